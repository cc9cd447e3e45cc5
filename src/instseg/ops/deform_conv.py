"""Deformable convolution, DCN v1 and modulated DCN v2, with mmcv 2.1.0's semantics and names.

Runs on :func:`torchvision.ops.deform_conv2d` (CPU and CUDA, no compiled extension of ours).
Module and parameter names are mmcv's, so mmdetection state dicts load unchanged:

* :class:`DeformConv2d` / :class:`DeformConv2dPack` (mmdet ``dcn=dict(type='DCN')``): ``weight``
  ``(out, in/groups, kh, kw)``, no bias; the Pack adds ``conv_offset`` (an ``nn.Conv2d`` with the
  layer's kernel, stride, padding and dilation, ``in -> deform_groups*2*kh*kw`` channels, with bias,
  zero-initialised so a fresh layer is a plain convolution).
* :class:`ModulatedDeformConv2d` / :class:`ModulatedDeformConv2dPack` (``type='DCNv2'``):
  ``weight`` and optional ``bias`` (mmcv's default ``bias=True``; mmdet's ResNet passes
  ``bias=False``); ``conv_offset`` outputs ``deform_groups*3*kh*kw`` channels, chunked in three:
  ``o1, o2, m``; ``offset = cat(o1, o2)`` and ``mask = sigmoid(m)``. Zero-initialised, a fresh layer
  is a plain convolution times ``sigmoid(0) = 0.5``.

Definition (mmcv's kernels). For output position ``p0`` (``p0 = out * stride - padding``), kernel
tap ``k = i*kw + j`` at ``pk = (i*dilation_h, j*dilation_w)`` and an input channel ``c`` of deformable
group ``g = c // (C_in / deform_groups)``::

    out[o, p0] = bias[o] + sum_{c in group(o), k} weight[o, c, i, j] * m_gk(p0) * x_c(p0 + pk + d_gk(p0))

with ``d_gk = (offset[:, g*2K + 2k], offset[:, g*2K + 2k + 1])`` = (dy, dx) -- offsets interleaved
``[y0, x0, y1, x1, ..., y8, x8]`` per deformable group, taps in row-major order -- and the mask
``m_gk = mask[:, g*K + k]`` (1 for v1). ``x_c(y, x)`` is bilinear interpolation of the input with
zeros outside: 0 when ``y <= -1 or y >= H or x <= -1 or x >= W``, otherwise the four neighbours
weighted as usual, each neighbour outside the image counting as 0. This is also torchvision's
layout and forward, so offsets pass through unchanged.

Gradients are mmcv's too. One difference of torchvision's kernel is corrected here: mmcv's offset
gradient is exactly zero for a sample at ``y <= -1 or y >= H or x <= -1 or x >= W`` (where the
forward value is 0), whereas torchvision's is not zero at a coordinate of exactly ``-1`` -- which is
where a zero-offset 3x3 tap with padding 1 samples on the border, i.e. every DCN layer at
initialisation. The offset fed to torchvision passes its gradient only where the sample is inside
``(-1, H) x (-1, W)``; input, weight, mask and bias gradients need no change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single
from torchvision.ops import deform_conv2d as _tv_deform_conv2d

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
]

IntPair = int | tuple[int, int]


def _output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    size = []
    for d in range(2):
        kernel = dilation[d] * (weight.shape[2 + d] - 1) + 1
        size.append((x.shape[2 + d] + 2 * padding[d] - kernel) // stride[d] + 1)
    if min(size) <= 0:
        raise ValueError(
            f"convolution input is too small (output would be {x.shape[0]}x{weight.shape[0]}x{size[0]}x{size[1]})"
        )
    return size[0], size[1]


def _inside_mask(offset: Tensor, height: int, width: int, kernel, stride, padding, dilation) -> Tensor:
    """True where a tap's sample lies in ``(-1, H) x (-1, W)`` (mmcv's non-zero offset-gradient
    region), expanded to the (dy, dx) channel pair; same shape as ``offset``."""
    b, c, ho, wo = offset.shape
    kh, kw = kernel
    k = kh * kw
    off = offset.detach().reshape(b, c // (2 * k), k, 2, ho, wo)
    # integer part of the sampling position, as the kernels compute it: (out*s - p) + i*d
    iy = torch.arange(kh, device=offset.device).repeat_interleave(kw) * dilation[0]  # (K,)
    ix = torch.arange(kw, device=offset.device).repeat(kh) * dilation[1]
    oy = torch.arange(ho, device=offset.device) * stride[0] - padding[0]
    ox = torch.arange(wo, device=offset.device) * stride[1] - padding[1]
    base_y = (oy[None, :, None] + iy[:, None, None]).to(offset.dtype)  # (K, Ho, 1)
    base_x = (ox[None, None, :] + ix[:, None, None]).to(offset.dtype)  # (K, 1, Wo)
    y = base_y + off[:, :, :, 0]
    x = base_x + off[:, :, :, 1]
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)  # (B, G, K, Ho, Wo)
    return inside.unsqueeze(3).expand(b, c // (2 * k), k, 2, ho, wo).reshape(b, c, ho, wo)


def _deform_conv(
    x: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    deform_groups: int,
) -> Tensor:
    """Shared implementation: checks shapes as mmcv's kernels assume them, then torchvision."""
    if x.dim() != 4:
        raise ValueError(f"Expected 4D tensor as input, got {x.dim()}D tensor instead.")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[2], weight.shape[3]
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels, weight {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups}"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"out_channels {weight.shape[0]} is not divisible by groups {groups}")
    if x.shape[1] % deform_groups:
        raise ValueError(f"in_channels {x.shape[1]} is not divisible by deform_groups {deform_groups}")
    ho, wo = _output_size(x, weight, stride, padding, dilation)
    k = kh * kw
    want = (x.shape[0], 2 * deform_groups * k, ho, wo)
    if tuple(offset.shape) != want:
        raise ValueError(
            f"offset must have shape {want} (B, deform_groups*2*kh*kw, H_out, W_out), got {tuple(offset.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (x.shape[0], deform_groups * k, ho, wo):
        raise ValueError(
            f"mask must have shape {(x.shape[0], deform_groups * k, ho, wo)} (B, deform_groups*kh*kw, H_out, W_out), "
            f"got {tuple(mask.shape)}"
        )
    # mmcv: the offset's dtype decides (amp casts the offset conv's output)
    x = x.type_as(offset)
    weight = weight.type_as(x)
    if bias is not None:
        bias = bias.type_as(x)
    if mask is not None:
        mask = mask.type_as(x)
    if x.shape[0] == 0:
        return x.new_zeros((0, weight.shape[0], ho, wo))
    # A NaN offset makes the kernels (torchvision's and mmcv's alike) index memory with
    # int(floor(NaN)): a crash, not a NaN. Sample outside the image instead, and give the output
    # positions of such offsets NaN, so a diverged model still reads as non-finite.
    nan_pos = torch.isnan(offset)
    has_nan = bool(nan_pos.any())
    if has_nan:
        # every sampling position is <= H - 1 + padding: this puts it at <= -1 (zero, no gradient)
        offset = offset.masked_fill(nan_pos, -float(x.shape[2] + x.shape[3] + 2 * max(padding) + 4))
    if offset.requires_grad:
        inside = _inside_mask(offset, x.shape[2], x.shape[3], (kh, kw), stride, padding, dilation)
        # same values; the gradient reaches the offset only inside (-1, H) x (-1, W), as in mmcv
        offset = torch.where(inside, offset, offset.detach())
    out = _tv_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)
    if has_nan:
        out = out.masked_fill(nan_pos.any(1, keepdim=True), float("nan"))
    return out


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """mmcv's ``deform_conv2d`` (DCN v1): ``offset`` is ``(B, deform_groups*2*kh*kw, H_out, W_out)``.

    ``bias`` must be False (mmcv supports none); ``im2col_step`` is accepted for signature
    compatibility and has no effect on the result.
    """
    if bias is not False and bias is not None:
        raise ValueError("Only support bias is False.")
    return _deform_conv(input, offset, None, weight, None, stride, padding, dilation, groups, deform_groups)


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """mmcv's ``modulated_deform_conv2d`` (DCN v2): every sample is multiplied by its ``mask``
    value ``(B, deform_groups*kh*kw, H_out, W_out)`` before the weighted sum; optional ``bias``."""
    return _deform_conv(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups)


