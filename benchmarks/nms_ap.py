"""COCO AP of one checkpoint under each test-time NMS (hard, Fast NMS, Soft-NMS linear / gaussian)
and, for two-stage models, each TTA mode: the same weights, only ``model.nms`` / ``--tta`` change.

Usage::

    .venv/bin/python benchmarks/nms_ap.py --checkpoint RUN/checkpoints/best.pt --ann VAL.json \\
        --images DIR --name nuclei_yolact [--nms hard fast soft_linear soft_gaussian] [--tta '' flip ms]
        [--set KEY=VALUE ...] [--out benchmarks/results/nms_ap]

Each setting runs ``instseg eval`` in this process (output under ``--out/NAME/<setting>``) and the
bbox / segm AP and the seconds it took are collected into ``--out/NAME.json``.  Soft-NMS uses
mmdetection's soft-NMS settings as this project's ``model.soft_nms_*`` hold them (IoU threshold =
``model.nms_iou``, sigma 0.5, min score 1e-3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from instseg.cli import main as instseg_main


def run_setting(args: argparse.Namespace, out_dir: Path, nms: str, tta: str | None) -> dict:
    argv = ["eval", "--checkpoint", args.checkpoint, "--ann", args.ann, "--images", args.images,
            "--out", str(out_dir), "--set", f"model.nms={nms}", *args.set]
    if tta is not None:
        argv += ["--tta", tta]
    t0 = time.perf_counter()
    rc = instseg_main(argv)
    seconds = time.perf_counter() - t0
    if rc != 0:
        return {"nms": nms, "tta": tta, "error": f"instseg eval exited with {rc}"}
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"nms": nms, "tta": tta, "seconds": round(seconds, 1),
            **{k: metrics[k] for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50") if k in metrics}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--ann", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--nms", nargs="*", default=["hard", "fast", "soft_linear", "soft_gaussian"])
    ap.add_argument("--tta", nargs="*", default=None, help="TTA specs to run with model.nms=hard ('' = none)")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--out", default="benchmarks/results/nms_ap")
    args = ap.parse_args()
    root = Path(args.out)
    rows = []
    for nms in args.nms:
        rows.append(run_setting(args, root / args.name / nms, nms, None))
        print(json.dumps(rows[-1]), flush=True)
    for tta in args.tta or []:
        rows.append(run_setting(args, root / args.name / f"tta_{tta or 'none'}", "hard", tta))
        print(json.dumps(rows[-1]), flush=True)
    out = root / f"{args.name}.json"
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "ann": args.ann, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
