"""mmdetection's ``MaxIoUAssigner``.

Returns, per candidate box, ``0`` (negative), ``-1`` (ignored) or ``g + 1`` (assigned to ground
truth ``g``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from instseg.ops.boxes import box_iou


@dataclass
class AssignResult:
    """Assignment of candidates to ground truths.

    Attributes:
        gt_inds: ``(N,)`` int64; 0 = negative, -1 = ignore, ``g + 1`` = ground truth ``g``.
        max_overlaps: ``(N,)`` best IoU of each candidate with any ground truth.
        labels: ``(N,)`` int64 label of the assigned ground truth, -1 otherwise.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor


class MaxIoUAssigner:
    """Assigns each candidate to the ground truth it overlaps most.

    - IoU < ``neg_iou_thr`` (and >= 0): negative;
    - IoU >= ``pos_iou_thr``: positive;
    - ``match_low_quality``: every ground truth whose best IoU is >= ``min_pos_iou`` also
      claims all candidates that reach that best IoU (later ground truths win ties, as in mmdet).
    """

    def __init__(
        self,
        *,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        match_low_quality: bool = True,
    ) -> None:
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        n, g = boxes.shape[0], gt_boxes.shape[0]
        device = boxes.device
        if g == 0 or n == 0:
            gt_inds = torch.zeros(n, dtype=torch.int64, device=device) if g == 0 else torch.full(
                (n,), -1, dtype=torch.int64, device=device
            )
            return AssignResult(
                gt_inds, boxes.new_zeros(n), torch.full((n,), -1, dtype=torch.int64, device=device)
            )
        overlaps = box_iou(gt_boxes, boxes)  # (G, N)
        return self.assign_overlaps(overlaps, gt_labels)

    def assign_overlaps(self, overlaps: Tensor, gt_labels: Tensor) -> AssignResult:
        g, n = overlaps.shape
        max_overlaps, argmax = overlaps.max(dim=0)
        gt_max, _ = overlaps.max(dim=1)
        gt_inds = torch.full((n,), -1, dtype=torch.int64, device=overlaps.device)
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        pos = max_overlaps >= self.pos_iou_thr
        gt_inds[pos] = argmax[pos] + 1
        if self.match_low_quality:
            claim = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)
            # the last ground truth claiming a candidate wins, as in mmdet's sequential loop:
            # argmax over the flipped rows finds it without a (G, N) int64 temporary
            claimed = claim.any(dim=0)
            last = g - 1 - claim.flip(0).to(torch.uint8).argmax(dim=0)
            gt_inds = torch.where(claimed, last + 1, gt_inds)
        labels = torch.full((n,), -1, dtype=torch.int64, device=overlaps.device)
        assigned = gt_inds > 0
        labels[assigned] = gt_labels[gt_inds[assigned] - 1]
        return AssignResult(gt_inds, max_overlaps, labels)
