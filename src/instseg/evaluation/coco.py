"""COCO-style evaluation with the official ``pycocotools`` COCOeval.

Two steps:

1. :func:`detections_to_coco` turns one image's :class:`~instseg.structures.Detections`
   (original image frame, contiguous labels) into COCO result dicts (XYWH boxes, real
   category ids, compressed RLE masks).
2. :func:`evaluate_coco` runs COCOeval for ``bbox`` and/or ``segm`` and returns a flat dict of
   metrics (``bbox_AP``, ``bbox_AP50``, ..., ``segm_AR``).

Crowded data (the nuclei set has up to ~375 instances per image) needs ``max_dets`` of at
least 400. pycocotools' ``summarize()`` reads AP at a hard-coded ``maxDets=100``, so with
``maxDets=[1, 10, 400]`` its AP lines read -1; here every number is read from
``cocoEval.eval['precision']`` / ``['recall']`` at the ``max_dets`` actually used, and the printed
summary uses the same numbers.

With an ``out_dir``, :func:`evaluate_coco` also writes the reports of
:mod:`instseg.evaluation.report`: ``per_class_{bbox,segm}.csv`` (AP / AP50 / AP75 / AR per class,
also printed in the summary), ``pr_{bbox,segm}.png`` (precision-recall curves) and
``confusion_{bbox,segm}.{csv,png}`` (confusion matrix at IoU 0.5 with a background row/column).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.evaluation.report import format_per_class, write_reports
from instseg.structures.instances import Detections

__all__ = ["METRIC_NAMES", "detections_to_coco", "evaluate_coco", "format_summary", "write_results_json"]

# Metric suffixes returned per IoU type, e.g. ``bbox_AP`` or ``segm_ARl``.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR", "ARs", "ARm", "ARl")

_AREAS = {"all": 0, "small": 1, "medium": 2, "large": 3}


def detections_to_coco(dets: Detections, image_id: int, cat_ids: Sequence[int]) -> list[dict]:
    """Converts the detections of one image to COCO result dicts.

    Args:
        dets: detections in the original image frame; ``labels`` are contiguous indices into
            ``cat_ids``.
        image_id: the COCO image id.
        cat_ids: COCO category id of each contiguous label (``cat_ids[label]``).

    Returns:
        One dict per detection with ``image_id``, ``category_id``, ``bbox`` (``[x, y, w, h]``,
        rounded to 2 decimals), ``score`` and, when ``dets.masks`` is set, ``segmentation``
        (compressed RLE whose ``counts`` is a ``str``, ready for JSON). Masks are encoded one at
        a time, so hundreds of detections never need a second full-resolution stack.
    """
    n = len(dets)
    if n == 0:
        return []
    boxes = dets.boxes.detach().float().cpu().tolist()
    scores = dets.scores.detach().float().cpu().tolist()
    labels = dets.labels.detach().cpu().tolist()
    masks = dets.masks
    if masks is not None and int(masks.shape[0]) != n:
        raise ValueError(f"Detections has {n} boxes but {int(masks.shape[0])} masks")
    results: list[dict] = []
    for i in range(n):
        x1, y1, x2, y2 = boxes[i]
        label = int(labels[i])
        if not 0 <= label < len(cat_ids):
            raise ValueError(f"label {label} out of range for {len(cat_ids)} categories")
        res: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(cat_ids[label]),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": float(scores[i]),
        }
        if masks is not None:
            m = masks[i].detach().cpu().numpy()
            rle = mask_utils.encode(np.asfortranarray(m, dtype=np.uint8))
            rle["counts"] = rle["counts"].decode("ascii")
            res["segmentation"] = rle
        results.append(res)
    return results


def write_results_json(results: list[dict], path: str | os.PathLike) -> None:
    """Writes COCO results to ``path`` as JSON (RLE ``counts`` as str), via a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump([_jsonable_result(r) for r in results], f)
    os.replace(tmp, path)


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    *,
    iou_types: Iterable[str] = ("bbox", "segm"),
    max_dets: int = 100,
    out_dir: str | os.PathLike | None = None,
    image_ids: Sequence[int] | None = None,
    verbose: bool = True,
    confusion_score_thr: float = 0.3,
    plots: bool = True,
) -> dict[str, float]:
    """Runs the official COCOeval and returns flat metrics.

    Args:
        coco_gt: ground truth.
        results: COCO result dicts (e.g. from :func:`detections_to_coco`); not modified.
        iou_types: any of ``"bbox"``, ``"segm"``.
        max_dets: detections kept per image; COCOeval runs with ``maxDets=[1, 10, max_dets]``
            and every returned number (AP included) is read at ``max_dets``.
        out_dir: when given, ``results.json``, ``metrics.json`` and ``summary.txt`` are written
            there.
        image_ids: evaluate only these images (default: every image of ``coco_gt``). Results
            for other images are ignored.
        verbose: print pycocotools' progress and the summary.
        confusion_score_thr: detections below this score are left out of the confusion matrix.
        plots: also draw the PNG reports (precision-recall curves, confusion matrix).

    The summary (printed, and ``summary.txt``) has COCO's 12 lines and a per-class table for each
    IoU type; the per-class CSVs and the confusion matrices go to ``out_dir`` (see
    :func:`instseg.evaluation.report.write_reports`).

    Returns:
        ``{f"{iou}_{name}": value}`` for ``name`` in :data:`METRIC_NAMES`, values in [0, 1].
        A metric that is undefined (e.g. ``APl`` with no large ground truth) is -1.0, as in
        pycocotools. With no results for an IoU type, all its metrics are 0.0.
    """
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"unsupported iou type {t!r} (use 'bbox' or 'segm')")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")

    gt_ids = set(coco_gt.getImgIds())
    if image_ids is None:
        eval_ids = sorted(gt_ids)
        unknown = {int(r["image_id"]) for r in results} - gt_ids
        if unknown:
            raise ValueError(f"results refer to {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[:5]}")
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        missing = set(eval_ids) - gt_ids
        if missing:
            raise ValueError(f"image_ids not in the ground truth: {sorted(missing)[:5]}")
    eval_set = set(eval_ids)
    results = [r for r in results if int(r["image_id"]) in eval_set]

    metrics: dict[str, float] = {}
    summaries: list[str] = []
    class_names = {int(c["id"]): str(c.get("name", c["id"])) for c in coco_gt.dataset.get("categories", [])}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    for iou_type in iou_types:
        if iou_type == "segm":
            # Without 'bbox', loadRes takes a detection's area from its mask, not its box, so
            # the small/medium/large split of mask AP is by mask area (as mmdet/detectron2 do).
            dts = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            dts = [dict(r) for r in results]  # loadRes adds keys to the dicts it gets
        if not dts:
            values = {name: 0.0 for name in METRIC_NAMES}
            note = "no results" if not results else "no results carry a 'segmentation'"
            summaries.append(f"{iou_type}: {note}; all metrics 0.0")
        else:
            values, ev = _run_cocoeval(coco_gt, dts, iou_type, max_dets, eval_ids, verbose)
            summaries.append(format_summary(values, iou_type, max_dets))
            rows = write_reports(
                ev, iou_type, max_dets, out_dir, class_names=class_names,
                confusion_score_thr=confusion_score_thr, plots=plots,
            )
            summaries.append(format_per_class(rows, iou_type))
        metrics.update({f"{iou_type}_{k}": v for k, v in values.items()})

    summary = "\n".join(summaries)
    if verbose:
        print(summary)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_results_json(results, out / "results.json")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "summary.txt").write_text(summary + "\n")
    return metrics


