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
      claims all candidates that reach that best IoU (later ground truths win ties, as in mmdet);
      with ``gt_max_assign_all=False`` only its single best candidate (first index on ties), as
      mmdet's YOLACT configures it.
    """

    def __init__(
        self,
        *,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ) -> None:
        self.gt_max_assign_all = gt_max_assign_all
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
        if self.match_low_quality and not self.gt_max_assign_all:
            # mmdet's loop: gt i (in order) takes its argmax candidate when its best IoU qualifies
            best = overlaps.argmax(dim=1)
            for i in torch.nonzero(gt_max >= self.min_pos_iou).flatten().tolist():
                gt_inds[best[i]] = i + 1
        elif self.match_low_quality:
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


class ForcedMatchAssigner:
    """The official YOLACT ``match`` (``layers/box_utils.py``) with its "less greedy" force-match.

    1. every candidate takes its best ground truth by IoU;
    2. every ground truth is force-matched to one candidate, in order of the globally highest
       remaining IoU: pick the (gt, candidate) pair with the highest IoU, give that candidate to
       that gt with overlap 2, then remove the gt's row and the candidate's column (CHANGELOG
       2019-08-04);
    3. best IoU < ``pos_iou_thr``: neutral (-1); < ``neg_iou_thr``: background (0);
    4. crowd boxes: a candidate that is not positive and whose intersection over *its own area*
       with some crowd box exceeds ``crowd_iof_thr`` becomes neutral.

    Returns the same :class:`AssignResult` as :class:`MaxIoUAssigner` (``gt_inds`` 0 / -1 / g+1).
    """

    def __init__(self, *, pos_iou_thr: float = 0.5, neg_iou_thr: float = 0.4, crowd_iof_thr: float = 0.7) -> None:
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.crowd_iof_thr = crowd_iof_thr

    def assign(
        self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, crowd_boxes: Tensor | None = None
    ) -> AssignResult:
        n, g = boxes.shape[0], gt_boxes.shape[0]
        device = boxes.device
        if g == 0 or n == 0:
            gt_inds = torch.zeros(n, dtype=torch.int64, device=device)
            result = AssignResult(gt_inds, boxes.new_zeros(n), torch.full((n,), -1, dtype=torch.int64, device=device))
        else:
            overlaps = box_iou(gt_boxes, boxes)  # (G, N)
            best_overlap, best_gt = overlaps.max(dim=0)
            for gt, cand in _less_greedy_pairs(overlaps):
                best_overlap[cand] = 2.0
                best_gt[cand] = gt
            gt_inds = best_gt + 1
            gt_inds[best_overlap < self.pos_iou_thr] = -1
            gt_inds[best_overlap < self.neg_iou_thr] = 0
            labels = torch.full((n,), -1, dtype=torch.int64, device=device)
            pos = gt_inds > 0
            labels[pos] = gt_labels[gt_inds[pos] - 1]
            result = AssignResult(gt_inds, best_overlap, labels)
        if crowd_boxes is not None and crowd_boxes.numel() and self.crowd_iof_thr < 1:
            iof = box_iof(boxes, crowd_boxes).max(dim=1).values
            result.gt_inds[(result.gt_inds <= 0) & (iof > self.crowd_iof_thr)] = -1
        return result


def _less_greedy_pairs(overlaps: Tensor) -> list[tuple[int, int]]:
    """The official force-match order, without its ``G x (G x N)`` work.

    The official loop recomputes every row's max after each pick.  Only rows whose best column
    was just removed can change, so each row's best ``(value, column)`` is cached and recomputed
    for those rows only; the picks are identical (ties resolve to the lowest index, as
    ``Tensor.max`` does on CPU).
    """
    ov = overlaps.clone()
    g = ov.shape[0]
    row_val, row_col = ov.max(dim=1)
    active = torch.ones(g, dtype=torch.bool, device=ov.device)
    pairs = []
    for _ in range(g):
        vals = torch.where(active, row_val, torch.full_like(row_val, -2.0))
        j = int(vals.argmax())
        i = int(row_col[j])
        pairs.append((j, i))
        active[j] = False
        ov[:, i] = -1.0
        ov[j, :] = -1.0
        stale = torch.nonzero(active & (row_col == i)).flatten()
        if stale.numel():
            v, c = ov[stale].max(dim=1)
            row_val[stale] = v
            row_col[stale] = c
    return pairs


def box_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of each of ``boxes`` ``(N, M)`` (YOLACT's ``iscrowd`` jaccard)."""
    iw = (torch.min(boxes[:, None, 2], regions[None, :, 2]) - torch.max(boxes[:, None, 0], regions[None, :, 0])).clamp(min=0)
    ih = (torch.min(boxes[:, None, 3], regions[None, :, 3]) - torch.max(boxes[:, None, 1], regions[None, :, 1])).clamp(min=0)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    return iw * ih / area
