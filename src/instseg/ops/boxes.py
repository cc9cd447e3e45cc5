"""Box utilities (XYXY, no +1)."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


# rows of ``a`` processed at once: bounds the temporaries to a few chunk x len(b) matrices
# (375 ground truths x 130k anchors would otherwise need ~2 GB of intermediates)
IOU_CHUNK_ELEMENTS = 1 << 22


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``(len(a), len(b))`` with mmdet's ``bbox_overlaps`` convention (union >= eps)."""
    out = a.new_empty((a.shape[0], b.shape[0]))
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    step = max(1, IOU_CHUNK_ELEMENTS // max(b.shape[0], 1))
    for start in range(0, a.shape[0], step):
        c = a[start : start + step]
        area_c = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
        iw = (torch.min(c[:, None, 2], b[None, :, 2]) - torch.max(c[:, None, 0], b[None, :, 0])).clamp_(min=0)
        ih = (torch.min(c[:, None, 3], b[None, :, 3]) - torch.max(c[:, None, 1], b[None, :, 1])).clamp_(min=0)
        inter = iw.mul_(ih)
        union = (area_c[:, None] + area_b[None, :]).sub_(inter).clamp_(min=EPS)
        out[start : start + step] = inter.div_(union)
    return out


def rescale_boxes(boxes: Tensor, scale_factor: Tensor) -> Tensor:
    """Divides XYXY boxes by a per-axis ``(w_scale, h_scale)`` factor (input frame -> original frame)."""
    return boxes / scale_factor.to(boxes).repeat(2)[None]


def flip_boxes(boxes: Tensor, size: int, *, vertical: bool = False) -> Tensor:
    """Mirrors XYXY boxes horizontally in an image ``size`` pixels wide (or, with ``vertical``,
    top-to-bottom in an image ``size`` pixels high)."""
    lo, hi = (1, 3) if vertical else (0, 2)
    out = boxes.clone()
    out[:, lo] = size - boxes[:, hi]
    out[:, hi] = size - boxes[:, lo]
    return out


def larger_than(boxes: Tensor, min_size: float) -> Tensor:
    """Mask of the XYXY boxes whose width AND height exceed ``min_size`` (mmdet's ``min_bbox_size``
    filter; with 0 it drops degenerate boxes)."""
    return ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
