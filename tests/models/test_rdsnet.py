"""RDSNet pinned by definitions (no reference outputs exist: the official code needs compiled
CUDA ops): mmdet-v1 "+1" geometry, the correlation as a per-object convolution, the expanded crop
(ignored outside, background inside), OHEM at 1:1, the object filters, one training step and
inference in the original frame, the official checkpoint layout, and MBRM's second training stage
through the trainer."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from instseg.config.schema import Config, ModelConfig
from instseg.modeling.dense_heads import rdsnet as rds
from instseg.modeling.dense_heads.dense import AnchorTargets
from instseg.modeling.dense_heads.rdsnet import (
    RDSNetMaskLogic,
    RDSNetOutputs,
    RDSNetSettings,
    V1AnchorGenerator,
    correlate,
    expanded_box_mask,
    ohem_mask_loss,
)
from instseg.modeling.refiners.mbrm import OFFICIAL_WEIGHT
from instseg.modeling.zoo import build_model
from instseg.ops.anchors import AnchorGenerator
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.boxes import box_iou
from instseg.structures import CroppedMasks, ImageBatch, ImageTargets

from .tiny import tiny_batch


def tiny_rdsnet(**rd) -> ModelConfig:
    cfg = ModelConfig(arch="rdsnet", backbone="resnet18", num_classes=4, fpn_channels=32,
                      anchor_strides=(8, 16, 32, 64, 128), mask_thr=0.4)
    cfg.rdsnet.feat_channels = 32
    cfg.rdsnet.pixel_channels = 32
    cfg.rdsnet.norm_groups = 8
    for k, v in rd.items():
        setattr(cfg.rdsnet, k, v)
    return cfg


# ----------------------------------------------------------------------------------- v1 geometry
def test_v1_anchors_are_rounded_around_stride_minus_one_over_two():
    gen = V1AnchorGenerator(strides=(8, 16), ratios=(0.5, 1.0, 2.0), scales=(4.0, 4.0 * 2 ** (1 / 3)))
    base = gen.base_anchors[0]  # exclusive boxes (v1 + 1 on x2, y2)
    # ratio 1, scale 4 at stride 8: centre 3.5, half extent (32 - 1) / 2 -> v1 [-12, -12, 19, 19]
    assert base[2].tolist() == [-12.0, -12.0, 20.0, 20.0]
    # ratio 0.5 (h / w), scale 4: w = 45.25, h = 22.63 -> v1 round(3.5 -+ 22.13), round(3.5 -+ 10.81)
    assert base[0].tolist() == [-19.0, -7.0, 27.0, 15.0]
    assert torch.equal(base, base.round())
    # unrounded, the v1 boxes + 1 are the plain generator centred at stride / 2
    plain = AnchorGenerator(strides=(8, 16), ratios=(0.5, 1.0, 2.0), scales=(4.0, 4.0 * 2 ** (1 / 3)),
                            centers=[(4.0, 4.0), (8.0, 8.0)])
    assert (plain.base_anchors[0] - base).abs().max() <= 0.5
    grid = gen.grid_anchors([(2, 3)], torch.device("cpu"))[0]
    assert grid.shape == (2 * 3 * 6, 4)
    torch.testing.assert_close(grid[6] - grid[0], torch.tensor([8.0, 0.0, 8.0, 0.0]))  # next cell to the right
    torch.testing.assert_close(grid[18] - grid[0], torch.tensor([0.0, 8.0, 0.0, 8.0]))  # next row


def _v1_bbox2delta(p, g):
    px, py = (p[:, 0] + p[:, 2]) * 0.5, (p[:, 1] + p[:, 3]) * 0.5
    pw, ph = p[:, 2] - p[:, 0] + 1.0, p[:, 3] - p[:, 1] + 1.0
    gx, gy = (g[:, 0] + g[:, 2]) * 0.5, (g[:, 1] + g[:, 3]) * 0.5
    gw, gh = g[:, 2] - g[:, 0] + 1.0, g[:, 3] - g[:, 1] + 1.0
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)


def _v1_delta2bbox(r, d, max_shape):
    px, py = (r[:, 0] + r[:, 2]) * 0.5, (r[:, 1] + r[:, 3]) * 0.5
    pw, ph = r[:, 2] - r[:, 0] + 1.0, r[:, 3] - r[:, 1] + 1.0
    clip = abs(math.log(16 / 1000))
    gw, gh = pw * d[:, 2].clamp(-clip, clip).exp(), ph * d[:, 3].clamp(-clip, clip).exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    x1, y1, x2, y2 = gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5, gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5
    h, w = max_shape
    return torch.stack([x1.clamp(0, w - 1), y1.clamp(0, h - 1), x2.clamp(0, w - 1), y2.clamp(0, h - 1)], dim=1)


def _v1_iou(a, b):
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    iw = (torch.min(a[:, None, 2], b[None, :, 2]) - torch.max(a[:, None, 0], b[None, :, 0]) + 1).clamp(min=0)
    ih = (torch.min(a[:, None, 3], b[None, :, 3]) - torch.max(a[:, None, 1], b[None, :, 1]) + 1).clamp(min=0)
    inter = iw * ih
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_v1_plus_one_formulas_are_the_plain_ones_on_exclusive_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    a_v1 = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 60], 1).round()
    xy = torch.rand(50, 2, generator=g) * 100
    g_v1 = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 60], 1)
    coder = DeltaXYWHCoder()
    torch.testing.assert_close(coder.encode(rds.from_v1(a_v1), rds.from_v1(g_v1)), _v1_bbox2delta(a_v1, g_v1))
    torch.testing.assert_close(box_iou(rds.from_v1(a_v1), rds.from_v1(g_v1)), _v1_iou(a_v1, g_v1))
    deltas = torch.randn(50, 4, generator=g) * 0.5
    head = build_model(tiny_rdsnet()).bbox_head
    torch.testing.assert_close(head.decode_v1(rds.from_v1(a_v1), deltas, (120, 150)), _v1_delta2bbox(a_v1, deltas, (120, 150)))


# ----------------------------------------------------------------------------------- correlation
def test_correlation_is_one_matmul_equal_to_a_per_object_convolution():
    g = torch.Generator().manual_seed(0)
    d, n = 32, 5
    pixel = torch.randn(d, 12, 17, generator=g)
    reps = torch.randn(n, 2 * d, generator=g)
    logits = correlate(pixel, reps)
    assert logits.shape == (n, 2, 12, 17)
    for j in range(n):
        kernels = reps[j].view(2, d, 1, 1)  # first d: background kernel, next d: foreground
        torch.testing.assert_close(logits[j], F.conv2d(pixel[None], kernels)[0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- cropping
def test_expanded_crop_is_the_official_sanitize():
    # v1 box [4, 2, 11, 5]: pad_x = 0.25 * 8 = 2 -> [2, 13); pad_y = max(0.25 * 4, 1) = 1 -> [1, 6)
    m = expanded_box_mask(torch.tensor([[4.0, 2.0, 11.0, 5.0]]), (10, 20), 0.25)[0]
    expected = torch.zeros(10, 20, dtype=torch.bool)
    expected[1:6, 2:13] = True
    assert torch.equal(m, expected)
    # fractional ends truncate; at least 1 px; clamped to the frame; corners given in any order
    m = expanded_box_mask(torch.tensor([[17.5, 8.2, 3.0, 0.4]]), (10, 20), 0.1)[0]
    # x: [3, 17.5] pad 1.55 -> [1.45, 19.05] -> [1, 19); y: [0.4, 8.2] pad max(0.88, 1) -> [0, 9.2] -> [0, 9)
    expected = torch.zeros(10, 20, dtype=torch.bool)
    expected[0:9, 1:19] = True
    assert torch.equal(m, expected)


def _one_object_problem(ohem_ratio: float):
    """One image 64 x 64 (stride-4 map 16 x 16), one positive anchor on a 24 x 16 px object."""
    d = 4
    logic = RDSNetMaskLogic(RDSNetSettings(ohem_ratio=ohem_ratio, min_mask_area=100))
    full = torch.zeros(1, 64, 64, dtype=torch.uint8)
    full[0, 16:32, 16:40] = 1
    masks = CroppedMasks.from_full(full)
    targets = [ImageTargets(masks.boxes(), torch.tensor([0]), masks)]
    batch = ImageBatch(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64)], torch.ones(1, 2))
    reps = torch.zeros(1, 1, 2 * d)
    reps[0, 0, d] = 1.0  # background kernel 0, foreground kernel e0: fg logit = pixel channel 0
    pixel = (torch.randn(1, d, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_()
    out = RDSNetOutputs(cls=torch.zeros(1, 1, 1), reg=torch.zeros(1, 1, 4), sizes=[(1, 1)], reps=reps)
    assigned = [AnchorTargets(torch.tensor([0]), torch.tensor([0]))]
    return logic, out, pixel, batch, targets, assigned


def test_outside_the_expanded_gt_box_is_ignored_inside_it_background():
    logic, out, pixel, batch, targets, assigned = _one_object_problem(ohem_ratio=0.0)
    loss = logic.loss(out, pixel, batch, targets, assigned)
    loss.backward()
    grad = pixel.grad[0, 0]
    # v1 gt [16, 16, 39, 31] / 4 = [4, 4, 9.75, 7.75], + 0.25 (w + 1) per side, truncated: cols 2..10, rows 2..7
    crop = torch.zeros(16, 16, dtype=torch.bool)
    crop[2:8, 2:11] = True
    fg = torch.zeros(16, 16, dtype=torch.bool)
    fg[4:8, 4:10] = True  # the gt at stride 4 (bilinear, > 0.5)
    assert (grad[~crop] == 0).all()  # ignored: no gradient at all
    assert (grad[crop & ~fg] > 0).all()  # background inside the crop: pushes the fg logit down
    assert (grad[fg] < 0).all()
    # the loss is sum / (#pixels + 1) per object, then / (#objects + 1)
    with torch.no_grad():
        logits = correlate(pixel[0], out.reps[0])
        ce = F.cross_entropy(logits, fg.long()[None], reduction="none")[0]
        expected = ce[crop].sum() / (crop.sum() + 1) / 2
    torch.testing.assert_close(loss.detach(), expected)


def test_objects_with_small_masks_are_dropped_and_at_most_masks_to_train_kept(monkeypatch):
    seen = []
    real = rds.ohem_mask_loss
    monkeypatch.setattr(rds, "ohem_mask_loss", lambda logits, t, r: seen.append(logits.shape[0]) or real(logits, t, r))
    logic, out, pixel, batch, targets, _ = _one_object_problem(ohem_ratio=1.0)
    many = [AnchorTargets(torch.zeros(250, dtype=torch.long), torch.zeros(250, dtype=torch.long))]
    out.reps = out.reps.expand(1, 250, -1)
    logic.loss(out, pixel, batch, targets, many)
    assert seen == [100]  # 250 positives on one object -> 100 sampled
    logic.settings.min_mask_area = 384.0  # the object has exactly 24 x 16 = 384 px: dropped (<= 100 rule)
    loss = logic.loss(out, pixel, batch, targets, many)
    assert seen == [100] and float(loss.detach()) == 0.0


def test_ohem_keeps_exactly_as_many_background_pixels_as_foreground():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 12, 12, generator=g)
    target = torch.full((3, 12, 12), -1, dtype=torch.long)
    target[:, 2:10, 2:10] = 0  # 64 pixels inside the crop
    target[0, 4:6, 4:7] = 1  # 6 fg
    target[1, 3:9, 3:9] = 1  # 36 fg, 28 bg: fewer bg than fg -> all bg kept
    target[2, 5, 5] = 1  # 1 fg
    loss, kept = ohem_mask_loss(logits, target, 1.0)
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    for j, (nfg, nbg) in enumerate([(6, 6), (36, 28), (1, 1)]):
        fg, bg = target[j] == 1, target[j] == 0
        assert int((kept[j] & fg).sum()) == nfg and int((kept[j] & bg).sum()) == nbg
        assert not (kept[j] & (target[j] == -1)).any()
        if nbg < int(bg.sum()):  # the kept background pixels are the hardest ones
            assert ce[j][kept[j] & bg].min() >= ce[j][~kept[j] & bg].max()
        torch.testing.assert_close(loss[j], ce[j][kept[j]].sum() / (kept[j].sum() + 1))


def test_test_time_probabilities_follow_the_official_order():
    """Upsample the 2-channel logits to the image padded to 32 (align_corners=False), cut to the
    image, resize to the original size (align_corners=True), softmax, times the 1.2x box."""
    g = torch.Generator().manual_seed(0)
    logic = RDSNetMaskLogic(RDSNetSettings())
    pixel = torch.randn(8, 16, 32, generator=g)  # batch padded to 64 x 128, stride 4
    batch = ImageBatch(torch.zeros(1, 3, 64, 128), [(60, 70)], [(120, 140)], torch.full((1, 2), 0.5))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 5.0, 140.0, 50.0]])
    dets = rds.RDSNetDetections(boxes, torch.ones(2), torch.zeros(2, dtype=torch.long), torch.randn(2, 16, generator=g))
    (sl, probs), = list(logic.iter_probs(pixel, dets, batch, 0))
    logits = correlate(pixel[:, :16, :24], dets.reps)  # the image padded to 32 is 64 x 96: 16 x 24 cells
    up = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)[:, :, :60, :70]
    up = F.interpolate(up, size=(120, 140), mode="bilinear", align_corners=True)
    expected = up.softmax(dim=1)[:, 1] * expanded_box_mask(rds.to_v1(boxes), (120, 140), 0.1)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    masks, same = logic.predict_masks(pixel, dets, batch, 0)
    assert torch.equal(masks, probs > 0.4) and torch.equal(same, boxes)


# ----------------------------------------------------------------------------------- whole model
def test_tiny_rdsnet_trains_a_step_and_predicts_in_the_original_frame():
    torch.manual_seed(0)
    model = build_model(tiny_rdsnet(min_mask_area=10.0)).train()
    assert not any(p.requires_grad for p in model.mbrm.parameters())  # stage 1: MBRM keeps its kernel
    batch, targets = tiny_batch()  # the second image has no objects
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = model(batch, targets)
    assert set(losses) == {"loss", "loss_cls", "loss_bbox", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.mask_head.conv_reps.weight.grad.abs().sum() > 0 and model.bbox_head.retina_rep.weight.grad.abs().sum() > 0
    opt.step()
    empty = [ImageTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), CroppedMasks.empty((120, 160)))] * 2
    losses = model(batch, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()

    model.eval()
    model.bbox_head.test.score_thr = 0.0  # keep candidates despite the 0.01 prior
    model.bbox_head.test.max_per_img = 30  # (cheaper; the cap is checked below)
    dets = model.predict(batch)
    assert [tuple(d.masks.shape[1:]) for d in dets] == [(240, 320), (128, 150)]
    for d, (h, w) in zip(dets, batch.original_sizes):
        assert 0 < len(d) <= 30 and d.masks.dtype == torch.bool
        assert d.boxes.min() >= 0 and d.boxes[:, 0::2].max() <= w and d.boxes[:, 1::2].max() <= h
        # masks live inside the 1.2x predicted box (v1 coordinates: x2 - 1)
        crop = expanded_box_mask(rds.to_v1(d.boxes), (h, w), 0.1)
        assert not (d.masks & ~crop).any()
    model.refine = True
    refined = model.predict(batch)
    for a, b in zip(dets, refined):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.masks, b.masks)  # MBRM only moves boxes
        assert torch.equal(b.boxes, b.boxes.round())


def test_official_checkpoint_converts_with_every_key(tmp_path):
    """A state dict written under the official (mmdet v1) module names, without ``mbrm.*`` (the
    refine configs share the plain checkpoint), converts and loads strictly."""
    from instseg.config.presets import get_preset
    from instseg.convert.mmdet import ConversionError
    from instseg.convert.rdsnet import convert_checkpoint

    cfg = get_preset("rdsnet_refine_r50_fpn_1x")
    cfg.model.backbone, cfg.model.fpn_channels = "resnet18", 64  # small, same head layout
    cfg.model.rdsnet.feat_channels = cfg.model.rdsnet.pixel_channels = 64
    c, a, d = 64, 9, 32
    official = {}
    for tower in ("cls_convs", "reg_convs", "rep_convs"):
        for i in range(4):
            official[f"bbox_head.{tower}.{i}.conv.weight"] = torch.randn(c, c, 3, 3)
            official[f"bbox_head.{tower}.{i}.gn.weight"] = torch.randn(c)
            official[f"bbox_head.{tower}.{i}.gn.bias"] = torch.randn(c)
    for name, out_c in (("retina_cls", a * 80), ("retina_reg", a * 4), ("retina_rep", a * 2 * d)):
        official[f"bbox_head.{name}.weight"] = torch.randn(out_c, c, 3, 3)
        official[f"bbox_head.{name}.bias"] = torch.randn(out_c)
    for level, j in ((0, 0), (1, 0), (2, 0), (2, 2)):  # RdsMaskHead: conv, (up), conv, (up) per level
        official[f"mask_head.lateral_convs.{level}.{j}.conv.weight"] = torch.randn(c, c, 3, 3)
        official[f"mask_head.lateral_convs.{level}.{j}.gn.weight"] = torch.randn(c)
        official[f"mask_head.lateral_convs.{level}.{j}.gn.bias"] = torch.randn(c)
    official["mask_head.final_convs.0.0.conv.weight"] = torch.randn(c, c, 3, 3)
    official["mask_head.final_convs.0.0.gn.weight"] = torch.randn(c)
    official["mask_head.final_convs.0.0.gn.bias"] = torch.randn(c)
    official["mask_head.conv_reps.weight"] = torch.randn(d, c, 1, 1)
    official["mask_head.conv_reps.bias"] = torch.randn(d)
    model = build_model(cfg.model)
    for k, v in model.state_dict().items():  # backbone / FPN: mmdet's names (tested with the mmdet converter)
        if k.startswith(("backbone.", "neck.")):
            official[k] = torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
    path = tmp_path / "rdsnet_r50_fpn_1x.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}, "meta": {"mmdet_version": "1.0rc0+fbb9f3d"}}, path)
    ckpt = convert_checkpoint(path, cfg)
    assert set(ckpt["model"]) == set(official) | {"mbrm.weight", "mbrm.bias"}
    model.load_state_dict(ckpt["model"], strict=True)  # every key used, every shape right
    torch.testing.assert_close(model.mbrm.weight.view(-1), torch.tensor(OFFICIAL_WEIGHT))
    torch.testing.assert_close(model.mask_head.lateral_convs[2][2].gn.bias, official["mask_head.lateral_convs.2.2.gn.bias"])
    assert ckpt["classes"]["cat_ids"][:3] == [1, 2, 3] and ckpt["config"]["model"]["rdsnet"]["refine"] is True
    # what does not fit is named
    bad = dict(official)
    bad["bbox_head.cls_convs.0.conv.bias"] = torch.randn(c)
    bad.pop("mask_head.conv_reps.bias")
    torch.save({"state_dict": bad}, path)
    with pytest.raises(ConversionError, match=r"missing 1 keys.*conv_reps.bias.*unexpected 1 keys.*cls_convs.0.conv.bias.*bias='auto'"):
        convert_checkpoint(path, cfg)


# ----------------------------------------------------------------------------------- MBRM stage 2
def test_mbrm_second_stage_trains_only_the_kernel_through_the_trainer(tmp_path):
    from instseg.engine.checkpoint import load_checkpoint
    from instseg.engine.trainer import train

    from ..cli.test_engine import write_tiny_coco

    ann, images = write_tiny_coco(tmp_path / "data", n=4)
    cfg = Config(name="rds")
    cfg.model = tiny_rdsnet(min_mask_area=10.0, octave_base_scale=2.0)
    cfg.model.backbone_weights = ""
    d = cfg.data
    d.train_ann, d.train_images = str(ann), str(images)
    d.scale, d.batch_size = (64, 48), 2
    t = cfg.train
    t.device, t.threads, t.lr, t.warmup_iters, t.max_iters, t.log_interval = "cpu", 1, 0.01, 1, 1, 1
    first = train(cfg, run_dir=tmp_path / "stage1")
    stage1 = load_checkpoint(tmp_path / "stage1" / "checkpoints" / "last.pt")["model"]

    cfg2 = copy.deepcopy(cfg)
    cfg2.model.rdsnet.mbrm_train = True
    cfg2.model.rdsnet.mbrm_train_iou = 0.0  # the untrained model's boxes: match every detection
    cfg2.model.score_thr = 0.0
    cfg2.train.init_from = str(tmp_path / "stage1" / "checkpoints" / "last.pt")
    cfg2.train.max_iters, cfg2.train.lr = 2, 0.05
    second = train(cfg2, run_dir=tmp_path / "stage2")
    assert first["iter"] == 1 and second["iter"] == 2
    stage2 = load_checkpoint(tmp_path / "stage2" / "checkpoints" / "last.pt")["model"]
    changed = sorted(k for k in stage1 if not torch.equal(stage1[k], stage2[k]))
    assert changed == ["mbrm.bias", "mbrm.weight"]
    records = [json.loads(x) for x in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r.get("mode") == "train"]
    assert train_recs and all("loss_mbrm" in r and "loss_mask" not in r for r in train_recs)
    assert all(math.isfinite(r["loss_mbrm"]) and r["loss_mbrm"] > 0 for r in train_recs)


def test_every_official_config_name_is_a_preset():
    """The six configs of ``wangsr126/RDSNet`` (``configs/rdsnet``) resolve by their own names; the
    refine ones differ from their plain twin only by MBRM."""
    from instseg.config.presets import get_preset

    for plain, refine, two_x in (
        ("rdsnet_r50_fpn_1x", "rdsnet_refine_r50_fpn_1x", False),
        ("rdsnet_r101_fpn_1x", "rdsnet_refine_r101_fpn_1x", False),
        ("rdsnet_640_800_r101_fpn_2x", "rdsnet_640_800_refine_r101_fpn_2x", True),
    ):
        p, r = get_preset(plain), get_preset(refine)
        assert (p.model.rdsnet.refine, r.model.rdsnet.refine) == (False, True)
        r.model.rdsnet.refine, r.name = False, p.name
        assert r == p
        assert (p.train.epochs, p.data.train_short_range) == ((24, (640, 800)) if two_x else (12, (0, 0)))
