"""HTC R-50-FPN with and without mixed precision on CUDA: inference fps at 1333x800 and peak
training memory at 2 images per GPU.  Random weights, synthetic input: no network, no data.

    python benchmarks/amp.py [--iters 20] [--out benchmarks/results/amp_<gpu>.json]

For each of ``fp32``, ``fp16`` and ``bf16`` (where the GPU supports it):

* **Inference.** ``htc_r50_fpn_1x_coco`` in eval mode after ``optimize_for_inference()``, one
  1333x800 image (padded to 1344x800), ``torch.inference_mode`` + ``torch.autocast``, score
  threshold 0.001 as preset; median of ``--iters`` timed calls after 3 warm-up calls, as fps.
* **Training memory.** One forward + backward + SGD step of the preset (semantic branch included)
  on 2 images of 1333x800 with 10 boxes each, the fp16 run through a ``GradScaler``, as the
  trainer does; ``torch.cuda.max_memory_allocated`` after the step (reset before it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

H, W = 800, 1344  # 1333 padded to a multiple of 32


def _batch(n: int, device: torch.device):
    from instseg.structures import ImageBatch

    g = torch.Generator().manual_seed(0)
    return ImageBatch(
        images=torch.randn(n, 3, H, W, generator=g),
        image_sizes=[(H, 1333)] * n,
        original_sizes=[(H, 1333)] * n,
        scale_factors=torch.ones(n, 2),
        image_ids=list(range(n)),
    ).to(device)


def _targets(n: int, device: torch.device):
    from instseg.structures import CroppedMasks, ImageTargets

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        full = torch.zeros(10, H, 1333, dtype=torch.uint8)
        for k in range(10):
            x0, y0 = int(torch.randint(0, 1000, (1,), generator=g)), int(torch.randint(0, 600, (1,), generator=g))
            full[k, y0 : y0 + 150, x0 : x0 + 250] = 1
        masks = CroppedMasks.from_full(full)
        semantic = torch.randint(0, 183, (H, W), generator=g)
        out.append(ImageTargets(masks.boxes(), torch.randint(0, 80, (10,), generator=g), masks, semantic).to(device))
    return out


def _model(device: torch.device):
    from instseg.config.presets import get_preset
    from instseg.modeling.zoo import build_model

    return build_model(get_preset("htc_r50_fpn_1x_coco").model).to(device)


def bench_inference(dtype: torch.dtype | None, iters: int, device: torch.device) -> dict:
    """fps of one 1333x800 image (median of ``iters`` calls after 3 warm-up calls)."""
    torch.manual_seed(0)
    model = _model(device).eval().optimize_for_inference()
    batch = _batch(1, device)

    def infer() -> int:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            return len(model.predict(batch)[0])

    for _ in range(3):
        infer()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dets = infer()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"inference_fps": 1.0 / statistics.median(times), "inference_ms_all": [1000 * t for t in times],
            "detections": dets}


def bench_train_memory(dtype: torch.dtype | None, device: torch.device) -> dict:
    """Peak memory of one training step on 2 images (the trainer's AMP recipe)."""
    torch.manual_seed(0)
    model = _model(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch, targets = _batch(2, device), _targets(2, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(batch, targets)["loss"]
    scaler.scale(loss.float()).backward()
    scaler.step(opt)
    scaler.update()
    torch.cuda.synchronize(device)
    return {"train_peak_memory_mb_2img": torch.cuda.max_memory_allocated(device) / 2**20, "train_loss": float(loss)}


def bench(dtype: torch.dtype | None, iters: int, device: torch.device) -> dict:
    out = bench_inference(dtype, iters, device)
    torch.cuda.empty_cache()
    out.update(bench_train_memory(dtype, device))
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/amp.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    modes = {"fp32": None, "fp16": torch.float16}
    if torch.cuda.is_bf16_supported():
        modes["bf16"] = torch.bfloat16
    gpu = torch.cuda.get_device_name(device)
    result = {"gpu": gpu, "torch": torch.__version__, "input": f"1x3x{H}x{W} (1333x800 padded)", "modes": {}}
    for name, dtype in modes.items():
        result["modes"][name] = r = bench(dtype, args.iters, device)
        print(f"{name}: {r['inference_fps']:.1f} img/s inference, {r['train_peak_memory_mb_2img']:.0f} MiB "
              f"peak training memory (2 img), loss {r['train_loss']:.3f}", flush=True)
    out = Path(args.out or f"benchmarks/results/amp_{gpu.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
