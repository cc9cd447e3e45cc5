"""Box utilities (XYXY, no +1)."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``(len(a), len(b))`` with mmdet's ``bbox_overlaps`` convention (union >= eps)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area_a[:, None] + area_b[None, :] - inter).clamp(min=EPS)
    return inter / union


def rescale_boxes(boxes: Tensor, scale_factor: Tensor) -> Tensor:
    """Divides XYXY boxes by a per-axis ``(w_scale, h_scale)`` factor (input frame -> original frame)."""
    return boxes / scale_factor.to(boxes).repeat(2)[None]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out
