"""What every anchor-based dense head shares (RetinaNet, YOLACT, RDSNet's object stream).

The flow of a dense head, written once here:

- ``flatten_levels``: per-level conv outputs ``(B, A * c, H, W)`` -> one ``(B, sum(H W A), c)``
  tensor in the anchors' order (row-major cells, then base anchor), plus the level sizes;
- ``assign_anchors``: per image, anchors -> class targets (``0..C-1`` foreground, ``C``
  background, ``-1`` ignored) and the matched ground-truth index of each positive;
- ``loss_normaliser``: the batch's positives (at least 1), mmdet's ``avg_factor`` with a
  pseudo sampler;
- ``topk_per_level``: the per-level candidate selection of mmdet's ``_predict_by_feat_single``;
- ``class_nms``: the NMS family of ``ops/nms.py`` (``model.nms``) plus the per-image cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from torchvision.ops import sigmoid_focal_loss

from instseg.ops.nms import nms_by_method
from instseg.structures.instances import ImageTargets


def drop_degenerate(t: ImageTargets) -> ImageTargets:
    """Drops instances whose box has no width or height (box deltas would be infinite), with
    their labels and masks; crowd boxes are left alone."""
    ok = (t.boxes[:, 2] > t.boxes[:, 0]) & (t.boxes[:, 3] > t.boxes[:, 1])
    if bool(ok.all()):
        return t
    keep = torch.nonzero(ok).flatten()
    masks = None if t.masks is None else t.masks.select(keep.cpu())
    return replace(t, boxes=t.boxes[keep], labels=t.labels[keep], masks=masks)


def flatten_levels(outs: list[Tensor], channels: int) -> Tensor:
    """``[(B, A * channels, H, W)]`` per level -> ``(B, sum(H * W * A), channels)``."""
    b = outs[0].shape[0]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1, channels) for o in outs], dim=1)


def level_sizes(outs: list[Tensor]) -> list[tuple[int, int]]:
    return [(int(o.shape[-2]), int(o.shape[-1])) for o in outs]


@dataclass
class AnchorTargets:
    """Per-anchor training targets of one image.

    Attributes:
        labels: ``(N,)`` int64: ``0..C-1`` positive class, ``C`` background, ``-1`` ignored.
        gt_inds: ``(N,)`` int64: 0-based matched ground truth of positives, ``-1`` elsewhere.
    """

    labels: Tensor
    gt_inds: Tensor

    @property
    def pos(self) -> Tensor:
        return torch.nonzero(self.gt_inds >= 0).flatten()

    @property
    def num_pos(self) -> int:
        return int((self.gt_inds >= 0).sum())


def assign_anchors(
    assigner, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int, *, valid: Tensor | None = None, **kw
) -> AnchorTargets:
    """Runs ``assigner`` on the (valid) anchors; anchors outside ``valid`` are ignored."""
    n = anchors.shape[0]
    device = anchors.device
    labels = torch.full((n,), -1, dtype=torch.int64, device=device)
    gt_inds = torch.full((n,), -1, dtype=torch.int64, device=device)
    idx = torch.arange(n, device=device) if valid is None else torch.nonzero(valid).flatten()
    result = assigner.assign(anchors[idx], gt_boxes, gt_labels, **kw)
    neg = result.gt_inds == 0
    pos = result.gt_inds > 0
    labels[idx[neg]] = num_classes
    labels[idx[pos]] = gt_labels[result.gt_inds[pos] - 1]
    gt_inds[idx[pos]] = result.gt_inds[pos] - 1
    return AnchorTargets(labels, gt_inds)


def focal_cls_loss(logits: Tensor, a: AnchorTargets, num_classes: int, *, alpha: float, gamma: float) -> Tensor:
    """Summed sigmoid focal loss (``torchvision.ops.sigmoid_focal_loss``) of one image's ``(N, C)``
    class logits over its non-ignored anchors: one-hot targets for positives, all-zero for
    negatives (RetinaNet, RDSNet's object stream)."""
    used = a.labels >= 0
    x = logits[used].float()
    onehot = torch.zeros_like(x)
    fg = a.labels[used] < num_classes
    onehot[torch.nonzero(fg).flatten(), a.labels[used][fg]] = 1.0
    return sigmoid_focal_loss(x, onehot, alpha=alpha, gamma=gamma, reduction="sum")


def loss_normaliser(targets: list[AnchorTargets]) -> float:
    """Positives in the batch, at least one (what the dense losses divide by)."""
    return float(max(sum(t.num_pos for t in targets), 1))


def topk_per_level(
    scores: Tensor, counts: list[int], k: int, *, score_thr: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet's per-level candidate selection on one image's ``(N, C)`` class scores.

    With ``score_thr`` (RetinaNet, mmdet's ``filter_scores_and_topk``): per level, the (anchor,
    class) pairs above the threshold, at most ``k`` of them by score.  Without: per level the
    ``k`` anchors of highest max class score (``topk_anchors_per_level``), every class kept.

    Returns ``(anchor indices, labels, scores)`` of the candidates (flat over levels).
    """
    if score_thr is None:
        anchors = topk_anchors_per_level(scores.max(dim=1).values, counts, k)
        c = scores.shape[1]
        rows = anchors[:, None].expand(-1, c).reshape(-1)
        return rows, torch.arange(c, device=scores.device).repeat(anchors.numel()), scores[anchors].reshape(-1)
    rows, labels, vals = [], [], []
    start = 0
    num_classes = scores.shape[1]
    for count in counts:
        flat = scores[start : start + count].reshape(-1)
        passed = flat > score_thr
        if bool(passed.all()):
            # every pair passes: flat[nonzero] would be a copy of flat with indices 0..n-1, so
            # select on flat itself (same values, same order, hence the same top-k)
            valid, v = None, flat
        else:
            valid = torch.nonzero(passed).flatten()
            v = flat[valid]
        if 0 < k < v.numel():
            v, order = v.topk(k)
        else:
            v, order = v.sort(descending=True)
        valid = order if valid is None else valid[order]
        rows.append(valid // num_classes + start)
        labels.append(valid % num_classes)
        vals.append(v)
        start += count
    return torch.cat(rows), torch.cat(labels), torch.cat(vals)


def topk_anchors_per_level(max_scores: Tensor, counts: list[int], k: int) -> Tensor:
    """Per level the ``k`` anchors with the highest ``max_scores`` (mmdet's ``nms_pre`` for softmax
    heads such as YOLACT): their indices, flat over levels."""
    rows = []
    start = 0
    for count in counts:
        if 0 < k < count:
            rows.append(max_scores[start : start + count].topk(k).indices + start)
        else:
            rows.append(torch.arange(start, start + count, device=max_scores.device))
        start += count
    return torch.cat(rows)


@dataclass
class DenseTestSettings:
    """Test-time settings of a dense head (mmdet's ``test_cfg``; ``model.*`` in the config)."""

    nms_pre: int = 1000
    score_thr: float = 0.05
    nms: str = "hard"
    nms_iou: float = 0.5
    nms_top_k: int = 200
    max_per_img: int = 100
    min_bbox_size: float = 0.0
    soft_nms_sigma: float = 0.5
    soft_nms_min_score: float = 1e-3


def class_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, ts: DenseTestSettings, *, max_num: int | None = None
) -> tuple[Tensor, Tensor]:
    """The NMS of ``ts.nms`` (``model.nms``) on candidate triples, then the per-image cap
    (``ts.max_per_img`` unless ``max_num`` is given; 0 = no cap).

    Returns ``(kept candidate indices, their scores)``, best first.
    """
    keep, out_scores = nms_by_method(
        boxes, scores, labels, method=ts.nms, iou_threshold=ts.nms_iou, top_k=ts.nms_top_k,
        sigma=ts.soft_nms_sigma, min_score=ts.soft_nms_min_score,
    )
    cap = ts.max_per_img if max_num is None else max_num
    if cap > 0:
        keep, out_scores = keep[:cap], out_scores[:cap]
    return keep, out_scores
