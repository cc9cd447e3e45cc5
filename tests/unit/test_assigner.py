"""MaxIoUAssigner against a loop transcription of mmdet's ``assign_wrt_overlaps``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.boxes import box_iou

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _ref_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            iw = max(min(ax2, bx2) - max(ax1, bx1), 0)
            ih = max(min(ay2, by2) - max(ay1, by1), 0)
            inter = iw * ih
            union = max((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter, 1e-6)
            out[i, j] = inter / union
    return out


def _ref_assign(overlaps, gt_labels, pos_thr, neg_thr, min_pos, low_quality):
    """mmdet MaxIoUAssigner.assign_wrt_overlaps (gt_max_assign_all=True), one candidate at a time."""
    g, n = overlaps.shape
    gt_inds = [-1] * n
    max_ov = [0.0] * n
    if g == 0 or n == 0:
        return [0 if g == 0 else -1] * n, [0.0] * n, [-1] * n
    for j in range(n):
        best, arg = -1.0, -1
        for i in range(g):
            if overlaps[i, j] > best:  # first maximum wins, like torch.max
                best, arg = overlaps[i, j], i
        max_ov[j] = best
        if 0 <= best < neg_thr:
            gt_inds[j] = 0
        if best >= pos_thr:
            gt_inds[j] = arg + 1
    if low_quality:
        for i in range(g):
            gmax = max(overlaps[i, j] for j in range(n))
            if gmax >= min_pos:
                for j in range(n):
                    if overlaps[i, j] == gmax:
                        gt_inds[j] = i + 1  # later ground truths overwrite earlier ones
    labels = [int(gt_labels[k - 1]) if k > 0 else -1 for k in gt_inds]
    return gt_inds, max_ov, labels


def _boxes(rng, n, grid=True):
    if grid:  # coarse integer coordinates: many exact IoU ties and duplicates
        xy = rng.integers(0, 6, (n, 2)) * 8
        wh = rng.integers(1, 5, (n, 2)) * 8
    else:
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(4, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


CONFIGS = [
    dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),  # RPN
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True),  # stage 0
    dict(pos_iou_thr=0.6, neg_iou_thr=0.6, min_pos_iou=0.6, match_low_quality=False),  # cascade base
    dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, match_low_quality=True),
]


def test_box_iou_matches_loops():
    rng = np.random.default_rng(0)
    a, b = _boxes(rng, 20, False), _boxes(rng, 30, True)
    b[0] = b[0, [0, 1, 0, 1]]  # a degenerate (zero-area) box
    np.testing.assert_allclose(box_iou(torch.tensor(a), torch.tensor(b)).numpy(), _ref_iou(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("grid", [True, False])
def test_assign_matches_reference(device, cfg, grid):
    rng = np.random.default_rng([int(grid), CONFIGS.index(cfg)])
    assigner = MaxIoUAssigner(**cfg)
    for trial in range(15):
        g, n = int(rng.integers(1, 7)), int(rng.integers(1, 60))
        gts, boxes = _boxes(rng, g, grid), _boxes(rng, n, grid)
        if trial % 3 == 0:  # duplicate ground truths and candidates equal to a ground truth
            gts = np.concatenate([gts, gts[:1]])
            boxes[: min(n, 2)] = gts[0]
        labels = rng.integers(0, 80, len(gts))
        res = assigner.assign(
            torch.tensor(boxes, device=device), torch.tensor(gts, device=device), torch.tensor(labels, device=device)
        )
        ov = box_iou(torch.tensor(gts), torch.tensor(boxes)).numpy().astype(np.float64)
        np.testing.assert_allclose(ov, _ref_iou(gts, boxes), atol=1e-6)
        ref_inds, ref_max, ref_labels = _ref_assign(ov, labels, **{k.replace("_iou_thr", "_thr").replace("min_pos_iou", "min_pos").replace("match_low_quality", "low_quality"): v for k, v in cfg.items()})
        assert res.gt_inds.cpu().tolist() == ref_inds
        assert res.labels.cpu().tolist() == ref_labels
        np.testing.assert_allclose(res.max_overlaps.cpu().numpy(), ref_max, atol=1e-6)
        assert res.gt_inds.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_assign_overlaps_hand_cases(device):
    """Hand-made overlaps: neg band, ignore band, pos, low-quality overwrite order, ties."""
    a = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    ov = torch.tensor(
        [
            [0.10, 0.50, 0.80, 0.40, 0.40, 0.20],
            [0.20, 0.10, 0.75, 0.40, 0.35, 0.25],
            [0.00, 0.00, 0.00, 0.00, 0.00, 0.29],
        ],
        device=device,
    )
    res = a.assign_overlaps(ov, torch.tensor([5, 6, 7], device=device))
    # col0: best .2 -> negative; col1, col3, col4: best in [.3, .7) -> ignored; col5: .29 -> negative.
    # col2: .8 -> positive for gt0, then low-quality matching lets gt0 (best .8) and then gt1
    # (best .75) claim it, so the later gt1 wins; gt2's best .29 < min_pos_iou claims nothing.
    assert res.gt_inds.tolist() == [0, -1, 2, -1, -1, 0]
    assert res.labels.tolist() == [-1, -1, 6, -1, -1, -1]
    # a tie: both gts reach their max at the same two candidates -> the later gt wins both
    ov2 = torch.tensor([[0.4, 0.4, 0.1], [0.4, 0.4, 0.0]], device=device)
    res2 = a.assign_overlaps(ov2, torch.tensor([1, 2], device=device))
    assert res2.gt_inds.tolist() == [2, 2, 0]
    # without low-quality matching the same candidates are ignored
    a2 = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=False)
    assert a2.assign_overlaps(ov2, torch.tensor([1, 2], device=device)).gt_inds.tolist() == [-1, -1, 0]
    # exact thresholds: IoU == neg_thr is not negative, IoU == pos_thr is positive
    ov3 = torch.tensor([[0.3, 0.7, 0.9]], device=device)
    res3 = a2.assign_overlaps(ov3, torch.tensor([3], device=device))
    assert res3.gt_inds.tolist() == [-1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_no_gt_and_no_boxes(device):
    a = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)
    boxes = torch.tensor(_boxes(np.random.default_rng(0), 5), device=device)
    r = a.assign(boxes, torch.zeros((0, 4), device=device), torch.zeros(0, dtype=torch.int64, device=device))
    assert r.gt_inds.tolist() == [0] * 5 and r.labels.tolist() == [-1] * 5
    assert r.max_overlaps.tolist() == [0.0] * 5
    r = a.assign(torch.zeros((0, 4), device=device), boxes[:2], torch.tensor([1, 2], device=device))
    assert r.gt_inds.shape == (0,) and r.labels.shape == (0,) and r.max_overlaps.shape == (0,)
    r = a.assign(torch.zeros((0, 4), device=device), torch.zeros((0, 4), device=device), torch.zeros(0, dtype=torch.int64))
    assert r.gt_inds.shape == (0,)
