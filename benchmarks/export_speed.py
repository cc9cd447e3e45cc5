"""torch vs onnxruntime: ms per image of the same detector, same process, side by side.

Usage::

    .venv/bin/python benchmarks/export_speed.py [--threads 2] [--iters 5] [--models mask_rcnn,htc,yolact]
        [--out benchmarks/results/export/speed_<host>.json]

Models: the golden Mask R-CNN and HTC of ``../shared/golden`` (converted from mmdetection) and the
``yolact_r18_c64_shapes`` YOLACT with random weights (seed 0).  Input: the two golden validation
images through each model's test transforms, padded to the exported square size (512, YOLACT 550).
Each model is exported with ``instseg.export`` (ONNX, opset 18) and run twice per image and
iteration, alternating: ``model.predict`` (torch, eval, no_grad) and the runtime copy's
``predict``, whose network parts are onnxruntime sessions (CPU provider) and whose post-processing
(decoding, NMS, RoIAlign, mask pasting) is the same torch code.  torch and onnxruntime get the same
thread count.  Reported: median ms/img over ``--iters`` x images after one warm-up pass, and the
verification numbers of the same outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from instseg.config.presets import get_preset
from instseg.convert.mmdet import convert_checkpoint
from instseg.export import export_model, export_size, load_batches, runtime_model, verify
from instseg.modeling.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
IMAGES = [GOLDEN / "100002.jpg", GOLDEN / "100008.jpg"]
CHECKPOINTS = {"mask_rcnn": ("mask_rcnn_r18_fpn_c64_shapes", "mask-rcnn_r18_fpn_c64_shapes.pth"),
               "htc": ("htc_r18_fpn_c64_shapes", "htc_r18_fpn_c64_shapes.pth")}


def build(name: str):
    if name == "yolact":
        cfg = get_preset("yolact_r18_c64_shapes")
        cfg.model.backbone_weights = ""
        torch.manual_seed(0)
        return build_model(cfg.model).eval(), cfg, 0.5
    preset, ckpt = CHECKPOINTS[name]
    cfg = get_preset(preset)
    model = build_model(cfg.model)
    model.load_state_dict(convert_checkpoint(GOLDEN / ckpt, cfg)["model"])
    return model.eval(), cfg, 0.05


def time_predict(model, batches, iters: int) -> float:
    samples = []
    with torch.no_grad():
        for _ in range(iters):
            for b in batches:
                t0 = time.perf_counter()
                model.predict(b)
                samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def bench(name: str, threads: int, iters: int, tmp: Path) -> dict:
    model, cfg, score_thr = build(name)
    batches = load_batches(IMAGES, cfg, export_size(cfg))
    t0 = time.perf_counter()
    export_model(model, batches, tmp / name, "onnx")
    export_s = time.perf_counter() - t0
    runtime = runtime_model(model, tmp / name, threads=threads)
    rows = verify(model, runtime, batches, score_thr=score_thr)  # also the warm-up pass of both
    torch_ms, ort_ms = [], []
    for _ in range(iters):  # alternate, so that both see the same machine load
        torch_ms.append(time_predict(model, batches, 1))
        ort_ms.append(time_predict(runtime, batches, 1))
    return {
        "input": f"1x3x{export_size(cfg)}x{export_size(cfg)}",
        "torch_ms_per_img": round(statistics.median(torch_ms), 1),
        "onnxruntime_ms_per_img": round(statistics.median(ort_ms), 1),
        "export_s": round(export_s, 1),
        "verify_score_thr": score_thr,
        "verify": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--models", default="mask_rcnn,htc,yolact")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export" / f"speed_{platform.node() or 'host'}.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = {"threads": args.threads, "iters": args.iters, "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__, "machine": platform.processor() or platform.machine(),
               "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results["models"][name] = bench(name, args.threads, args.iters, Path(tmp))
            print(name, json.dumps({k: v for k, v in results["models"][name].items() if k != "verify"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
