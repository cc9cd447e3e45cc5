"""AnchorGenerator / inside_flags against explicit per-level anchors written out in loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instseg.ops.anchors import AnchorGenerator, inside_flags

STRIDES = [4, 8, 16, 32, 64]
RATIOS = [0.5, 1.0, 2.0]


def _ref_level(fh, fw, stride, ratios, scales):
    out = []
    for y in range(fh):
        for x in range(fw):
            cx, cy = x * stride, y * stride
            for r in ratios:
                for c in scales:
                    s = stride * c
                    h, w = s * math.sqrt(r), s / math.sqrt(r)
                    out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(out).reshape(-1, 4)


def test_rpn_anchor_sizes_and_ratio_order():
    gen = AnchorGenerator(strides=STRIDES, ratios=RATIOS, scales=[8])
    assert gen.num_base_anchors == 3
    for stride, size, base in zip(STRIDES, [32, 64, 128, 256, 512], gen.base_anchors):
        w = (base[:, 2] - base[:, 0]).numpy()
        h = (base[:, 3] - base[:, 1]).numpy()
        # area is size^2 for every ratio; ratio = h / w in order 0.5, 1, 2
        np.testing.assert_allclose(w * h, size * size, rtol=1e-5)
        np.testing.assert_allclose(h / w, RATIOS, rtol=1e-5)
        # centred at 0 (center_offset 0)
        np.testing.assert_allclose((base[:, 0] + base[:, 2]).numpy(), 0, atol=1e-4)
        np.testing.assert_allclose((base[:, 1] + base[:, 3]).numpy(), 0, atol=1e-4)
    b = gen.base_anchors[0].numpy()
    r2 = math.sqrt(2)
    np.testing.assert_allclose(
        b, [[-16 * r2, -8 * r2, 16 * r2, 8 * r2], [-16, -16, 16, 16], [-8 * r2, -16 * r2, 8 * r2, 16 * r2]], rtol=1e-5
    )


@pytest.mark.parametrize("scales", [[8.0], [4.0, 8.0]])
def test_grid_anchors_match_loops(scales):
    gen = AnchorGenerator(strides=STRIDES, ratios=RATIOS, scales=scales)
    sizes = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    levels = gen.grid_anchors(sizes, torch.device("cpu"))
    assert len(levels) == 5
    for (fh, fw), stride, got in zip(sizes, STRIDES, levels):
        ref = _ref_level(fh, fw, stride, RATIOS, scales)
        assert got.shape == (fh * fw * len(RATIOS) * len(scales), 4)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-3)


def test_flat_order_matches_conv_permutation():
    """Flat index == index into a conv output (A, H, W) permuted to (H, W, A)."""
    gen = AnchorGenerator(strides=[8], ratios=RATIOS, scales=[8])
    fh, fw, a = 3, 5, 3
    anchors = gen.grid_anchors([(fh, fw)], torch.device("cpu"))[0]
    conv = torch.arange(a * fh * fw).reshape(a, fh, fw)
    flat = conv.permute(1, 2, 0).reshape(-1)
    for i, code in enumerate(flat.tolist()):
        ai, rest = divmod(code, fh * fw)
        y, x = divmod(rest, fw)
        cx = float(anchors[i, 0] + anchors[i, 2]) / 2
        cy = float(anchors[i, 1] + anchors[i, 3]) / 2
        assert (cx, cy) == pytest.approx((x * 8, y * 8), abs=1e-4)
        ratio = float(anchors[i, 3] - anchors[i, 1]) / float(anchors[i, 2] - anchors[i, 0])
        assert ratio == pytest.approx(RATIOS[ai], rel=1e-5)


@pytest.mark.parametrize("image_size", [(37, 53), (64, 64), (1, 1), (100, 30)])
def test_valid_flags(image_size):
    gen = AnchorGenerator(strides=STRIDES, ratios=RATIOS, scales=[8])
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    flags = gen.valid_flags(sizes, image_size, torch.device("cpu"))
    h, w = image_size
    for (fh, fw), stride, got in zip(sizes, STRIDES, flags):
        vh, vw = min(math.ceil(h / stride), fh), min(math.ceil(w / stride), fw)
        ref = [y < vh and x < vw for y in range(fh) for x in range(fw) for _ in RATIOS]
        assert got.dtype == torch.bool
        assert got.tolist() == ref


def test_inside_flags():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-30, 120, (500, 2))
    wh = rng.uniform(1, 60, (500, 2))
    anchors = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
    anchors[0] = torch.tensor([0.0, 0.0, 80.0, 60.0])  # touches right/bottom edge exactly: outside (strict <)
    anchors[1] = torch.tensor([0.0, 0.0, 79.5, 59.5])
    valid = torch.tensor(rng.random(500) < 0.8)
    valid[:2] = True
    h, w = 60, 80
    for border in [-1, 0, 5.0]:
        got = inside_flags(anchors, valid, (h, w), border).tolist()
        for i, (x1, y1, x2, y2) in enumerate(anchors.tolist()):
            if border < 0:
                ref = bool(valid[i])
            else:
                ref = bool(valid[i]) and x1 >= -border and y1 >= -border and x2 < w + border and y2 < h + border
            assert got[i] == ref, (border, i)
    assert inside_flags(anchors, valid, (h, w), 0)[:2].tolist() == [False, True]
