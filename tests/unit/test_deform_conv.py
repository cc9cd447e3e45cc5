"""Deformable convolution (mmcv 2.1.0 semantics) and the DCN ResNet / ResNeXt backbones.

The reference below is mmcv's definition written out: for output position p0 and kernel tap k,
sample the input at p0 + pk + dpk (offsets interleaved (dy, dx) per tap, per deformable group) by
bilinear interpolation, 0 outside (-1, H) x (-1, W) and each neighbour outside the image counting as
0; DCN v2 multiplies every sample by its mask; then the (grouped) weighted sum. Autograd through it
gives mmcv's gradients (floor() is piecewise constant; the outside region has zero gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from instseg.modeling.backbones.resnet import ResNet, fuse_conv_bn, load_backbone_weights
from instseg.ops.deform_conv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
    modulated_deform_conv2d,
)


# ====================================================================== brute-force reference
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _bilinear_zero_outside(img: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """img (B, G, Cg, H, W); y, x (B, G, Ho, Wo) -> (B, G, Cg, Ho, Wo), mmcv's bilinear sampling."""
    b, g, cg, h, w = img.shape
    y0, x0 = torch.floor(y.detach()), torch.floor(x.detach())
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    flat = img.reshape(b, g, cg, h * w)

    def corner(yy: Tensor, xx: Tensor) -> Tensor:
        ok = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().flatten(2)  # (B, G, Ho*Wo)
        v = torch.gather(flat, 3, idx[:, :, None].expand(b, g, cg, idx.shape[-1]))
        return v.reshape(b, g, cg, *y.shape[2:]) * ok[:, :, None].to(img.dtype)

    val = (
        (hy * hx)[:, :, None] * corner(y0, x0)
        + (hy * lx)[:, :, None] * corner(y0, x0 + 1)
        + (ly * hx)[:, :, None] * corner(y0 + 1, x0)
        + (ly * lx)[:, :, None] * corner(y0 + 1, x0 + 1)
    )
    inside = (y > -1) & (y < h) & (x > -1) & (x < w)
    return torch.where(inside[:, :, None], val, torch.zeros_like(val))


