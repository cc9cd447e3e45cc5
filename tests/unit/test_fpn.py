"""FPN neck: mmdetection's key names, exact-size nearest top-down, max-pool P6, extra convs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instseg.modeling.backbones import ResNet
from instseg.modeling.necks import FPN


def _nearest_ref(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Independent nearest resize: dst index i reads src index floor(i * in / out)."""
    h, w = x.shape[-2:]
    iy = torch.tensor([min(math.floor(i * h / size[0]), h - 1) for i in range(size[0])])
    ix = torch.tensor([min(math.floor(j * w / size[1]), w - 1) for j in range(size[1])])
    return x[..., iy, :][..., :, ix]


def test_fpn_shapes_odd_input_and_p6():
    torch.manual_seed(0)
    backbone = ResNet(depth=18).eval()
    fpn = FPN(in_channels=backbone.out_channels, out_channels=32, num_outs=5)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 100, 150))
        outs = fpn(feats)
    assert [tuple(f.shape[-2:]) for f in feats] == [(25, 38), (13, 19), (7, 10), (4, 5)]
    assert [tuple(o.shape) for o in outs] == [
        (1, 32, 25, 38), (1, 32, 13, 19), (1, 32, 7, 10), (1, 32, 4, 5), (1, 32, 2, 3),
    ]
    assert torch.equal(outs[4], outs[3][..., ::2, ::2])


def test_fpn_matches_reference_computation():
    torch.manual_seed(0)
    chans = [8, 16, 24, 32]
    sizes = [(25, 38), (13, 19), (7, 10), (4, 5)]
    feats = [torch.randn(2, c, *s) for c, s in zip(chans, sizes)]
    fpn = FPN(in_channels=chans, out_channels=16, num_outs=5)
    with torch.no_grad():
        for m in fpn.modules():  # non-zero biases so they are exercised
            if isinstance(m, torch.nn.Conv2d):
                m.bias.normal_()
        outs = fpn(feats)
        lat = [
            F.conv2d(f, fpn.lateral_convs[i].conv.weight, fpn.lateral_convs[i].conv.bias)
            for i, f in enumerate(feats)
        ]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + _nearest_ref(lat[i], sizes[i - 1])
        ref = [
            F.conv2d(l, fpn.fpn_convs[i].conv.weight, fpn.fpn_convs[i].conv.bias, padding=1)
            for i, l in enumerate(lat)
        ]
    assert len(outs) == 5
    for o, r in zip(outs[:4], ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[4], ref[3][..., ::2, ::2])


def test_fpn_key_names_shapes_and_init():
    fpn = FPN(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5)
    sd = fpn.state_dict()
    expected = {f"{n}.{i}.conv.{p}" for n in ("lateral_convs", "fpn_convs") for i in range(4)
                for p in ("weight", "bias")}
    assert set(sd) == expected  # P6 by max-pool has no parameters
    for i, c in enumerate([256, 512, 1024, 2048]):
        assert sd[f"lateral_convs.{i}.conv.weight"].shape == (256, c, 1, 1)
        assert sd[f"fpn_convs.{i}.conv.weight"].shape == (256, 256, 3, 3)
        assert sd[f"fpn_convs.{i}.conv.bias"].shape == (256,)
    # Xavier-uniform (gain 1) weights, zero bias
    w = sd["lateral_convs.3.conv.weight"]
    bound = math.sqrt(6.0 / (2048 + 256))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(torch.all(v == 0) for k, v in sd.items() if k.endswith("bias"))


def test_fpn_extra_convs_retinanet_style():
    torch.manual_seed(0)
    chans = [8, 16, 24, 32]
    feats = [torch.randn(1, c, 64 // 2**i, 64 // 2**i) for i, c in enumerate(chans)]
    fpn = FPN(in_channels=chans, out_channels=16, num_outs=5, start_level=1, add_extra_convs=True)
    sd = fpn.state_dict()
    assert sd["lateral_convs.0.conv.weight"].shape == (16, 16, 1, 1)  # C3
    assert sd["fpn_convs.3.conv.weight"].shape == (16, 32, 3, 3)  # P6 from C5 (on_input)
    assert sd["fpn_convs.4.conv.weight"].shape == (16, 16, 3, 3)  # P7 from P6
    outs = fpn(feats)
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]
    fpn_out = FPN(in_channels=chans, out_channels=16, num_outs=5, start_level=1,
                  add_extra_convs="on_output", relu_before_extra_convs=True)
    assert fpn_out.state_dict()["fpn_convs.3.conv.weight"].shape == (16, 16, 3, 3)
    assert [o.shape[-1] for o in fpn_out(feats)] == [32, 16, 8, 4, 2]


def test_fpn_bad_arguments():
    with pytest.raises(ValueError):
        FPN(in_channels=[8, 16], out_channels=8, num_outs=1)
    with pytest.raises(ValueError):
        FPN(in_channels=[8, 16], out_channels=8, add_extra_convs="on_something")
    fpn = FPN(in_channels=[8, 16], out_channels=8, num_outs=3)
    with pytest.raises(ValueError):
        fpn([torch.randn(1, 8, 8, 8)])
