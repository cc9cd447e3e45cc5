"""Proposal recall, as mmdetection's ``CocoMetric`` reports it for RPN-type models.

- :func:`evaluate_proposals_coco` is metric ``proposal``: COCOeval ``bbox`` with ``useCats=0``
  (class-agnostic), ``maxDets = proposal_nums`` (100, 300, 1000) and the 10 IoU thresholds
  0.50:0.95; it returns ``AR@100``, ``AR@300``, ``AR@1000``, ``AR_s@1000``, ``AR_m@1000`` and
  ``AR_l@1000`` (pycocotools' ``stats[6:12]``; mmdet rounds them to 3 decimals, here they are not).
- :func:`fast_eval_recall` is metric ``proposal_fast`` (mmdet's ``eval_recalls``): per image a
  greedy one-to-one matching of ground truths (not crowd, not ``ignore``) to the top-N proposals
  by IoU, recall averaged over the same IoU thresholds, no area ranges.  Returned as
  ``fast_AR@N``.

:func:`evaluate_proposal_predictions` runs both on a model's predictions (what ``instseg eval``
and the trainer do for ``model.arch=rpn``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

PROPOSAL_NUMS = (100, 300, 1000)
IOU_THRS = tuple(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1).tolist())
_AREAS = {"all": 0, "small": 1, "medium": 2, "large": 3}


def proposals_to_coco(boxes, scores, image_id: int, category_id: int = 1) -> list[dict]:
    """COCO result dicts (``[x, y, w, h]``) of one image's proposals ``(N, 4)`` XYXY and scores."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(sc),
        }
        for (x1, y1, x2, y2), sc in zip(b.tolist(), s.tolist())
    ]


def evaluate_proposals_coco(
    coco_gt: COCO,
    results: list[dict],
    *,
    proposal_nums: Sequence[int] = PROPOSAL_NUMS,
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """mmdet's ``proposal`` metric (see the module docstring).  Undefined values (no ground truth
    of a size) are -1, as in pycocotools; with no results every value is 0."""
    nums = [int(n) for n in proposal_nums]
    last = nums[-1]
    keys = [f"AR@{n}" for n in nums] + [f"AR_{a}@{last}" for a in ("s", "m", "l")]
    if not results:
        return {k: 0.0 for k in keys}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
        ev.params.maxDets = nums
        ev.params.iouThrs = np.asarray(IOU_THRS)
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
    recall = ev.eval["recall"]  # [T, K=1, A, M]

    def ar(area: str, m: int) -> float:
        s = recall[:, :, _AREAS[area], m]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    out = {f"AR@{n}": ar("all", i) for i, n in enumerate(nums)}
    m = len(nums) - 1
    out.update({f"AR_s@{last}": ar("small", m), f"AR_m@{last}": ar("medium", m), f"AR_l@{last}": ar("large", m)})
    return out


def _bbox_overlaps(gts: np.ndarray, props: np.ndarray) -> np.ndarray:
    """mmdet's numpy ``bbox_overlaps`` (IoU, union clamped to 1e-6)."""
    area_g = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    area_p = (props[:, 2] - props[:, 0]) * (props[:, 3] - props[:, 1])
    iw = np.clip(np.minimum(gts[:, None, 2], props[None, :, 2]) - np.maximum(gts[:, None, 0], props[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(gts[:, None, 3], props[None, :, 3]) - np.maximum(gts[:, None, 1], props[None, :, 1]), 0, None)
    inter = iw * ih
    union = np.maximum(area_g[:, None] + area_p[None, :] - inter, 1e-6)
    return inter / union


def fast_eval_recall(
    gt_boxes: Sequence[np.ndarray],
    proposals: Sequence[np.ndarray],
    proposal_nums: Sequence[int] = PROPOSAL_NUMS,
    iou_thrs: Sequence[float] = IOU_THRS,
) -> np.ndarray:
    """mmdet's ``eval_recalls``: recall ``(len(proposal_nums), len(iou_thrs))``.

    ``proposals[i]`` is ``(N, 4)`` best first, or ``(N, 5)`` with scores (then sorted by them).
    """
    nums = np.asarray(proposal_nums)
    thrs = np.asarray(iou_thrs)
    all_ious = []
    for gts, props in zip(gt_boxes, proposals):
        props = np.asarray(props, dtype=np.float32)
        props = props.reshape(0, 4) if props.size == 0 else props.reshape(props.shape[0], -1)
        if props.shape[1] == 5:
            props = props[np.argsort(props[:, 4])[::-1]]
        n = min(props.shape[0], int(nums[-1]))
        gts = np.asarray(gts, dtype=np.float32).reshape(-1, 4)
        if gts.shape[0] == 0:
            all_ious.append(np.zeros((0, props.shape[0]), dtype=np.float32))
        else:
            all_ious.append(_bbox_overlaps(gts, props[:n, :4]))
    total = sum(x.shape[0] for x in all_ious)
    best = np.zeros((nums.size, total), dtype=np.float32)
    for k, num in enumerate(nums):
        parts = []
        for ious in all_ious:
            ious = ious[:, :num].copy()
            gt_ious = np.zeros(ious.shape[0])
            if ious.size:
                for j in range(ious.shape[0]):  # greedy: the globally best remaining (gt, proposal) pair
                    gt_best = ious.argmax(axis=1)
                    vals = ious[np.arange(ious.shape[0]), gt_best]
                    g = vals.argmax()
                    gt_ious[j] = vals[g]
                    ious[g, :] = -1
                    ious[:, gt_best[g]] = -1
            parts.append(gt_ious)
        best[k] = np.concatenate(parts) if parts else np.zeros(0)
    best = np.fliplr(np.sort(best, axis=1))
    recalls = np.zeros((nums.size, thrs.size))
    for i, thr in enumerate(thrs):
        recalls[:, i] = (best >= thr).sum(axis=1) / float(max(total, 1))
    return recalls


def _gt_boxes(coco_gt: COCO, image_id: int) -> np.ndarray:
    boxes = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])):
        if ann.get("ignore", False) or ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        boxes.append([x, y, x + w, y + h])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def evaluate_proposal_predictions(
    coco_gt: COCO,
    preds: Sequence[tuple[int, np.ndarray, np.ndarray]],
    *,
    proposal_nums: Sequence[int] = PROPOSAL_NUMS,
    out_dir: str | os.PathLike | None = None,
    category_id: int | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """Both recall metrics for ``preds`` = ``[(image_id, boxes (N, 4) XYXY original frame, scores)]``.

    With ``out_dir``: ``results.json`` (the proposals as COCO results), ``metrics.json`` and
    ``summary.txt``.
    """
    if category_id is None:
        cats = coco_gt.getCatIds()
        category_id = int(cats[0]) if cats else 1
    image_ids = [int(p[0]) for p in preds]
    results: list[dict] = []
    gts, props = [], []
    for image_id, boxes, scores in preds:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")
        results.extend(proposals_to_coco(boxes[order], scores[order], image_id, category_id))
        gts.append(_gt_boxes(coco_gt, int(image_id)))
        props.append(boxes[order])
    metrics = evaluate_proposals_coco(coco_gt, results, proposal_nums=proposal_nums, image_ids=image_ids)
    recalls = fast_eval_recall(gts, props, proposal_nums)
    metrics.update({f"fast_AR@{n}": float(v) for n, v in zip(proposal_nums, recalls.mean(axis=1))})
    table = format_recall_table(recalls, proposal_nums)
    summary = format_proposal_summary(metrics) + "\n" + table
    if verbose:
        print(table)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out / "results.json")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "summary.txt").write_text(summary + "\n")
    return metrics


