"""NMS variants over torchvision's compiled ``nms``.

- :func:`batched_nms`: per-class hard NMS (suppress IoU > thr), as mmcv's ``batched_nms``.
- :func:`multiclass_nms`: mmdet's ``multiclass_nms`` (score threshold, per-class NMS, top-k).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms as tv_batched_nms


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS done independently per ``idxs`` value, sorted by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # float32: fp16 lacks range for the per-class coordinate offsets
    return tv_batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdet's ``multiclass_nms``.

    Args:
        boxes: ``(N, 4)`` class-agnostic or ``(N, 4 * C)`` class-specific boxes.
        scores: ``(N, C + 1)`` class probabilities, background last.

    Returns:
        boxes ``(n, 4)``, scores ``(n,)``, labels ``(n,)`` and the row index of each detection.
    """
    n = scores.shape[0]
    num_classes = scores.shape[1] - 1
    if boxes.shape[1] > 4:
        cand = boxes.reshape(n, num_classes, 4)
    else:
        cand = boxes[:, None, :].expand(n, num_classes, 4)
    cls_scores = scores[:, :num_classes]
    valid = cls_scores > score_thr
    rows, labels = torch.nonzero(valid, as_tuple=True)
    cand = cand[rows, labels]
    s = cls_scores[rows, labels]
    keep = batched_nms(cand, s, labels, iou_threshold)
    if max_num > 0:
        keep = keep[:max_num]
    return cand[keep], s[keep], labels[keep], rows[keep]
