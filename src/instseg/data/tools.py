"""``instseg data check | browse | convert``: look at a data set before training on it.

- ``check``: builds the data set with the loader itself (``CocoDataset``, non-strict), so every
  problem it reports is one training would skip or stop on: the JSON structure, each annotation
  (the loader's ``DataWarning`` for a skipped instance), then every image decoded with its masks
  (and its stuff map with ``--stuff-dir``).  Prints counts per class; exit code 1 when there is any
  problem, 0 otherwise.
- ``browse``: draws the annotations of some images to PNGs, as stored or after the training
  transforms of a preset (``--config``), i.e. exactly what the model is fed.
- ``convert``: YOLO-seg / LabelMe -> COCO, and COCO -> YOLO-seg (``instseg.data.formats``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from instseg.data.coco import CocoDataset, DataError, DataWarning, Sample

__all__ = ["CheckReport", "browse_main", "check_dataset", "check_main", "convert_main", "draw_sample"]


@dataclass
class CheckReport:
    """What ``check_dataset`` found.  ``problems`` are the loader's own messages (file, field, why)."""

    ann_file: str
    problems: list[str] = field(default_factory=list)
    images: int = 0
    images_checked: int = 0
    instances: Counter = field(default_factory=Counter)  # category id -> kept instances
    images_with: Counter = field(default_factory=Counter)  # category id -> images having it
    crowd: int = 0
    empty_images: list[str] = field(default_factory=list)
    class_names: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        lines = [
            f"{self.ann_file}: {self.images} images ({self.images_checked} decoded), "
            f"{sum(self.instances.values())} instances, {self.crowd} crowd regions, {len(self.class_names)} categories"
        ]
        if self.class_names:
            width = max(len(n) for n in self.class_names.values())
            lines.append(f"  {'id':>5}  {'class':<{width}}  {'instances':>9}  {'images':>6}")
            for cid, name in self.class_names.items():
                lines.append(f"  {cid:>5}  {name:<{width}}  {self.instances[cid]:>9}  {self.images_with[cid]:>6}")
        if self.empty_images:
            shown = ", ".join(self.empty_images[:5]) + (" ..." if len(self.empty_images) > 5 else "")
            lines.append(f"note: {len(self.empty_images)} images have no instances (training skips them): {shown}")
        if self.problems:
            lines.append(f"{len(self.problems)} problems:")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more (--max-problems)")
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def check_dataset(
    ann_file: str | Path,
    image_dir: str | Path,
    *,
    stuff_dir: str | Path | None = None,
    semantic_classes: int | None = None,
    decode: bool = True,
    progress: bool = False,
) -> CheckReport:
    """Runs the loader's own checks over the whole data set (see the module docstring)."""
    report = CheckReport(str(ann_file))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            ds = CocoDataset(ann_file, image_dir, stuff_dir=stuff_dir, num_semantic_classes=semantic_classes)
        except DataError as e:
            report.problems.append(str(e))
            return report
    report.problems += [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    report.class_names = dict(zip(ds.cat_ids, ds.class_names))
    report.images = len(ds)
    for image_id in ds.image_ids:
        anns = ds._anns[image_id]
        report.crowd += len(ds._crowd[image_id])
        for a in anns:
            report.instances[int(a["category_id"])] += 1
        for cid in {int(a["category_id"]) for a in anns}:
            report.images_with[cid] += 1
        if not anns:
            report.empty_images.append(str(ds._images[image_id]["file_name"]))
    if decode:
        from tqdm import tqdm

        for i in tqdm(range(len(ds)), desc="decoding", disable=not (progress and sys.stderr.isatty()), leave=False):
            try:
                ds[i]  # the image, its size against the JSON, every mask, the stuff map
            except DataError as e:
                report.problems.append(str(e))
            report.images_checked += 1
    return report


def check_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="instseg data check",
        description="Validate a COCO instances data set with the loader's own rules: the JSON, every "
        "annotation, every image decoded (and every stuff map). Prints counts per class; exit code 1 "
        "when there are problems.",
    )
    p.add_argument("ann", metavar="ANN", help="COCO instances JSON")
    p.add_argument("--images", required=True, metavar="DIR", help="folder the images' file_name are relative to")
    p.add_argument("--stuff-dir", metavar="DIR", help="COCO-Stuff-style PNG maps to check too")
    p.add_argument("--semantic-classes", type=int, metavar="N",
                   help="stuff labels must be < N (or 255), as model.semantic_classes requires")
    p.add_argument("--no-decode", action="store_true", help="check the JSON only (no image decoding)")
    p.add_argument("--max-problems", type=int, default=50, metavar="N", help="print at most N problems (default 50)")
    a = p.parse_args(argv)
    if not Path(a.images).is_dir():
        raise FileNotFoundError(f"--images: folder not found: {a.images}")
    report = check_dataset(a.ann, a.images, stuff_dir=a.stuff_dir, semantic_classes=a.semantic_classes,
                           decode=not a.no_decode, progress=True)
    print(report.format(a.max_problems))
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------------------ browse


def draw_sample(sample: Sample, class_names: list[str], *, mean=None, std=None, **kw):
    """The sample's image with its ground truth drawn (a ``PIL.Image``).  ``mean`` / ``std`` undo
    ``Normalize`` for a sample that went through the training transforms."""
    from instseg.structures import Detections
    from instseg.visualize import draw_detections

    img = sample.image.detach().float()
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    t = sample.targets
    n = len(t)
    masks = t.masks.to_full() if t.masks is not None and n else None
    if masks is not None:
        masks = masks.bool()
    dets = Detections(t.boxes.float(), torch.ones(n), t.labels.long(), masks)
    kw.setdefault("show_scores", False)
    return draw_detections(arr, dets, class_names, score_thr=0.0, **kw)


