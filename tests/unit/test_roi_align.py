"""RoI level mapping, multi-level RoIAlign, and the RoIAlign convention itself (brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from instseg.ops.roi_align import MultiLevelRoIAlign, boxes_to_rois, map_roi_levels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
STRIDES = [4, 8, 16, 32]


def _bilinear(feat, y, x):
    """Bilinear sample of ``feat (H, W)`` as mmcv/torchvision RoIAlign do (clamp at the border, 0 far outside)."""
    h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yl = yh = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xl = xh = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * feat[yl, xl] + hy * lx * feat[yl, xh] + ly * hx * feat[yh, xl] + ly * lx * feat[yh, xh]


def _ref_roi_align(feat, box, out, scale, sampling_ratio=0, aligned=True):
    """``feat (C, H, W)``, one box; average of ``grid x grid`` bilinear samples per bin."""
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - off for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / out, rh / out
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out)
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out)
    count = max(gw * gh, 1)
    res = np.zeros((feat.shape[0], out, out))
    for c in range(feat.shape[0]):
        for ph in range(out):
            for pw in range(out):
                acc = 0.0
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = x1 + pw * bw + (ix + 0.5) * bw / gw
                        acc += _bilinear(feat[c], y, x)
                res[c, ph, pw] = acc / count
    return res


def test_level_thresholds():
    scales = [1.0, 55.9, 111.9, 112.0, 150.0, 223.9, 224.0, 447.9, 448.0, 1000.0]
    rois = torch.tensor([[0.0, 10.0, 20.0, 10.0 + s, 20.0 + s] for s in scales])
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert map_roi_levels(rois, 2).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    # non-square: scale is sqrt(w * h)
    rois = torch.tensor([[0, 0, 0, 56.0, 224.0], [0, 0, 0, 448.0, 111.0], [0, 0, 0, 448.0, 112.0]])
    assert map_roi_levels(rois, 4).tolist() == [1, 1, 2]


def test_level_mapping_random_vs_loop():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (300, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(900), (300, 2)))
    rois = torch.tensor(np.concatenate([np.zeros((300, 1)), xy, xy + wh], 1), dtype=torch.float32)
    ref = []
    for _, x1, y1, x2, y2 in rois.tolist():
        s = math.sqrt((x2 - x1) * (y2 - y1))
        ref.append(0 if s < 112 else 1 if s < 224 else 2 if s < 448 else 3)
    got = map_roi_levels(rois, 4).tolist()
    assert got == ref
    assert set(ref) == {0, 1, 2, 3}


def test_boxes_to_rois():
    a, b = torch.rand(3, 4), torch.rand(0, 4)
    c = torch.rand(2, 4)
    rois = boxes_to_rois([a, b, c])
    assert rois.shape == (5, 5)
    assert rois[:, 0].tolist() == [0, 0, 0, 2, 2]
    assert torch.equal(rois[:3, 1:], a) and torch.equal(rois[3:, 1:], c)
    assert boxes_to_rois([]).shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("box", [[3.3, 4.1, 20.7, 12.2], [-5.0, -3.5, 8.2, 30.0], [10.0, 10.0, 11.0, 11.5], [0.0, 0.0, 40.0, 33.0]])
def test_torchvision_matches_bruteforce_roi_align(device, box):
    """Pins the convention: aligned=True (half-pixel shift), adaptive ceil(bin) samples, average."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 24, 28, generator=g, dtype=torch.float64)
    for scale in [1.0, 0.5]:
        rois = torch.tensor([[1.0, *box]], dtype=torch.float64)
        got = roi_align(feat.to(device), rois.to(device), 7, scale, 0, True)[0].cpu().numpy()
        ref = _ref_roi_align(feat[1].numpy(), box, 7, scale)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    # and the non-aligned variant differs (guards against the test passing vacuously)
    un = roi_align(feat.to(device), rois.to(device), 7, 1.0, 0, False)[0].cpu().numpy()
    np.testing.assert_allclose(un, _ref_roi_align(feat[1].numpy(), box, 7, 1.0, aligned=False), rtol=1e-9, atol=1e-9)
    assert not np.allclose(un, _ref_roi_align(feat[1].numpy(), box, 7, 1.0))


