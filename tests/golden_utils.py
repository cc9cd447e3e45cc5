"""Helpers for the parity tests against mmdetection's reference outputs in ../shared/golden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"

MODELS = {
    "htc": ("htc_r18_fpn_c64_shapes", "htc_r18_fpn_c64_shapes.pth"),
    "mask_rcnn": ("mask_rcnn_r18_fpn_c64_shapes", "mask-rcnn_r18_fpn_c64_shapes.pth"),
}
IMAGES = ("100002", "100008")

requires_golden = pytest.mark.skipif(
    not GOLDEN.is_dir(), reason="../shared/golden is not present (it sits beside the repo on dev machines and CI)"
)


def decode_rles(rles: list[dict]) -> np.ndarray:
    return np.stack([mask_util.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(inter) / float(union)


def match_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
    ref_boxes: torch.Tensor, ref_scores: torch.Tensor, ref_labels: torch.Tensor,
    *, iou_thr: float = 0.99, score_tol: float = 1e-4,
) -> list[int]:
    """For each reference detection, the index of an unused detection of the same label with
    IoU >= ``iou_thr`` and a score within ``score_tol`` (-1 when there is none)."""
    from instseg.ops.boxes import box_iou

    used: set[int] = set()
    out = []
    iou = box_iou(ref_boxes, boxes) if len(boxes) else torch.zeros((len(ref_boxes), 0))
    for i in range(len(ref_boxes)):
        cands = [
            j for j in torch.argsort(iou[i], descending=True).tolist()
            if j not in used and labels[j] == ref_labels[i] and iou[i, j] >= iou_thr
            and abs(float(scores[j]) - float(ref_scores[i])) <= score_tol
        ]
        out.append(cands[0] if cands else -1)
        if cands:
            used.add(cands[0])
    return out
