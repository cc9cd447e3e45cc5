"""mmdetection's ``AnchorGenerator`` (v2/v3 conventions).

Per level with stride ``s``: base size ``s``; for ratio ``r = h / w`` and scale ``c``,
``h = s * c * sqrt(r)`` and ``w = s * c / sqrt(r)``; centre offset 0, so anchor centres sit
at ``(x * s, y * s)``.  Base anchors are ordered ratio-major then scale; the flat order of a
level is location-major in row-major ``(y, x)`` order, then base anchor, which matches
permuting a conv output ``(A, H, W)`` to ``(H, W, A)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Generates anchors for every level of a feature pyramid."""

    def __init__(self, *, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float]) -> None:
        self.strides = [int(s) for s in strides]
        self.ratios = [float(r) for r in ratios]
        self.scales = [float(c) for c in scales]
        self.base_anchors = [self._base_anchors(s) for s in self.strides]

    @property
    def num_base_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, stride: int) -> Tensor:
        h_ratios = torch.tensor([math.sqrt(r) for r in self.ratios])
        w_ratios = 1.0 / h_ratios
        scales = torch.tensor(self.scales)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

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
