"""CroppedMasks and paste_masks against the same operations done on full bitmaps / per pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from instseg.structures.masks import CroppedMasks, paste_masks


def _random_masks(rng, n, h, w):
    """Blobs (ellipses plus speckle) of varied size; some touch or hug the frame border; one is empty."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        kind = i % 5
        if kind == 4 and i == 4:
            continue  # empty mask
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if kind == 0:
            cy, cx = rng.choice([0.0, h - 1.0]), rng.choice([0.0, w - 1.0])  # a corner
        elif kind == 1:
            cy = rng.choice([1.0, 2.0, h - 2.0, h - 3.0])  # within the margin of the border
        ry, rx = rng.uniform(1, h / 3), rng.uniform(1, w / 3)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        m |= (rng.random((h, w)) < 0.02) & (np.abs(yy - cy) < 2 * ry) & (np.abs(xx - cx) < 2 * rx)
        if kind == 3:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h), rng.integers(0, w)] = True  # a single pixel
        out[i] = m
    return out


@pytest.fixture
def full():
    return _random_masks(np.random.default_rng(0), 15, 57, 71)


def test_round_trip(full):
    cm = CroppedMasks.from_full(full)
    assert len(cm) == 15 and cm.frame == (57, 71)
    assert torch.equal(cm.to_full(), torch.tensor(full))
    assert cm.to_full().dtype == torch.uint8
    assert torch.equal(CroppedMasks.from_full(torch.tensor(full)).to_full(), torch.tensor(full))
    it = CroppedMasks.from_iter((m.astype(bool) for m in full), (57, 71))
    assert torch.equal(it.to_full(), torch.tensor(full))
    assert torch.equal(cm.to_full(torch.tensor([3, 0])), torch.tensor(full[[3, 0]]))
    # crops cover the box plus a 2-pixel margin clamped to the frame
    for i, m in enumerate(full):
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        x0, y0 = cm.offsets[i].tolist()
        ch, cw = cm.crops[i].shape
        assert (x0, y0) == (max(xs.min() - 2, 0), max(ys.min() - 2, 0))
        assert (x0 + cw, y0 + ch) == (min(xs.max() + 3, 71), min(ys.max() + 3, 57))
    empty = CroppedMasks.empty((5, 6))
    assert empty.to_full().shape == (0, 5, 6) and empty.boxes().shape == (0, 4)


