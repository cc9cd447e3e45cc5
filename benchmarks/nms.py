"""Fast NMS (YOLACT) next to per-class greedy NMS, plus Soft-NMS, on YOLACT's detection setting.

Usage::

    .venv/bin/python benchmarks/nms.py [--device cpu|cuda] [--repeats 10] [--warmup 2] [--seed 0]
        [--threads N] [--out benchmarks/results/nms/nms_<device>.json]

Workload (one synthetic YOLACT-550 image, built once, fixed seed):

* **Anchors.** 19,248 boxes (YOLACT-550's anchor count) with random centres in a 550x550 image and
  log-uniform sizes / aspect ratios, clipped to the image.
* **Scores.** ``softmax`` over 81 logits per anchor: 80 foreground columns ``N(0, 1)`` and a strong
  background column ``N(6.5, 1)``.  ``--objects`` random objects (class, box) make it realistic:
  anchors overlapping an object (IoU > 0.4) get that class's logit raised and background lowered,
  so detections come in clusters of duplicates, which is what NMS is for.  A few thousand anchors
  end up with a max foreground score > 0.05.
* **YOLACT's pipeline.** Keep anchors whose max foreground score > 0.05 (YOLACT's ``conf_thresh``);
  every (kept anchor, class) pair is a candidate (YOLACT passes all class scores of those anchors);
  per class its top 200 candidates; NMS at IoU 0.5; the 100 best detections overall.

Timed (median of ``--repeats`` rounds; the order of the methods rotates between rounds; CUDA calls
are bracketed by ``torch.cuda.synchronize()``):

* ``topk_select``: the per-class top-200 selection from the dense ``(anchors, 80)`` score matrix.
* ``greedy``: ``batched_nms`` (torchvision's per-class greedy NMS) on those candidates, top 100.
* ``fast``: ``fast_nms`` on the same candidates, top 100 (the comparison that matters: same input).
* ``fast_dense``: ``fast_nms_dense`` on the dense ``(anchors, classes)`` scores (YOLACT's head path:
  its own per-class top 200, one (C, K, K) IoU tensor), against ``topk_select`` + ``greedy``.
* ``fast_end_to_end``: ``fast_nms`` on all dense candidates, doing its own per-class top 200.
* ``soft_linear`` / ``soft_gaussian``: mmcv-style ``soft_nms`` (IoU 0.3 / sigma 0.5, min_score
  1e-3) on the same top-200 candidates, top 100.

Also reported: detections kept by each (before the 100 cap), and how many of Fast NMS's top 100 are
in greedy's top 100 (same (anchor, class) candidate).  Fast NMS is O(C K^2) dense work (80 x 200 x
200 IoUs) while greedy NMS skips suppressed boxes: the dense form pays off on GPUs, not on a few
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from torchvision.ops import box_iou

from instseg.ops.nms import batched_nms, fast_nms, fast_nms_dense, soft_nms

IMG = 550.0
NUM_ANCHORS = 19248
NUM_CLASSES = 80
CONF_THRESH = 0.05
TOP_K = 200
IOU_THR = 0.5
MAX_DETS = 100


def make_image(seed: int, num_objects: int) -> tuple[Tensor, Tensor]:
    """Anchors ``(19248, 4)`` and softmax scores ``(19248, 81)`` (background column 0, as YOLACT)."""
    g = torch.Generator().manual_seed(seed)

    def rand_boxes(n: int, lo: float, hi: float) -> Tensor:
        ctr = torch.rand(n, 2, generator=g) * IMG
        size = torch.exp(torch.empty(n).uniform_(torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item(), generator=g))
        ratio = torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=g))
        wh = torch.stack([size * ratio.sqrt(), size / ratio.sqrt()], 1)
        return torch.cat([ctr - wh / 2, ctr + wh / 2], 1).clamp(0, IMG)

    anchors = rand_boxes(NUM_ANCHORS, 16.0, 400.0)
    logits = torch.randn(NUM_ANCHORS, NUM_CLASSES + 1, generator=g)
    logits[:, 0] += 6.5
    objects = rand_boxes(num_objects, 40.0, 300.0)
    obj_cls = torch.randint(1, NUM_CLASSES + 1, (num_objects,), generator=g)
    iou = box_iou(anchors, objects)  # (anchors, objects)
    best_iou, best_obj = iou.max(1)
    hit = best_iou > 0.4
    boost = 3.0 + 4.0 * (best_iou[hit] - 0.4) + torch.randn(int(hit.sum()), generator=g)
    logits[hit.nonzero()[:, 0], obj_cls[best_obj[hit]]] += boost
    logits[hit, 0] -= 2.0
    return anchors, torch.softmax(logits, 1)


def dense_candidates(anchors: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """YOLACT's pre-filter: anchors with max fg score > 0.05, all their (anchor, class) pairs.

    Returns kept anchor boxes ``(n, 4)``, fg scores ``(n, 80)`` and the flattened triples' scores
    and labels (triple ``r * 80 + c`` is anchor ``r``, class ``c``).
    """
    fg = scores[:, 1:]
    keep = fg.max(1).values > CONF_THRESH
    boxes, fg = anchors[keep], fg[keep]
    labels = torch.arange(NUM_CLASSES, device=fg.device).repeat(fg.shape[0])
    return boxes, fg, fg.reshape(-1), labels


def topk_select(boxes: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class top 200 from the dense ``(n, 80)`` matrix: candidate boxes, scores, labels, triple ids."""
    k = min(TOP_K, fg.shape[0])
    vals, rows = fg.topk(k, dim=0)  # (k, 80)
    cls = torch.arange(NUM_CLASSES, device=fg.device).expand(k, -1)
    return boxes[rows.reshape(-1)], vals.reshape(-1), cls.reshape(-1), (rows * NUM_CLASSES + cls).reshape(-1)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objects", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    anchors, scores = make_image(args.seed, args.objects)
    boxes, fg, dense_scores, dense_labels = dense_candidates(anchors.to(device), scores.to(device))
    dense_boxes = boxes.repeat_interleave(NUM_CLASSES, 0)  # triple r * 80 + c -> anchor r
    cand_boxes, cand_scores, cand_labels, cand_ids = topk_select(boxes, fg)

    methods: dict[str, Callable[[], Tensor | tuple[Tensor, Tensor]]] = {
        "topk_select": lambda: topk_select(boxes, fg)[3],
        "greedy": lambda: batched_nms(cand_boxes, cand_scores, cand_labels, IOU_THR)[:MAX_DETS],
        "fast": lambda: fast_nms(cand_boxes, cand_scores, cand_labels, iou_threshold=IOU_THR, top_k=TOP_K)[:MAX_DETS],
        # what YOLACT's head runs: per-class top 200 of the dense (anchor, class) scores + Fast NMS
        "fast_dense": lambda: fast_nms_dense(boxes, fg, iou_threshold=IOU_THR, top_k=TOP_K)[0][:MAX_DETS],
        "fast_end_to_end": lambda: fast_nms(dense_boxes, dense_scores, dense_labels, iou_threshold=IOU_THR, top_k=TOP_K)[:MAX_DETS],
        "soft_linear": lambda: soft_nms(cand_boxes, cand_scores, cand_labels, iou_threshold=0.3, method="linear")[0][:MAX_DETS],
        "soft_gaussian": lambda: soft_nms(cand_boxes, cand_scores, cand_labels, sigma=0.5, method="gaussian")[0][:MAX_DETS],
    }
    names = list(methods)
    for _ in range(args.warmup):
        for name in names:
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(methods[name], device)[0])
    ms = {name: statistics.median(v) for name, v in times.items()}

    # what each keeps (before the cap) and agreement of the top 100s, as (anchor, class) triple ids
    greedy_all = batched_nms(cand_boxes, cand_scores, cand_labels, IOU_THR)
    fast_all = fast_nms(cand_boxes, cand_scores, cand_labels, iou_threshold=IOU_THR, top_k=TOP_K)
    e2e_all = fast_nms(dense_boxes, dense_scores, dense_labels, iou_threshold=IOU_THR, top_k=TOP_K)
    soft_lin = soft_nms(cand_boxes, cand_scores, cand_labels, iou_threshold=0.3, method="linear")[0]
    soft_gau = soft_nms(cand_boxes, cand_scores, cand_labels, method="gaussian")[0]
    greedy_top = set(cand_ids[greedy_all[:MAX_DETS]].tolist())
    fast_top = cand_ids[fast_all[:MAX_DETS]].tolist()
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()},
        "setting": {
            "anchors": NUM_ANCHORS,
            "classes": NUM_CLASSES,
            "anchors_above_conf": int(boxes.shape[0]),
            "dense_candidates": int(dense_scores.shape[0]),
            "topk_candidates": int(cand_scores.shape[0]),
            "conf_thresh": CONF_THRESH,
            "top_k": TOP_K,
            "iou_threshold": IOU_THR,
            "max_dets": MAX_DETS,
        },
        "median_ms": ms,
        "all_ms": times,
        "fast_over_greedy": ms["fast"] / ms["greedy"],
        "fast_dense_over_topk_plus_greedy": ms["fast_dense"] / (ms["topk_select"] + ms["greedy"]),
        "fast_end_to_end_over_topk_plus_greedy": ms["fast_end_to_end"] / (ms["topk_select"] + ms["greedy"]),
        "kept_before_cap": {
            "greedy": int(greedy_all.numel()),
            "fast": int(fast_all.numel()),
            "fast_end_to_end": int(e2e_all.numel()),
            "soft_linear": int(soft_lin.numel()),
            "soft_gaussian": int(soft_gau.numel()),
        },
        # same set; the order of exactly tied scores may differ (ties go by each call's own input index)
        "fast_end_to_end_same_detections": sorted(cand_ids[fast_all].tolist()) == sorted(e2e_all.tolist()),
        "fast_top100_in_greedy_top100": sum(i in greedy_top for i in fast_top),
    }

    out = args.out or Path(__file__).parent / "results" / "nms" / f"nms_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["setting"]
    print(f"device={args.device} threads={result['threads']} repeats={args.repeats}")
    print(
        f"{s['anchors_above_conf']} of {NUM_ANCHORS} anchors have max fg score > {CONF_THRESH}: "
        f"{s['dense_candidates']} (anchor, class) candidates, {s['topk_candidates']} after per-class top {TOP_K}"
    )
    for name in names:
        kept = result["kept_before_cap"].get(name)
        print(f"  {name:16s} {ms[name]:9.2f} ms" + (f"   kept {kept} (top {MAX_DETS} reported)" if kept is not None else ""))
    print(f"fast / greedy (same top-{TOP_K} candidates): {result['fast_over_greedy']:.3f}")
    print(f"fast end-to-end / (topk_select + greedy): {result['fast_end_to_end_over_topk_plus_greedy']:.3f}")
    print(f"fast end-to-end keeps the same detections as fast on the selected candidates: {result['fast_end_to_end_same_detections']}")
    print(f"Fast NMS top-{MAX_DETS} also in greedy top-{MAX_DETS}: {result['fast_top100_in_greedy_top100']} / {len(fast_top)}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