def format_recall_table(recalls: np.ndarray, proposal_nums: Sequence[int], iou_thrs: Sequence[float] = IOU_THRS) -> str:
    """mmdet's ``print_recall_summary``: recall (proposal_fast) per proposal number and IoU threshold."""
    head = f"{'recall':>8s}" + "".join(f"{t:7.2f}" for t in iou_thrs)
    rows = [f"{'@' + str(n):>8s}" + "".join(f"{v:7.3f}" for v in r) for n, r in zip(proposal_nums, recalls)]
    return "\n".join([head, *rows])


def format_proposal_summary(metrics: dict[str, float]) -> str:
    """A small table: AR at each proposal number (COCO ``proposal`` and ``proposal_fast``) and by size."""
    nums = [k[3:] for k in metrics if k.startswith("AR@")]
    lines = ["[proposals] average recall, IoU 0.50:0.95 (class-agnostic)"]
    lines.append(f"{'':22s}" + "".join(f"{'@' + n:>8s}" for n in nums))

    def row(title: str, prefix: str) -> str:
        vals = [metrics.get(f"{prefix}@{n}") for n in nums]
        return f"{title:22s}" + "".join(f"{100 * v:8.1f}" if v is not None and v >= 0 else f"{'-':>8s}" for v in vals)

    lines.append(row("AR (COCOeval)", "AR"))
    if any(k.startswith("fast_AR@") for k in metrics):
        lines.append(row("AR (proposal_fast)", "fast_AR"))
    last = nums[-1] if nums else "1000"
    sizes = [(a, metrics.get(f"AR_{a}@{last}")) for a in ("s", "m", "l")]
    lines.append(f"by size @{last}: " + "  ".join(
        f"AR_{a} {100 * v:.1f}" if v is not None and v >= 0 else f"AR_{a} -" for a, v in sizes))
    return "\n".join(lines)
