"""Which model families export and verify: ONNX (onnxruntime) vs torch on synthetic images.

Usage::

    .venv/bin/python benchmarks/export_coverage.py [--presets a,b,...] [--scale 320] [--threads 2]
        [--out benchmarks/results/export/coverage.json]

Every preset is built with random weights (seed 0; backbone ImageNet weights off) and then each
parameter is perturbed by N(0, 0.05^2) so that untrained classifiers do not give near-equal scores
(ties would let either runtime legitimately pick a different top-k).  Input: two built-in
synthetic images through the preset's test transforms with ``data.scale = (--scale, --scale)``.
Detections scoring >= 0.05 in torch (score threshold of the models set to 0) are matched:
same label, max box difference, min mask IoU.  Trained-weight checks of Mask R-CNN, HTC and
YOLACT are in ``tests/cli/test_export.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from instseg.config.presets import get_preset
from instseg.export import export_model, export_size, load_batches, runtime_model, synthetic_images, verify
from instseg.modeling.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("cascade_mask_rcnn_synth_cpu,retinanet_r18_fpn_c64_shapes,ga_rpn_r18_fpn_c64_shapes,"
           "rdsnet_synth_cpu,htc_fishnet150_fpn_20e_coco")


def check(preset: str, scale: int, files: list[Path], tmp: Path) -> dict:
    cfg = get_preset(preset)
    cfg.model.backbone_weights = ""
    cfg.model.score_thr = 0.0  # every model returns detections, so every part is reached
    cfg.data.scale = (scale, scale)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batches = load_batches(files, cfg, export_size(cfg))
    t0 = time.perf_counter()
    manifest = export_model(model, batches, tmp / preset, "onnx")
    rows = verify(model, runtime_model(model, tmp / preset), batches, score_thr=0.05)
    return {"arch": cfg.model.arch, "backbone": cfg.model.backbone, "parts": [p["name"] for p in manifest["parts"]],
            "seconds": round(time.perf_counter() - t0, 1), "verify": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--scale", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export" / "coverage.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = synthetic_images(Path(tmp) / "images")
        for preset in args.presets.split(","):
            try:
                results[preset] = check(preset, args.scale, files, Path(tmp))
            except Exception as e:  # noqa: BLE001 - a family that does not export is a result too
                results[preset] = {"error": f"{type(e).__name__}: {e}"[:500], "where": traceback.format_exc()[-800:]}
            print(preset, json.dumps(results[preset])[:600], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
