"""Soft-NMS speed: instseg's vectorised ``soft_nms`` next to two loop implementations.

Usage::

    .venv/bin/python benchmarks/soft_nms_speed.py [--sizes 1000 10000] [--classes 20] [--repeats 5]
        [--threads 2] [--out benchmarks/results/nms/soft_nms_speed_cpu.json]

Workload (fixed seed): ``N`` detections in a 1333x800 image, in clusters of duplicates (each cluster
a jittered copy of one object box, as a detector's candidates before NMS), spread over ``--classes``
classes, scores uniform in (0.05, 1).  Linear Soft-NMS with mmdetection's settings (IoU 0.3 as
mmcv's default, ``min_score`` 1e-3) and gaussian (sigma 0.5).

Compared (the same boxes, same results: the kept indices are checked to be equal):

* ``vectorised``: ``instseg.ops.nms.soft_nms``: every class at once, one pick per class per
  iteration, the IoU matrix cached when it fits.
* ``per_pick_torch``: the usual Python implementation: class by class, one pick per iteration, each
  pick's IoU with the remaining boxes vectorised in torch.
* ``per_box_python``: mmcv's ``softnms_cpu`` algorithm written out in Python (one loop over picks,
  one over the remaining boxes), i.e. what a per-box loop costs without a compiled kernel.  At
  10,000 boxes it runs once (``--loop-repeats``).

Prints a table and writes JSON with the median ms of each.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from instseg.ops.nms import soft_nms

IMAGE_W, IMAGE_H = 1333.0, 800.0


def make_detections(n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes in clusters of about 10 jittered duplicates of one object, with classes and scores."""
    g = torch.Generator().manual_seed(seed)
    num_objects = max(1, n // 10)
    wh = torch.exp(torch.empty(num_objects, 2).uniform_(math.log(16), math.log(400), generator=g))
    ctr = torch.rand(num_objects, 2, generator=g) * torch.tensor([IMAGE_W, IMAGE_H])
    obj = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    which = torch.randint(0, num_objects, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g) * 0.1 * wh[which].repeat(1, 2)
    boxes = obj[which] + jitter
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, IMAGE_W - 2), boxes[:, 1].clamp(0, IMAGE_H - 2), boxes[:, 2], boxes[:, 3]], dim=1
    )
    boxes[:, 2] = torch.maximum(boxes[:, 2].clamp(max=IMAGE_W), boxes[:, 0] + 1)
    boxes[:, 3] = torch.maximum(boxes[:, 3].clamp(max=IMAGE_H), boxes[:, 1] + 1)
    labels = torch.randint(0, num_classes, (num_objects,), generator=g)[which]
    scores = torch.empty(n).uniform_(0.05, 1.0, generator=g)
    return boxes, scores, labels


def per_pick_torch(boxes, scores, labels, *, iou_threshold, sigma, min_score, method):
    """Class by class; each pick's decay is vectorised over the class's remaining boxes."""
    kept: list[torch.Tensor] = []
    kept_scores: list[torch.Tensor] = []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        b, s = boxes[idx], scores[idx].clone()
        s = torch.where(s >= min_score, s, -math.inf)
        while True:
            i = int(s.argmax())
            if s[i] == -math.inf:
                break
            kept.append(idx[i])
            kept_scores.append(s[i].clone())
            s[i] = -math.inf
            lt = torch.maximum(b[i, :2], b[:, :2])
            rb = torch.minimum(b[i, 2:], b[:, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=1)
            area = (b[:, 2:] - b[:, :2]).prod(dim=1)
            iou = inter / (area[i] + area - inter)
            if method == "gaussian":
                w = torch.exp(-(iou * iou) / sigma)
            else:
                w = torch.where(iou >= iou_threshold, 1.0 - iou, 1.0)
            s = s * w
            s = torch.where(s >= min_score, s, -math.inf)
    if not kept:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return torch.stack(kept), torch.stack(kept_scores)


def per_box_python(boxes, scores, labels, *, iou_threshold, sigma, min_score, method):
    """mmcv's ``softnms_cpu`` loop structure in plain Python (cross-class IoU 0)."""
    x1, y1, x2, y2 = (boxes[:, k].tolist() for k in range(4))
    sc, lab = scores.tolist(), labels.tolist()
    inds = list(range(len(sc)))
    areas = [(x2[i] - x1[i]) * (y2[i] - y1[i]) for i in range(len(sc))]
    arrays = [x1, y1, x2, y2, sc, lab, inds, areas]
    n, i, out = len(sc), 0, []
    while i < n:
        max_pos = max(range(i, n), key=sc.__getitem__)
        for a in arrays:
            a[i], a[max_pos] = a[max_pos], a[i]
        if sc[i] < min_score:
            break
        out.append(inds[i])
        pos = i + 1
        while pos < n:
            ovr = 0.0
            if lab[pos] == lab[i]:
                w = max(0.0, min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
                h = max(0.0, min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
                inter = w * h
                ovr = inter / (areas[i] + areas[pos] - inter)
            if method == "gaussian":
                weight = math.exp(-(ovr * ovr) / sigma)
            else:
                weight = 1.0 - ovr if ovr >= iou_threshold else 1.0
            sc[pos] *= weight
            if sc[pos] < min_score:
                for a in arrays:
                    a[pos], a[n - 1] = a[n - 1], a[pos]
                n -= 1
                continue
            pos += 1
        i += 1
    return torch.tensor(out, dtype=torch.int64), None


def time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=1, help="repeats of per_box_python above 2,000 boxes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/nms/soft_nms_speed_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for n in args.sizes:
        boxes, scores, labels = make_detections(n, args.classes, args.seed)
        for method in ("linear", "gaussian"):
            kw = dict(iou_threshold=0.3, sigma=0.5, min_score=1e-3, method=method)
            ours, _ = soft_nms(boxes, scores, labels, **kw)
            ref_pick, _ = per_pick_torch(boxes, scores, labels, **kw)
            ref_box, _ = per_box_python(boxes, scores, labels, **kw)
            same = set(ours.tolist()) == set(ref_pick.tolist()) == set(ref_box.tolist())
            row = {
                "boxes": n,
                "method": method,
                "kept": int(ours.numel()),
                "same_kept_set": same,
                "vectorised_ms": time_ms(lambda: soft_nms(boxes, scores, labels, **kw), args.repeats),
                "per_pick_torch_ms": time_ms(lambda: per_pick_torch(boxes, scores, labels, **kw), args.repeats),
                "per_box_python_ms": time_ms(
                    lambda: per_box_python(boxes, scores, labels, **kw),
                    args.repeats if n <= 2000 else args.loop_repeats,
                ),
            }
            rows.append(row)
            print(
                f"{n:6d} boxes {method:8s} kept {row['kept']:5d} same={same}  vectorised "
                f"{row['vectorised_ms']:9.1f} ms  per-pick torch {row['per_pick_torch_ms']:9.1f} ms  "
                f"per-box python {row['per_box_python_ms']:10.1f} ms",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "classes": args.classes, "cpu": platform.processor()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
