"""Anchor (prior) generators.

:class:`AnchorGenerator` is mmdetection's (v2/v3 conventions).  Per level with stride ``s`` and
base size ``b`` (default ``b = s``): for ratio ``r = h / w`` and scale ``c``, ``h = b * c * sqrt(r)``
and ``w = b * c / sqrt(r)``; the base anchors are centred on ``centers[l]`` (default ``(0, 0)``,
mmdet's ``center_offset=0``), so anchor centres sit at ``(x * s + cx, y * s + cy)``.  Strides may
be fractional (mmdet's YOLACT uses ``550 / 69`` ...).  Base anchors are ordered ratio-major then
scale; the flat order of a level is location-major in row-major ``(y, x)`` order, then base
anchor, which matches permuting a conv output ``(A, H, W)`` to ``(H, W, A)``.

:class:`YolactPriorGenerator` is the official YOLACT ``make_priors`` (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Generates anchors for every level of a feature pyramid."""

    def __init__(
        self,
        *,
        strides: Sequence[float],
        ratios: Sequence[float],
        scales: Sequence[float],
        base_sizes: Sequence[float] | None = None,
        centers: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        # integral strides stay ints (the RPN computes padded sizes from them)
        self.strides = [int(s) if float(s).is_integer() else float(s) for s in strides]
        self.ratios = [float(r) for r in ratios]
        self.scales = [float(c) for c in scales]
        self.base_sizes = [float(b) for b in (base_sizes if base_sizes is not None else self.strides)]
        self.centers = [(float(c[0]), float(c[1])) for c in centers] if centers is not None else None
        if len(self.base_sizes) != len(self.strides) or (self.centers is not None and len(self.centers) != len(self.strides)):
            raise ValueError("base_sizes and centers need one entry per stride")
        self.base_anchors = [
            self._base_anchors(b, self.centers[i] if self.centers else (0.0, 0.0)) for i, b in enumerate(self.base_sizes)
        ]

    @property
    def num_base_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def _base_anchors(self, base_size: float, center: tuple[float, float]) -> Tensor:
        h_ratios = torch.tensor([math.sqrt(r) for r in self.ratios])
        w_ratios = 1.0 / h_ratios
        scales = torch.tensor(self.scales)
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        cx, cy = center
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=1)

    def grid_anchors(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Anchors ``(H * W * A, 4)`` per level for feature maps of the given ``(H, W)`` sizes."""
        out = []
        for (fh, fw), stride, base in zip(feat_sizes, self.strides, self.base_anchors):
            shift_x = torch.arange(fw, device=device, dtype=torch.float32) * stride
            shift_y = torch.arange(fh, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + base.to(device)[None]).reshape(-1, 4))
        return out

    def valid_flags(
        self, feat_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], device: torch.device
    ) -> list[Tensor]:
        """Per level, whether each anchor's location lies inside the un-padded image.

        Like mmdet: a location is valid when ``x < ceil(w / stride)`` and ``y < ceil(h / stride)``.
        """
        h, w = image_size
        out = []
        for (fh, fw), stride in zip(feat_sizes, self.strides):
            vh = min(int(math.ceil(h / stride)), fh)
            vw = min(int(math.ceil(w / stride)), fw)
            valid = torch.zeros((fh, fw), dtype=torch.bool, device=device)
            valid[:vh, :vw] = True
            out.append(valid[:, :, None].expand(fh, fw, self.num_base_anchors).reshape(-1))
        return out


class YolactPriorGenerator:
    """The official YOLACT ``make_priors`` with ``use_pixel_scales=True, preapply_sqrt=False``.

    For a level of ``h x w`` cells and pixel scale ``s``, the prior at cell ``(y, x)`` and aspect
    ratio ``ar`` is, relative to an input of ``max_size`` pixels: centre ``((x + .5) / w,
    (y + .5) / h)``, width ``s * sqrt(ar) / max_size`` and height ``s / sqrt(ar) / max_size`` --
    or, with ``square`` (the v1 configs' ``use_square_anchors=True``, a bug kept for weight
    compatibility), height = width.  Values are computed in Python double and stored float32, as
    the official code does.  Order: row-major cells, then aspect ratios (``[1, 1/2, 2]``).
    """

    def __init__(
        self, *, scales: Sequence[float], aspect_ratios: Sequence[float], max_size: int, square: bool = True
    ) -> None:
        self.scales = [float(s) for s in scales]
        self.aspect_ratios = [float(a) for a in aspect_ratios]
        self.max_size = int(max_size)
        self.square = square
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_base_anchors(self) -> int:
        return len(self.aspect_ratios)

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    def priors(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Per level ``(H * W * A, 4)`` relative ``(cx, cy, w, h)`` priors (cached per size and device)."""
        key = (tuple(tuple(int(v) for v in s) for s in feat_sizes), str(device))
        if key not in self._cache:
            self._cache[key] = self._make(feat_sizes, device)
        return self._cache[key]

    def _make(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device) -> list[Tensor]:
        out = []
        for (fh, fw), scale in zip(feat_sizes, self.scales):
            rows = []
            for j in range(fh):
                for i in range(fw):
                    x = (i + 0.5) / fw
                    y = (j + 0.5) / fh
                    for ar in self.aspect_ratios:
                        r = math.sqrt(ar)
                        pw = scale * r / self.max_size
                        ph = pw if self.square else scale / r / self.max_size
                        rows.append((x, y, pw, ph))
            out.append(torch.tensor(rows, dtype=torch.float32, device=device).reshape(-1, 4))
        return out

    def grid_anchors(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device, image_size: tuple[int, int]) -> list[Tensor]:
        """Per level XYXY anchors in pixels of an ``image_size = (h, w)`` input."""
        h, w = image_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        return [point_form(p) * scale for p in self.priors(feat_sizes, device)]


def point_form(priors: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)`` as the official YOLACT computes it."""
    return torch.cat((priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2), 1)


def inside_flags(anchors: Tensor, valid: Tensor, image_size: tuple[int, int], allowed_border: float) -> Tensor:
    """mmdet's ``anchor_inside_flags``: valid anchors, and (if ``allowed_border >= 0``) inside the image."""
    if allowed_border < 0:
        return valid
    h, w = image_size
    b = allowed_border
    return (
        valid
        & (anchors[:, 0] >= -b)
        & (anchors[:, 1] >= -b)
        & (anchors[:, 2] < w + b)
        & (anchors[:, 3] < h + b)
    )