def reference_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = x.shape
    o, cpg, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    k_taps = kh * kw
    dg = deform_groups
    off = offset.reshape(b, dg, k_taps, 2, ho, wo)
    img = x.reshape(b, dg, c // dg, h, w)
    oy = (torch.arange(ho, dtype=x.dtype) * stride[0] - padding[0])[:, None]
    ox = (torch.arange(wo, dtype=x.dtype) * stride[1] - padding[1])[None, :]
    cols = []
    for k in range(k_taps):
        i, j = divmod(k, kw)
        y = oy + i * dilation[0] + off[:, :, k, 0]
        xx = ox + j * dilation[1] + off[:, :, k, 1]
        v = _bilinear_zero_outside(img, y, xx)  # (B, G, C/G, Ho, Wo)
        if mask is not None:
            v = v * mask.reshape(b, dg, k_taps, ho, wo)[:, :, k, None]
        cols.append(v.reshape(b, c, ho, wo))
    col = torch.stack(cols, 2)  # (B, C, K, Ho, Wo)
    col = col.reshape(b, groups, c // groups, k_taps, ho, wo)
    wt = weight.reshape(groups, o // groups, cpg, k_taps)
    out = torch.einsum("bgckhw,gock->bgohw", col, wt).reshape(b, o, ho, wo)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


CASES = [
    # (C_in, C_out, kernel, stride, padding, dilation, groups, deform_groups)
    (4, 6, (3, 3), 1, 1, 1, 1, 1),
    (4, 4, (3, 3), 2, 1, 1, 2, 2),
    (6, 6, (3, 3), 1, 2, 2, 3, 2),
    (4, 2, (3, 2), (2, 1), (1, 0), (1, 2), 1, 4),
]


def _inputs(case, seed, *, modulated):
    cin, cout, k, s, p, d, g, dg = case
    gen = torch.Generator().manual_seed(seed)
    h, w = 7, 6
    kh, kw = k
    s, p, d = _pair(s), _pair(p), _pair(d)
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    dt = torch.float64
    x = torch.randn(2, cin, h, w, generator=gen, dtype=dt)
    weight = torch.randn(cout, cin // g, kh, kw, generator=gen, dtype=dt)
    offset = torch.randn(2, dg * 2 * kh * kw, ho, wo, generator=gen, dtype=dt) * 2.0
    # a third of the offsets integer-valued: samples exactly on pixels, on the border (-1) and outside
    pick = torch.rand(offset.shape, generator=gen) < 0.33
    offset = torch.where(pick, offset.round(), offset)
    mask = torch.rand(2, dg * kh * kw, ho, wo, generator=gen, dtype=dt) if modulated else None
    bias = torch.randn(cout, generator=gen, dtype=dt) if modulated else None
    return x, offset, mask, weight, bias


def _grads(fn, tensors, seed):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, params, g)
    return out, grads


@pytest.mark.parametrize("case", CASES)
def test_dcn_v1_matches_bilinear_reference_outputs_and_gradients(case):
    _, _, k, s, p, d, g, dg = case
    x, offset, _, weight, _ = _inputs(case, 1, modulated=False)
    ours = lambda x_, o_, w_: deform_conv2d(x_, o_, w_, s, p, d, g, dg)  # noqa: E731
    ref = lambda x_, o_, w_: reference_deform_conv(x_, o_, None, w_, None, s, p, d, g, dg)  # noqa: E731
    out, grads = _grads(ours, [x, offset, weight], 2)
    out_ref, grads_ref = _grads(ref, [x, offset, weight], 2)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("input", "offset", "weight"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_dcn_v2_matches_bilinear_reference_outputs_and_gradients(case):
    _, _, k, s, p, d, g, dg = case
    x, offset, mask, weight, bias = _inputs(case, 3, modulated=True)
    ours = lambda x_, o_, m_, w_, b_: modulated_deform_conv2d(x_, o_, m_, w_, b_, s, p, d, g, dg)  # noqa: E731
    ref = lambda x_, o_, m_, w_, b_: reference_deform_conv(x_, o_, m_, w_, b_, s, p, d, g, dg)  # noqa: E731
    out, grads = _grads(ours, [x, offset, mask, weight, bias], 4)
    out_ref, grads_ref = _grads(ref, [x, offset, mask, weight, bias], 4)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("input", "offset", "mask", "weight", "bias"), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_offset_gradient_is_zero_on_the_minus_one_border_as_in_mmcv():
    """Zero offsets, padding 1: the first row / column of taps sample at exactly -1. mmcv's offset
    gradient there is 0 (torchvision's raw kernel is not); inside the image it is not."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 5, 5, dtype=torch.float64, requires_grad=True)
    deform_conv2d(x, offset, weight, 1, 1).sum().backward()
    gy = offset.grad[0, 0]  # tap (0, 0), dy: samples at y = out_y - 1 -> -1 on the first output row
    assert torch.all(gy[0] == 0) and torch.all(offset.grad[0, 1][:, 0] == 0)  # dx of tap (0,0) at x = -1
    assert gy[1:, 1:].abs().sum() > 0
    ref = offset.detach().clone().requires_grad_(True)
    reference_deform_conv(x, ref, None, weight, None, 1, 1, 1, 1, 1).sum().backward()
    torch.testing.assert_close(offset.grad, ref.grad, rtol=1e-10, atol=1e-10)


def test_offset_layout_is_dy_dx_per_tap():
    """An offset of +1 in every even channel (dy) samples one row down: a plain conv whose zero
    padding moved from the top to the bottom; +1 in the odd channels (dx): from left to right."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    off = torch.zeros(1, 18, 6, 7, dtype=torch.float64)
    off[:, 0::2] = 1.0
    down = F.pad(x, (1, 1, 0, 2))  # (left, right, top, bottom)
    torch.testing.assert_close(deform_conv2d(x, off, weight, 1, 1), F.conv2d(down, weight))
    off = torch.zeros_like(off)
    off[:, 1::2] = 1.0
    right = F.pad(x, (0, 2, 1, 1))
    torch.testing.assert_close(deform_conv2d(x, off, weight, 1, 1), F.conv2d(right, weight))
    # a single tap: channel 2k / 2k+1 belong to tap k = i*kw + j (row-major); move only tap 4 (centre)
    off = torch.zeros_like(off)
    off[:, 8] = 1.0  # dy of the centre tap
    w_centre = torch.zeros_like(weight)
    w_centre[:, :, 1, 1] = weight[:, :, 1, 1]
    expect = F.conv2d(down, w_centre)
    torch.testing.assert_close(deform_conv2d(x, off, w_centre, 1, 1), expect)


@pytest.mark.parametrize("stride,padding,dilation,groups,dg", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 2), (1, 2, 2, 4, 1)])
def test_packs_at_init_reduce_to_plain_conv_v1_and_half_conv_v2(stride, padding, dilation, groups, dg):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 10)
    v1 = DeformConv2dPack(8, 8, 3, stride, padding, dilation, groups, dg)
    assert torch.all(v1.conv_offset.weight == 0) and torch.all(v1.conv_offset.bias == 0)
    plain = F.conv2d(x, v1.weight, None, stride, padding, dilation, groups)
    torch.testing.assert_close(v1(x), plain, rtol=1e-5, atol=1e-5)
    v2 = ModulatedDeformConv2dPack(8, 8, 3, stride, padding, dilation, groups, dg)
    with torch.no_grad():
        v2.bias.uniform_(-1, 1)
    plain = F.conv2d(x, v2.weight, None, stride, padding, dilation, groups)
    torch.testing.assert_close(v2(x), 0.5 * plain + v2.bias[None, :, None, None], rtol=1e-5, atol=1e-5)


def test_packs_use_conv_offset_as_mmcv_does():
    """v1: offset = conv_offset(x). v2: (o1, o2, m) = chunk(conv_offset(x), 3); offset = cat(o1, o2),
    mask = sigmoid(m). Checked (outputs and all gradients) against the reference."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    for pack in (
        DeformConv2dPack(4, 6, 3, stride=2, padding=1, deform_groups=2).double(),
        ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, deform_groups=2).double(),
    ):
        with torch.no_grad():
            pack.conv_offset.weight.normal_(0, 0.5)
            pack.conv_offset.bias.normal_(0, 0.5)
        xa = x.clone().requires_grad_(True)
        out = pack(xa)
        g = torch.randn_like(out)
        out.backward(g)
        params = dict(pack.named_parameters())
        grads = {n: p.grad.clone() for n, p in params.items()}
        xb = x.clone().requires_grad_(True)
        for p in params.values():
            p.grad = None
        raw = pack.conv_offset(xb)
        if isinstance(pack, ModulatedDeformConv2dPack):
            k2 = 2 * pack.deform_groups * 9
            offset, mask = raw[:, :k2], torch.sigmoid(raw[:, k2:])
            assert pack.conv_offset.out_channels == 3 * 2 * 9
            bias = pack.bias
        else:
            offset, mask, bias = raw, None, None
            assert pack.conv_offset.out_channels == 2 * 2 * 9
        ref = reference_deform_conv(xb, offset, mask, pack.weight, bias, 2, 1, 1, 1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
        for n, p in params.items():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")


def test_mmcv_parameter_names_shapes_and_options():
    v1 = DeformConv2dPack(16, 32, 3, padding=1, deform_groups=2)
    assert {k: tuple(v.shape) for k, v in v1.state_dict().items()} == {
        "weight": (32, 16, 3, 3), "conv_offset.weight": (36, 16, 3, 3), "conv_offset.bias": (36,),
    }
    v2 = ModulatedDeformConv2dPack(16, 32, 3, padding=1, groups=4, bias=False)
    assert {k: tuple(v.shape) for k, v in v2.state_dict().items()} == {
        "weight": (32, 4, 3, 3), "conv_offset.weight": (27, 16, 3, 3), "conv_offset.bias": (27,),
    }
    assert "bias" in ModulatedDeformConv2dPack(16, 32, 3).state_dict()  # mmcv's default bias=True
    with pytest.raises(ValueError, match="bias"):
        DeformConv2d(4, 4, 3, bias=True)
    with pytest.raises(ValueError, match="bias"):
        deform_conv2d(torch.zeros(1, 4, 5, 5), torch.zeros(1, 18, 3, 3), torch.zeros(4, 4, 3, 3), bias=True)
    assert DeformConv2dPack(8, 8, 3, deformable_groups=4).deform_groups == 4  # deprecated alias
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv2d(torch.zeros(1, 4, 5, 5), torch.zeros(1, 9, 3, 3), torch.zeros(4, 4, 3, 3))
    # the non-pack modules take offset (and mask) in forward
    x = torch.randn(1, 4, 5, 5)
    m1, m2 = DeformConv2d(4, 4, 3, padding=1), ModulatedDeformConv2d(4, 4, 3, padding=1)
    torch.testing.assert_close(m1(x, torch.zeros(1, 18, 5, 5)), F.conv2d(x, m1.weight, padding=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        m2(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5)), F.conv2d(x, m2.weight, m2.bias, padding=1),
        rtol=1e-5, atol=1e-5,
    )
    # mmcv's DeformConv2d pads an input smaller than the kernel, then crops
    tiny = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(
        m1(tiny, torch.zeros(1, 18, 2, 2)), F.conv2d(tiny, m1.weight, padding=1), rtol=1e-5, atol=1e-5
    )
    assert DeformConv2dPack(4, 4, 3, padding=1)(torch.zeros(0, 4, 5, 5)).shape == (0, 4, 5, 5)


def test_nan_offsets_give_nan_not_a_crash():
    """A NaN offset would make the sampling kernels index memory with int(floor(NaN))."""
    x = torch.randn(1, 4, 6, 6)
    offset = torch.zeros(1, 18, 6, 6)
    offset[0, 3, 2, 4] = float("nan")
    offset[0, 5, 0, 0] = float("inf")
    out = deform_conv2d(x, offset, torch.randn(4, 4, 3, 3), 1, 1)
    assert torch.isnan(out[0, :, 2, 4]).all() and torch.isfinite(out).sum() == out.numel() - 4


# ====================================================================== DCN ResNet / ResNeXt
def mmdet_resnet_backbone_shapes(depth, groups=1, base_width=64, stage_with_dcn=(False,) * 4, dcn=None, dg=1):
    """``backbone.*`` keys and shapes of mmdetection's ResNet / ResNeXt (style='pytorch') with
    ``dcn=dict(type='DCN'|'DCNv2', deform_groups=dg)``, written from mmdet's definition."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, n):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (n,)
        keys[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for i, nb in enumerate(blocks):
        planes = 64 * 2**i
        width = planes if groups == 1 else (planes * base_width // 64) * groups
        for b in range(nb):
            pre = f"layer{i + 1}.{b}"
            keys[f"{pre}.conv1.weight"] = (width, inplanes if b == 0 else planes * 4, 1, 1)
            bn(f"{pre}.bn1", width)
            keys[f"{pre}.conv2.weight"] = (width, width // groups, 3, 3)
            if stage_with_dcn[i] and dcn is not None:
                per_tap = 2 if dcn == "DCN" else 3
                keys[f"{pre}.conv2.conv_offset.weight"] = (dg * per_tap * 9, width, 3, 3)
                keys[f"{pre}.conv2.conv_offset.bias"] = (dg * per_tap * 9,)
            bn(f"{pre}.bn2", width)
            keys[f"{pre}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{pre}.bn3", planes * 4)
            if b == 0:
                keys[f"{pre}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{pre}.downsample.1", planes * 4)
        inplanes = planes * 4
    return keys


C3_C5 = (False, True, True, True)


@pytest.mark.parametrize(
    "kw,mmdet",
    [
        (dict(depth=50, dcn="dcn", stage_with_dcn=C3_C5), dict(depth=50, dcn="DCN")),
        (dict(depth=50, dcn="dcnv2", stage_with_dcn=C3_C5, deform_groups=4), dict(depth=50, dcn="DCNv2", dg=4)),
        (
            dict(depth=101, groups=64, width_per_group=4, dcn="dcn", stage_with_dcn=C3_C5),
            dict(depth=101, groups=64, base_width=4, dcn="DCN"),
        ),
        (dict(depth=50, dcn="dcn", stage_with_dcn=(True, False, True, False)), dict(depth=50, dcn="DCN")),
    ],
)
def test_dcn_resnet_keys_and_shapes_are_mmdetections(kw, mmdet):
    with torch.device("meta"):
        m = ResNet(**kw)
    expect = mmdet_resnet_backbone_shapes(stage_with_dcn=kw["stage_with_dcn"], **mmdet)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expect
    for i, on in enumerate(kw["stage_with_dcn"]):
        for block in getattr(m, f"layer{i + 1}"):
            cls = {"dcn": DeformConv2dPack, "dcnv2": ModulatedDeformConv2dPack}[kw["dcn"]] if on else nn.Conv2d
            assert type(block.conv2) is cls
    # style='pytorch': the stride-2 conv of a downsampling bottleneck is conv2, and its offsets too
    c = m.layer3[0].conv2
    assert c.stride == (2, 2) and c.conv_offset.stride == (2, 2) and c.padding == (1, 1)
    if kw.get("groups", 1) > 1:
        assert c.groups == kw["groups"] and c.conv_offset.groups == 1
    if kw["dcn"] == "dcnv2":
        assert c.bias is None  # mmdet's Bottleneck builds conv2 with bias=False


def test_dcn_off_keeps_plain_resnet_and_rng_stream():
    with torch.device("meta"):
        plain_keys = list(ResNet(depth=50).state_dict())
        assert list(ResNet(depth=50, dcn=None, stage_with_dcn=C3_C5).state_dict()) == plain_keys
        assert list(ResNet(depth=50, dcn="", stage_with_dcn=C3_C5).state_dict()) == plain_keys
    torch.manual_seed(0)
    plain = ResNet(depth=50)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    on = ResNet(depth=50, dcn="dcn", stage_with_dcn=C3_C5)
    assert torch.equal(after_plain, torch.rand(3))  # building DCN does not shift the seed stream
    sd_plain, sd_on = plain.state_dict(), on.state_dict()
    assert all(torch.equal(sd_plain[k], sd_on[k]) for k in sd_plain)  # same weights; offsets extra
    # zero offsets: DCN v1 is the plain network
    x = torch.randn(1, 3, 32, 32)
    on.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(on(x), plain(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dcn_resnet_argument_checks():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="dcn"):
            ResNet(depth=50, dcn="dcn3", stage_with_dcn=C3_C5)
        with pytest.raises(ValueError, match="BasicBlock"):
            ResNet(depth=18, dcn="dcn", stage_with_dcn=C3_C5)
        with pytest.raises(ValueError, match="stage_with_dcn"):
            ResNet(depth=50, dcn="dcn", stage_with_dcn=(True, True))
        ResNet(depth=18, dcn="dcn", stage_with_dcn=(False,) * 4)  # mmdet: dcn reaches no BasicBlock
        assert type(ResNet(depth=50, dcn="DCNv2", stage_with_dcn=C3_C5).layer4[0].conv2) is ModulatedDeformConv2dPack


def test_fallback_on_stride_is_mmdets_popped_key():
    """mmdet pops ``fallback_on_stride`` from the one dcn dict shared by every block: only the first
    DCN bottleneck built gets a plain conv2."""
    with torch.device("meta"):
        m = ResNet(depth=50, dcn="dcn", stage_with_dcn=C3_C5, fallback_on_stride=True)
    assert type(m.layer2[0].conv2) is nn.Conv2d
    assert type(m.layer2[1].conv2) is DeformConv2dPack and type(m.layer3[0].conv2) is DeformConv2dPack


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(m, (DeformConv2dPack, ModulatedDeformConv2dPack)):
                m.conv_offset.weight.copy_(torch.randn(m.conv_offset.weight.shape, generator=g) * 0.01)
                m.conv_offset.bias.copy_(torch.randn(m.conv_offset.bias.shape, generator=g) * 0.5)


def test_bn_folding_covers_dcn_convs():
    """v1 on c4, v2 (grouped, as in ResNeXt) in one c5 block: folded BN gives the DCN layer a bias;
    same outputs."""
    torch.manual_seed(0)
    m = ResNet(depth=50, dcn="dcn", stage_with_dcn=(False, False, True, False))
    m.layer4[1].conv2 = ModulatedDeformConv2dPack(512, 512, 3, padding=1, groups=32, bias=False)
    _randomise(m)
    m.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = m(x)
        fuse_conv_bn(m, inplace=True)
        out = m(x)
    for block in (m.layer3[1], m.layer4[1]):
        assert isinstance(block.bn2, nn.Identity) and block.conv2.bias is not None
    assert not any(isinstance(mod, _BatchNorm) for mod in m.modules())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dcn_resnet_trains_offsets_and_channels_last_matches():
    torch.manual_seed(0)
    m = ResNet(depth=50, dcn="dcnv2", stage_with_dcn=C3_C5)
    _randomise(m)
    m.train()
    outs = m(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in outs).backward()
    for name, p in m.named_parameters():
        if "conv_offset" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    m.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m.to(memory_format=torch.channels_last)
        out = m(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_imagenet_weights_load_into_dcn_backbone_offsets_stay_zero():
    """A classification checkpoint has no offsets: they keep their zero init (mmdet loads pretrained
    weights with strict=False). A checkpoint that has some offsets must have all of them."""
    torch.manual_seed(0)
    m = ResNet(depth=50, dcn="dcn", stage_with_dcn=C3_C5)
    sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in m.state_dict().items() if ".conv_offset." not in k}
    sd["fc.weight"] = torch.zeros(1000, 2048)  # an ImageNet file's classifier is ignored
    load_backbone_weights(m, sd)
    assert torch.equal(m.layer3[2].conv2.weight, sd["layer3.2.conv2.weight"])
    assert torch.all(m.layer3[2].conv2.conv_offset.weight == 0)
    partial = dict(m.state_dict())
    partial.pop("layer4.2.conv2.conv_offset.bias")
    with pytest.raises(RuntimeError, match="layer4.2.conv2.conv_offset.bias"):
        load_backbone_weights(m, {"state_dict": {"backbone." + k: v for k, v in partial.items()}})
    # mmdet v1 / mmcv < 2 checkpoints name the offsets conv2_offset
    full = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    load_backbone_weights(m, {k.replace("conv2.conv_offset.", "conv2_offset."): v for k, v in full.items()})
    assert torch.equal(m.layer4[2].conv2.conv_offset.weight, full["layer4.2.conv2.conv_offset.weight"])


# ====================================================================== presets + mmdet checkpoints
DCN_PRESETS = {
    "mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco": dict(depth=50, dcn="DCN"),
    "mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco": dict(depth=50, dcn="DCNv2"),
    "mask_rcnn_r101_fpn_dconv_c3-c5_1x_coco": dict(depth=101, dcn="DCN"),
    "cascade_mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco": dict(depth=50, dcn="DCN"),
    "cascade_mask_rcnn_r101_fpn_dconv_c3-c5_1x_coco": dict(depth=101, dcn="DCN"),
    "cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco": dict(depth=101, groups=32, base_width=4, dcn="DCN"),
    "htc_x101_64x4d_fpn_dconv_c3-c5_mstrain_400_1400_16x1_20e_coco": dict(
        depth=101, groups=64, base_width=4, dcn="DCN"
    ),
}


def _fake_tensor(shape, buf: Tensor) -> Tensor:
    """A random-valued tensor of ``shape`` sharing one small storage (rows repeat), so a whole
    detector's checkpoint is a few MB on disk."""
    if len(shape) == 0:
        return torch.tensor(7)
    inner = 1
    for s in shape[1:]:
        inner *= s
    return buf[:inner].reshape(shape[1:]).expand(shape)


def _fake_mmdet_checkpoint(name: str, path) -> dict[str, tuple[int, ...]]:
    """mmdet-named random checkpoint: ``backbone.*`` from mmdet's architecture (above); the other
    keys (neck, heads: mmdet's names, covered by the parity tests) from the preset's model."""
    from instseg.config.presets import get_preset
    from instseg.modeling.zoo import build_model

    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg.model)
    backbone = mmdet_resnet_backbone_shapes(stage_with_dcn=C3_C5, **DCN_PRESETS[name])
    shapes = {f"backbone.{k}": v for k, v in backbone.items()}
    for k, v in model.state_dict().items():
        if not k.startswith("backbone."):
            k = k.replace("roi_head.stages.", "roi_head.STAGE.")
            shapes[k] = tuple(v.shape)
    # instseg keeps RoI stages under roi_head.stages.{t}; mmdet names them bbox_head[.t] / mask_head[.t]
    mm: dict[str, tuple[int, ...]] = {}
    cascade = cfg.model.arch != "mask_rcnn"
    for k, v in shapes.items():
        if k.startswith("roi_head.STAGE."):
            t, head, rest = k[len("roi_head.STAGE."):].split(".", 2)
            head = "bbox_head" if head == "box_head" else head
            k = f"roi_head.{head}.{t}.{rest}" if cascade else f"roi_head.{head}.{rest}"
        mm[k] = v
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(1 << 17, generator=g)
    pos = buf.abs() + 0.5
    state = {
        k: _fake_tensor(s, pos if k.endswith("running_var") else buf) if s else torch.tensor(3) for k, s in mm.items()
    }
    torch.save({"state_dict": state, "meta": {"mmdet_version": "2.28.2"}}, path)
    return mm


@pytest.mark.parametrize("name", sorted(DCN_PRESETS))
def test_mmdet_dcn_checkpoint_converts_and_loads_every_key(name, tmp_path, monkeypatch):
    import instseg.modeling.zoo as zoo
    from instseg.config.presets import get_preset
    from instseg.convert.mmdet import convert_checkpoint

    real_build = zoo.build_model

    def meta_build(cfg):  # the conversion check needs shapes only
        with torch.device("meta"):
            return real_build(cfg)

    monkeypatch.setattr(zoo, "build_model", meta_build)
    path = tmp_path / f"{name}.pth"
    mm = _fake_mmdet_checkpoint(name, path)
    dcn_blocks = (4 + 6 + 3) if DCN_PRESETS[name]["depth"] == 50 else (4 + 23 + 3)  # c3-c5
    assert sum(".conv2.conv_offset." in k for k in mm) == 2 * dcn_blocks
    cfg = get_preset(name)
    ckpt = convert_checkpoint(path, cfg)
    assert len(ckpt["model"]) == len(mm)
    model = meta_build(cfg.model)
    result = model.load_state_dict(ckpt["model"], strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd = model.state_dict()
    assert all(not v.is_meta for v in sd.values())  # every parameter and buffer came from the file


def test_mmdet_dcn_r50_checkpoint_real_load_and_forward(tmp_path):
    """One preset for real (no meta device): convert, load, run the DCN backbone."""
    from instseg.config.presets import get_preset
    from instseg.convert.mmdet import convert_checkpoint
    from instseg.modeling.zoo import build_model

    name = "mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco"
    path = tmp_path / "m.pth"
    _fake_mmdet_checkpoint(name, path)
    raw = torch.load(path, weights_only=False)["state_dict"]
    cfg = get_preset(name)
    assert (cfg.model.dcn, cfg.model.stage_with_dcn) == ("dcn", C3_C5)
    model = build_model(cfg.model)
    model.load_state_dict(convert_checkpoint(path, cfg)["model"], strict=True)
    for k in ("layer3.4.conv2.conv_offset.weight", "layer2.0.conv2.weight", "layer4.2.conv2.conv_offset.bias"):
        assert torch.equal(model.backbone.state_dict()[k], raw["backbone." + k])
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 64) * 1e-3)
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]


def test_dcn_presets_are_mmdetections_settings():
    from instseg.config.presets import get_preset, list_presets

    assert set(DCN_PRESETS) <= set(list_presets())
    base = {
        "mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco": "mask_rcnn_r50_fpn_1x_coco",
        "cascade_mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco": "cascade_mask_rcnn_r50_fpn_1x_coco",
        "htc_x101_64x4d_fpn_dconv_c3-c5_mstrain_400_1400_16x1_20e_coco": "htc_x101_64x4d_fpn_16x1_20e_coco",
    }
    for name, parent in base.items():
        a, b = get_preset(name), get_preset(parent)
        assert a.model.dcn == "dcn" and a.model.stage_with_dcn == C3_C5
        a.model.dcn, a.model.stage_with_dcn = b.model.dcn, b.model.stage_with_dcn
        assert a.model == b.model
        assert a.train == b.train
    assert get_preset("mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco").model.dcn == "dcnv2"
    htc = get_preset("htc_x101_64x4d_fpn_dconv_c3-c5_mstrain_400_1400_16x1_20e_coco")
    assert htc.model.backbone == "resnext101_64x4d" and htc.model.semantic
    assert htc.data.train_short_range == (400, 1400) and htc.data.scale[0] == 1600
    assert (htc.train.epochs, htc.train.lr_steps, htc.data.batch_size) == (20, (16, 19), 1)