def _feats(device, batch=2, size=256, channels=4, levels=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, size // s, size // s, generator=g).to(device) for s in [4, 8, 16, 32, 64][:levels]]


def _random_rois(rng, k, batch, size=256):
    xy = rng.uniform(-10, size - 20, (k, 2))
    wh = np.exp(rng.uniform(np.log(4), np.log(600), (k, 2)))
    bi = rng.integers(0, batch, (k, 1))
    return torch.tensor(np.concatenate([bi, xy, xy + wh], 1), dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [7, 14])
def test_multilevel_matches_per_roi_calls(device, out):
    feats = _feats(device)  # P2..P6; P6 must never be pooled
    rng = np.random.default_rng(out)
    rois = _random_rois(rng, 60, 2).to(device)
    rois[0, 1:] = torch.tensor([0.0, 0.0, 500.0, 500.0])  # level 3
    rois[1, 1:] = torch.tensor([5.0, 5.0, 10.0, 10.0])  # level 0
    pooler = MultiLevelRoIAlign(output_size=out, strides=STRIDES)
    got = pooler(feats, rois)
    assert got.shape == (60, 4, out, out) and got.device.type == device
    levels = set()
    for k in range(60):
        x1, y1, x2, y2 = rois[k, 1:].tolist()
        s = math.sqrt((x2 - x1) * (y2 - y1))
        lvl = min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 3)
        levels.add(lvl)
        ref = roi_align(feats[lvl], rois[k : k + 1], out, 1.0 / STRIDES[lvl], 0, True)
        torch.testing.assert_close(got[k : k + 1], ref, rtol=0, atol=0)
    assert levels == {0, 1, 2, 3}


def test_multilevel_one_roi_vs_bruteforce():
    feats = [f.double() for f in _feats("cpu", batch=1, size=128, channels=2, levels=4)]
    rois = torch.tensor([[0, 7.3, 9.1, 60.2, 40.8], [0, 2.0, 3.0, 130.0, 127.0]], dtype=torch.float64)
    got = MultiLevelRoIAlign(output_size=7, strides=STRIDES)(feats, rois)
    # scale sqrt(52.9 * 31.7) ~ 41 -> P2 (stride 4); sqrt(128 * 124) ~ 126 -> P3 (stride 8)
    np.testing.assert_allclose(got[0].numpy(), _ref_roi_align(feats[0][0].numpy(), rois[0, 1:].tolist(), 7, 1 / 4), atol=1e-9)
    np.testing.assert_allclose(got[1].numpy(), _ref_roi_align(feats[1][0].numpy(), rois[1, 1:].tolist(), 7, 1 / 8), atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_single_level_and_empty(device):
    feats = _feats(device, levels=2)
    rois = _random_rois(np.random.default_rng(5), 10, 2).to(device)
    pooler = MultiLevelRoIAlign(output_size=14, strides=[8])
    got = pooler(feats[1:], rois)  # single level: every roi from it, whatever its scale
    torch.testing.assert_close(got, roi_align(feats[1], rois, 14, 1 / 8, 0, True), rtol=0, atol=0)
    empty = MultiLevelRoIAlign(output_size=7, strides=STRIDES)(_feats(device), torch.zeros((0, 5), device=device))
    assert empty.shape == (0, 4, 7, 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_half_precision_features():
    device = "cuda"
    feats = [f.half() for f in _feats(device)]
    rois = _random_rois(np.random.default_rng(6), 20, 2).to(device)
    got = MultiLevelRoIAlign(output_size=7, strides=STRIDES)(feats, rois)
    ref = MultiLevelRoIAlign(output_size=7, strides=STRIDES)([f.float() for f in feats], rois)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_sampling_ratio_vs_bruteforce(sampling_ratio):
    feats = [f.double() for f in _feats("cpu", batch=1, size=128, channels=1, levels=4)]
    rois = torch.tensor([[0, 1.7, 2.2, 95.0, 88.5]], dtype=torch.float64)  # scale ~89 -> P2, 23.3 x 21.6 cells
    got = MultiLevelRoIAlign(output_size=7, strides=STRIDES, sampling_ratio=sampling_ratio)(feats, rois)
    ref = _ref_roi_align(feats[0][0].numpy(), rois[0, 1:].tolist(), 7, 1 / 4, sampling_ratio)
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-9)