class DeformConv2d(nn.Module):
    """mmcv's ``DeformConv2d``: deformable convolution with the offset passed to ``forward``.

    ``weight`` ``(out_channels, in_channels // groups, kh, kw)``; no bias (``bias=True`` raises, as
    in mmcv). ``deformable_groups`` is accepted as the deprecated alias of ``deform_groups``.
    ``im2col_step`` is stored only (the result does not depend on it).

    ``self.bias`` exists and is ``None``; only :func:`instseg.modeling.backbones.resnet.fuse_conv_bn`
    sets it (folding BatchNorm for inference), and ``forward`` then adds it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        super().__init__()
        if deformable_groups is not None:
            deform_groups = deformable_groups
        if bias:
            raise ValueError(f"bias={bias} is not supported in DeformConv2d.")
        if in_channels % groups:
            raise ValueError(f"in_channels {in_channels} cannot be divisible by groups {groups}")
        if out_channels % groups:
            raise ValueError(f"out_channels {out_channels} cannot be divisible by groups {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.im2col_step = im2col_step
        # enable compatibility with nn.Conv2d
        self.transposed = False
        self.output_padding = _single(0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def _conv(self, x: Tensor, offset: Tensor) -> Tensor:
        return _deform_conv(
            x, offset, None, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deform_groups,
        )

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """``offset``: ``(B, deform_groups*2*kh*kw, H_out, W_out)``, ``[y0, x0, y1, x1, ...]``."""
        # mmcv pads an input smaller than the kernel at the bottom / right and crops the output
        pad_h = max(self.kernel_size[0] - x.size(2), 0)
        pad_w = max(self.kernel_size[1] - x.size(3), 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), "constant", 0)
            offset = F.pad(offset, (0, pad_w, 0, pad_h), "constant", 0)
        out = self._conv(x, offset)
        if pad_h or pad_w:
            out = out[:, :, : out.size(2) - pad_h, : out.size(3) - pad_w].contiguous()
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class DeformConv2dPack(DeformConv2d):
    """mmcv's ``DeformConv2dPack`` (mmdet ``type='DCN'``): a drop-in for ``nn.Conv2d`` whose offsets
    come from ``conv_offset`` (zero-initialised: a fresh layer equals a plain convolution)."""

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self._conv(x, self.conv_offset(x))


class ModulatedDeformConv2d(nn.Module):
    """mmcv's ``ModulatedDeformConv2d``: ``forward(x, offset, mask)``; ``bias=True`` by default.

    Init as mmcv's ``init_weights``: ``weight ~ U(-1/sqrt(n), 1/sqrt(n))`` with
    ``n = in_channels * kh * kw``, bias 0.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        super().__init__()
        if deformable_groups is not None:
            deform_groups = deformable_groups
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels {in_channels} / out_channels {out_channels} not divisible by groups {groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # enable compatibility with nn.Conv2d
        self.transposed = False
        self.output_padding = _single(0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.init_weights()

    def init_weights(self) -> None:
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.zero_()

    def _conv(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return _deform_conv(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.deform_groups,
        )

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self._conv(x, offset, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (mmdet ``type='DCNv2'``): ``conv_offset`` gives
    ``3 * deform_groups * kh * kw`` channels ``o1, o2, m`` (``torch.chunk(out, 3, 1)``);
    ``offset = cat(o1, o2)``, ``mask = sigmoid(m)``. Zero-initialised, so a fresh layer is a plain
    convolution times 0.5."""

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "conv_offset"):
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return self._conv(x, offset, torch.sigmoid(mask))
