"""Speed of instseg's Mask R-CNN / HTC R-50-FPN next to torchvision's Mask R-CNN R-50-FPN.

Usage::

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--threads 2] [--iters 5]
        [--skip-train] [--skip-htc] [--out benchmarks/results/speed_<host>.json]

What is compared (one process, so both models see the same machine load):

* **Input.** One 800x1216 image (already a multiple of 32, so neither model resizes or pads it).
  instseg gets the mmdetection-normalised tensor ``(img - mean) / std``; torchvision gets
  ``img / 255`` and normalises it itself with its default ImageNet mean/std, which is the same
  arithmetic.  torchvision's transform is built with ``min_size=800, max_size=1216`` so its resize
  is the identity (it still runs one scale-1.0 interpolation: that is part of its pipeline).
* **Weights.** Random (``weights=None, weights_backbone=None``), 80 classes + background for both.
  torchvision then uses trainable ``BatchNorm2d`` everywhere (it only freezes BN for pretrained
  backbones); ``--tv-frozen`` gives it frozen BN and a frozen stem + layer1 instead, which is what
  instseg's preset trains (``frozen_stages=1, norm_eval=True``).
* **Detections.** With random weights no class reaches the usual 0.05 score threshold, so both
  models use score threshold 0.0 (torchvision ``box_score_thresh=0.0``, instseg
  ``score_thr=0.0``) and cap 100 detections per image; both then run the full mask branch and
  paste 100 masks at full resolution.
* **Inference.** Eval mode, ``torch.no_grad``.  instseg calls ``optimize_for_inference()`` (BN
  folded into the backbone convolutions - exact in eval mode); torchvision is used as shipped.
* **Training step.** Train mode, forward + backward + ``SGD.step`` on the same synthetic targets
  (``--num-gt`` boxes with filled-ellipse masks).  The learning rate is 0 so every iteration
  sees the same weights and hence the same workload; the optimiser still does all its arithmetic.
  Separate model instances are used for training (BN folding is for inference only); they call
  ``use_channels_last()`` (NHWC backbone/FPN/RPN, an opt-in that only changes memory layout).
* **HTC.** ``htc_r50_fpn_1x_coco`` exactly as preset (score threshold 0.001, which random-weight
  scores of about 1/81 pass, so it also keeps 100 detections); its training step adds a random
  semantic map with labels < 183.

Timing: ``--warmup`` untimed calls of each model, then ``--iters`` rounds, each timing one call
of every model in turn (the order alternates between rounds); reported numbers are medians in ms
per image and the ratio instseg / torchvision (lower is better for instseg).  On CUDA every
timed call is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from instseg.config.presets import get_preset
from instseg.modeling.zoo import build_model
from instseg.structures.instances import ImageBatch, ImageTargets
from instseg.structures.masks import CroppedMasks

HEIGHT, WIDTH = 800, 1216
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
NUM_CLASSES = 80


# ---------------------------------------------------------------------------------------- inputs
def make_image(seed: int) -> Tensor:
    """A float image ``(3, H, W)`` in [0, 255] with some structure (smooth blobs + noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((1, 3, HEIGHT // 32, WIDTH // 32), generator=g)
    img = torch.nn.functional.interpolate(low, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
    img = img * 200 + torch.rand((3, HEIGHT, WIDTH), generator=g) * 55
    return img.clamp(0, 255)


def make_targets(num_gt: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes ``(G, 4)``, labels ``(G,)`` in ``[0, 80)`` and uint8 masks ``(G, H, W)`` (ellipses)."""
    g = torch.Generator().manual_seed(seed)
    boxes, masks = [], []
    ys = torch.arange(HEIGHT, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(WIDTH, dtype=torch.float32)[None, :] + 0.5
    for _ in range(num_gt):
        w = float(torch.randint(40, 400, (1,), generator=g))
        h = float(torch.randint(40, 400, (1,), generator=g))
        x0 = float(torch.randint(0, int(WIDTH - w), (1,), generator=g))
        y0 = float(torch.randint(0, int(HEIGHT - h), (1,), generator=g))
        cx, cy = x0 + w / 2, y0 + h / 2
        m = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0
        masks.append(m.to(torch.uint8))
        boxes.append([x0, y0, x0 + w, y0 + h])
    labels = torch.randint(0, NUM_CLASSES, (num_gt,), generator=g)
    return torch.tensor(boxes, dtype=torch.float32), labels, torch.stack(masks)


def instseg_batch(img: Tensor, device: torch.device) -> ImageBatch:
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    return ImageBatch(
        images=((img - mean) / std)[None].to(device),
        image_sizes=[(HEIGHT, WIDTH)],
        original_sizes=[(HEIGHT, WIDTH)],
        scale_factors=torch.ones((1, 2), device=device),
    )


# ---------------------------------------------------------------------------------------- models
def build_instseg(preset: str, device: torch.device, *, score_thr: float | None) -> nn.Module:
    cfg = get_preset(preset).model
    if score_thr is not None:
        cfg.score_thr = score_thr
    return build_model(cfg).to(device)


def build_torchvision(device: torch.device, *, frozen: bool) -> nn.Module:
    kwargs = dict(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES + 1,
        min_size=HEIGHT,
        max_size=WIDTH,
        box_score_thresh=0.0,
        box_detections_per_img=100,
    )
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(**kwargs)
    if frozen:
        # torchvision ignores trainable_backbone_layers without pretrained weights, so freeze by hand
        _freeze_bn(model.backbone.body)
        for name, p in model.backbone.body.named_parameters():
            if not name.startswith(("layer2.", "layer3.", "layer4.")):
                p.requires_grad_(False)
    return model.to(device)


def _freeze_bn(module: nn.Module) -> None:
    """Replaces every ``BatchNorm2d`` by torchvision's ``FrozenBatchNorm2d`` (same statistics)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)


# ---------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, warmup: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Runs each callable ``warmup`` times, then ``iters`` rounds of one timed call each (ms)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(iters):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    return times


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------- benches
def bench_inference(args: argparse.Namespace, device: torch.device, img: Tensor) -> dict[str, dict]:
    ours = build_instseg("mask_rcnn_r50_fpn_1x_coco", device, score_thr=0.0).eval()
    ours.optimize_for_inference()
    tv = build_torchvision(device, frozen=args.tv_frozen).eval()
    fns: dict[str, Callable[[], object]] = {}
    batch = instseg_batch(img, device)
    tv_img = [(img / 255.0).to(device)]

    def run_ours() -> object:
        with torch.no_grad():
            return ours.predict(batch)

    def run_tv() -> object:
        with torch.no_grad():
            return tv(tv_img)

    fns["instseg_mask_rcnn"] = run_ours
    fns["torchvision_mask_rcnn"] = run_tv
    if not args.skip_htc:
        htc = build_instseg("htc_r50_fpn_1x_coco", device, score_thr=None).eval()
        htc.optimize_for_inference()

        def run_htc() -> object:
            with torch.no_grad():
                return htc.predict(batch)

        fns["instseg_htc"] = run_htc
    # sanity: both Mask R-CNNs keep 100 detections, so the mask branches do the same work
    counts = {"instseg_mask_rcnn": len(run_ours()[0]), "torchvision_mask_rcnn": int(run_tv()[0]["boxes"].shape[0])}
    if "instseg_htc" in fns:
        counts["instseg_htc"] = len(fns["instseg_htc"]()[0])
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {k: {"ms": _median(v), "all_ms": v, "detections": counts[k]} for k, v in times.items()}


def bench_train(args: argparse.Namespace, device: torch.device, img: Tensor) -> dict[str, dict]:
    boxes, labels, masks = make_targets(args.num_gt, seed=1)
    batch = instseg_batch(img, device)
    # CroppedMasks is what instseg's data pipeline produces, so building it is not timed
    targets = [ImageTargets(boxes, labels, CroppedMasks.from_full(masks))]
    tv_img = [(img / 255.0).to(device)]
    tv_targets = [{"boxes": boxes.to(device), "labels": (labels + 1).to(device), "masks": masks.to(device)}]

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)

    # channels-last is an opt-in for training (use_channels_last); only the layout changes
    ours = build_instseg("mask_rcnn_r50_fpn_1x_coco", device, score_thr=0.0).train().use_channels_last()
    tv = build_torchvision(device, frozen=args.tv_frozen).train()
    opt_ours, opt_tv = sgd(ours), sgd(tv)

    def step_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        ours(batch, targets)["loss"].backward()
        opt_ours.step()

    def step_tv() -> None:
        opt_tv.zero_grad(set_to_none=True)
        losses = tv(tv_img, tv_targets)
        sum(losses.values()).backward()
        opt_tv.step()

    fns: dict[str, Callable[[], object]] = {"instseg_mask_rcnn": step_ours, "torchvision_mask_rcnn": step_tv}
    if not args.skip_htc:
        semantic = torch.randint(0, 183, (HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2))
        htc_targets = [ImageTargets(boxes, labels, CroppedMasks.from_full(masks), semantic)]
        htc = build_instseg("htc_r50_fpn_1x_coco", device, score_thr=None).train().use_channels_last()
        opt_htc = sgd(htc)

        def step_htc() -> None:
            opt_htc.zero_grad(set_to_none=True)
            htc(batch, htc_targets)["loss"].backward()
            opt_htc.step()

        fns["instseg_htc"] = step_htc
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {k: {"ms": _median(v), "all_ms": v} for k, v in times.items()}


# ---------------------------------------------------------------------------------------- report
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def summarise(section: dict[str, dict]) -> dict[str, float]:
    ours = section["instseg_mask_rcnn"]["ms"]
    out = {"instseg_over_torchvision": _ratio(ours, section["torchvision_mask_rcnn"]["ms"])}
    if "instseg_htc" in section:
        out["htc_over_instseg_mask_rcnn"] = _ratio(section["instseg_htc"]["ms"], ours)
    return out


def print_table(results: dict) -> None:
    rows = []
    for kind in ("inference", "train_step"):
        if kind not in results:
            continue
        sec = results[kind]
        for name, label in (
            ("instseg_mask_rcnn", "instseg Mask R-CNN R50-FPN"),
            ("torchvision_mask_rcnn", "torchvision Mask R-CNN R50-FPN"),
            ("instseg_htc", "instseg HTC R50-FPN"),
        ):
            if name in sec:
                spread = f"{min(sec[name]['all_ms']):.0f}-{max(sec[name]['all_ms']):.0f}"
                rows.append((kind, label, f"{sec[name]['ms']:.1f}", spread))
        ratios = results[f"{kind}_ratios"]
        rows.append((kind, "ratio instseg / torchvision", f"{ratios['instseg_over_torchvision']:.3f}", ""))
        if "htc_over_instseg_mask_rcnn" in ratios:
            rows.append((kind, "ratio HTC / instseg Mask R-CNN", f"{ratios['htc_over_instseg_mask_rcnn']:.3f}", ""))
    widths = [max(len(r[i]) for r in rows + [("what", "model", "median ms/img", "range ms")]) for i in range(4)]
    header = ("what", "model", "median ms/img", "range ms")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (both models)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model before timing")
    p.add_argument("--num-gt", type=int, default=10, help="synthetic ground-truth instances for training")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-htc", action="store_true")
    p.add_argument(
        "--tv-frozen", action="store_true",
        help="give torchvision frozen BN and a frozen stem+layer1, as instseg's preset trains",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/speed_<host>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    img = make_image(seed=0)
    host = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else socket.gethostname()
    results: dict = {
        "device": str(device),
        "device_name": host,
        "threads": args.threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "image": [HEIGHT, WIDTH],
        "tv_frozen": args.tv_frozen,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()},
    }
    if not args.skip_inference:
        results["inference"] = bench_inference(args, device, img)
        results["inference_ratios"] = summarise(results["inference"])
    if not args.skip_train:
        results["train_step"] = bench_train(args, device, img)
        results["train_step_ratios"] = summarise(results["train_step"])
    print_table(results)
    out = args.out or Path(__file__).resolve().parent / "results" / f"speed_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
