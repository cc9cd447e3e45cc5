"""Peak memory (RSS) of one training step on the most crowded nuclei image (375 instances).

    python benchmarks/memory.py [--preset mask_rcnn_nuclei_cpu] [--nuclei ../shared/data/nuclei]

Prints and saves (``benchmarks/results/memory_<preset>.json``) the process's peak RSS after
building the model and after one forward + backward + SGD step on that image alone, at the
preset's input scale.  Mask targets are per-instance crops (``CroppedMasks``), so the 375 masks
cost kilobytes, not 375 full-resolution bitmaps.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import Counter
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    from instseg.config.load import apply_overrides
    from instseg.config.presets import get_preset
    from instseg.data.build import build_dataset
    from instseg.data.collate import collate
    from instseg.modeling.zoo import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mask_rcnn_nuclei_cpu")
    parser.add_argument("--nuclei", default="../shared/data/nuclei")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.nuclei)
    cfg = get_preset(args.preset)
    apply_overrides(cfg, assignments=[
        f"data.train_ann={root / 'annotations' / 'instances_train.json'}", f"data.train_images={root / 'images'}",
        "data.flip_prob=0",
    ])
    semantic = cfg.model.semantic_targets if cfg.model.semantic else "none"
    dataset = build_dataset(cfg.data, "train", semantic=semantic, num_semantic_classes=cfg.model.semantic_classes)
    counts = Counter(a["image_id"] for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0))
    image_id, num_instances = counts.most_common(1)[0]
    index = dataset.image_ids.index(image_id)
    cfg.model.num_classes = len(dataset.cat_ids)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    sample = dataset[index]
    batch, targets, _ = collate([sample], cfg.data.size_divisor)
    mask_bytes = sum(c.numel() for c in targets[0].masks.crops)
    dense_bytes = len(targets[0].masks) * targets[0].masks.frame[0] * targets[0].masks.frame[1]
    before = peak_rss_mb()
    t0 = time.perf_counter()
    losses = model(batch, targets)
    optimizer.zero_grad()
    losses["loss"].backward()
    optimizer.step()
    step_s = time.perf_counter() - t0
    after = peak_rss_mb()
    result = {
        "preset": cfg.name,
        "image_id": image_id,
        "instances": num_instances,
        "input_shape": list(batch.images.shape),
        "mask_crop_bytes": mask_bytes,
        "dense_mask_bytes": dense_bytes,
        "peak_rss_mb_before_step": round(before, 1),
        "peak_rss_mb_after_step": round(after, 1),
        "step_seconds": round(step_s, 2),
        "loss": round(float(losses["loss"]), 4),
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory_{cfg.name}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
