"""Multi-level RoIAlign as mmdetection's ``SingleRoIExtractor`` does it.

Each RoI is pooled from one pyramid level chosen by its scale:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels
(``finest_scale = 56``: scale < 112 -> P2, < 224 -> P3, < 448 -> P4, else P5).  Pooling is
torchvision's ``roi_align`` with ``aligned=True`` and ``sampling_ratio=0`` (adaptive), which
is the same algorithm as mmcv's ``RoIAlign`` defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenates per-image boxes into ``(K, 5)`` rois ``(batch_index, x1, y1, x2, y2)``."""
    parts = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1) for i, b in enumerate(boxes)]
    if not parts:
        return torch.zeros((0, 5))
    return torch.cat(parts, dim=0)


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class MultiLevelRoIAlign:
    """Pools fixed-size features for rois from a list of feature maps of increasing stride."""

    def __init__(
        self, *, output_size: int, strides: Sequence[int], finest_scale: float = 56.0, sampling_ratio: int = 0
    ) -> None:
        self.output_size = output_size
        # 0 = adaptive ceil(roi_bin_size) samples per bin (mmcv's default, needed for parity);
        # a small fixed value (e.g. 2) is much cheaper for large RoIs on CPU
        self.sampling_ratio = sampling_ratio
        self.strides = list(strides)
        self.finest_scale = finest_scale

    def __call__(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        feats = list(feats)[: len(self.strides)]
        k = rois.shape[0]
        channels = feats[0].shape[1]
        out = feats[0].new_zeros((k, channels, self.output_size, self.output_size))
        if k == 0:
            return out
        rois = rois.to(feats[0].dtype)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, 1.0 / self.strides[0], self.sampling_ratio, True)
        levels = map_roi_levels(rois, len(feats), self.finest_scale)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            inds = torch.nonzero(levels == lvl).flatten()
            if inds.numel() == 0:
                continue
            out[inds] = roi_align(feat, rois[inds], self.output_size, 1.0 / stride, self.sampling_ratio, True).to(out.dtype)
        return out
