"""``make demo``: synthetic data -> train a small HTC on the CPU -> COCO AP -> overlays.

    python -m instseg.demo [--set train.max_iters=50 ...] [--data-dir demo_data/synth] [--runs-dir runs]

1. writes the built-in synthetic shapes data set to ``demo_data/synth`` (unless it is there);
2. trains the preset ``DEMO_PRESET`` on its train split into ``runs/demo`` (``runs/demo_1``, ... when
   an earlier demo run is there);
3. evaluates on the val split with the official COCO metrics (bbox and segm AP);
4. draws the predictions on the val images into ``runs/demo/overlays/``.

Everything it needs is in this repository; it reads nothing outside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_PRESET = "htc_synth_cpu"
RUN_NAME = "demo"


def synth_paths(data_dir: Path) -> dict[str, str]:
    return {
        "data.train_ann": str(data_dir / "annotations" / "instances_train.json"),
        "data.train_images": str(data_dir / "images" / "train"),
        "data.train_stuff": str(data_dir / "stuffthingmaps" / "train"),
        "data.val_ann": str(data_dir / "annotations" / "instances_val.json"),
        "data.val_images": str(data_dir / "images" / "val"),
        "data.val_stuff": str(data_dir / "stuffthingmaps" / "val"),
    }


def ensure_synthetic(data_dir: Path, **synth_kwargs) -> None:
    from instseg.data.synthetic import generate_synthetic_dataset

    done = all(Path(p).exists() for p in synth_paths(data_dir).values())
    if done:
        print(f"[1/4] synthetic data already in {data_dir}")
        return
    print(f"[1/4] writing the synthetic data set to {data_dir} ...", flush=True)
    generate_synthetic_dataset(data_dir, **synth_kwargs)


def write_overlays(checkpoint: Path, out_dir: Path, score_thr: float = 0.3) -> int:
    """Draws the checkpoint's predictions on the val images of its config into ``out_dir``."""
    from instseg.data import build_dataset, build_test_loader
    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import predict_dataset
    from instseg.visualize import save_overlay

    model, cfg, classes = load_model_from_checkpoint(checkpoint, "cpu")
    dataset = build_dataset(cfg.data, "val")
    loader = build_test_loader(cfg.data, dataset, batch_size=1)
    names = list(classes["class_names"])
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, (meta, dets) in enumerate(predict_dataset(model, loader, progress=True)):
        save_overlay(out_dir / f"{Path(meta.file_name).stem}.png", dataset.load_image(i), dets, names, score_thr=score_thr)
        n += 1
    return n


def run_demo(
    *,
    data_dir: Path = Path("demo_data/synth"),
    runs_dir: Path = Path("runs"),
    overrides: list[str] = (),
    preset: str = DEMO_PRESET,
    synth_kwargs: dict | None = None,
) -> dict:
    """The whole demo; returns the final metrics and where things are."""
    from instseg.config.load import apply_overrides, set_value
    from instseg.config.presets import get_preset
    from instseg.engine.inference import format_metrics
    from instseg.engine.trainer import train

    t0 = time.time()
    data_dir, runs_dir = Path(data_dir), Path(runs_dir)
    ensure_synthetic(data_dir, **(synth_kwargs or {}))

    cfg = get_preset(preset)
    for key, value in synth_paths(data_dir).items():
        set_value(cfg, key, value)
    cfg.train.output_dir = str(runs_dir)
    apply_overrides(cfg, [], list(overrides))
    run_dir = runs_dir / RUN_NAME
    print(f"[2/4] training preset {preset} on {cfg.data.train_ann} -> {run_dir}", flush=True)
    result = train(cfg, run_dir=run_dir)
    run_dir = Path(result["run_dir"])  # runs/demo_1, ... when runs/demo holds an earlier demo

    print("[3/4] COCO evaluation on the val split", flush=True)
    metrics = result["metrics"]
    if not metrics:  # the trainer evaluates at the end when there is val data; be safe anyway
        from instseg.data import build_dataset
        from instseg.engine.checkpoint import load_model_from_checkpoint
        from instseg.engine.inference import evaluate

        model, ecfg, _ = load_model_from_checkpoint(run_dir / "checkpoints" / "last.pt")
        metrics = evaluate(model, build_dataset(ecfg.data, "val"), ecfg, run_dir / "eval", verbose=False)

    overlays = run_dir / "overlays"
    print(f"[4/4] drawing val predictions into {overlays}", flush=True)
    n = write_overlays(run_dir / "checkpoints" / "last.pt", overlays)

    bar = "=" * 62
    print(f"\n{bar}\n demo: {preset}, {result['iter']} iterations, {time.time() - t0:.0f} s\n{bar}")
    print(format_metrics(metrics))
    for t in ("bbox", "segm"):
        if f"{t}_AP" in metrics:
            print(f" {t} AP (COCO, IoU .50:.95) = {100 * metrics[f'{t}_AP']:.1f}")
    print(bar)
    print(f" data:         {data_dir}")
    print(f" run:          {run_dir}")
    print(f" config:       {run_dir / 'config.yaml'}")
    print(f" metrics log:  {run_dir / 'metrics.jsonl'}")
    print(f" checkpoints:  {run_dir / 'checkpoints'} (last.pt, best.pt)")
    print(f" COCO results: {run_dir / 'eval'}")
    print(f" plots:        {run_dir / 'plots'}")
    print(f" overlays:     {overlays} ({n} images)")
    print(bar)
    return {"metrics": metrics, "run_dir": run_dir, "overlays": overlays, "iter": result["iter"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instseg.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="demo_data/synth", help="where the synthetic data goes")
    p.add_argument("--runs-dir", default="runs", help="the run is written to RUNS_DIR/demo")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    from instseg.cli import _user_errors

    try:
        run_demo(data_dir=Path(args.data_dir), runs_dir=Path(args.runs_dir), overrides=args.set)
    except _user_errors() as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
