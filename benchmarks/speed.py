"""Speed of instseg's detectors side by side with references (torchvision, or instseg's Mask R-CNN).

Usage::

    .venv/bin/python benchmarks/speed.py [--family two-stage|one-stage|rdsnet|all] [--device cpu|cuda]
        [--threads 2] [--iters 5] [--skip-train] [--skip-htc] [--skip-retinanet] [--skip-yolact]
        [--mbrm-iters 20] [--tv-frozen] [--out benchmarks/results/speed_<host>.json]

``--family two-stage`` (the default, and what this script always did): instseg's Mask R-CNN / HTC
R-50-FPN next to torchvision's Mask R-CNN R-50-FPN, written to ``speed_<host>.json``.
``--family one-stage``: RetinaNet R-50-FPN next to torchvision's RetinaNet, and YOLACT-550 R-50
next to instseg's Mask R-CNN R-50-FPN (``speed_one_stage_<host>.json``); ``--family rdsnet``:
RDSNet R-50-FPN next to YOLACT-550 R-50 and instseg's Mask R-CNN R-50-FPN, and MBRM's own cost
(``speed_rdsnet_<host>.json``); ``--family all``: all of them (``speed_all_<host>.json``).  The
sections are described below.

Two-stage (one process, so both models see the same machine load):

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

One-stage, RetinaNet (issue 6: ratio instseg / torchvision <= 1.0 must, <= 0.8 goal):

* **Models.** instseg's ``retinanet_r50_fpn_1x_coco`` (mmdet's RetinaNet: P3-P7, P6 from C5,
  4 x 256 towers, 9 anchors per location, sigmoid focal loss, L1 box loss) and torchvision's
  ``retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)`` (v1: the same
  head, anchors, matcher 0.5 / 0.4 with low-quality matches, focal + L1 losses; its P6 is computed
  from P5, 256 channels, where mmdet's is from C5, 2048 channels: instseg does the slightly larger
  P6 conv).  80 sigmoid classes each, random weights, both heads initialised with the 0.01 prior.
* **Input.** The same image and tensor semantics as the Mask R-CNN comparison: 800x1216,
  instseg gets ``(img - mean) / std``, torchvision ``img / 255`` with ``min_size=800,
  max_size=1216`` (its resize is the identity).
* **Detections.** Random weights give every (anchor, class) score about the 0.01 prior, below
  mmdet's 0.05, so both use score threshold 0.0 with 1000 candidates per level and 100
  detections per image: torchvision ``score_thresh=0.0, topk_candidates=1000,
  detections_per_img=100`` (NMS 0.5), instseg ``model.score_thr=0.0,
  model.retinanet.nms_pre=1000, model.max_per_img=100`` (hard NMS 0.5).  Both therefore keep
  1000 candidates on every level, run class-wise NMS on the 5000 and return 100 boxes.
* **Inference / training step.** As for Mask R-CNN: ``optimize_for_inference()`` for instseg,
  torchvision as shipped; training = forward + backward + ``SGD(lr=0)`` step on ``--num-gt``
  random boxes (labels in ``[0, 80)``, torchvision's RetinaNet has no background class).
  instseg trains in its default NCHW layout, as ``instseg train`` does: on CPU, channels-last
  made RetinaNet's training step slower (its NHWC convolution backward is slower here, about
  48 s vs 33 s per step on the 2-core VM), unlike Mask R-CNN's; ``--retinanet-train-channels-last``
  times the NHWC variant instead.  ``--tv-frozen`` freezes torchvision's BN and stem + layer1 as
  for Mask R-CNN (instseg's preset: ``frozen_stages=1, norm_eval=True``).

One-stage, YOLACT vs Mask R-CNN (issue 6 goal: YOLACT >= 3x faster, i.e. ratio <= 0.333):

* **Models.** instseg's ``yolact_resnet50`` (the official ``yolact_resnet50_config``: R-50-FPN,
  550x550, protonet k = 32, Fast NMS top 200 per class, 100 detections) and instseg's
  ``mask_rcnn_r50_fpn_1x_coco``, both random weights, both ``optimize_for_inference()``.
* **Input.** The benchmark's 800x1216 image: Mask R-CNN as above; YOLACT gets it squash-resized
  to 550x550 (bilinear) and normalised with YOLACT's mean / std, with ``original_sizes =
  (800, 1216)``.  The resize and normalisation are data-pipeline work and are not timed (as the
  normalisation is not for any model here).
* **Detections.** Both use score threshold 0.0 and keep 100 detections with masks pasted at the
  full 800x1216 resolution.  YOLACT's official candidates are the anchors whose best softmax
  foreground score passes ``score_thr``; with 0.0 that is every anchor (19,248), the most work
  its Fast NMS can see (random weights would pass the preset's 0.05 too, but trained softmax scores
  mostly do not, so 0.0 is the conservative setting for YOLACT).  YOLACT's timed call includes
  the prototypes, the 100 mask combinations and crops and their upsampling to 800x1216.

RDSNet (``--family rdsnet``; inference only, ``--skip-train`` does not apply):

* **Models.** instseg's ``rdsnet_r50_fpn_1x`` (the official ``rdsnet_r50_fpn_1x``: R-50-FPN,
  P3-P7, GN towers, 1000 candidates per level, NMS 0.5, 100 detections, masks at 0.4) twice, with
  ``model.rdsnet.refine=false`` and ``model.rdsnet.refine=true`` (MBRM on, the official
  ``*_refine`` configs); the refining copy gets the other's weights (``load_state_dict``), so both
  compute the same detections and masks and differ only by MBRM.  Next to them, in the same
  interleaved rounds, ``yolact_resnet50`` and ``mask_rcnn_r50_fpn_1x_coco`` exactly as in the
  YOLACT comparison.  All random weights, all ``optimize_for_inference()``.
* **Input.** The YOLACT comparison's: the 800x1216 image; both RDSNets get Mask R-CNN's tensor
  (``(img - mean) / std``, mmdet's mean / std, which RDSNet's preset uses, no resize or pad),
  YOLACT its 550x550 squash-resized tensor (not timed), all with masks in the 800x1216 frame.
* **Detections.** Score threshold 0.0 for all (``model.score_thr=0.0``): random RDSNet scores
  are about its 0.01 focal prior, below the preset's 0.05, so 0.0 keeps up to 1000 candidates per
  level (all of P7's 630 anchors), and all four models return 100 detections, RDSNet with its 100 masks (correlation,
  crop, upsampling to 800x1216) and, with ``refine``, 100 MBRM-refined boxes.
* **MBRM.** Two measures of its cost per image at 100 detections: the difference of the medians
  refine - no refine (and the median of the per-round differences) from the rounds above, which
  is noisy on a shared machine since it is a small part of a large call; and MBRM alone:
  ``MBRM.refine(probs, boxes)`` (the refining RDSNet's ``mbrm`` module, as ``predict`` calls it)
  on that RDSNet's 100 detections and their cropped mask probabilities ``(100, 800, 1216)`` in
  the original frame, computed once and not timed; it includes the row / column max profiles of
  the probability maps, the 1-D convolutions, the Gaussian priors and the argmaxes (``--warmup``
  untimed calls, then ``--mbrm-iters`` timed ones).

Timing: ``--warmup`` untimed calls of each model, then ``--iters`` rounds, each timing one call
of every model in turn (the order alternates between rounds); reported numbers are medians in ms
per image and the ratio instseg / reference (lower is better for instseg); the one-stage
and RDSNet sections also give the median of the per-round ratios (robust to a shared machine's
load changing).  Each comparison (Mask R-CNN, RetinaNet, YOLACT, RDSNet) is its own set of
interleaved rounds.  On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``.
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
import torch.nn.functional as F
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
YOLACT_PRESET = "yolact_resnet50"
RDSNET_PRESET = "rdsnet_r50_fpn_1x"
FAMILIES = ("two-stage", "one-stage", "rdsnet", "all")


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


def yolact_batch(img: Tensor, device: torch.device) -> ImageBatch:
    """YOLACT's input for the benchmark image: squash-resized to the preset's square size and
    normalised with its mean / std; detections and masks come back in the 800x1216 frame."""
    cfg = get_preset(YOLACT_PRESET)
    size = cfg.model.yolact.input_size
    mean = torch.tensor(cfg.data.mean)[:, None, None]
    std = torch.tensor(cfg.data.std)[:, None, None]
    small = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return ImageBatch(
        images=((small - mean) / std)[None].to(device),
        image_sizes=[(size, size)],
        original_sizes=[(HEIGHT, WIDTH)],
        scale_factors=torch.tensor([[size / WIDTH, size / HEIGHT]], device=device),
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
        _freeze_backbone(model)
    return model.to(device)


def build_instseg_retinanet(device: torch.device) -> nn.Module:
    """``retinanet_r50_fpn_1x_coco`` with score threshold 0 (1000 candidates per level, 100 kept)."""
    cfg = get_preset("retinanet_r50_fpn_1x_coco").model
    cfg.score_thr = 0.0
    cfg.max_per_img = 100
    cfg.retinanet.nms_pre = 1000
    return build_model(cfg).to(device)


def build_torchvision_retinanet(device: torch.device, *, frozen: bool) -> nn.Module:
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,  # sigmoid classifier: no background class
        min_size=HEIGHT,
        max_size=WIDTH,
        score_thresh=0.0,
        nms_thresh=0.5,
        topk_candidates=1000,
        detections_per_img=100,
    )
    if frozen:
        _freeze_backbone(model)
    return model.to(device)


def _freeze_backbone(model: nn.Module) -> None:
    """Frozen BN and a frozen stem + layer1 (instseg's ``frozen_stages=1, norm_eval=True``);
    torchvision ignores ``trainable_backbone_layers`` without pretrained weights, so by hand."""
    _freeze_bn(model.backbone.body)
    for name, p in model.backbone.body.named_parameters():
        if not name.startswith(("layer2.", "layer3.", "layer4.")):
            p.requires_grad_(False)


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

    # channels-last is an opt-in for training (use_channels_last); only the layout changes
    ours = build_instseg("mask_rcnn_r50_fpn_1x_coco", device, score_thr=0.0).train().use_channels_last()
    tv = build_torchvision(device, frozen=args.tv_frozen).train()
    opt_ours, opt_tv = _sgd(ours), _sgd(tv)

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
        opt_htc = _sgd(htc)

        def step_htc() -> None:
            opt_htc.zero_grad(set_to_none=True)
            htc(batch, htc_targets)["loss"].backward()
            opt_htc.step()

        fns["instseg_htc"] = step_htc
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {k: {"ms": _median(v), "all_ms": v} for k, v in times.items()}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    """lr 0: every iteration sees the same weights (same workload), the optimiser still does its work."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)


def bench_retinanet_inference(args: argparse.Namespace, device: torch.device, img: Tensor) -> dict[str, dict]:
    ours = build_instseg_retinanet(device).eval()
    ours.optimize_for_inference()
    tv = build_torchvision_retinanet(device, frozen=args.tv_frozen).eval()
    batch = instseg_batch(img, device)
    tv_img = [(img / 255.0).to(device)]

    def run_ours() -> object:
        with torch.no_grad():
            return ours.predict(batch)

    def run_tv() -> object:
        with torch.no_grad():
            return tv(tv_img)

    fns: dict[str, Callable[[], object]] = {"instseg_retinanet": run_ours, "torchvision_retinanet": run_tv}
    counts = {"instseg_retinanet": len(run_ours()[0]), "torchvision_retinanet": int(run_tv()[0]["boxes"].shape[0])}
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {k: {"ms": _median(v), "all_ms": v, "detections": counts[k]} for k, v in times.items()}


def bench_retinanet_train(args: argparse.Namespace, device: torch.device, img: Tensor) -> dict[str, dict]:
    boxes, labels, _ = make_targets(args.num_gt, seed=1)
    batch = instseg_batch(img, device)
    targets = [ImageTargets(boxes, labels)]
    tv_img = [(img / 255.0).to(device)]
    tv_targets = [{"boxes": boxes.to(device), "labels": labels.to(device)}]  # classes 0..79, no background
    ours = build_instseg_retinanet(device).train().use_channels_last(args.retinanet_train_channels_last)
    tv = build_torchvision_retinanet(device, frozen=args.tv_frozen).train()
    opt_ours, opt_tv = _sgd(ours), _sgd(tv)

    def step_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        ours(batch, targets)["loss"].backward()
        opt_ours.step()

    def step_tv() -> None:
        opt_tv.zero_grad(set_to_none=True)
        losses = tv(tv_img, tv_targets)
        sum(losses.values()).backward()
        opt_tv.step()

    fns: dict[str, Callable[[], object]] = {"instseg_retinanet": step_ours, "torchvision_retinanet": step_tv}
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {k: {"ms": _median(v), "all_ms": v} for k, v in times.items()}


def build_yolact_and_mask_rcnn(device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The two peers of the one-stage comparisons: YOLACT-550 R-50 and Mask R-CNN R-50-FPN, score
    threshold 0, in eval mode and ready for inference."""
    models = []
    for preset in (YOLACT_PRESET, "mask_rcnn_r50_fpn_1x_coco"):
        model = build_instseg(preset, device, score_thr=0.0).eval()
        model.optimize_for_inference()
        models.append(model)
    return models[0], models[1]


def bench_yolact_inference(args: argparse.Namespace, device: torch.device, img: Tensor) -> dict[str, dict]:
    """YOLACT-550 R-50 (preset, score threshold 0) vs instseg's Mask R-CNN R-50 at 800x1216."""
    yolact, mrcnn = build_yolact_and_mask_rcnn(device)
    y_batch = yolact_batch(img, device)
    m_batch = instseg_batch(img, device)

    def run_yolact() -> object:
        with torch.no_grad():
            return yolact.predict(y_batch)

    def run_mrcnn() -> object:
        with torch.no_grad():
            return mrcnn.predict(m_batch)

    fns: dict[str, Callable[[], object]] = {"instseg_yolact": run_yolact, "instseg_mask_rcnn": run_mrcnn}
    counts, mask_shapes = {}, {}
    for name, fn in fns.items():
        det = fn()[0]
        counts[name] = len(det)
        mask_shapes[name] = list(det.masks.shape) if det.masks is not None else None
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    return {
        k: {"ms": _median(v), "all_ms": v, "detections": counts[k], "mask_shape": mask_shapes[k]}
        for k, v in times.items()
    }


def build_instseg_rdsnet(device: torch.device, *, refine: bool) -> nn.Module:
    """``rdsnet_r50_fpn_1x`` with score threshold 0 (1000 candidates per level, 100 kept) and
    ``model.rdsnet.refine`` as given."""
    cfg = get_preset(RDSNET_PRESET).model
    cfg.score_thr = 0.0
    cfg.max_per_img = 100
    cfg.rdsnet.nms_pre = 1000
    cfg.rdsnet.refine = refine
    return build_model(cfg).to(device)


def bench_rdsnet_inference(
    args: argparse.Namespace, device: torch.device, img: Tensor
) -> tuple[dict[str, dict], dict]:
    """RDSNet R-50-FPN without / with MBRM vs YOLACT-550 R-50 vs Mask R-CNN R-50-FPN (800x1216),
    then MBRM alone on RDSNet's 100 detections.  Returns (model section, MBRM section)."""
    rdsnet = build_instseg_rdsnet(device, refine=False)
    rdsnet_refine = build_instseg_rdsnet(device, refine=True)
    rdsnet_refine.load_state_dict(rdsnet.state_dict())  # same weights: the two differ only by MBRM
    rdsnet.optimize_for_inference()
    rdsnet_refine.optimize_for_inference()
    yolact, mrcnn = build_yolact_and_mask_rcnn(device)
    batch = instseg_batch(img, device)
    y_batch = yolact_batch(img, device)

    def runner(model: nn.Module, b: ImageBatch) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model.predict(b)

        return run

    fns: dict[str, Callable[[], object]] = {
        "instseg_rdsnet": runner(rdsnet, batch),
        "instseg_rdsnet_refine": runner(rdsnet_refine, batch),
        "instseg_yolact": runner(yolact, y_batch),
        "instseg_mask_rcnn": runner(mrcnn, batch),
    }
    counts, mask_shapes, dets = {}, {}, {}
    for name, fn in fns.items():
        det = dets[name] = fn()[0]
        counts[name] = len(det)
        mask_shapes[name] = list(det.masks.shape) if det.masks is not None else None
    plain, refined = dets["instseg_rdsnet"], dets["instseg_rdsnet_refine"]
    same_dets = bool(torch.equal(plain.scores, refined.scores) and torch.equal(plain.labels, refined.labels))
    boxes_changed = int((plain.boxes != refined.boxes).any(dim=1).sum()) if same_dets else -1
    times = time_interleaved(fns, warmup=args.warmup, iters=args.iters, device=device)
    models = {
        k: {"ms": _median(v), "all_ms": v, "detections": counts[k], "mask_shape": mask_shapes[k]}
        for k, v in times.items()
    }
    diffs = [a - b for a, b in zip(times["instseg_rdsnet_refine"], times["instseg_rdsnet"])]

    # MBRM alone: RDSNet's 100 detections and their cropped probabilities in the original frame,
    # exactly what predict() hands to MBRM.refine (computed once, not timed)
    model = rdsnet_refine
    with torch.no_grad():
        feats = model.extract_feats(batch.images)
        rd_dets = model.bbox_head.predict_boxes(model.bbox_head(feats), batch)[0]
        pixel = model.mask_head(feats)[0]
        probs = torch.cat([p for _, p in model.logic.iter_probs(pixel, rd_dets, batch, 0)])
    del feats, pixel
    boxes = rd_dets.boxes

    def run_mbrm() -> object:
        return model.mbrm.refine(probs, boxes)

    mbrm_times = time_interleaved({"mbrm": run_mbrm}, warmup=args.warmup, iters=args.mbrm_iters, device=device)["mbrm"]
    mbrm = {
        "detections": int(boxes.shape[0]),
        "probs_shape": list(probs.shape),
        "same_detections_with_and_without_refine": same_dets,
        "boxes_changed_by_mbrm": boxes_changed,
        "refine_minus_plain_ms": models["instseg_rdsnet_refine"]["ms"] - models["instseg_rdsnet"]["ms"],
        "refine_minus_plain_paired_ms": _median(diffs),
        "refine_minus_plain_all_ms": diffs,
        "mbrm_alone_ms": _median(mbrm_times),
        "mbrm_alone_all_ms": mbrm_times,
        "mbrm_alone_iters": args.mbrm_iters,
    }
    del probs
    return models, mbrm


# ---------------------------------------------------------------------------------------- report
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def summarise(section: dict[str, dict]) -> dict[str, float]:
    ours = section["instseg_mask_rcnn"]["ms"]
    out = {"instseg_over_torchvision": _ratio(ours, section["torchvision_mask_rcnn"]["ms"])}
    if "instseg_htc" in section:
        out["htc_over_instseg_mask_rcnn"] = _ratio(section["instseg_htc"]["ms"], ours)
    return out


def summarise_one_stage(section: dict[str, dict], ours: str, ref: str, key: str) -> dict[str, float]:
    """``key``: ratio of the medians; ``key + "_paired"``: median over rounds of the ratio of the
    two calls of that round (they run back to back, so slow drifts of a shared machine's load cancel)."""
    out = {key: _ratio(section[ours]["ms"], section[ref]["ms"])}
    paired = [_ratio(a, b) for a, b in zip(section[ours]["all_ms"], section[ref]["all_ms"])]
    out[f"{key}_paired"] = _median(paired) if paired else math.nan
    if ours == "instseg_yolact":  # the issue states this one as a speed-up
        out["speedup_yolact_vs_mask_rcnn"] = _ratio(section[ref]["ms"], section[ours]["ms"])
    return out


def summarise_rdsnet(section: dict[str, dict]) -> dict[str, float]:
    """RDSNet (no refine) over YOLACT and over Mask R-CNN, medians and per-round; refine over plain."""
    out: dict[str, float] = {}
    for ref, key in (("instseg_yolact", "rdsnet_over_yolact"), ("instseg_mask_rcnn", "rdsnet_over_mask_rcnn"),
                     ("instseg_rdsnet", "rdsnet_refine_over_rdsnet")):
        ours = "instseg_rdsnet_refine" if ref == "instseg_rdsnet" else "instseg_rdsnet"
        out[key] = _ratio(section[ours]["ms"], section[ref]["ms"])
        paired = [_ratio(a, b) for a, b in zip(section[ours]["all_ms"], section[ref]["all_ms"])]
        out[f"{key}_paired"] = _median(paired) if paired else math.nan
    return out


_MASK_RCNN_ROWS = (
    ("instseg_mask_rcnn", "instseg Mask R-CNN R50-FPN"),
    ("torchvision_mask_rcnn", "torchvision Mask R-CNN R50-FPN"),
    ("instseg_htc", "instseg HTC R50-FPN"),
)
_MASK_RCNN_RATIOS = (
    ("instseg_over_torchvision", "ratio instseg / torchvision", ".3f"),
    ("htc_over_instseg_mask_rcnn", "ratio HTC / instseg Mask R-CNN", ".3f"),
)
_RETINANET_ROWS = (
    ("instseg_retinanet", "instseg RetinaNet R50-FPN"),
    ("torchvision_retinanet", "torchvision RetinaNet R50-FPN"),
)
_RETINANET_RATIOS = (
    ("instseg_over_torchvision", "ratio instseg / torchvision", ".3f"),
    ("instseg_over_torchvision_paired", "ratio, median of per-round ratios", ".3f"),
)
# (results key, model rows, ratio rows), in print order
TABLE = (
    ("inference", _MASK_RCNN_ROWS, _MASK_RCNN_RATIOS),
    ("train_step", _MASK_RCNN_ROWS, _MASK_RCNN_RATIOS),
    ("retinanet_inference", _RETINANET_ROWS, _RETINANET_RATIOS),
    ("retinanet_train_step", _RETINANET_ROWS, _RETINANET_RATIOS),
    (
        "yolact_inference",
        (("instseg_yolact", "instseg YOLACT-550 R50-FPN"), ("instseg_mask_rcnn", "instseg Mask R-CNN R50-FPN 800x1216")),
        (
            ("yolact_over_mask_rcnn", "ratio YOLACT / Mask R-CNN", ".3f"),
            ("yolact_over_mask_rcnn_paired", "ratio, median of per-round ratios", ".3f"),
            ("speedup_yolact_vs_mask_rcnn", "speed-up YOLACT vs Mask R-CNN (x)", ".2f"),
        ),
    ),
    (
        "rdsnet_inference",
        (
            ("instseg_rdsnet", "instseg RDSNet R50-FPN 800x1216"),
            ("instseg_rdsnet_refine", "instseg RDSNet R50-FPN + MBRM 800x1216"),
            ("instseg_yolact", "instseg YOLACT-550 R50-FPN"),
            ("instseg_mask_rcnn", "instseg Mask R-CNN R50-FPN 800x1216"),
        ),
        (
            ("rdsnet_over_yolact", "ratio RDSNet / YOLACT", ".3f"),
            ("rdsnet_over_yolact_paired", "ratio, median of per-round ratios", ".3f"),
            ("rdsnet_over_mask_rcnn", "ratio RDSNet / Mask R-CNN", ".3f"),
            ("rdsnet_over_mask_rcnn_paired", "ratio, median of per-round ratios", ".3f"),
            ("rdsnet_refine_over_rdsnet", "ratio RDSNet + MBRM / RDSNet", ".3f"),
            ("rdsnet_refine_over_rdsnet_paired", "ratio, median of per-round ratios", ".3f"),
            ("refine_minus_plain_ms", "MBRM: refine - plain, ms/img", ".1f"),
            ("refine_minus_plain_paired_ms", "MBRM: median per-round refine - plain", ".1f"),
            ("mbrm_alone_ms", "MBRM alone, 100 dets, ms/img", ".1f"),
        ),
    ),
)


def print_table(results: dict) -> None:
    rows = []
    for kind, models, ratio_rows in TABLE:
        if kind not in results:
            continue
        sec = results[kind]
        for name, label in models:
            if name in sec:
                spread = f"{min(sec[name]['all_ms']):.0f}-{max(sec[name]['all_ms']):.0f}"
                rows.append((kind, label, f"{sec[name]['ms']:.1f}", spread))
        ratios = results[f"{kind}_ratios"]
        for key, label, fmt in ratio_rows:
            if key in ratios:
                rows.append((kind, label, format(ratios[key], fmt), ""))
    widths = [max(len(r[i]) for r in rows + [("what", "model", "median ms/img", "range ms")]) for i in range(4)]
    header = ("what", "model", "median ms/img", "range ms")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family", choices=FAMILIES, default="two-stage",
        help="two-stage: Mask R-CNN / HTC vs torchvision (default); one-stage: RetinaNet vs torchvision and "
        "YOLACT vs Mask R-CNN; rdsnet: RDSNet (with / without MBRM) vs YOLACT vs Mask R-CNN, and MBRM alone; "
        "all: all of them",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (both models)")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model before timing")
    p.add_argument("--mbrm-iters", type=int, default=20, help="rdsnet: timed calls of MBRM alone")
    p.add_argument("--num-gt", type=int, default=10, help="synthetic ground-truth instances for training")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-htc", action="store_true", help="two-stage: leave HTC out")
    p.add_argument("--skip-retinanet", action="store_true", help="one-stage: leave the RetinaNet comparison out")
    p.add_argument("--skip-yolact", action="store_true", help="one-stage: leave the YOLACT comparison out")
    p.add_argument(
        "--retinanet-train-channels-last", action="store_true",
        help="one-stage: train instseg's RetinaNet channels-last (default: NCHW, as instseg train does)",
    )
    p.add_argument(
        "--tv-frozen", action="store_true",
        help="give torchvision frozen BN and a frozen stem+layer1, as instseg's preset trains",
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help="JSON file (default benchmarks/results/speed_<host>.json; speed_one_stage_<host>.json for "
        "--family one-stage, speed_rdsnet_<host>.json for rdsnet, speed_all_<host>.json for all)",
    )
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
        "family": args.family,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()},
    }
    two_stage = args.family in ("two-stage", "all")
    one_stage = args.family in ("one-stage", "all")
    rdsnet = args.family in ("rdsnet", "all")
    if one_stage:
        results["retinanet_train_channels_last"] = args.retinanet_train_channels_last
    if two_stage and not args.skip_inference:
        results["inference"] = bench_inference(args, device, img)
        results["inference_ratios"] = summarise(results["inference"])
    if two_stage and not args.skip_train:
        results["train_step"] = bench_train(args, device, img)
        results["train_step_ratios"] = summarise(results["train_step"])
    if one_stage and not args.skip_retinanet:
        if not args.skip_inference:
            sec = results["retinanet_inference"] = bench_retinanet_inference(args, device, img)
            results["retinanet_inference_ratios"] = summarise_one_stage(
                sec, "instseg_retinanet", "torchvision_retinanet", "instseg_over_torchvision"
            )
        if not args.skip_train:
            sec = results["retinanet_train_step"] = bench_retinanet_train(args, device, img)
            results["retinanet_train_step_ratios"] = summarise_one_stage(
                sec, "instseg_retinanet", "torchvision_retinanet", "instseg_over_torchvision"
            )
    if one_stage and not args.skip_yolact and not args.skip_inference:
        sec = results["yolact_inference"] = bench_yolact_inference(args, device, img)
        results["yolact_inference_ratios"] = summarise_one_stage(
            sec, "instseg_yolact", "instseg_mask_rcnn", "yolact_over_mask_rcnn"
        )
    if rdsnet and not args.skip_inference:
        sec, mbrm = bench_rdsnet_inference(args, device, img)
        results["rdsnet_inference"] = sec
        results["rdsnet_mbrm"] = mbrm
        ratios = results["rdsnet_inference_ratios"] = summarise_rdsnet(sec)
        for key in ("refine_minus_plain_ms", "refine_minus_plain_paired_ms", "mbrm_alone_ms"):
            ratios[key] = mbrm[key]
    print_table(results)
    suffix = {"two-stage": "", "one-stage": "one_stage_", "rdsnet": "rdsnet_", "all": "all_"}[args.family]
    out = args.out or Path(__file__).resolve().parent / "results" / f"speed_{suffix}{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
