"""RetinaNet and YOLACT: definitions pinned by hand-checked cases, plus the mmdetection layouts.

Anchors at 550, the "less greedy" force-match order, the neutral band, crowd handling, OHEM
counts, the mask crop, empty images, degenerate boxes, and the parameter names / shapes that
mmdetection checkpoints of the golden configs must fit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instseg.config.presets import get_preset
from instseg.config.schema import ModelConfig
from instseg.modeling.dense_heads.dense import AnchorTargets
from instseg.modeling.dense_heads.yolact import crop_masks
from instseg.modeling.zoo import _yolact_cells, build_model
from instseg.ops.anchors import AnchorGenerator, YolactPriorGenerator
from instseg.ops.assigner import ForcedMatchAssigner, _less_greedy_pairs
from instseg.structures import CroppedMasks, ImageTargets

from .tiny import tiny_batch


# ----------------------------------------------------------------------------------- anchors
def test_official_priors_at_550_count_and_layout():
    sizes = [(c, c) for c in _yolact_cells(550)]
    assert [c for c, _ in sizes] == [69, 35, 18, 9, 5]
    gen = YolactPriorGenerator(scales=(24, 48, 96, 192, 384), aspect_ratios=(1, 0.5, 2), max_size=550, square=True)
    levels = gen.priors(sizes, torch.device("cpu"))
    assert [len(p) for p in levels] == [14283, 3675, 972, 243, 75]
    assert sum(len(p) for p in levels) == 19248
    p3 = levels[0]
    # cell (0, 0): centre (0.5 / 69, 0.5 / 69); shapes in the order ar = 1, 1/2, 2; square sides 24 sqrt(ar)
    torch.testing.assert_close(p3[:3, :2], torch.full((3, 2), 0.5 / 69))
    torch.testing.assert_close(p3[:3, 2] * 550, torch.tensor([24.0, 24 * math.sqrt(0.5), 24 * math.sqrt(2)]))
    assert torch.equal(p3[:, 2], p3[:, 3])
    # row-major: index 3 is the next cell to the right, index 69 * 3 the next row
    torch.testing.assert_close(p3[3, :2], torch.tensor([1.5 / 69, 0.5 / 69]))
    torch.testing.assert_close(p3[69 * 3, :2], torch.tensor([0.5 / 69, 1.5 / 69]))
    # each level doubles the side
    torch.testing.assert_close(levels[1][0, 2], 2 * p3[0, 2])
    # without the quirk, height = scale / sqrt(ar)
    free = YolactPriorGenerator(scales=(24,), aspect_ratios=(1, 0.5, 2), max_size=550, square=False)
    q = free.priors([(69, 69)], torch.device("cpu"))[0]
    torch.testing.assert_close(q[1, 3] * 550, torch.tensor(24 / math.sqrt(0.5)))


def test_mmdet_yolact_anchors_are_centred_and_not_square():
    cells = _yolact_cells(550)
    gen = AnchorGenerator(
        strides=[550 / c for c in cells], ratios=(0.5, 1.0, 2.0), scales=[3.0], base_sizes=[8, 16, 32, 64, 128],
        centers=[(550 * 0.5 / c, 550 * 0.5 / c) for c in cells],
    )
    a = gen.grid_anchors([(c, c) for c in cells], torch.device("cpu"))
    assert sum(len(x) for x in a) == 19248
    first = a[0][:3]
    cx = (first[:, 0] + first[:, 2]) / 2
    torch.testing.assert_close(cx, torch.full((3,), 550 * 0.5 / 69))
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    # ratio h / w = 0.5, 1, 2 with base 8 x scale 3 = 24
    torch.testing.assert_close(w, torch.tensor([24 / math.sqrt(0.5), 24.0, 24 / math.sqrt(2)]))
    torch.testing.assert_close(h, torch.tensor([24 * math.sqrt(0.5), 24.0, 24 * math.sqrt(2)]))


# ----------------------------------------------------------------------------------- matching
def _official_loop(overlaps: torch.Tensor) -> list[tuple[int, int]]:
    """The official loop, verbatim in behaviour: G full max passes."""
    ov = overlaps.clone()
    pairs = []
    for _ in range(ov.shape[0]):
        best_prior_overlap, best_prior_idx = ov.max(1)
        j = int(best_prior_overlap.max(0)[1])
        i = int(best_prior_idx[j])
        ov[:, i] = -1
        ov[j, :] = -1
        pairs.append((j, i))
    return pairs


@pytest.mark.parametrize("seed", range(8))
def test_less_greedy_pairs_equal_the_official_loop(seed):
    g = torch.Generator().manual_seed(seed)
    ov = torch.rand(7, 40, generator=g)
    ov[ov < 0.6] = 0  # sparse, many rows sharing best columns
    assert _less_greedy_pairs(ov) == _official_loop(ov)


def test_force_match_takes_the_globally_best_pair_first():
    # both gts prefer anchor 0; gt 1 overlaps it more, so gt 1 gets it and gt 0 its second best
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 14], [30, 30, 40, 40]], dtype=torch.float32)
    gts = torch.tensor([[0, 0, 10, 16], [0, 0, 10, 11]], dtype=torch.float32)
    res = ForcedMatchAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4).assign(anchors, gts, torch.tensor([3, 4]))
    assert res.gt_inds.tolist() == [2, 1, 0]
    assert res.max_overlaps[:2].tolist() == [2.0, 2.0]
    assert res.labels.tolist() == [4, 3, -1]


def test_neutral_band_and_crowd():
    gt = torch.tensor([[0, 0, 100, 100]], dtype=torch.float32)
    anchors = torch.tensor(
        [
            [0, 0, 100, 100],  # 1.0 -> positive (also the forced match)
            [0, 0, 100, 55],  # 0.55 -> positive
            [0, 0, 100, 45],  # 0.45 -> neutral
            [0, 0, 100, 30],  # 0.30 -> background
            [200, 200, 240, 240],  # 0 -> background, but inside a crowd box -> neutral
            [300, 300, 340, 340],  # 0, crowd overlap 0.5 of its area -> stays background
        ],
        dtype=torch.float32,
    )
    crowd = torch.tensor([[190, 190, 260, 260], [320, 300, 400, 400]], dtype=torch.float32)
    res = ForcedMatchAssigner(crowd_iof_thr=0.7).assign(anchors, gt, torch.tensor([0]), crowd)
    assert res.gt_inds.tolist() == [1, 1, -1, 0, -1, 0]


# ----------------------------------------------------------------------------------- losses
def _yolact(flavor: str, **kw):
    cfg = ModelConfig(arch="yolact", backbone="resnet18", num_classes=4, fpn_channels=32, **kw)
    cfg.yolact.flavor = flavor
    cfg.yolact.head_channels = cfg.yolact.proto_channels = 32
    cfg.yolact.input_size = 160
    return build_model(cfg)


@pytest.mark.parametrize("flavor", ["official", "mmdet"])
def test_ohem_keeps_three_negatives_per_positive(flavor):
    logic = _yolact(flavor).logic
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g)
    labels = torch.full((50,), 4, dtype=torch.int64)  # background
    labels[[3, 7]] = torch.tensor([0, 2])
    labels[[10, 11]] = -1  # neutral: never mined
    gt = torch.full((50,), -1, dtype=torch.int64)
    gt[[3, 7]] = torch.tensor([0, 1])
    loss = logic._ohem_ce(logits, AnchorTargets(labels, gt))
    bg = logic.bg
    col = (lambda c: c + 1) if flavor == "official" else (lambda c: c)
    pos = F.cross_entropy(logits[[3, 7]], torch.tensor([col(0), col(2)]), reduction="sum")
    neg_idx = [i for i in range(50) if labels[i] == 4]
    neg = F.cross_entropy(logits[neg_idx], torch.full((len(neg_idx),), bg), reduction="none")
    expected = pos + neg.topk(6).values.sum()
    torch.testing.assert_close(loss, expected)
    # the mining score is the background CE = logsumexp - background logit
    torch.testing.assert_close(neg, logits[neg_idx].logsumexp(1) - logits[neg_idx, bg])
    # no positives: the official code mines no negative, mmdet keeps them all
    empty = AnchorTargets(torch.full((50,), 4, dtype=torch.int64), torch.full((50,), -1, dtype=torch.int64))
    loss0 = logic._ohem_ce(logits, empty)
    if flavor == "official":
        assert float(loss0) == 0.0
    else:
        torch.testing.assert_close(loss0, F.cross_entropy(logits, torch.full((50,), bg), reduction="sum"))


def test_crop_keeps_exactly_the_padded_box():
    masks = torch.ones(2, 10, 20)
    boxes = torch.tensor([[0.25, 0.2, 0.5, 0.6], [0.5, 0.6, 0.25, 0.2]])  # second one flipped: sanitised
    out = crop_masks(masks, boxes, padding=1)
    # x: 0.25 * 20 - 1 = 4 .. 0.5 * 20 + 1 = 11 (exclusive); y: 2 - 1 = 1 .. 6 + 1 = 7
    expected = torch.zeros(10, 20)
    expected[1:7, 4:11] = 1
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], expected)
    # clamped at the frame
    edge = crop_masks(torch.ones(1, 10, 20), torch.tensor([[-0.5, -0.5, 2.0, 2.0]]))
    assert torch.equal(edge[0], torch.ones(10, 20))


@pytest.mark.parametrize("flavor", ["official", "mmdet"])
def test_yolact_trains_on_empty_and_degenerate_targets(flavor):
    torch.manual_seed(0)
    model = _yolact(flavor).train()
    batch, targets = tiny_batch()
    # a degenerate (zero-width) instance next to real ones
    t = targets[0]
    boxes = torch.cat([t.boxes, torch.tensor([[40.0, 40.0, 40.0, 60.0]])])
    full = torch.cat([t.masks.to_full(), torch.zeros(1, *t.masks.frame, dtype=torch.uint8)])
    targets[0] = ImageTargets(boxes, torch.cat([t.labels, torch.tensor([1])]), CroppedMasks.from_full(full))
    losses = model(batch, targets)
    for k, v in losses.items():
        assert torch.isfinite(v), k
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # an all-empty batch
    empty = [ImageTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), CroppedMasks.empty((120, 160)))] * 2
    losses = model(batch, empty)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("flavor", ["official", "mmdet"])
def test_yolact_predicts_in_the_original_frame(flavor):
    model = _yolact(flavor).eval()
    batch, _ = tiny_batch()
    dets = model.predict(batch)
    assert [tuple(d.masks.shape[1:]) for d in dets] == [(240, 320), (128, 150)]
    for d, (h, w) in zip(dets, batch.original_sizes):
        assert len(d) <= 100
        assert (d.scores[:-1] >= d.scores[1:]).all()
        if len(d):
            assert d.boxes[:, 0::2].max() <= w + 1e-3 and d.boxes[:, 1::2].max() <= h + 1e-3
            assert d.boxes.min() >= 0
    if flavor == "official":  # boxes are truncated to integers, as the official postprocess does
        assert all(torch.equal(d.boxes, d.boxes.floor()) for d in dets)


def test_retinanet_loss_and_predict():
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=4, fpn_channels=32, anchor_strides=(8, 16, 32, 64, 128))
    cfg.retinanet.feat_channels = 32
    model = build_model(cfg)
    assert model.bbox_head.anchor_generator.num_base_anchors == 9
    batch, targets = tiny_batch()
    losses = model(batch, targets)
    assert torch.isfinite(losses["loss"]) and float(losses["loss_bbox"]) > 0
    # at init every anchor has probability 0.01: focal loss of ~N negatives / #pos is ~ constant
    losses["loss"].backward()
    model.eval()
    model.bbox_head.test.score_thr = 0.0  # keep candidates despite the 0.01 prior
    dets = model.predict(batch)
    assert len(dets) == 2 and dets[0].masks is None
    assert 0 < len(dets[0]) <= 100
    w, h = batch.original_sizes[0][1], batch.original_sizes[0][0]
    assert dets[0].boxes[:, 2].max() <= w + 1e-3 and dets[0].boxes[:, 3].max() <= h + 1e-3


def test_nms_is_a_one_line_override_for_every_model():
    from .tiny import tiny_config

    batch, _ = tiny_batch()
    for nms in ("fast", "soft_gaussian"):
        model = build_model(tiny_config("mask_rcnn", nms=nms)).eval()
        assert model.roi_head.nms["method"] == nms
        dets = model.predict(batch)
        assert len(dets) == 2
    with pytest.raises(ValueError, match="model.nms"):
        build_model(tiny_config("mask_rcnn", nms="greedy"))


# ----------------------------------------------------------------------------------- mmdet layouts
def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_model(get_preset(name).model).state_dict().items()}


def test_retinanet_golden_layout_is_mmdetections():
    s = _shapes("retinanet_r18_fpn_c64_shapes")
    assert s["neck.lateral_convs.0.conv.weight"] == (64, 128, 1, 1)  # C3
    assert s["neck.fpn_convs.3.conv.weight"] == (64, 512, 3, 3)  # P6 on C5 ('on_input')
    assert s["neck.fpn_convs.4.conv.weight"] == (64, 64, 3, 3)
    assert "neck.fpn_convs.5.conv.weight" not in s
    for i in range(4):
        assert s[f"bbox_head.cls_convs.{i}.conv.weight"] == (64, 64, 3, 3)
        assert s[f"bbox_head.reg_convs.{i}.conv.weight"] == (64, 64, 3, 3)
    assert s["bbox_head.retina_cls.weight"] == (45, 64, 3, 3)  # 9 anchors x 5 classes (sigmoid)
    assert s["bbox_head.retina_reg.weight"] == (36, 64, 3, 3)
    assert not any(k.startswith(("rpn_head", "roi_head", "mask_head")) for k in s)


def test_yolact_golden_layout_is_mmdetections():
    s = _shapes("yolact_r18_c64_shapes")
    assert s["neck.fpn_convs.3.conv.weight"] == (64, 512, 3, 3)  # mmdet: P6 on C5
    assert s["bbox_head.head_convs.0.conv.weight"] == (64, 64, 3, 3)
    assert s["bbox_head.conv_cls.weight"] == (18, 64, 3, 3)  # 3 anchors x (5 + 1), background last
    assert s["bbox_head.conv_reg.weight"] == (12, 64, 3, 3)
    assert s["bbox_head.conv_coeff.weight"] == (96, 64, 3, 3)  # 3 x 32 prototypes
    assert [k for k in s if k.startswith("mask_head.protonet") and k.endswith("weight")] == [
        f"mask_head.protonet.{i}.weight" for i in (0, 2, 4, 8, 10)
    ]
    assert s["mask_head.protonet.10.weight"] == (32, 64, 1, 1)
    assert s["mask_head.segm_branch.segm_conv.weight"] == (5, 64, 1, 1)
    cfg = get_preset("yolact_r18_c64_shapes")
    assert (cfg.data.keep_ratio, cfg.data.scale, cfg.data.size_divisor) == (False, (550, 550), 1)
    assert (cfg.model.score_thr, cfg.model.nms, cfg.model.nms_top_k, cfg.model.max_per_img) == (0.05, "fast", 200, 100)


def test_mmdet_yolact_checkpoint_converts_unchanged(tmp_path):
    """mmdetection's YOLACT / RetinaNet keys are instseg's: a state dict in mmdet's layout round-trips."""
    from instseg.convert.mmdet import ConversionError, convert_checkpoint

    for name in ("yolact_r18_c64_shapes", "retinanet_r18_fpn_c64_shapes"):
        cfg = get_preset(name)
        state = build_model(cfg.model).state_dict()
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": state, "meta": {"dataset_meta": {"classes": list("abcde")}}}, path)
        ckpt = convert_checkpoint(path, cfg)
        assert set(ckpt["model"]) == set(state)
        assert ckpt["classes"]["class_names"] == list("abcde")
        bad = dict(state)
        bad.pop("bbox_head.conv_reg.weight" if "yolact" in name else "bbox_head.retina_reg.weight")
        torch.save({"state_dict": bad}, path)
        with pytest.raises(ConversionError, match="missing 1 keys"):
            convert_checkpoint(path, cfg)
