"""Every architecture: a loss step with backward, prediction, shapes and empty-target images."""

from __future__ import annotations

import pytest
import torch

from instseg.modeling.zoo import build_model
from tests.models.tiny import ARCH_PRESETS, tiny_batch, tiny_config

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCH_PRESETS))
def test_loss_backward_and_predict(arch, device):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).to(device).train()
    batch, targets = tiny_batch(device)
    losses = model(batch, targets)
    assert torch.isfinite(losses["loss"])
    summed = sum(v for k, v in losses.items() if "loss" in k and k != "loss")
    torch.testing.assert_close(losses["loss"], summed)
    losses["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), "every trainable parameter gets a gradient"
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    model.eval()
    dets = model.predict(batch)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.original_sizes):
        assert d.boxes.shape[1] == 4 and d.scores.shape == d.labels.shape == (len(d),)
        assert d.masks.shape == (len(d), h, w) and d.masks.dtype == torch.bool
        assert len(d) <= model.roi_head.max_per_img
        if len(d):
            assert d.labels.min() >= 0 and d.labels.max() < 4
            assert (d.scores[:-1] >= d.scores[1:]).all()


@pytest.mark.parametrize("arch", list(ARCH_PRESETS))
def test_loss_names(arch):
    model = build_model(tiny_config(arch)).train()
    batch, targets = tiny_batch()
    names = set(model(batch, targets))
    if arch == "mask_rcnn":
        assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc"} <= names
    else:
        for t in range(3):
            assert {f"s{t}.loss_cls", f"s{t}.loss_bbox", f"s{t}.loss_mask", f"s{t}.acc"} <= names
    assert ("loss_semantic_seg" in names) == (arch == "htc")


def test_only_empty_images_give_zero_box_and_mask_regression():
    """Images without objects: no positives, so box regression and mask losses are exactly zero."""
    model = build_model(tiny_config("htc")).train()
    batch, targets = tiny_batch()
    losses = model(batch, [targets[1], targets[1]])
    for t in range(3):
        assert float(losses[f"s{t}.loss_bbox"]) == 0.0
        assert float(losses[f"s{t}.loss_mask"]) == 0.0
        assert float(losses[f"s{t}.loss_cls"]) > 0.0
    assert float(losses["loss_rpn_bbox"]) == 0.0
    losses["loss"].backward()


def test_predict_maps_boxes_to_original_frame():
    model = build_model(tiny_config("mask_rcnn", score_thr=0.0)).eval()
    batch, _ = tiny_batch()
    raw = model.predict_raw(batch)
    dets = model.predict(batch)
    # image 0 was downscaled by 2: original-frame boxes are twice the input-frame boxes
    torch.testing.assert_close(dets[0].boxes, raw.roi[0].boxes * 2)
    torch.testing.assert_close(dets[1].boxes, raw.roi[1].boxes)
