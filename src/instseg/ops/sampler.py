"""mmdetection's ``RandomSampler`` (and the ``PseudoSampler`` used for deterministic tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from instseg.ops.assigner import AssignResult


@dataclass
class SamplingResult:
    """Which candidates one image trains on.

    ``boxes`` are the candidates after the (optional) ground truths were prepended; ``pos_inds``
    and ``neg_inds`` index into it.  The training rows are ``boxes[pos_inds]`` then ``boxes[neg_inds]``.
    """

    boxes: Tensor
    pos_inds: Tensor
    neg_inds: Tensor
    pos_gt_inds: Tensor  # 0-based ground-truth index of each positive
    pos_labels: Tensor
    pos_is_gt: Tensor  # bool, whether each positive is a ground truth added as a proposal
    avg_factor: int  # normaliser for dense-head losses: num_pos + num_neg (random) or num_pos (pseudo)

    @property
    def pos_boxes(self) -> Tensor:
        return self.boxes[self.pos_inds]

    @property
    def neg_boxes(self) -> Tensor:
        return self.boxes[self.neg_inds]

    @property
    def sampled_boxes(self) -> Tensor:
        return torch.cat([self.pos_boxes, self.neg_boxes])

    @property
    def num_sampled(self) -> int:
        return int(self.pos_inds.numel() + self.neg_inds.numel())


class RandomSampler:
    """Samples up to ``num`` candidates, ``pos_fraction`` of them positive when available.

    ``num <= 0`` turns it into mmdet's ``PseudoSampler``: every positive and negative is kept,
    no ground truth is added, and the loss normaliser counts positives only.
    """

    def __init__(self, *, num: int, pos_fraction: float, add_gt_as_proposals: bool) -> None:
        self.num = num
        self.pos_fraction = pos_fraction
        self.add_gt_as_proposals = add_gt_as_proposals

    @property
    def is_pseudo(self) -> bool:
        return self.num <= 0

    def sample(
        self,
        assign: AssignResult,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplingResult:
        device = boxes.device
        gt_inds = assign.gt_inds
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=device)
        if self.add_gt_as_proposals and not self.is_pseudo and gt_boxes.numel() > 0:
            g = gt_boxes.shape[0]
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
            gt_inds = torch.cat([torch.arange(1, g + 1, device=device), gt_inds])
            is_gt = torch.cat([torch.ones(g, dtype=torch.bool, device=device), is_gt])
        pos_all = torch.nonzero(gt_inds > 0).flatten()
        neg_all = torch.nonzero(gt_inds == 0).flatten()
        if self.is_pseudo:
            pos_inds, neg_inds = pos_all, neg_all
            avg = pos_inds.numel()
        else:
            num_pos = int(self.num * self.pos_fraction)
            pos_inds = _random_choice(pos_all, num_pos, generator).sort().values
            neg_inds = _random_choice(neg_all, self.num - pos_inds.numel(), generator).sort().values
            avg = pos_inds.numel() + neg_inds.numel()
        pos_gt = gt_inds[pos_inds] - 1
        return SamplingResult(
            boxes=boxes,
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            pos_gt_inds=pos_gt,
            pos_labels=gt_labels[pos_gt] if pos_gt.numel() else gt_labels.new_zeros(0),
            pos_is_gt=is_gt[pos_inds],
            avg_factor=avg,
        )


def _random_choice(inds: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    if inds.numel() <= num:
        return inds
    perm = torch.randperm(inds.numel(), generator=generator)[:num].to(inds.device)
    return inds[perm]