def test_boxes_and_areas(full):
    cm = CroppedMasks.from_full(full)
    for i, m in enumerate(full):
        ys, xs = np.nonzero(m)
        ref = [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert cm.boxes()[i].tolist() == ref
        assert cm.areas()[i] == m.sum()


def test_select_flip_pad(full):
    cm = CroppedMasks.from_full(full)
    sel = cm.select(torch.tensor([5, 1, 1]))
    assert torch.equal(sel.to_full(), torch.tensor(full[[5, 1, 1]]))
    assert len(cm.select([])) == 0 and cm.select([]).to_full().shape == (0, 57, 71)
    assert torch.equal(cm.flip_horizontal().to_full(), torch.tensor(full[:, :, ::-1].copy()))
    assert torch.equal(cm.flip_horizontal().flip_horizontal().to_full(), torch.tensor(full))
    padded = cm.pad((64, 80)).to_full()
    ref = np.zeros((15, 64, 80), np.uint8)
    ref[:, :57, :71] = full
    assert torch.equal(padded, torch.tensor(ref))
    assert len(CroppedMasks.empty((4, 4)).flip_horizontal()) == 0


def _ref_nearest(full, nh, nw):
    n, h, w = full.shape
    out = np.zeros((n, nh, nw), np.uint8)
    for i in range(nh):
        for j in range(nw):
            out[:, i, j] = full[:, (i * h) // nh, (j * w) // nw]
    return out


@pytest.mark.parametrize("new", [(57, 71), (114, 142), (80, 101), (200, 77), (40, 50), (19, 23), (7, 9), (3, 2)])
def test_resize_is_nearest_of_full(full, new):
    cm = CroppedMasks.from_full(full)
    got = cm.resize(new)
    assert got.frame == new
    assert torch.equal(got.to_full(), torch.tensor(_ref_nearest(full, *new)))
    # the result keeps the crop invariant (tight box plus margin), so later ops stay exact
    # (a mask that vanished when shrinking is a 1x1 zero crop; where it sits does not matter)
    again = CroppedMasks.from_full(got.to_full())
    for i, (a, b) in enumerate(zip(got.crops, again.crops)):
        if b.any():
            assert a.shape == b.shape
            assert got.offsets[i].tolist() == again.offsets[i].tolist()
        else:
            assert a.shape == (1, 1) and not a.any()


def _roi_boxes(rng, full_cm, h, w, k):
    gt = full_cm.boxes()
    idx = rng.integers(0, len(full_cm), k)
    boxes = []
    for j, g in enumerate(idx):
        x1, y1, x2, y2 = gt[g].tolist()
        kind = j % 5
        if kind == 0:  # jittered box around the instance
            b = [x1 + rng.normal(0, 3), y1 + rng.normal(0, 3), x2 + rng.normal(0, 3), y2 + rng.normal(0, 3)]
        elif kind == 1:  # crossing the image border
            b = [rng.uniform(-20, 0), rng.uniform(-15, 10), rng.uniform(w - 10, w + 20), rng.uniform(h - 5, h + 15)]
        elif kind == 2:  # larger than the whole mask / frame
            b = [-30.0, -25.0, w + 40.0, h + 35.0]
        elif kind == 3:  # the ground-truth box itself (integer coordinates)
            b = [x1, y1, x2, y2]
        else:  # random box anywhere, possibly not touching the instance
            x, y = rng.uniform(-5, w), rng.uniform(-5, h)
            b = [x, y, x + rng.uniform(0.5, 40), y + rng.uniform(0.5, 40)]
        if b[2] <= b[0]:
            b[2] = b[0] + 1
        if b[3] <= b[1]:
            b[3] = b[1] + 1
        boxes.append(b)
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(idx)


def _assert_targets_equal(got, raw_full):
    """``got`` equals ``raw_full >= 0.5`` except where the exact value is a 0.5 tie.

    A sample point midway between a 1 and a 0 pixel has exact value 0.5; float32 rounding then
    gives 0.4999990 or 0.5000001 depending on where the coordinates start (full frame vs crop),
    so such pixels may go either way (mmdet on GPU vs CPU differs there too).  Everything else
    must match bit for bit.
    """
    ref = (raw_full >= 0.5).float()
    assert ref.sum() > 0
    mismatch = got != ref
    ties = (raw_full - 0.5).abs() < 1e-5
    assert not (mismatch & ~ties).any(), f"rois {torch.nonzero((mismatch & ~ties).flatten(1).any(1)).flatten().tolist()} differ"
    assert mismatch.sum() <= 0.001 * mismatch.numel()


@pytest.mark.parametrize("size", [28, 14])
def test_roi_targets_equal_roi_align_on_full_bitmap(full, size):
    rng = np.random.default_rng(size)
    cm = CroppedMasks.from_full(full)
    boxes, gt_inds = _roi_boxes(rng, cm, 57, 71, 200)
    got = cm.roi_targets(boxes, gt_inds, size)
    full_t = torch.tensor(full, dtype=torch.float32)
    rois = torch.cat([gt_inds[:, None].float(), boxes], 1)
    assert got.shape == (200, size, size) and got.dtype == torch.float32
    _assert_targets_equal(got, roi_align(full_t[:, None], rois, (size, size), 1.0, 0, True)[:, 0])
    assert cm.roi_targets(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), size).shape == (0, size, size)


def test_roi_targets_after_resize_and_flip(full):
    """The crop invariant survives transforms: targets still equal those of the transformed full bitmap."""
    rng = np.random.default_rng(9)
    cm = CroppedMasks.from_full(full).resize((90, 130)).flip_horizontal().pad((96, 136))
    dense = cm.to_full().float()
    boxes, gt_inds = _roi_boxes(rng, cm, 90, 130, 100)
    rois = torch.cat([gt_inds[:, None].float(), boxes], 1)
    _assert_targets_equal(cm.roi_targets(boxes, gt_inds, 28), roi_align(dense[:, None], rois, (28, 28), 1.0, 0, True)[:, 0])


def test_pad_restores_margin_at_old_edge():
    """A mask touching the bottom/right edge: after padding, RoIAlign sees the zero padding."""
    full = np.zeros((1, 20, 24), np.uint8)
    full[0, 12:, 15:] = 1
    cm = CroppedMasks.from_full(full).pad((32, 32))
    dense = torch.zeros((1, 1, 32, 32))
    dense[0, 0, :20, :24] = torch.tensor(full[0], dtype=torch.float32)
    boxes = torch.tensor([[14.0, 11.0, 24.0, 20.0], [16.3, 13.1, 23.9, 19.7]])  # clipped to the image
    raw = roi_align(dense, torch.cat([torch.zeros((2, 1)), boxes], 1), (28, 28), 1.0, 0, True)[:, 0]
    got = cm.roi_targets(boxes, torch.tensor([0, 0]), 28)
    assert torch.equal(got, (raw >= 0.5).float())
    # unpadded, the same rois clamp at the edge instead of interpolating towards the padding
    unpadded = CroppedMasks.from_full(full).roi_targets(boxes, torch.tensor([0, 0]), 28)
    assert not torch.equal(got, unpadded)
    assert cm.crops[0].shape == (8 + 2 + 2, 9 + 2 + 2)
    assert torch.equal(cm.to_full(), dense[0].to(torch.uint8))


def test_memory_of_crowded_image():
    rng = np.random.default_rng(0)
    h = w = 1000
    n = 375

    def masks():
        for _ in range(n):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
            m[y : y + rng.integers(4, 20), x : x + rng.integers(4, 20)] = 1
            yield m

    cm = CroppedMasks.from_iter(masks(), (h, w))
    crop_bytes = sum(c.numel() * c.element_size() for c in cm.crops) + cm.offsets.numel() * 8
    dense_bytes = n * h * w  # uint8 stack
    assert len(cm) == n
    assert crop_bytes < dense_bytes / 1000
    for c in cm.crops:
        assert c.shape[0] <= 19 + 4 and c.shape[1] <= 19 + 4


def _ref_paste(probs, box, h, w, thr=0.5):
    """Per pixel: bilinear sample (grid_sample, align_corners=False, zero padding) at the pixel centre."""
    m = probs.shape[0]
    x0, y0, x1, y1 = box

    def at(r, c):
        return probs[r, c] if 0 <= r < m and 0 <= c < m else 0.0

    out = np.zeros((h, w), bool)
    for i in range(h):
        gy = (i + 0.5 - y0) / (y1 - y0) * 2 - 1
        sy = ((gy + 1) * m - 1) / 2
        for j in range(w):
            gx = (j + 0.5 - x0) / (x1 - x0) * 2 - 1
            sx = ((gx + 1) * m - 1) / 2
            r0, c0 = math.floor(sy), math.floor(sx)
            fy, fx = sy - r0, sx - c0
            v = (
                (1 - fy) * (1 - fx) * at(r0, c0)
                + (1 - fy) * fx * at(r0, c0 + 1)
                + fy * (1 - fx) * at(r0 + 1, c0)
                + fy * fx * at(r0 + 1, c0 + 1)
            )
            out[i, j] = v >= thr
    return out


def test_paste_masks_vs_per_pixel_bilinear():
    rng = np.random.default_rng(0)
    h, w = 40, 52
    # smooth-ish probability maps: a blob plus noise, with values right up to 1 at the border
    yy, xx = np.mgrid[0:28, 0:28]
    probs = []
    for k in range(6):
        p = np.exp(-(((yy - rng.uniform(5, 22)) / rng.uniform(4, 12)) ** 2 + ((xx - rng.uniform(5, 22)) / rng.uniform(4, 12)) ** 2))
        p = np.clip(p + rng.normal(0, 0.1, p.shape), 0, 1)
        probs.append(p)
    probs[5][:] = 1.0  # full box: the pasted mask must be the box itself
    boxes = [
        [3.2, 4.7, 30.1, 25.9],
        [-8.0, -5.0, 20.0, 12.0],  # crosses the top-left border
        [40.3, 30.2, 70.0, 55.0],  # crosses the bottom-right border
        [10.0, 10.0, 14.0, 12.0],  # much smaller than the 28x28 map
        [0.0, 0.0, 52.0, 40.0],
        [5.2, 6.3, 15.7, 20.6],
    ]
    probs_t = torch.tensor(np.stack(probs), dtype=torch.float32)
    got = paste_masks(probs_t, torch.tensor(boxes), (h, w))
    assert got.shape == (6, h, w) and got.dtype == torch.bool
    for k, box in enumerate(boxes):
        ref = _ref_paste(probs_t[k].double().numpy(), box, h, w)
        assert np.array_equal(got[k].numpy(), ref), k
    # the all-ones map pastes exactly the pixels whose centre lies inside the box
    ref5 = np.zeros((h, w), bool)
    ref5[6:21, 5:16] = True
    assert np.array_equal(got[5].numpy(), ref5)
    assert paste_masks(probs_t[:0], torch.zeros((0, 4)), (h, w)).shape == (0, h, w)


def test_paste_masks_threshold():
    probs = torch.full((1, 28, 28), 0.4)
    assert not paste_masks(probs, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), (12, 12)).any()
    assert paste_masks(probs, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), (12, 12), threshold=0.3).sum() == 100
