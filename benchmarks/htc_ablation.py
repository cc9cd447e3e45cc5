"""HTC's ablation ladder on the built-in synthetic data (which has COCO-Stuff-style maps).

Trains, at the same iteration budget and seed, five configurations that differ one switch at a
time, evaluates each on the val split with COCOeval, times inference, and writes a markdown
table shaped like the HTC paper's (Table 2: box AP, mask AP, AP50, AP75, runtime):

    Mask R-CNN            mask_rcnn_synth_cpu
    Cascade Mask R-CNN    cascade_mask_rcnn_synth_cpu
    + interleaved         ... interleaved=true
    + mask info flow      ... interleaved=true mask_info_flow=true
    + semantic fusion     ... + semantic=true (= HTC)

The cascade rungs all start from ``cascade_mask_rcnn_synth_cpu`` so that each row changes
exactly one thing (mmdetection's HTC configs also switch the R-CNN assigners to
``match_low_quality=True``; here it stays False on every rung).  All rows use the same test
settings (score_thr 0.001, 100 detections per image), as the paper's table does.

    python benchmarks/htc_ablation.py --iters 150 --seeds 0 1 --out benchmarks/results/htc_ablation
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from instseg.config.load import apply_overrides
from instseg.config.presets import get_preset

LADDER: list[tuple[str, str, list[str]]] = [
    ("Mask R-CNN", "mask_rcnn_synth_cpu", []),
    ("Cascade Mask R-CNN", "cascade_mask_rcnn_synth_cpu", []),
    ("+ interleaved", "cascade_mask_rcnn_synth_cpu", ["model.arch=htc", "model.interleaved=true"]),
    (
        "+ mask info flow",
        "cascade_mask_rcnn_synth_cpu",
        ["model.arch=htc", "model.interleaved=true", "model.mask_info_flow=true"],
    ),
    (
        "+ semantic fusion (HTC)",
        "cascade_mask_rcnn_synth_cpu",
        [
            "model.arch=htc",
            "model.interleaved=true",
            "model.mask_info_flow=true",
            "model.semantic=true",
            "model.semantic_classes=9",
        ],
    ),
]
COMMON = ["model.score_thr=0.001", "model.max_per_img=100", "train.max_minutes=0", "train.eval_interval=0"]


def time_inference(checkpoint: Path, images: int) -> float:
    """Median ms/img of ``model.predict`` (masks pasted) over the first val images, 1 image per batch."""
    from instseg.data import build_dataset, build_test_loader
    from instseg.engine.checkpoint import load_model_from_checkpoint

    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    model.eval()
    loader = build_test_loader(cfg.data, build_dataset(cfg.data, "val"), batch_size=1)
    times = []
    with torch.inference_mode():
        for i, (batch, _, _) in enumerate(loader):
            if i >= images + 1:
                break
            t0 = time.perf_counter()
            model.predict(batch)
            if i > 0:  # the first image warms up allocators
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run_rung(name: str, preset: str, sets: list[str], *, seed: int, iters: int, data: Path, out: Path) -> dict:
    from instseg.demo import synth_paths
    from instseg.engine.trainer import train

    cfg = get_preset(preset)
    steps = max(1, int(iters * 0.8))
    paths = [f"{k}={v}" for k, v in synth_paths(data).items()]
    apply_overrides(
        cfg,
        assignments=[*paths, *COMMON, *sets, f"train.seed={seed}", f"train.max_iters={iters}",
                     f"train.lr_steps=[{steps}]", f"train.output_dir={out}"],
    )
    run = f"{name.strip('+ ').split(' (')[0].replace(' ', '_').lower()}_s{seed}"
    t0 = time.time()
    result = train(cfg, run_dir=out / run)
    train_min = (time.time() - t0) / 60
    metrics = result["metrics"]
    ckpt = Path(result["run_dir"]) / "checkpoints" / "last.pt"
    return {
        "name": name,
        "seed": seed,
        "run": run,
        "box_AP": metrics.get("bbox_AP", float("nan")),
        "mask_AP": metrics.get("segm_AP", float("nan")),
        "mask_AP50": metrics.get("segm_AP50", float("nan")),
        "mask_AP75": metrics.get("segm_AP75", float("nan")),
        "ms_per_img": time_inference(ckpt, images=10),
        "train_minutes": train_min,
    }


def markdown(rows: list[dict], seeds: list[int], iters: int, threads: int) -> str:
    lines = [
        f"HTC ablation on the built-in synthetic data, val split (24 images); {iters} iterations of 4 images, "
        f"seeds {seeds}, CPU with {threads} threads. AP in %, mean over seeds (± half the spread).",
        "",
        "| model | box AP | mask AP | mask AP50 | mask AP75 | ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for name, *_ in LADDER:
        rs = [r for r in rows if r["name"] == name]
        if not rs:
            continue

        def cell(key: str, scale: float = 100.0, digits: int = 1) -> str:
            vals = [r[key] * scale for r in rs]
            mean = sum(vals) / len(vals)
            if len(vals) > 1:
                return f"{mean:.{digits}f} ± {(max(vals) - min(vals)) / 2:.{digits}f}"
            return f"{mean:.{digits}f}"

        lines.append(
            f"| {name} | {cell('box_AP')} | {cell('mask_AP')} | {cell('mask_AP50')} | {cell('mask_AP75')} "
            f"| {cell('ms_per_img', 1.0, 0)} |"
        )
    lines.append("")
    lines.append("Per run: " + "; ".join(f"{r['name']} s{r['seed']}: mask AP {100 * r['mask_AP']:.1f}" for r in rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", default="demo_data/synth")
    parser.add_argument("--out", default="benchmarks/results/htc_ablation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="rung names to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "annotations" / "instances_train.json").exists():
        from instseg.data.synthetic import generate_synthetic_dataset

        generate_synthetic_dataset(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    rows: list[dict] = json.loads(results_file.read_text()) if results_file.exists() else []
    for seed in args.seeds:
        for name, preset, sets in LADDER:
            if args.only and name not in args.only:
                continue
            if any(r["name"] == name and r["seed"] == seed for r in rows):
                continue  # already measured: the script can be re-run to fill gaps
            rows.append(run_rung(name, preset, sets, seed=seed, iters=args.iters, data=data, out=out / "runs"))
            results_file.write_text(json.dumps(rows, indent=1))
    table = markdown(rows, args.seeds, args.iters, args.threads)
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
