"""FishNet as a detector backbone: the zoo names, weights from a file, the HTC preset, and a tiny
HTC on FishNet-99 through one loss step and a prediction (small inputs, so it stays cheap)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from instseg.config.presets import get_preset
from instseg.modeling.backbones.fishnet import FishNet
from instseg.modeling.zoo import build_backbone, build_model
from instseg.structures import CroppedMasks, ImageBatch, ImageTargets
from tests.models.tiny import tiny_config


def _small_batch() -> tuple[ImageBatch, list[ImageTargets]]:
    """Two 64x96 inputs (one padded), one with two objects and one empty."""
    g = torch.Generator().manual_seed(0)
    batch = ImageBatch(
        images=torch.randn(2, 3, 64, 96, generator=g),
        image_sizes=[(64, 90), (60, 96)],
        original_sizes=[(128, 180), (60, 96)],
        scale_factors=torch.tensor([[0.5, 0.5], [1.0, 1.0]]),
        image_ids=[1, 2],
    )
    full = torch.zeros(2, 64, 90, dtype=torch.uint8)
    full[0, 8:40, 10:50] = 1
    full[1, 30:60, 55:85] = 1
    masks = CroppedMasks.from_full(full)
    semantic = torch.randint(0, 6, (64, 96), generator=g)
    semantic[:, 90:] = 255
    objects = ImageTargets(masks.boxes(), torch.tensor([0, 2]), masks, semantic)
    empty = ImageTargets(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), CroppedMasks.empty((60, 96)),
        torch.full((64, 96), 255, dtype=torch.int64),
    )
    return batch, [objects, empty]


def test_tiny_htc_on_fishnet99_trains_and_predicts():
    torch.manual_seed(0)
    cfg = tiny_config("htc", backbone="fishnet99", rpn_train_pre_nms=100, rpn_train_post_nms=50,
                      rpn_test_pre_nms=100, rpn_test_post_nms=50, rcnn_batch_per_image=32)
    model = build_model(cfg).train()
    assert isinstance(model.backbone, FishNet) and model.backbone.depth == 99
    assert [c.conv.in_channels for c in model.neck.lateral_convs] == [320, 832, 1600, 2112]
    batch, targets = _small_batch()
    losses = model(batch, targets)
    assert torch.isfinite(losses["loss"]) and "loss_semantic_seg" in losses
    losses["loss"].backward()
    backbone = dict(model.backbone.named_parameters())
    frozen = [n for n, p in backbone.items() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1.", "conv2.", "conv3.", "fish.fish.0.")) for n in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    dets = model.predict(batch)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.original_sizes):
        assert d.boxes.shape[1] == 4 and d.masks.shape == (len(d), h, w)


def test_zoo_names_weights_file_and_errors(tmp_path):
    cfg = tiny_config("mask_rcnn", backbone="fishnet99")
    ref = FishNet(depth=99, with_classifier=True)
    path = tmp_path / "fishnet99_ckpt.tar"  # official layout: DataParallel prefix, classifier included
    torch.save({"epoch": 1, "arch": "fishnet99", "best_prec1": 0.0,
                "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    cfg.backbone_weights = str(path)
    backbone = build_backbone(cfg)
    assert isinstance(backbone, FishNet) and not backbone.with_classifier
    assert torch.equal(backbone.state_dict()["fish.fish.9.1.3.conv3.weight"], ref.state_dict()["fish.fish.9.1.3.conv3.weight"])
    with pytest.raises(ValueError, match="fishnet99, fishnet150, fishnet201"):
        build_backbone(dataclasses.replace(cfg, backbone="fishnet188"))
    with pytest.raises(ValueError, match="not bundled"):
        build_backbone(dataclasses.replace(cfg, backbone="fishnet150", backbone_weights="imagenet"))


def test_htc_fishnet150_preset_is_the_r50_20e_preset_on_fishnet150():
    fish = get_preset("htc_fishnet150_fpn_20e_coco")
    r50 = get_preset("htc_r50_fpn_20e_coco")
    assert fish.model.backbone == "fishnet150" and fish.model.backbone_weights == ""
    assert dataclasses.replace(fish.model, backbone=r50.model.backbone) == r50.model
    assert fish.data == r50.data and fish.train == r50.train
