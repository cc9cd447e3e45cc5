"""What a practitioner reads after a COCO evaluation: per-class AP, precision-recall curves and a
confusion matrix, written beside ``metrics.json``.

Everything is computed from a finished ``COCOeval`` (after ``evaluate()`` and ``accumulate()``):

- per-class AP / AP50 / AP75 / AR are means of COCOeval's own ``eval['precision']`` ``[T, R, K, A, M]``
  and ``eval['recall']`` ``[T, K, A, M]`` arrays at area ``all`` and the ``maxDets`` used, class by
  class (the overall AP is the mean of these over the classes that have ground truth); the ground
  truth count is the non-crowd ground truth COCOeval matched against (``ev._gts``);
- precision-recall curves are the rows ``precision[t, :, k, 0, m]`` against ``params.recThrs``;
- COCOeval matches only within a class, so the confusion matrix is built here from COCOeval's
  prepared ground truth and detections (``ev._gts`` / ``ev._dts``, per image): detections with
  ``score >= score_thr``, best score first (at most ``maxDets`` per image), are matched greedily
  to the unmatched non-crowd ground truth of ANY class with the highest IoU ``>= iou_thr`` (box IoU
  for ``bbox``, mask IoU for ``segm``).  A match counts in row = true class, column = predicted
  class; a detection without a match counts in the background row (unless it covers a crowd
  region by ``iou_thr``, then it is ignored, as COCOeval does); ground truth left unmatched counts
  in the background column.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "confusion_matrix",
    "format_per_class",
    "per_class_rows",
    "plot_confusion",
    "plot_pr_curves",
    "pr_curves",
    "write_confusion_csv",
    "write_per_class_csv",
    "write_reports",
]

PER_CLASS_FIELDS = ("category_id", "class", "gt_count", "detections", "AP", "AP50", "AP75", "AR")


def _max_det_index(ev, max_dets: int) -> int:
    return list(ev.params.maxDets).index(int(max_dets))


def _iou_index(ev, iou: float) -> int:
    return int(np.where(np.isclose(np.asarray(ev.params.iouThrs), iou))[0][0])


def _mean_defined(a: np.ndarray) -> float:
    a = a[a > -1]
    return float(np.mean(a)) if a.size else -1.0


def per_class_rows(ev, max_dets: int, class_names: Mapping[int, str] | None = None) -> list[dict]:
    """One dict per category of ``ev.params.catIds`` with :data:`PER_CLASS_FIELDS`.

    AP values are in ``[0, 1]``; ``-1.0`` where undefined (a class without ground truth), as in
    pycocotools.
    """
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    recall = ev.eval["recall"]  # [T, K, A, M]
    m = _max_det_index(ev, max_dets)
    t50, t75 = _iou_index(ev, 0.5), _iou_index(ev, 0.75)
    img_ids = list(ev.params.imgIds)
    names = class_names or {}
    rows = []
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, m]
        rows.append(
            {
                "category_id": int(cat),
                "class": str(names.get(int(cat), cat)),
                "gt_count": sum(1 for i in img_ids for g in ev._gts.get((i, cat), ()) if not g["ignore"]),
                "detections": sum(min(len(ev._dts.get((i, cat), ())), int(max_dets)) for i in img_ids),
                "AP": _mean_defined(p),
                "AP50": _mean_defined(p[t50]),
                "AP75": _mean_defined(p[t75]),
                "AR": _mean_defined(recall[:, k, 0, m]),
            }
        )
    return rows


def write_per_class_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_CLASS_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in PER_CLASS_FIELDS})
    return path


def format_per_class(rows: Sequence[dict], iou_type: str) -> str:
    """The per-class table of the printed summary (AP in percent, ``-`` where undefined)."""
    width = max([5] + [len(r["class"]) for r in rows])
    head = f"{'class':<{width}} {'GT':>6} {'dets':>6} {'AP':>6} {'AP50':>6} {'AP75':>6} {'AR':>6}"
    lines = [f"[{iou_type}] per class", head]

    def pct(v: float) -> str:
        return f"{100 * v:6.1f}" if v >= 0 else f"{'-':>6}"

    for r in rows:
        lines.append(
            f"{r['class']:<{width}} {r['gt_count']:>6d} {r['detections']:>6d} "
            f"{pct(r['AP'])} {pct(r['AP50'])} {pct(r['AP75'])} {pct(r['AR'])}"
        )
    return "\n".join(lines)


def pr_curves(ev, max_dets: int) -> dict[str, np.ndarray]:
    """``recall`` (R,), ``per_class`` (K, R) precision at IoU 0.5 (``nan`` for classes without
    ground truth), and the class means at IoU 0.5, 0.75 and averaged over all thresholds."""
    precision = ev.eval["precision"][:, :, :, 0, _max_det_index(ev, max_dets)]  # [T, R, K]
    p = np.where(precision > -1, precision, np.nan)
    t50, t75 = _iou_index(ev, 0.5), _iou_index(ev, 0.75)
    with warnings.catch_warnings():  # nanmean of an all-nan column (no class has ground truth)
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "recall": np.asarray(ev.params.recThrs),
            "per_class": p[t50].T,
            "mean50": np.nanmean(p[t50], axis=1),
            "mean75": np.nanmean(p[t75], axis=1),
            "mean": np.nanmean(p, axis=(0, 2)),
        }


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pr_curves(ev, max_dets: int, rows: Sequence[dict], path: str | os.PathLike, iou_type: str) -> Path:
    """Left: the class-mean precision-recall curves (IoU .50, .75, .50:.95); right: one curve per
    class at IoU .50 (the legend names the 15 classes with the most ground truth)."""
    c = pr_curves(ev, max_dets)
    fig = _figure(11, 4.5)
    ax_mean, ax_cls = fig.subplots(1, 2)
    r = c["recall"]
    for key, label in (("mean50", "IoU .50"), ("mean75", "IoU .75"), ("mean", "IoU .50:.95")):
        if np.isfinite(c[key]).any():
            ax_mean.plot(r, c[key], label=label)
    ax_mean.set_title(f"{iou_type}: mean over classes")
    order = sorted(range(len(rows)), key=lambda k: -rows[k]["gt_count"])
    named = set(order[:15])
    for k in order:
        curve = c["per_class"][k]
        if not np.isfinite(curve).any():
            continue
        ap = rows[k]["AP50"]
        label = f"{rows[k]['class']} ({100 * ap:.1f})" if k in named else None
        ax_cls.plot(r, curve, linewidth=1.0, label=label)
    ax_cls.set_title(f"{iou_type}: per class at IoU .50 (AP50)")
    for ax in (ax_mean, ax_cls):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.18)
    path = Path(path)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------ confusion matrix


def confusion_matrix(ev, *, iou_thr: float = 0.5, score_thr: float = 0.3, max_dets: int | None = None) -> np.ndarray:
    """``(K + 1, K + 1)`` int64 counts, rows = ground-truth class, columns = predicted class, index
    ``K`` = background (see the module docstring for the matching rules)."""
    cat_ids = list(ev.params.catIds)
    index = {c: k for k, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    cm = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    limit = int(max_dets if max_dets is not None else ev.params.maxDets[-1])
    key = "segmentation" if ev.params.iouType == "segm" else "bbox"
    for img in ev.params.imgIds:
        gts = [g for c in cat_ids for g in ev._gts.get((img, c), ())]
        dts = [d for c in cat_ids for d in ev._dts.get((img, c), ()) if d["score"] >= score_thr]
        dts = sorted(dts, key=lambda d: -d["score"])[:limit]
        regular = [g for g in gts if not g["iscrowd"]]
        crowd = [g for g in gts if g["iscrowd"]]
        matched = np.zeros(len(regular), dtype=bool)
        ious = _ious(dts, regular, key, crowd=False)
        crowd_ious = _ious(dts, crowd, key, crowd=True)
        for i, d in enumerate(dts):
            pred = index[d["category_id"]]
            best, best_iou = -1, iou_thr
            for j in range(len(regular)):
                if not matched[j] and ious[i, j] >= best_iou:
                    best, best_iou = j, ious[i, j]
            if best >= 0:
                matched[best] = True
                cm[index[regular[best]["category_id"]], pred] += 1
            elif crowd and crowd_ious[i].max() >= iou_thr:
                continue  # on a crowd region: neither right nor wrong (COCOeval ignores it)
            else:
                cm[bg, pred] += 1
        for j, g in enumerate(regular):
            if not matched[j]:
                cm[index[g["category_id"]], bg] += 1
    return cm


def _ious(dts: list[dict], gts: list[dict], key: str, *, crowd: bool) -> np.ndarray:
    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    d = [x[key] for x in dts]
    g = [x[key] for x in gts]
    return np.asarray(mask_utils.iou(d, g, [int(crowd)] * len(g)), dtype=np.float64).reshape(len(dts), len(gts))


def write_confusion_csv(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike) -> Path:
    """Rows: ground truth; columns: prediction; the last row/column is ``background``."""
    labels = [*names, "background"]
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *labels])
        for name, row in zip(labels, cm.tolist()):
            w.writerow([name, *row])
    return path


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    """Counts, coloured by each row's fraction (so rare classes are as readable as common ones)."""
    labels = [*names, "background"]
    n = len(labels)
    sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, sums, out=np.zeros(cm.shape, dtype=np.float64), where=sums > 0)
    side = min(max(4.0, 0.45 * n + 2.0), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots(1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = 8 if n <= 30 else 5
    ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    ax.set_yticklabels(labels, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    longest = max(len(x) for x in labels)
    margin = min(0.45, 0.08 + 0.012 * longest * 8 / max(side, 1.0))  # room for the tick labels
    fig.subplots_adjust(left=margin, bottom=margin, right=0.92, top=0.9)
    path = Path(path)
    fig.savefig(path)
    return path


def write_reports(
    ev,
    iou_type: str,
    max_dets: int,
    out_dir: str | os.PathLike | None,
    *,
    class_names: Mapping[int, str] | None = None,
    confusion_score_thr: float = 0.3,
    plots: bool = True,
) -> list[dict]:
    """Per-class rows of ``ev``; with ``out_dir``: ``per_class_{iou}.csv``, ``confusion_{iou}.csv``
    and (``plots``) ``pr_{iou}.png`` and ``confusion_{iou}.png`` there."""
    rows = per_class_rows(ev, max_dets, class_names)
    if out_dir is None:
        return rows
    out = Path(out_dir)
    write_per_class_csv(rows, out / f"per_class_{iou_type}.csv")
    cm = confusion_matrix(ev, iou_thr=0.5, score_thr=confusion_score_thr, max_dets=max_dets)
    names = [r["class"] for r in rows]
    write_confusion_csv(cm, names, out / f"confusion_{iou_type}.csv")
    if plots:
        plot_pr_curves(ev, max_dets, rows, out / f"pr_{iou_type}.png", iou_type)
        plot_confusion(
            cm, names, out / f"confusion_{iou_type}.png",
            f"{iou_type} confusion at IoU 0.5, score >= {confusion_score_thr:g}\n(rows: true class, columns: predicted)",
        )
    return rows
