"""NMS family: hard (greedy), YOLACT's Fast NMS and mmcv's Soft-NMS, all per class and vectorised.

- :func:`batched_nms`: per-class hard NMS (suppress IoU > thr), as mmcv's ``batched_nms``.
- :func:`fast_nms`: YOLACT's Fast NMS, per class on each class's ``top_k`` candidates.
- :func:`cross_class_fast_nms`: YOLACT's ``--cross_class_nms``: Fast NMS on the overall ``top_k``.
- :func:`soft_nms`: mmcv's ``soft_nms`` (linear / gaussian), per class as mmcv's ``batched_nms``.
- :func:`nms_by_method`: the single dispatcher over :data:`NMS_METHODS` that models call.
- :func:`multiclass_nms`: mmdet's ``multiclass_nms`` (score threshold, per-class NMS, top-k).

All functions take XYXY ``boxes (M, 4)``, ``scores (M,)`` and integer ``labels (M,)`` on any device,
compute in float32 (fp16 inputs are upcast), and use IoU without the legacy ``+1`` (width is
``x2 - x1``), like mmcv >= 1.x (``offset=0``) and YOLACT.  IoUs of degenerate (zero-area) pairs,
which are 0/0, count as 0, so such boxes never suppress or decay anything (as torchvision's ``nms``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import box_iou

NMS_METHODS: tuple[str, ...] = ("hard", "fast", "fast_cross_class", "soft_linear", "soft_gaussian")

# Soft-NMS precomputes all per-class IoUs, (C, K, K) float32, when they fit this many elements (64 MiB);
# otherwise it computes one (C, K) IoU row per pick.  Same values either way: a per-pick IoU costs a
# dozen small kernel launches, which dominates on CPU for the usual K <= a few hundred.
SOFT_NMS_IOU_CACHE_ELEMENTS = 1 << 24


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS done independently per ``idxs`` value, sorted by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # float32: fp16 lacks range for the per-class coordinate offsets
    return tv_batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _empty_keep(ref: Tensor) -> Tensor:
    return torch.zeros(0, dtype=torch.int64, device=ref.device)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of ``(P, 4)`` x ``(Q, 4)`` boxes, 0/0 read as 0."""
    return torch.nan_to_num(box_iou(a, b), nan=0.0)


def _batched_iou(a: Tensor, b: Tensor) -> Tensor:
    """Per-group pairwise IoU ``(G, P, Q)`` of ``(G, P, 4)`` x ``(G, Q, 4)`` boxes in one call.

    ``vmap`` over torchvision's ``box_iou`` keeps its exact arithmetic (same bits as a per-group
    call) without a Python loop over groups.
    """
    return torch.nan_to_num(torch.vmap(box_iou)(a, b), nan=0.0)


def _descending_order(scores: Tensor) -> Tensor:
    """Stable descending argsort: equal scores keep increasing input index."""
    return torch.sort(scores, descending=True, stable=True).indices


def _group_by_class(scores: Tensor, labels: Tensor, top_k: int | None) -> tuple[Tensor, Tensor]:
    """Lays candidates out as a padded ``(C, K)`` matrix of input indices, one row per present class.

    Within a row, candidates are in decreasing score (stable: ties by lower index); only the first
    ``top_k`` of each class are placed (all if ``top_k`` is None), and ``K`` is the largest row.
    Doing the grouping with two stable sorts avoids any loop over classes.

    Returns:
        ``idx (C, K)`` int64 input indices (0 in padding) and ``valid (C, K)`` bool.
    """
    m = scores.shape[0]
    dev = scores.device
    order = _descending_order(scores)
    order = order[torch.sort(labels[order], stable=True).indices]  # by class, then score desc
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    num_cls = counts.shape[0]
    cls = torch.repeat_interleave(torch.arange(num_cls, device=dev), counts)
    rank = torch.arange(m, device=dev) - (counts.cumsum(0) - counts)[cls]
    k = int(counts.max())
    if top_k is not None:
        k = min(k, top_k)
    sel = rank < k
    idx = torch.zeros((num_cls, k), dtype=torch.int64, device=dev)
    valid = torch.zeros((num_cls, k), dtype=torch.bool, device=dev)
    idx[cls[sel], rank[sel]] = order[sel]
    valid[cls[sel], rank[sel]] = True
    return idx, valid


