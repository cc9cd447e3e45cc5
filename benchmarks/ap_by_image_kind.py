"""COCO AP of saved results, split by the kind of image: grey or colour, dark or bright background.

A validation split can hide a weak kind of image when that kind is rare in it.  DSB2018 nuclei mix
dark-background grey fluorescence (most images) with bright-background colour histology and grey
bright-field; a data set with another mix of kinds scores differently.  This script shows where
the AP comes from, so a recipe can be judged per kind.

Usage::

    .venv/bin/python benchmarks/ap_by_image_kind.py --ann VAL.json --images DIR \\
        --results RUN/eval/results.json [more results.json ...] [--max-dets 400] [--out FILE.json]

Kinds: an image is *grey* when its channels differ by less than 2 grey levels on average, else
*colour*; *bright* when its mean value is above 100, else *dark*.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from instseg.evaluation.coco import evaluate_coco


def image_kind(path: Path) -> str:
    """``grey-dark``, ``grey-bright``, ``colour-dark`` or ``colour-bright`` (see the module doc)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    grey = float(np.abs(rgb[..., 0] - rgb[..., 1]).mean()) < 2 and float(np.abs(rgb[..., 1] - rgb[..., 2]).mean()) < 2
    return ("grey" if grey else "colour") + ("-bright" if float(rgb.mean()) > 100 else "-dark")


def kinds_of(coco: COCO, images: Path) -> dict[str, list[int]]:
    by_kind: dict[str, list[int]] = defaultdict(list)
    for img in coco.dataset["images"]:
        by_kind[image_kind(images / img["file_name"])].append(int(img["id"]))
    return dict(sorted(by_kind.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ann", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--results", nargs="+", required=True, help="COCO results JSON files (e.g. RUN/eval/results.json)")
    ap.add_argument("--max-dets", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()

    coco = COCO(args.ann)
    kinds = kinds_of(coco, Path(args.images))
    kinds["all"] = [int(i) for i in coco.getImgIds()]
    table: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'results':<60} {'kind':<14} {'images':>6} {'bbox AP':>8} {'segm AP':>8}")
    for res_path in args.results:
        results = json.loads(Path(res_path).read_text())
        table[res_path] = {}
        for kind, ids in kinds.items():
            m = evaluate_coco(coco, results, max_dets=args.max_dets, image_ids=ids, verbose=False, plots=False)
            table[res_path][kind] = {"images": len(ids), "bbox_AP": m["bbox_AP"], "segm_AP": m["segm_AP"]}
            print(f"{res_path[-60:]:<60} {kind:<14} {len(ids):>6} {100 * m['bbox_AP']:>8.1f} {100 * m['segm_AP']:>8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