def browse_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="instseg data browse",
        description="Draw the annotations of a COCO data set to PNGs (one per image), as stored or, with "
        "--config, after that preset's training transforms (resize, flip; what the model is fed).",
    )
    p.add_argument("ann", metavar="ANN", help="COCO instances JSON")
    p.add_argument("--images", required=True, metavar="DIR", help="folder the images' file_name are relative to")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs")
    p.add_argument("--num", type=int, default=16, metavar="N", help="draw the first N images (default 16; 0 = all)")
    p.add_argument("--ids", type=int, nargs="+", metavar="ID", help="draw these image ids instead")
    p.add_argument("--config", metavar="PRESET",
                   help="apply this preset's (or config YAML's) training transforms first")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose random transforms to show (with --config)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for --config, e.g. data.flip_prob=1.0")
    p.add_argument("--boxes", action=argparse.BooleanOptionalAction, default=None, help="draw boxes (default: up to 40 instances)")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=None, help="draw class names (default: up to 40 instances)")
    a = p.parse_args(argv)
    if not Path(a.images).is_dir():
        raise FileNotFoundError(f"--images: folder not found: {a.images}")
    transforms, mean, std = None, None, None
    if a.config:
        from instseg.cli import resolve_config
        from instseg.data.transforms import build_transforms

        cfg = resolve_config(a.config, [], a.set)
        transforms = build_transforms(cfg.data, train=True)
        mean, std = list(cfg.data.mean), list(cfg.data.std)
    ds = CocoDataset(a.ann, a.images, transforms=transforms)
    ds.set_epoch(a.epoch, seed=0)
    if a.ids:
        position = {iid: k for k, iid in enumerate(ds.image_ids)}
        missing = [i for i in a.ids if i not in position]
        if missing:
            raise DataError(f"{a.ann}: image ids {missing} are not in the annotation file")
        indices = [position[i] for i in a.ids]
    else:
        indices = list(range(len(ds) if a.num <= 0 else min(a.num, len(ds))))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in indices:
        info = ds.image_info(i)
        try:
            sample = ds[i]
        except DataError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        img = draw_sample(sample, ds.class_names, mean=mean, std=std, show_boxes=a.boxes, show_labels=a.labels)
        img.save(out / f"{info['id']}_{Path(info['file_name']).stem}.png")
        written += 1
    print(f"{written} images drawn to {out}" + (" (after the training transforms of " + a.config + ")" if a.config else ""))
    return 0


# ----------------------------------------------------------------------------------------- convert


def convert_main(argv: list[str] | None = None) -> int:
    from instseg.data.formats import coco_to_yolo_seg, labelme_to_coco, read_class_names, yolo_seg_to_coco

    p = argparse.ArgumentParser(
        prog="instseg data convert",
        description="Convert annotations to a COCO instances JSON (--from yolo-seg | labelme), or a COCO "
        "JSON to YOLO-seg label files (--to yolo-seg).",
        epilog="examples:\n"
        "  instseg data convert --from yolo-seg --images ds/images/train --labels ds/labels/train --names ds/data.yaml --out train.json\n"
        "  instseg data convert --from labelme --labelme-dir shots/ --images shots/ --out ann.json\n"
        "  instseg data convert --to yolo-seg --ann train.json --out yolo_ds/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="src", choices=("yolo-seg", "labelme"), help="source format (output: COCO JSON)")
    g.add_argument("--to", dest="dst", choices=("yolo-seg",), help="target format (input: COCO JSON)")
    p.add_argument("--images", metavar="DIR", help="image folder (file_name in the COCO output is relative to it)")
    p.add_argument("--labels", metavar="DIR", help="YOLO-seg labels folder (--from yolo-seg)")
    p.add_argument("--names", metavar="FILE", help="class names: YOLO data YAML or one name per line")
    p.add_argument("--labelme-dir", metavar="DIR", help="folder of LabelMe .json files (--from labelme; default --images)")
    p.add_argument("--ann", metavar="JSON", help="COCO instances JSON (--to yolo-seg)")
    p.add_argument("--out", required=True, metavar="PATH", help="output COCO JSON (--from) or folder (--to)")
    a = p.parse_args(argv)
    if a.dst == "yolo-seg":
        if not a.ann:
            p.error("--to yolo-seg needs --ann")
        report = coco_to_yolo_seg(a.ann, a.out)
        print(f"wrote YOLO-seg labels to {Path(a.out) / 'labels'} and {Path(a.out) / 'data.yaml'}")
    else:
        if a.src == "yolo-seg":
            if not (a.images and a.labels and a.names):
                p.error("--from yolo-seg needs --images, --labels and --names")
            coco, report = yolo_seg_to_coco(a.images, a.labels, read_class_names(a.names))
        else:
            if not (a.labelme_dir or a.images):
                p.error("--from labelme needs --labelme-dir (or --images)")
            names = read_class_names(a.names) if a.names else None
            coco, report = labelme_to_coco(a.labelme_dir or a.images, a.images or a.labelme_dir, names)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(coco))
        print(f"wrote {out}")
    print("\n".join(report.lines()))
    return 0
