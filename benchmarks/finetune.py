"""Fine-tuning vs training from scratch: the golden 5-class mmdetection HTC into a 3-class model.

Usage::

    .venv/bin/python benchmarks/finetune.py [--iters 24] [--scale 384] [--batch-size 2] [--threads 2] [--seed 0]
        [--init ../shared/golden/htc_r18_fpn_c64_shapes.pth] [--out benchmarks/results/finetune/htc_fruit.json]

Data: ``../shared/data/fruit`` (18 real photos, 3 classes: date, fig, hazelnut), split by image id
into 12 training and 6 validation images (written as two annotation files in a temporary folder).
Both runs use the preset ``htc_r18_fpn_c64_shapes`` (ResNet-18, 64-channel heads; semantic targets
derived from the instance masks, as fruit has no stuff maps) with the same seed, data order, schedule
and number of iterations; one starts from ``train.init_from`` = the golden checkpoint (every tensor
but the class-dependent ones), the other from the model's own random init (the golden model itself
was trained from scratch, so neither has ImageNet weights).  The validation COCO AP of each run's
last weights is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from instseg.config.presets import get_preset
from instseg.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FRUIT = ROOT.parent / "shared" / "data" / "fruit"
GOLDEN_HTC = ROOT.parent / "shared" / "golden" / "htc_r18_fpn_c64_shapes.pth"


def split_fruit(dst: Path, n_val: int = 6) -> tuple[Path, Path]:
    """Writes train/val annotation files of fruit: the last ``n_val`` images (by id) are val."""
    data = json.loads((FRUIT / "annotations" / "instances.json").read_text())
    ids = sorted(im["id"] for im in data["images"])
    val_ids = set(ids[-n_val:])
    out = []
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        part = dict(data)
        part["images"] = [im for im in data["images"] if keep(im["id"])]
        part["annotations"] = [a for a in data["annotations"] if keep(a["image_id"])]
        path = dst / f"fruit_{name}.json"
        path.write_text(json.dumps(part))
        out.append(path)
    return out[0], out[1]


def run_one(init_from: str, args: argparse.Namespace, train_ann: Path, val_ann: Path, runs: Path) -> dict:
    cfg = get_preset("htc_r18_fpn_c64_shapes")
    cfg.name = "pretrained" if init_from else "scratch"
    cfg.data.train_ann, cfg.data.train_images = str(train_ann), str(FRUIT / "images")
    cfg.data.val_ann, cfg.data.val_images = str(val_ann), str(FRUIT / "images")
    cfg.model.semantic_targets, cfg.model.semantic_classes = "derive", 4
    cfg.model.backbone_weights = ""
    cfg.data.scale, cfg.data.batch_size = (args.scale, args.scale), args.batch_size
    t = cfg.train
    t.init_from, t.max_iters, t.lr_steps, t.seed = init_from, args.iters, (), args.seed
    t.device, t.threads, t.eval_interval, t.checkpoint_interval, t.log_interval = "cpu", args.threads, 0, 0, 5
    t.output_dir = str(runs)
    t0 = time.time()
    result = train(cfg, run_dir=runs / cfg.name)
    metrics = result["metrics"] or {}
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("mode") == "train" and "loss" in r]
    return {
        "init_from": init_from or None,
        "iters": result["iter"],
        "train_s": round(time.time() - t0, 1),
        "bbox_AP": metrics.get("bbox_AP"),
        "segm_AP": metrics.get("segm_AP"),
        "bbox_AP50": metrics.get("bbox_AP50"),
        "segm_AP50": metrics.get("segm_AP50"),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=384, help="images resized to fit SCALE x SCALE (the golden 512 costs ~2x)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=str(GOLDEN_HTC))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune" / "htc_fruit.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train_ann, val_ann = split_fruit(Path(tmp))
        runs = {name: run_one(init, args, train_ann, val_ann, Path(tmp) / "runs")
                for name, init in (("pretrained", args.init), ("scratch", ""))}
    out = {
        "what": "golden 5-class HTC (mmdetection) fine-tuned into 3 classes vs the same run from scratch",
        "data": "shared/data/fruit: 12 train / 6 val images (last 6 ids are val)",
        "preset": "htc_r18_fpn_c64_shapes (semantic_targets=derive)",
        "iters": args.iters, "seed": args.seed, "threads": args.threads, "scale": args.scale,
        "batch_size": args.batch_size,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
