"""GA-RPN vs RPN proposal recall on the nuclei val set at the same training budget (CPU).

Usage::

    .venv/bin/python benchmarks/ga_rpn_ar.py [--minutes 4 | --iters N] [--val-images 0] [--threads 2]
        [--presets rpn_nuclei_cpu,ga_rpn_nuclei_cpu] [--set KEY=VALUE ...]
        [--out benchmarks/results/ga_rpn/ar_nuclei.json]

Each preset (proposal-only models on the same ImageNet MobileNetV2 + 64-channel FPN; the plain RPN
with 3 anchors of scale 4 per location, the GA-RPN with its one guided anchor and squares of scale
4) trains for ``--minutes`` of wall clock (``train.max_minutes``) or ``--iters`` iterations (same
schedule, seed and data order; on a shared machine the wall clock of one model depends on the
others' load, iterations do not), then its last weights are evaluated on the nuclei val set (all images, or the first
``--val-images``): mmdet's ``proposal`` metric (COCOeval, class-agnostic, AR@100/300/1000 and AR by
size at 1000) and ``proposal_fast``, plus the proposals per image and the test time per image.
The slides claim +10 AR@1000 for GA-RPN on COCO (mmdet's README: 58.7 -> 68.4 for R-50 caffe, 12
epochs on 8 GPUs); a few CPU minutes say something about the early training only.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from instseg.config.load import apply_overrides
from instseg.config.presets import get_preset
from instseg.data import build_dataset, build_test_loader
from instseg.engine.inference import predict_dataset
from instseg.engine.trainer import train
from instseg.evaluation.proposals import evaluate_proposal_predictions


def run_one(
    name: str, minutes: float, iters: int, val_images: int, threads: int, runs: Path, sets: list[str]
) -> dict:
    cfg = apply_overrides(get_preset(name), [], sets)
    cfg.train.max_minutes = minutes if iters <= 0 else 0.0
    if iters > 0:  # the same number of steps for every model (robust on a shared machine), constant lr after warmup
        cfg.train.max_iters = iters
        cfg.train.lr_steps = ()
    cfg.train.device = "cpu"
    cfg.train.threads = threads
    cfg.train.eval_interval = 0
    cfg.train.checkpoint_interval = 0
    cfg.train.output_dir = str(runs)
    val_ann = cfg.data.val_ann
    cfg.data.val_ann = ""  # evaluated below (optionally on a subset), not by the trainer
    t0 = time.time()
    result = train(cfg, run_dir=runs / name)
    train_s = time.time() - t0

    from instseg.engine.checkpoint import load_model_from_checkpoint

    model, cfg2, _ = load_model_from_checkpoint(Path(result["run_dir"]) / "checkpoints" / "last.pt", "cpu")
    cfg2.data.val_ann = val_ann
    model.optimize_for_inference()
    ds = build_dataset(cfg2.data, "val")
    if val_images > 0:
        ds = torch.utils.data.Subset(ds, range(min(val_images, len(ds))))
    loader = build_test_loader(cfg2.data, ds, batch_size=1)
    t1 = time.time()
    preds = predict_dataset(model, loader)
    test_s = (time.time() - t1) / max(len(preds), 1)
    coco = (ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds).coco
    metrics = evaluate_proposal_predictions(
        coco, [(m.image_id, d.boxes.numpy(), d.scores.numpy()) for m, d in preds], verbose=False
    )
    return {
        "preset": name,
        "iterations": result["iter"],
        "train_minutes": round(train_s / 60, 2),
        "stopped": result["stopped"],
        "val_images": len(preds),
        "proposals_per_image": round(sum(len(d) for _, d in preds) / max(len(preds), 1), 1),
        "test_s_per_image": round(test_s, 3),
        **{k: round(100 * v, 2) for k, v in metrics.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall clock per model")
    ap.add_argument("--iters", type=int, default=0,
                    help="> 0: train every model for this many iterations instead of --minutes")
    ap.add_argument("--val-images", type=int, default=0, help="evaluate on the first N val images (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default="rpn_nuclei_cpu,ga_rpn_nuclei_cpu")
    ap.add_argument("--runs", default="runs/bench_ga_rpn")
    ap.add_argument("--out", default="benchmarks/results/ga_rpn/ar_nuclei.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every preset, e.g. train.warmup_iters=10 for a few-minute budget")
    args = ap.parse_args()
    rows = []
    for name in args.presets.split(","):
        rows.append(run_one(name, args.minutes, args.iters, args.val_images, args.threads, Path(args.runs), args.set))
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "budget": f"{args.iters} iterations" if args.iters > 0 else f"{args.minutes} minutes",
        "overrides": args.set,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    keys = ["iterations", "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000", "fast_AR@1000",
            "proposals_per_image", "test_s_per_image"]
    print(f"{'preset':20s}" + "".join(f"{k:>14s}" for k in keys))
    for r in rows:
        cells = ["-" if isinstance(r[k], float) and r[k] < 0 else r[k] for k in keys]  # -1: no object of that size
        print(f"{r['preset']:20s}" + "".join(f"{c:>14}" for c in cells))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
