"""mmdetection's ``DeltaXYWHBBoxCoder``: box <-> (dx, dy, dw, dh) deltas.

Centres are ``(x1 + x2) / 2`` and sizes ``x2 - x1`` (no +1).  Deltas are normalised by
``(delta - means) / stds``.  Decoding clamps ``|dw|, |dh|`` to ``|log(16 / 1000)|`` and,
given an image shape, clips boxes to ``[0, w] x [0, h]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_WH_CLAMP = abs(math.log(16.0 / 1000.0))


class DeltaXYWHCoder:
    """Encodes boxes as normalised deltas relative to reference boxes, and back."""

    def __init__(
        self,
        *,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_clamp: float = DEFAULT_WH_CLAMP,
    ) -> None:
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.wh_clamp = wh_clamp

    def encode(self, refs: Tensor, targets: Tensor) -> Tensor:
        """Normalised deltas ``(N, 4)`` that move ``refs`` onto ``targets`` (both ``(N, 4)``)."""
        refs = refs.float()
        targets = targets.float()
        pw = refs[:, 2] - refs[:, 0]
        ph = refs[:, 3] - refs[:, 1]
        px = (refs[:, 0] + refs[:, 2]) * 0.5
        py = (refs[:, 1] + refs[:, 3]) * 0.5
        gw = targets[:, 2] - targets[:, 0]
        gh = targets[:, 3] - targets[:, 1]
        gx = (targets[:, 0] + targets[:, 2]) * 0.5
        gy = (targets[:, 1] + targets[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, refs: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """Applies ``deltas`` ``(N, 4k)`` to ``refs`` ``(N, 4)``; returns ``(N, 4k)`` boxes.

        ``max_shape`` is ``(h, w)``; when given, boxes are clipped to the image.
        """
        n = refs.shape[0]
        k = deltas.shape[1] // 4 if deltas.numel() else max(deltas.shape[1] // 4, 1)
        d = deltas.reshape(n, k, 4)
        if d.dtype in (torch.float16, torch.bfloat16):  # autocast output: decode in float32 (pixel
            d = d.float()  # coordinates of a 1333-px image are only 1 px apart in fp16)
        d = d * d.new_tensor(self.stds) + d.new_tensor(self.means)
        refs = refs.to(d.dtype)[:, None, :]
        pxy = (refs[..., :2] + refs[..., 2:]) * 0.5
        pwh = refs[..., 2:] - refs[..., :2]
        dwh = d[..., 2:].clamp(min=-self.wh_clamp, max=self.wh_clamp)
        gxy = pxy + pwh * d[..., :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            h, w = max_shape
            boxes = torch.stack(
                [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
                dim=-1,
            )
        return boxes.reshape(n, k * 4)


class SSDCoder:
    """The official YOLACT / SSD box coding with variances ``(0.1, 0.2)`` on centre-size priors.

    ``encode``: ``t_xy = (g_c - p_c) / (v0 * p_wh)``, ``t_wh = log(g_wh / p_wh) / v1``.
    ``decode`` follows the official operation order exactly (so results are bit-identical):
    centre and size first, then ``x1y1 = c - wh / 2`` and ``x2y2 = x1y1 + wh``; no clamping.
    Priors are ``(N, 4)`` ``(cx, cy, w, h)`` (relative or absolute, as long as boxes match).
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2)) -> None:
        self.variances = (float(variances[0]), float(variances[1]))

    def encode(self, priors: Tensor, boxes: Tensor) -> Tensor:
        v0, v1 = self.variances
        g_cxcy = (boxes[:, :2] + boxes[:, 2:]) / 2 - priors[:, :2]
        g_cxcy = g_cxcy / (v0 * priors[:, 2:])
        g_wh = (boxes[:, 2:] - boxes[:, :2]) / priors[:, 2:]
        return torch.cat([g_cxcy, torch.log(g_wh) / v1], 1)

    def decode(self, priors: Tensor, loc: Tensor) -> Tensor:
        v0, v1 = self.variances
        if loc.dtype in (torch.float16, torch.bfloat16):  # autocast output: decode in float32
            loc = loc.float()
            priors = priors.float()
        boxes = torch.cat(
            (priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:], priors[:, 2:] * torch.exp(loc[:, 2:] * v1)), 1
        )
        x1y1 = boxes[:, :2] - boxes[:, 2:] / 2
        return torch.cat([x1y1, x1y1 + boxes[:, 2:]], 1)