def _sort_kept(keep: Tensor, scores: Tensor) -> Tensor:
    """Kept indices by decreasing score; ties by lower input index (deterministic on every device)."""
    keep = torch.sort(keep).values
    return keep[_descending_order(scores[keep].float())]


def _fast_nms_keep(iou: Tensor, iou_threshold: float) -> Tensor:
    """YOLACT's rule on score-sorted ``(..., K, K)`` IoUs: keep j iff max_{i<j} IoU(i, j) <= thr.

    Every higher-scored box counts, suppressed or not; that is what makes it one matrix op (and why
    it drops slightly more than greedy NMS).
    """
    return iou.triu(diagonal=1).amax(dim=-2) <= iou_threshold


# --------------------------------------------------------------------------------------------------
# Fast NMS (YOLACT)
# --------------------------------------------------------------------------------------------------


def fast_nms(boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_threshold: float, top_k: int = 200) -> Tensor:
    """YOLACT's Fast NMS, done independently per class.

    Each class keeps only its ``top_k`` highest-scored candidates (stable: ties by lower index);
    candidate ``j`` survives iff its IoU with every higher-scored candidate of its class, including
    ones that are themselves suppressed, is ``<= iou_threshold``.  All classes are padded to a common
    ``K`` and processed as one ``(C, K, K)`` IoU tensor.

    Args:
        boxes: ``(M, 4)`` XYXY candidate boxes.
        scores: ``(M,)`` candidate scores.
        labels: ``(M,)`` int64 class of each candidate.

    Returns:
        int64 indices into the inputs of the kept candidates, by decreasing score (ties: lower index).
    """
    if boxes.shape[0] == 0 or top_k <= 0:
        return _empty_keep(boxes)
    idx, valid = _group_by_class(scores.float(), labels, top_k)
    grouped = boxes.float()[idx]  # (C, K, 4)
    keep = _fast_nms_keep(_batched_iou(grouped, grouped), iou_threshold) & valid
    return _sort_kept(idx[keep], scores)


def cross_class_fast_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, *, iou_threshold: float, top_k: int = 200
) -> Tensor:
    """YOLACT's ``--cross_class_nms``: Fast NMS over the ``top_k`` candidates overall, class ignored.

    YOLACT feeds one candidate per anchor (its best class); this function works on whatever triples it
    gets: ``labels`` is accepted for a uniform signature and not used.

    Returns:
        int64 indices of the kept candidates, by decreasing score (ties: lower index).
    """
    del labels  # class-agnostic by definition
    if boxes.shape[0] == 0 or top_k <= 0:
        return _empty_keep(boxes)
    order = _descending_order(scores.float())[:top_k]
    cand = boxes.float()[order]
    return order[_fast_nms_keep(_iou(cand, cand), iou_threshold)]


# --------------------------------------------------------------------------------------------------
# Soft-NMS (mmcv)
# --------------------------------------------------------------------------------------------------


def _soft_weights(iou: Tensor, *, gaussian: bool, iou_threshold: float, sigma: float) -> Tensor:
    """mmcv's decay factors: linear ``1 - iou`` where ``iou >= thr`` (else 1); gaussian ``exp(-iou^2/sigma)``.

    ``iou`` is a fresh tensor and is overwritten.  ``x / (-sigma)`` has the same bits as mmcv's
    ``-(x) / sigma`` (negation is exact).
    """
    if gaussian:
        return iou.mul_(iou).div_(-sigma).exp_()
    return torch.where(iou >= iou_threshold, 1.0 - iou, 1.0)


