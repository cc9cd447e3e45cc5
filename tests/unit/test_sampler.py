"""RandomSampler (and its pseudo mode) against mmdet's RandomSampler / PseudoSampler rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.ops.assigner import AssignResult
from instseg.ops.sampler import RandomSampler


def _assign(gt_inds, gt_labels):
    gt_inds = torch.tensor(gt_inds, dtype=torch.int64)
    labels = torch.full_like(gt_inds, -1)
    labels[gt_inds > 0] = gt_labels[gt_inds[gt_inds > 0] - 1]
    return AssignResult(gt_inds, torch.zeros(len(gt_inds)), labels)


def _setup(rng, n, g, p_pos, p_neg):
    u = rng.random(n)
    gt_inds = np.where(u < p_pos, rng.integers(1, g + 1, n), np.where(u < p_pos + p_neg, 0, -1))
    boxes = torch.tensor(rng.uniform(0, 100, (n, 4)), dtype=torch.float32)
    gt_boxes = torch.tensor(rng.uniform(0, 100, (g, 4)), dtype=torch.float32)
    gt_labels = torch.tensor(rng.integers(0, 80, g))
    return gt_inds.tolist(), boxes, gt_boxes, gt_labels


def _check_consistency(res, all_boxes, all_inds, all_is_gt, gt_labels):
    assert torch.equal(res.boxes, all_boxes)
    pos, neg = res.pos_inds.tolist(), res.neg_inds.tolist()
    assert len(set(pos)) == len(pos) and len(set(neg)) == len(neg)
    assert all(all_inds[i] > 0 for i in pos) and all(all_inds[i] == 0 for i in neg)
    assert res.pos_gt_inds.tolist() == [all_inds[i] - 1 for i in pos]
    assert res.pos_labels.tolist() == [int(gt_labels[all_inds[i] - 1]) for i in pos]
    assert res.pos_is_gt.tolist() == [all_is_gt[i] for i in pos]
    assert torch.equal(res.sampled_boxes, torch.cat([all_boxes[pos], all_boxes[neg]]))
    assert res.num_sampled == len(pos) + len(neg)


@pytest.mark.parametrize(
    "num,frac,add_gt,n,g,p_pos,p_neg",
    [
        (256, 0.5, False, 3000, 5, 0.02, 0.9),  # RPN: few positives -> negatives fill up to num
        (256, 0.5, False, 3000, 5, 0.3, 0.6),  # plenty of both: 128 / 128
        (512, 0.25, True, 2000, 12, 0.2, 0.7),  # RCNN stage with GT proposals
        (512, 0.25, True, 300, 3, 0.1, 0.2),  # too few of everything: take all
        (512, 0.25, True, 50, 0, 0.0, 0.8),  # no ground truth
    ],
)
def test_random_sampler_counts(num, frac, add_gt, n, g, p_pos, p_neg):
    rng = np.random.default_rng(n + g)
    inds, boxes, gt_boxes, gt_labels = _setup(rng, n, max(g, 1), p_pos, p_neg)
    if g == 0:
        gt_boxes, gt_labels = gt_boxes[:0], gt_labels[:0]
    sampler = RandomSampler(num=num, pos_fraction=frac, add_gt_as_proposals=add_gt)
    res = sampler.sample(_assign(inds, gt_labels), boxes, gt_boxes, gt_labels, torch.Generator().manual_seed(0))
    if add_gt and g > 0:
        all_boxes = torch.cat([gt_boxes, boxes])
        all_inds = list(range(1, g + 1)) + inds
        all_is_gt = [True] * g + [False] * n
    else:
        all_boxes, all_inds, all_is_gt = boxes, inds, [False] * n
    _check_consistency(res, all_boxes, all_inds, all_is_gt, gt_labels)
    n_pos_avail = sum(i > 0 for i in all_inds)
    n_neg_avail = sum(i == 0 for i in all_inds)
    exp_pos = min(int(num * frac), n_pos_avail)
    exp_neg = min(num - exp_pos, n_neg_avail)
    assert res.pos_inds.numel() == exp_pos
    assert res.neg_inds.numel() == exp_neg
    assert res.avg_factor == exp_pos + exp_neg


def test_gt_prepended_and_flagged():
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    gt_labels = torch.tensor([3, 7])
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [50.0, 50.0, 60.0, 60.0], [6.0, 6.0, 20.0, 20.0]])
    res = RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True).sample(
        _assign([1, 0, 2], gt_labels), boxes, gt_boxes, gt_labels
    )
    assert torch.equal(res.boxes[:2], gt_boxes) and torch.equal(res.boxes[2:], boxes)
    assert res.pos_inds.tolist() == [0, 1, 2, 4]
    assert res.neg_inds.tolist() == [3]
    assert res.pos_is_gt.tolist() == [True, True, False, False]
    assert res.pos_gt_inds.tolist() == [0, 1, 0, 1]
    assert res.pos_labels.tolist() == [3, 7, 3, 7]
    assert res.avg_factor == 5


def test_sampling_is_random_but_seeded():
    rng = np.random.default_rng(0)
    inds, boxes, gt_boxes, gt_labels = _setup(rng, 2000, 4, 0.3, 0.6)
    s = RandomSampler(num=256, pos_fraction=0.5, add_gt_as_proposals=False)
    a = s.sample(_assign(inds, gt_labels), boxes, gt_boxes, gt_labels, torch.Generator().manual_seed(1))
    b = s.sample(_assign(inds, gt_labels), boxes, gt_boxes, gt_labels, torch.Generator().manual_seed(1))
    c = s.sample(_assign(inds, gt_labels), boxes, gt_boxes, gt_labels, torch.Generator().manual_seed(2))
    assert torch.equal(a.pos_inds, b.pos_inds) and torch.equal(a.neg_inds, b.neg_inds)
    assert not torch.equal(a.pos_inds, c.pos_inds)


@pytest.mark.parametrize("num", [0, -1])
@pytest.mark.parametrize("add_gt", [False, True])
def test_pseudo_mode(num, add_gt):
    rng = np.random.default_rng(3)
    inds, boxes, gt_boxes, gt_labels = _setup(rng, 400, 3, 0.1, 0.7)
    res = RandomSampler(num=num, pos_fraction=0.5, add_gt_as_proposals=add_gt).sample(
        _assign(inds, gt_labels), boxes, gt_boxes, gt_labels
    )
    # every positive and negative, in index order; no GT added; avg factor = num positives
    assert res.pos_inds.tolist() == [i for i, v in enumerate(inds) if v > 0]
    assert res.neg_inds.tolist() == [i for i, v in enumerate(inds) if v == 0]
    _check_consistency(res, boxes, inds, [False] * 400, gt_labels)
    assert res.avg_factor == sum(v > 0 for v in inds)
    assert not res.pos_is_gt.any()


def test_no_positives_gives_empty_labels():
    gt_labels = torch.zeros(0, dtype=torch.int64)
    res = RandomSampler(num=8, pos_fraction=0.25, add_gt_as_proposals=True).sample(
        _assign([0, 0, -1], gt_labels), torch.rand(3, 4), torch.zeros((0, 4)), gt_labels
    )
    assert res.pos_inds.numel() == 0 and res.pos_labels.numel() == 0 and res.pos_gt_inds.numel() == 0
    assert res.neg_inds.tolist() == [0, 1]
    assert res.avg_factor == 2
