"""GA-RPN as a model: mmdetection's key layout, checkpoint conversion, the RPN-only detector, the
drop-in proposal head of the two-stage models, and proposal recall (AR) evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instseg.config.presets import get_preset
from instseg.modeling.zoo import build_model
from tests.golden_utils import GOLDEN
from tests.models.tiny import tiny_batch, tiny_config

# mmdet 3.3.0 GARPNHead (ga_rpn_head.py + guided_anchor_head.py) with in = feat = 64 channels:
# rpn_conv 3x3, conv_loc 1x1 -> 1, conv_shape 1x1 -> 2 (one anchor per location),
# FeatureAdaption: conv_offset 1x1 2 -> 4 groups x 18 (no bias), conv_adaption = mmcv DeformConv2d
# 3x3 (weight only), MaskedConv2d conv_cls 1x1 -> 1 (sigmoid, 1 class) and conv_reg 1x1 -> 4.
GA_HEAD_KEYS = {
    "rpn_conv.weight": (64, 64, 3, 3),
    "rpn_conv.bias": (64,),
    "conv_loc.weight": (1, 64, 1, 1),
    "conv_loc.bias": (1,),
    "conv_shape.weight": (2, 64, 1, 1),
    "conv_shape.bias": (2,),
    "feature_adaption.conv_offset.weight": (72, 2, 1, 1),
    "feature_adaption.conv_adaption.weight": (64, 64, 3, 3),
    "conv_cls.weight": (1, 64, 1, 1),
    "conv_cls.bias": (1,),
    "conv_reg.weight": (4, 64, 1, 1),
    "conv_reg.bias": (4,),
}
GOLDEN_MASK_RCNN = GOLDEN / "mask-rcnn_r18_fpn_c64_shapes.pth"


def _backbone_neck_reference() -> dict[str, torch.Tensor]:
    """ResNet-18 + FPN(64) tensors under mmdet's names: from the golden mmdet Mask R-CNN checkpoint
    (same backbone and neck as the golden GA-RPN config) when present, else from the Mask R-CNN
    parity preset (whose key layout the golden parity tests pin)."""
    if GOLDEN_MASK_RCNN.is_file():
        state = torch.load(GOLDEN_MASK_RCNN, map_location="cpu", weights_only=False)["state_dict"]
    else:
        state = build_model(get_preset("mask_rcnn_r18_fpn_c64_shapes").model).state_dict()
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "neck."))}


def test_ga_rpn_shapes_preset_has_mmdet_key_layout():
    cfg = get_preset("ga_rpn_r18_fpn_c64_shapes")
    state = build_model(cfg.model).state_dict()
    expected = {k: tuple(v.shape) for k, v in _backbone_neck_reference().items()}
    # mmdet's RPN detector keeps its head under ``bbox_head.``
    expected.update({f"bbox_head.{k}": s for k, s in GA_HEAD_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # the golden config's test settings
    head = build_model(cfg.model).rpn_head
    assert (head.test_proposals.pre_nms, head.nms_post, head.test_proposals.post_nms) == (2000, 1000, 1000)
    assert head.test_proposals.nms_iou == 0.7 and head.test_proposals.min_size == 0
    assert head.loc_filter_thr == 0.01 and head.anchor_coder.stds == (0.07, 0.07, 0.14, 0.14)
    assert head.bbox_coder.stds == (0.07, 0.07, 0.11, 0.11)
    assert head.approx_generator.scales == pytest.approx([8.0, 8 * 2 ** (1 / 3), 8 * 2 ** (2 / 3)])
    assert head.approx_generator.ratios == [0.5, 1.0, 2.0] and head.square_generator.scales == [8.0]
    assert list(head.square_generator.strides) == [4, 8, 16, 32, 64]
    assert cfg.data.scale == (512, 512) and cfg.data.size_divisor == 32


def test_fake_mmdet_ga_rpn_checkpoint_converts_with_every_key(tmp_path):
    from instseg.convert.mmdet import main as convert_main
    from instseg.engine.checkpoint import load_model_from_checkpoint

    g = torch.Generator().manual_seed(0)
    state = dict(_backbone_neck_reference())
    state.update({f"bbox_head.{k}": torch.randn(*s, generator=g) for k, s in GA_HEAD_KEYS.items()})
    meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": ("disk", "box", "triangle", "ring", "cross")}}
    src = tmp_path / "ga_rpn.pth"
    torch.save({"state_dict": state, "meta": meta}, src)
    out = tmp_path / "ga_rpn.pt"
    assert convert_main([str(src), "--config", "ga_rpn_r18_fpn_c64_shapes.py", "--out", str(out)]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert set(ckpt["model"]) == set(state)  # every key used, none added
    model, _, _ = load_model_from_checkpoint(out, "cpu")
    loaded = model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v.float() if v.is_floating_point() else v)


def test_two_stage_ga_rpn_uses_mmdet_rpn_head_names():
    cfg = tiny_config("mask_rcnn", rpn="ga_rpn")
    keys = {k[len("rpn_head."):] for k in build_model(cfg).state_dict() if k.startswith("rpn_head.")}
    assert keys == set(GA_HEAD_KEYS)


@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn", "htc"])
def test_tiny_ga_rpn_two_stage_trains_one_step_and_predicts(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, rpn="ga_rpn"))
    batch, targets = tiny_batch()
    model.train()
    losses = model(batch, targets)
    for name in ("loss_rpn_cls", "loss_rpn_bbox", "loss_anchor_shape", "loss_anchor_loc"):
        assert torch.isfinite(losses[name]), name
    if arch != "mask_rcnn":
        return  # the drop-in builds and trains; one full step is enough for the slowest part of the suite
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.rpn_head.feature_adaption.conv_adaption.weight.detach().clone()
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert not torch.equal(before, model.rpn_head.feature_adaption.conv_adaption.weight)
    model.eval()
    dets = model.predict(batch)
    assert len(dets) == 2 and all(d.masks is not None and len(d) <= 100 for d in dets)


def test_rpn_only_detector_returns_proposals_in_the_original_frame():
    cfg = tiny_config("mask_rcnn", rpn="ga_rpn")
    cfg.arch = "rpn"
    model = build_model(cfg).eval()
    batch, _ = tiny_batch()
    boxes, scores = model.predict_proposals(batch)
    dets = model.predict(batch)
    for i, d in enumerate(dets):
        torch.testing.assert_close(d.boxes, boxes[i] / batch.scale_factors[i].repeat(2)[None])
        torch.testing.assert_close(d.scores, scores[i])
        assert d.masks is None and torch.all(d.labels == 0)
        assert len(d) <= cfg.rpn_test_post_nms
        assert torch.all(d.scores[:-1] >= d.scores[1:])
    # the inference speed-ups (BN folding, channels-last) reach the masked heads unchanged
    with torch.no_grad():
        model.rpn_head.conv_loc.bias.fill_(0.0)  # keep sigmoid(loc) away from the 0.01 filter threshold
        logits, rest = model.rpn_head(model.extract_feats(batch.images))
        model.optimize_for_inference()
        logits2, rest2 = model.rpn_head(model.extract_feats(batch.images))
    for a, b in zip(logits + rest.deltas + rest.locs, logits2 + rest2.deltas + rest2.locs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- recall
def _coco(tmp_path, boxes_per_image):
    from pycocotools.coco import COCO

    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 200, "width": 300})
        for b in boxes:
            x1, y1, x2, y2 = b
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 7, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "x"}]}))
    return COCO(str(path))


def test_recall_of_proposals_equal_to_ground_truth_is_one(tmp_path):
    from instseg.evaluation.proposals import evaluate_proposal_predictions

    gts = [[[10, 10, 30, 30], [50, 60, 150, 160], [0, 0, 60, 50]], [[100, 20, 290, 190]]]
    coco = _coco(tmp_path, gts)
    preds = [(i + 1, np.array(b, dtype=np.float32), np.linspace(1, 0.5, len(b))) for i, b in enumerate(gts)]
    m = evaluate_proposal_predictions(coco, preds, out_dir=tmp_path / "ev", verbose=False)
    for k in ("AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
              "fast_AR@100", "fast_AR@300", "fast_AR@1000"):
        assert m[k] == pytest.approx(1.0), k
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["AR@1000"] == pytest.approx(1.0)


def test_recall_counts_only_the_top_n_proposals(tmp_path):
    from instseg.evaluation.proposals import evaluate_proposal_predictions

    gts = [[[10, 10, 40, 40], [100, 100, 160, 150]]]
    coco = _coco(tmp_path, gts)
    junk = np.tile(np.array([[200.0, 0, 210, 10]]), (150, 1))  # 150 misses scored above the second object
    boxes = np.concatenate([np.array([gts[0][0]], dtype=np.float32), junk, np.array([gts[0][1]], dtype=np.float32)])
    scores = np.linspace(1.0, 0.1, len(boxes))
    m = evaluate_proposal_predictions(coco, [(1, boxes, scores)], verbose=False)
    assert m["AR@100"] == pytest.approx(0.5) and m["AR@300"] == pytest.approx(1.0)
    assert m["fast_AR@100"] == pytest.approx(0.5) and m["fast_AR@300"] == pytest.approx(1.0)
    # a box of IoU 0.72 with its object counts at thresholds 0.50 .. 0.70: 5 of 10
    shifted = np.array([[10.0, 10, 40, 40], [100, 100, 160, 150]])
    shifted[1] = [100, 100, 160, 150 - 14]  # IoU = 36 / 50 = 0.72
    m = evaluate_proposal_predictions(coco, [(1, shifted, np.array([0.9, 0.8]))], verbose=False)
    assert m["AR@1000"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["fast_AR@1000"] == pytest.approx((1.0 + 0.5) / 2)


def test_cli_eval_reports_recall_for_an_rpn_model(tmp_path, write_coco, capsys):
    from instseg.cli import main as cli_main

    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(2):
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": 64, "width": 80})
        for _ in range(3):
            x, y = rng.integers(0, 40, 2).tolist()
            w, h = rng.integers(10, 30, 2).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 3, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    ann, image_dir = write_coco(images, anns, [{"id": 3, "name": "thing"}])
    sets = ["model.arch=rpn", "model.rpn=ga_rpn", "model.backbone=resnet18", "model.fpn_channels=32",
            "model.num_classes=1", "data.scale=[80,64]", "data.batch_size=2", "train.max_iters=1",
            "train.device=cpu", "train.eval_interval=0", "train.warmup_iters=1", f"train.output_dir={tmp_path / 'runs'}"]
    rc = cli_main(["train", "--config", "mask_rcnn_r50_fpn_1x_coco", "--name", "garpn", "--train-ann", str(ann),
                   "--train-images", str(image_dir), "--val-ann", str(ann), "--val-images", str(image_dir), "--set", *sets])
    assert rc == 0
    ckpt = tmp_path / "runs" / "garpn" / "checkpoints" / "last.pt"
    capsys.readouterr()
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--ann", str(ann), "--images", str(image_dir),
                   "--out", str(tmp_path / "ev")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "AR (COCOeval)" in out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in ("AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000", "fast_AR@1000"):
        assert k in metrics
    assert 0.0 <= metrics["AR@1000"] <= 1.0


def test_unknown_proposal_head_or_loc_mode_is_a_config_error():
    cfg = tiny_config("mask_rcnn", rpn="ga_rpm")
    with pytest.raises(ValueError, match="model.rpn"):
        build_model(cfg)
    cfg = tiny_config("mask_rcnn", rpn="ga_rpn")
    cfg.ga_rpn.loc_loss_mode = "inverted"
    with pytest.raises(ValueError, match="loc_loss_mode"):
        build_model(cfg)
