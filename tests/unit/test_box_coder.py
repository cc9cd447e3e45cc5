"""DeltaXYWHCoder against mmdet's DeltaXYWHBBoxCoder formulas written out per box."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instseg.ops.box_coder import DEFAULT_WH_CLAMP, DeltaXYWHCoder

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _random_boxes(rng: np.random.Generator, n: int, size: float = 500.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _ref_encode(refs, targets, means, stds):
    out = []
    for (px1, py1, px2, py2), (gx1, gy1, gx2, gy2) in zip(refs, targets):
        pw, ph = px2 - px1, py2 - py1
        px, py = (px1 + px2) / 2, (py1 + py2) / 2
        gw, gh = gx2 - gx1, gy2 - gy1
        gx, gy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
        d = [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]
        out.append([(d[j] - means[j]) / stds[j] for j in range(4)])
    return np.array(out)


def _ref_decode(refs, deltas, means, stds, max_shape=None, clamp=abs(math.log(16 / 1000))):
    out = []
    for (px1, py1, px2, py2), row in zip(refs, deltas):
        boxes = []
        for k in range(len(row) // 4):
            dx, dy, dw, dh = (row[4 * k + j] * stds[j] + means[j] for j in range(4))
            dw = min(max(dw, -clamp), clamp)
            dh = min(max(dh, -clamp), clamp)
            pw, ph = px2 - px1, py2 - py1
            cx, cy = (px1 + px2) / 2 + pw * dx, (py1 + py2) / 2 + ph * dy
            w, h = pw * math.exp(dw), ph * math.exp(dh)
            b = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            if max_shape is not None:
                H, W = max_shape
                b = [min(max(b[0], 0), W), min(max(b[1], 0), H), min(max(b[2], 0), W), min(max(b[3], 0), H)]
            boxes.extend(b)
        out.append(boxes)
    return np.array(out).reshape(len(refs), -1)


STDS = [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2), (0.033, 0.033, 0.067, 0.067)]


def test_default_clamp_value():
    assert DEFAULT_WH_CLAMP == pytest.approx(4.135166556742356)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stds", STDS)
def test_encode_matches_formula(device, stds):
    rng = np.random.default_rng(0)
    refs, tg = _random_boxes(rng, 64), _random_boxes(rng, 64)
    means = (0.01, -0.02, 0.03, 0.0)
    coder = DeltaXYWHCoder(means=means, stds=stds)
    got = coder.encode(torch.tensor(refs, device=device), torch.tensor(tg, device=device))
    assert got.dtype == torch.float32 and got.shape == (64, 4)
    np.testing.assert_allclose(got.cpu().numpy(), _ref_encode(refs, tg, means, stds), rtol=1e-4, atol=1e-4)


def test_encode_no_plus_one():
    coder = DeltaXYWHCoder()
    d = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 20.0]]), torch.tensor([[5.0, 0.0, 25.0, 40.0]]))
    # px=5, pw=10 (not 11); gx=15, gw=20
    np.testing.assert_allclose(d.numpy(), [[1.0, 0.5, math.log(2), math.log(2)]], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stds", STDS)
def test_round_trip(device, stds):
    rng = np.random.default_rng(1)
    refs, tg = _random_boxes(rng, 100), _random_boxes(rng, 100)
    # keep the size ratio inside the clamp so the round trip is exact
    coder = DeltaXYWHCoder(stds=stds)
    r, t = torch.tensor(refs, device=device), torch.tensor(tg, device=device)
    back = coder.decode(r, coder.encode(r, t))
    np.testing.assert_allclose(back.cpu().numpy(), tg, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 3])
def test_decode_matches_formula_with_clamp_and_clip(device, k):
    rng = np.random.default_rng(2)
    refs = _random_boxes(rng, 50, size=300)
    deltas = rng.normal(0, 3, (50, 4 * k))  # many |dw| beyond the clamp, many boxes cross the border
    deltas[0, 2] = 10.0
    deltas[1, 3] = -10.0
    means, stds = (0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.2, 0.2)
    coder = DeltaXYWHCoder(means=means, stds=stds)
    for shape in [None, (200, 250)]:
        got = coder.decode(torch.tensor(refs, device=device).float(), torch.tensor(deltas, device=device).float(), shape)
        ref = _ref_decode(refs, deltas, means, stds, shape)
        assert got.shape == (50, 4 * k)
        np.testing.assert_allclose(got.cpu().numpy(), ref, rtol=1e-4, atol=5e-3)
        if shape is not None:
            g = got.cpu().numpy().reshape(50, k, 4)
            assert g.min() >= 0 and g[..., [0, 2]].max() <= 250 and g[..., [1, 3]].max() <= 200


def test_decode_clamp_caps_growth():
    coder = DeltaXYWHCoder()
    out = coder.decode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    w, h = float(out[0, 2] - out[0, 0]), float(out[0, 3] - out[0, 1])
    assert w == pytest.approx(10 * 1000 / 16, rel=1e-5)
    assert h == pytest.approx(10 * 16 / 1000, rel=1e-5)


def test_decode_empty():
    coder = DeltaXYWHCoder()
    out = coder.decode(torch.zeros((0, 4)), torch.zeros((0, 4)), (10, 10))
    assert out.shape == (0, 4)