def format_summary(values: dict[str, float], iou_type: str, max_dets: int) -> str:
    """The 12 lines of COCO's summary, with every AP line at ``max_dets`` (not a fixed 100)."""
    rows = [
        ("Average Precision", "0.50:0.95", "all", max_dets, "AP"),
        ("Average Precision", "0.50", "all", max_dets, "AP50"),
        ("Average Precision", "0.75", "all", max_dets, "AP75"),
        ("Average Precision", "0.50:0.95", "small", max_dets, "APs"),
        ("Average Precision", "0.50:0.95", "medium", max_dets, "APm"),
        ("Average Precision", "0.50:0.95", "large", max_dets, "APl"),
        ("Average Recall", "0.50:0.95", "all", 1, "AR1"),
        ("Average Recall", "0.50:0.95", "all", 10, "AR10"),
        ("Average Recall", "0.50:0.95", "all", max_dets, "AR"),
        ("Average Recall", "0.50:0.95", "small", max_dets, "ARs"),
        ("Average Recall", "0.50:0.95", "medium", max_dets, "ARm"),
        ("Average Recall", "0.50:0.95", "large", max_dets, "ARl"),
    ]
    lines = [f"[{iou_type}]"]
    for title, iou, area, md, key in rows:
        short = "(AP)" if title.startswith("Average Precision") else "(AR)"
        lines.append(f" {title:<18} {short} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>4} ] = {values[key]:0.3f}")
    return "\n".join(lines)


def _run_cocoeval(
    coco_gt: COCO, dts: list[dict], iou_type: str, max_dets: int, image_ids: list[int], verbose: bool
) -> tuple[dict[str, float], COCOeval]:
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes(dts)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = list(image_ids)
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
    return _metrics_from_eval(ev, max_dets), ev


def _metrics_from_eval(ev: COCOeval, max_dets: int) -> dict[str, float]:
    """Reads AP/AR from ``ev.eval`` at the given maxDets (what ``summarize()`` gets wrong)."""
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    recall = ev.eval["recall"]  # [T, K, A, M]
    m_max = list(p.maxDets).index(int(max_dets))
    iou_thrs = np.asarray(p.iouThrs)

    def ap(area: str, iou: float | None = None) -> float:
        s = precision[..., _AREAS[area], m_max]
        if iou is not None:
            s = s[np.where(np.isclose(iou_thrs, iou))[0]]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    def ar(area: str, m: int) -> float:
        s = recall[:, :, _AREAS[area], m]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    return {
        "AP": ap("all"),
        "AP50": ap("all", 0.5),
        "AP75": ap("all", 0.75),
        "APs": ap("small"),
        "APm": ap("medium"),
        "APl": ap("large"),
        "AR1": ar("all", 0),
        "AR10": ar("all", 1),
        "AR": ar("all", m_max),
        "ARs": ar("small", m_max),
        "ARm": ar("medium", m_max),
        "ARl": ar("large", m_max),
    }


def _jsonable_result(r: dict) -> dict:
    out = {}
    for k, v in r.items():
        if k == "segmentation" and isinstance(v, dict) and isinstance(v.get("counts"), bytes):
            v = {**v, "counts": v["counts"].decode("ascii")}
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out
