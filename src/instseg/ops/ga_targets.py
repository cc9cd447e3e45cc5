"""Guided anchoring's training pieces, as mmdetection 3.3.0 defines them.

- :class:`ApproxMaxIoUAssigner`: a square anchor's IoU with a ground truth is the best IoU of its
  ``A`` approximating anchors (``approxs``, e.g. 3 scales x 3 ratios); then ``MaxIoUAssigner``'s
  rules (``assign_wrt_overlaps``) on those overlaps.
- :func:`ga_loc_targets`: the location branch's target / weight maps of every level
  (``GuidedAnchorHead.ga_loc_targets``), see its docstring.
- :func:`bounded_iou_loss`: ``BoundedIoULoss`` element-wise (before reduction).
- :func:`focal_loss`: sigmoid focal loss element-wise (mmdet's ``py_sigmoid_focal_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from instseg.ops.assigner import AssignResult, MaxIoUAssigner
from instseg.ops.boxes import EPS as BOX_EPS
from instseg.ops.boxes import box_iou

# mmdet's weight_reduce_loss divides by ``avg_factor + eps`` (float32 eps)
AVG_EPS = torch.finfo(torch.float32).eps


class ApproxMaxIoUAssigner(MaxIoUAssigner):
    """mmdet's ``ApproxMaxIoUAssigner`` (``ignore_iof_thr=-1``: no ignore boxes)."""

    def assign_approx(self, squares: Tensor, approxs: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        """Assigns ``squares`` ``(N, 4)`` given their ``approxs`` ``(N, A, 4)``.

        ``max_overlaps`` of the result are the per-square max-over-approxes IoUs.
        """
        n, g = squares.shape[0], gt_boxes.shape[0]
        if n == 0 or g == 0:
            return self.assign(squares, gt_boxes, gt_labels)  # the empty cases of MaxIoUAssigner
        overlaps = approx_overlaps(approxs, gt_boxes)
        return self.assign_overlaps(overlaps, gt_labels)


def approx_overlaps(approxs: Tensor, gt_boxes: Tensor) -> Tensor:
    """``(G, N)``: for every ground truth and square, the best IoU over the square's ``A`` approxes."""
    n, a = approxs.shape[:2]
    g = gt_boxes.shape[0]
    out = approxs.new_empty((g, n))
    # squares per chunk: bounds the (G, chunk * A) IoU temporary (375 nuclei x 44k squares x 9
    # approxes would be ~600 MB at once)
    step = max(1, (1 << 22) // max(g * a, 1))
    for start in range(0, n, step):
        chunk = approxs[start : start + step]
        ious = box_iou(gt_boxes, chunk.reshape(-1, 4))  # (G, chunk * A), square-major
        out[:, start : start + step] = ious.view(g, chunk.shape[0], a).max(dim=2).values
    return out


def approx_overlaps_on_grid(
    gt_boxes: Tensor,
    generator,
    feat_sizes: Sequence[tuple[int, int]],
) -> Tensor:
    """:func:`approx_overlaps` of every location of every level ``(G, sum(H * W))`` (level-major,
    row-major), for the approx anchors of an :class:`~instseg.ops.anchors.AnchorGenerator`.

    Exactly equal to the dense computation, but a ground truth is compared only with the locations
    whose approxes can reach it (centre within the box grown by the approxes' half extent); every
    other IoU is 0.  With hundreds of small objects (nuclei) this is a small fraction of the pairs.
    """
    device = gt_boxes.device
    g = gt_boxes.shape[0]
    total = sum(h * w for h, w in feat_sizes)
    out = torch.zeros((g, total), device=device)
    if g == 0 or total == 0:
        return out
    gt = gt_boxes.float()
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    offset = 0
    for lvl, (h, w) in enumerate(feat_sizes):
        stride = generator.strides[lvl]
        base = generator.base_anchors[lvl].to(device)  # (A, 4) relative to the location (x s, y s)
        hx = float(base[:, [0, 2]].abs().max())
        hy = float(base[:, [1, 3]].abs().max())
        x0 = torch.floor((gt[:, 0] - hx) / stride).clamp(0, w - 1).long()
        x1 = torch.ceil((gt[:, 2] + hx) / stride).clamp(0, w - 1).long()
        y0 = torch.floor((gt[:, 1] - hy) / stride).clamp(0, h - 1).long()
        y1 = torch.ceil((gt[:, 3] + hy) / stride).clamp(0, h - 1).long()
        wmax = int((x1 - x0).max()) + 1
        hmax = int((y1 - y0).max()) + 1
        xs = x0[:, None] + torch.arange(wmax, device=device)[None]  # (G, Wm)
        ys = y0[:, None] + torch.arange(hmax, device=device)[None]  # (G, Hm)
        ok = (xs <= x1[:, None])[:, None, :] & (ys <= y1[:, None])[:, :, None]  # (G, Hm, Wm)
        gi, yi, xi = torch.nonzero(ok, as_tuple=True)
        loc = ys[gi, yi] * w + xs[gi, xi]  # (P,)
        # the approxes of those locations, built as grid_anchors does
        shifts = torch.stack([xs[gi, xi], ys[gi, yi]], dim=1).float() * stride
        ap = base[None] + shifts.repeat(1, 2)[:, None, :]  # (P, A, 4)
        b = gt[gi][:, None, :]
        area_a = (ap[..., 2] - ap[..., 0]) * (ap[..., 3] - ap[..., 1])
        iw = (torch.min(b[..., 2], ap[..., 2]) - torch.max(b[..., 0], ap[..., 0])).clamp_(min=0)
        ih = (torch.min(b[..., 3], ap[..., 3]) - torch.max(b[..., 1], ap[..., 1])).clamp_(min=0)
        inter = iw.mul_(ih)
        union = (area_g[gi][:, None] + area_a).sub_(inter).clamp_(min=BOX_EPS)
        out[gi, offset + loc] = inter.div_(union).max(dim=1).values
        offset += h * w
    return out


def calc_region(box: Tensor, ratio: float, feat_size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """mmdet's ``calc_region``: the box shrunk about its centre to ``1 - 2 ratio`` of its size,
    corners rounded (``torch.round``: half to even) and clamped to ``[0, W] x [0, H]``; inclusive."""
    x1 = torch.round((1 - ratio) * box[0] + ratio * box[2]).long()
    y1 = torch.round((1 - ratio) * box[1] + ratio * box[3]).long()
    x2 = torch.round(ratio * box[0] + (1 - ratio) * box[2]).long()
    y2 = torch.round(ratio * box[1] + (1 - ratio) * box[3]).long()
    if feat_size is not None:
        h, w = feat_size
        x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
        y1, y2 = y1.clamp(0, h), y2.clamp(0, h)
    return int(x1), int(y1), int(x2), int(y2)


def gt_levels(gt_boxes: Tensor, anchor_scale: float, min_stride: float, num_levels: int) -> Tensor:
    """Level of each ground truth: ``floor(log2(sqrt(w h)) - log2(anchor_scale * min_stride) + 0.5)``
    clamped to ``[0, num_levels - 1]`` (computed in float32 as mmdet does)."""
    boxes = gt_boxes.float()
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    min_size = scale.new_full((1,), float(anchor_scale * min_stride))
    lvls = torch.floor(torch.log2(scale) - torch.log2(min_size) + 0.5)
    return lvls.clamp(min=0, max=num_levels - 1).long()


def ga_loc_targets(
    gt_boxes: Sequence[Tensor],
    feat_sizes: Sequence[tuple[int, int]],
    strides: Sequence[float],
    *,
    anchor_scale: float,
    center_ratio: float = 0.2,
    ignore_ratio: float = 0.5,
) -> tuple[list[Tensor], list[Tensor], float]:
    """Location targets ``(B, 1, H, W)`` and weights per level, and the loss normaliser.

    For each image and each ground truth ``g`` in order, at its level ``l`` (:func:`gt_levels`) on
    the box divided by the level's stride:

    1. weight 0 on the ignore region (``calc_region(box, (1 - ignore_ratio) / 2)``), then
    2. target 1 and weight 1 on the centre region (``calc_region(box, (1 - center_ratio) / 2)``);
    3. on levels ``l - 1`` and ``l + 1`` (when they exist) the ignore region of ``g`` goes into an
       ignore map.

    Afterwards, on every level, locations no ground truth labelled in steps 1-2 get weight 0 where
    the ignore map is set and 0.1 elsewhere (target 0).  As in mmdet, a later ground truth's step 1
    can zero the weight of an earlier one's centre (its target stays 1).  The normaliser is
    ``sum(B * H * W over levels) / 200``.
    """
    num_levels = len(feat_sizes)
    num_images = len(gt_boxes)
    device = gt_boxes[0].device if num_images else torch.device("cpu")
    r1 = (1 - center_ratio) / 2
    r2 = (1 - ignore_ratio) / 2
    targets = [torch.zeros(num_images, 1, h, w, device=device) for h, w in feat_sizes]
    weights = [torch.full((num_images, 1, h, w), -1.0, device=device) for h, w in feat_sizes]
    ignore = [torch.zeros(num_images, 1, h, w, device=device) for h, w in feat_sizes]
    for i, boxes in enumerate(gt_boxes):
        if boxes.shape[0] == 0:
            continue
        boxes = boxes.float().cpu()  # a few scalars per box: cheaper off the accelerator
        lvls = gt_levels(boxes, anchor_scale, strides[0], num_levels).tolist()
        for g in range(boxes.shape[0]):
            lvl = lvls[g]
            b = boxes[g] / strides[lvl]
            ix1, iy1, ix2, iy2 = calc_region(b, r2, feat_sizes[lvl])
            cx1, cy1, cx2, cy2 = calc_region(b, r1, feat_sizes[lvl])
            targets[lvl][i, 0, cy1 : cy2 + 1, cx1 : cx2 + 1] = 1
            weights[lvl][i, 0, iy1 : iy2 + 1, ix1 : ix2 + 1] = 0
            weights[lvl][i, 0, cy1 : cy2 + 1, cx1 : cx2 + 1] = 1
            for adj in (lvl - 1, lvl + 1):
                if 0 <= adj < num_levels:
                    ax1, ay1, ax2, ay2 = calc_region(boxes[g] / strides[adj], r2, feat_sizes[adj])
                    ignore[adj][i, 0, ay1 : ay2 + 1, ax1 : ax2 + 1] = 1
    for lvl in range(num_levels):
        w = weights[lvl]
        w[(w < 0) & (ignore[lvl] > 0)] = 0
        w[w < 0] = 0.1
    avg = sum(num_images * h * w for h, w in feat_sizes) / 200
    return targets, weights, avg


def bounded_iou_loss(pred: Tensor, target: Tensor, beta: float = 0.2, eps: float = 1e-3) -> Tensor:
    """``BoundedIoULoss`` per box and term ``(N, 4)``: smooth-L1(beta) of ``1 - bound`` for
    (dx, dy, dw, dh) (Tychsen-Smith & Petersson 2018), mmdet's ``eps``; no gradient into ``target``."""
    pcx = (pred[:, 0] + pred[:, 2]) * 0.5
    pcy = (pred[:, 1] + pred[:, 3]) * 0.5
    pw = pred[:, 2] - pred[:, 0]
    ph = pred[:, 3] - pred[:, 1]
    with torch.no_grad():
        tcx = (target[:, 0] + target[:, 2]) * 0.5
        tcy = (target[:, 1] + target[:, 3]) * 0.5
        tw = target[:, 2] - target[:, 0]
        th = target[:, 3] - target[:, 1]
    dx = tcx - pcx
    dy = tcy - pcy
    loss_dx = 1 - torch.max((tw - 2 * dx.abs()) / (tw + 2 * dx.abs() + eps), torch.zeros_like(dx))
    loss_dy = 1 - torch.max((th - 2 * dy.abs()) / (th + 2 * dy.abs() + eps), torch.zeros_like(dy))
    loss_dw = 1 - torch.min(tw / (pw + eps), pw / (tw + eps))
    loss_dh = 1 - torch.min(th / (ph + eps), ph / (th + eps))
    comb = torch.stack([loss_dx, loss_dy, loss_dw, loss_dh], dim=-1).flatten(1)
    return torch.where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta)


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (mmdet's ``py_sigmoid_focal_loss`` before reduction)."""
    p = logits.sigmoid()
    t = targets.to(logits.dtype)
    pt = (1 - p) * t + p * (1 - t)
    weight = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none") * weight


def wh_ratio_clamp(wh_ratio_clip: float) -> float:
    """``DeltaXYWHBBoxCoder.decode``'s ``|log(wh_ratio_clip)|`` bound on ``dw, dh``."""
    return abs(math.log(wh_ratio_clip))