def _soft_nms_grouped(
    grouped: Tensor, s: Tensor, *, gaussian: bool, iou_threshold: float, sigma: float, min_score: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs Soft-NMS on all classes at once: each iteration picks one box per class.

    Args:
        grouped: ``(C, K, 4)`` boxes.
        s: ``(C, K)`` float32 scores, ``-inf`` where there is no live candidate (padding, pruned).

    Returns:
        ``(C, T)`` picked column, its score at pick time and whether the pick is real, for the
        ``T`` iterations run (``T`` = most boxes kept by any one class).
    """
    num_cls, k = s.shape
    rows = torch.arange(num_cls, device=s.device)
    cached = _batched_iou(grouped, grouped) if num_cls * k * k <= SOFT_NMS_IOU_CACHE_ELEMENTS else None
    pos = torch.zeros((num_cls, k), dtype=torch.int64, device=s.device)
    picked = torch.full((num_cls, k), -math.inf, dtype=s.dtype, device=s.device)
    t = 0
    while t < k:  # sequential by nature: one sync per pick round
        best = s.argmax(dim=1)  # first max: lowest column (higher input score, then lower index) on ties
        best_score = s[rows, best]
        if not bool((best_score > -math.inf).any()):
            break
        pos[:, t], picked[:, t] = best, best_score
        s[rows, best] = -math.inf
        if cached is not None:
            iou = cached[rows, best]  # (C, K) copy
        else:
            iou = _batched_iou(grouped[rows, best][:, None], grouped)[:, 0]
        s = s * _soft_weights(iou, gaussian=gaussian, iou_threshold=iou_threshold, sigma=sigma)
        # mmcv drops a box iff its decayed score < min_score; NaN (-inf * weight 0) is dead as well
        s = torch.where(s >= min_score, s, -math.inf)
        t += 1
    return pos[:, :t], picked[:, :t], picked[:, :t] > -math.inf


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
) -> tuple[Tensor, Tensor]:
    """mmcv's Soft-NMS (``nms_cfg=dict(type='soft_nms', ...)``), independently per class.

    Semantics follow mmcv's ``softnms_cpu`` with ``offset=0``: repeatedly pick the highest remaining
    score, then multiply every other remaining score of the class by

    * ``linear``: ``1 - iou`` if ``iou >= iou_threshold`` (note ``>=``, as mmcv), else 1;
    * ``gaussian``: ``exp(-iou**2 / sigma)`` for every box (``iou_threshold`` unused);

    and drop the boxes whose score is now ``< min_score``.  Classes never interact, as with mmcv's
    ``batched_nms`` (its coordinate-offset trick makes cross-class IoUs 0, i.e. weight 1).  One
    difference: input scores already below ``min_score`` are dropped up front, whereas mmcv exempts
    the very first pick from that check.  Classes run side by side, so the number of Python
    iterations is the largest number of boxes kept by one class.

    Returns:
        kept indices in pick order (= decreasing updated score; ties by class, then pick order), and
        their updated scores in the input dtype.
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft_nms method must be 'linear' or 'gaussian', got {method!r}")
    if boxes.shape[0] == 0:
        return _empty_keep(boxes), scores.new_zeros(0)
    s32 = scores.float()
    idx, valid = _group_by_class(s32, labels, None)
    s = s32[idx]
    pos, picked, real = _soft_nms_grouped(
        boxes.float()[idx],
        torch.where(valid & (s >= min_score), s, -math.inf),
        gaussian=method == "gaussian",
        iou_threshold=iou_threshold,
        sigma=sigma,
        min_score=min_score,
    )
    keep = idx.gather(1, pos)[real]  # (class, pick) order: stable sort keeps each class's pick order
    kept_scores = picked[real]
    order = _descending_order(kept_scores)
    return keep[order], kept_scores[order].to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def nms_by_method(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    method: str,
    iou_threshold: float,
    top_k: int = 200,
    sigma: float = 0.5,
    min_score: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Runs the NMS named ``method`` (one of :data:`NMS_METHODS`) on candidate triples.

    ``hard`` is per-class greedy :func:`batched_nms` (suppress IoU > thr); ``fast`` /
    ``fast_cross_class`` are YOLACT's Fast NMS (``top_k`` candidates per class / overall);
    ``soft_linear`` / ``soft_gaussian`` are mmcv's Soft-NMS (``sigma``, ``min_score``; the linear
    one uses ``iou_threshold``).  ``top_k`` only affects the Fast NMS variants.

    Returns:
        kept indices by decreasing output score, and the output scores: the input scores, except
        for Soft-NMS where they are the decayed ones.
    """
    if method == "hard":
        keep = batched_nms(boxes, scores, labels, iou_threshold)
    elif method == "fast":
        keep = fast_nms(boxes, scores, labels, iou_threshold=iou_threshold, top_k=top_k)
    elif method == "fast_cross_class":
        keep = cross_class_fast_nms(boxes, scores, labels, iou_threshold=iou_threshold, top_k=top_k)
    elif method in ("soft_linear", "soft_gaussian"):
        return soft_nms(
            boxes, scores, labels, iou_threshold=iou_threshold, sigma=sigma, min_score=min_score, method=method[5:]
        )
    else:
        raise ValueError(f"unknown NMS method {method!r}; valid methods: {', '.join(NMS_METHODS)}")
    return keep, scores[keep]


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
    method: str = "hard",
    top_k: int = 200,
    sigma: float = 0.5,
    min_score: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdet's ``multiclass_nms``, with the per-class NMS chosen by ``method`` (see :func:`nms_by_method`).

    Args:
        boxes: ``(N, 4)`` class-agnostic or ``(N, 4 * C)`` class-specific boxes.
        scores: ``(N, C + 1)`` class probabilities, background last.
        method, top_k, sigma, min_score: passed to :func:`nms_by_method`; the default ``"hard"`` is
            mmdet's greedy per-class NMS.

    Returns:
        boxes ``(n, 4)``, scores ``(n,)`` (decayed for Soft-NMS), labels ``(n,)`` and the row index of
        each detection.
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
    keep, out_scores = nms_by_method(
        cand, s, labels, method=method, iou_threshold=iou_threshold, top_k=top_k, sigma=sigma, min_score=min_score
    )
    if max_num > 0:
        keep, out_scores = keep[:max_num], out_scores[:max_num]
    return cand[keep], out_scores, labels[keep], rows[keep]


def _self_iou(boxes: Tensor) -> Tensor:
    """``(..., K, K)`` IoU of ``(..., K, 4)`` boxes with themselves, written out (no vmap): the same
    arithmetic as torchvision's ``box_iou`` and the official YOLACT ``jaccard``; 0/0 read as 0.
    Coordinates are handled one axis at a time with in-place ops, so only three ``(..., K, K)``
    temporaries exist at once."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    iw = torch.min(x2[..., :, None], x2[..., None, :]).sub_(torch.max(x1[..., :, None], x1[..., None, :])).clamp_(min=0)
    ih = torch.min(y2[..., :, None], y2[..., None, :]).sub_(torch.max(y1[..., :, None], y1[..., None, :])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area[..., :, None] + area[..., None, :]).sub_(inter)
    return torch.nan_to_num(inter.div_(union), nan=0.0)


def fast_nms_dense(
    boxes: Tensor, scores: Tensor, *, iou_threshold: float, top_k: int = 200
) -> tuple[Tensor, Tensor, Tensor]:
    """YOLACT's per-class Fast NMS on DENSE candidates, exactly as the official ``Detect`` lays
    them out: ``boxes (N, 4)`` (one per anchor) and ``scores (N, C)`` (every class of every anchor).

    Per class the ``top_k`` anchors by score (``topk``, no sort of all ``N * C`` pairs), one
    ``(C, K, K)`` IoU tensor, keep iff the max IoU with any higher-scored box of the class is
    ``<= iou_threshold``.  Equals :func:`fast_nms` on the ``N * C`` triples (up to the order of
    exactly tied scores) at a fraction of the cost: no grouping sorts, no vmap.

    Returns ``(anchor rows, labels, scores)`` of the kept pairs by decreasing score.
    """
    n, c = scores.shape
    dev = scores.device
    k = min(int(top_k), n)
    if n == 0 or c == 0 or k <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty, scores.new_zeros(0)
    top, idx = scores.float().t().topk(k, dim=1)  # (C, K), sorted
    keep = _fast_nms_keep(_self_iou(boxes.float()[idx]), iou_threshold)
    labels = torch.arange(c, device=dev)[:, None].expand(c, k)[keep]
    rows, kept = idx[keep], top[keep]
    order = torch.sort(kept, descending=True, stable=True).indices
    return rows[order], labels[order], kept[order].to(scores.dtype)
