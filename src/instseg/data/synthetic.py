"""A built-in synthetic COCO data set (the default data of ``make demo``).

``generate_synthetic_dataset(out)`` writes::

    out/images/{train,val}/*.jpg
    out/annotations/instances_{train,val}.json     COCO instances (things only, ids 1-5)
    out/stuffthingmaps/{train,val}/*.png           COCO-Stuff-style maps: pixel = category_id - 1,
                                                   255 = unlabelled (thin lines between stuff regions)

Thing classes (ids 1-5): disk, box, triangle, ring, cross.  Stuff classes (ids 6-9): sky, grass,
water, wall; so the semantic maps have 9 classes (``num_semantic_classes = 9``), listed also in the
JSON's ``info``.  A background is made of 1-3 textured stuff regions separated by wavy lines; on it
2-10 things are drawn, sizes from ~12 px to ~45 % of the short image side, colours drawn from one
palette shared by all classes (so shape, not colour, tells the class), each rotated and shaded.
Later objects are drawn over earlier ones and the earlier instance's mask loses the covered pixels; a
placement that would leave an earlier instance with less than 30 % of its pixels visible is
rejected, so every drawn object is annotated and every annotation is at least 30 % visible.
Unoccluded objects are annotated with polygons (the drawn shape is the rasterisation of that very
polygon by pycocotools), occluded ones and rings (which have a hole) with compressed RLE.

Everything is deterministic given ``seed`` (one ``numpy.random.Generator`` per image).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from instseg.data.coco import decode_rle

THING_CLASSES = ("disk", "box", "triangle", "ring", "cross")  # category ids 1..5
STUFF_CLASSES = ("sky", "grass", "water", "wall")  # category ids 6..9
NUM_SEMANTIC_CLASSES = len(THING_CLASSES) + len(STUFF_CLASSES)
MIN_VISIBLE = 0.3
MIN_THING = 12

PALETTE = np.array(
    [
        (220, 40, 40),  # red
        (245, 215, 40),  # yellow
        (250, 140, 20),  # orange
        (205, 50, 200),  # magenta
        (245, 245, 245),  # white
        (30, 30, 30),  # black
        (40, 215, 215),  # cyan
        (110, 40, 170),  # purple
    ],
    dtype=np.float32,
)


# --------------------------------------------------------------------------- background
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = max(h // cell + 2, 2), max(w // cell + 2, 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _stuff_texture(kind: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An ``(h, w, 3)`` float texture of stuff class ``kind`` (index into STUFF_CLASSES)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    jitter = rng.uniform(-15, 15, size=3).astype(np.float32)
    if kind == 0:  # sky: bright blue, vertical gradient, soft clouds
        base = np.array([125, 175, 235], np.float32) + jitter
        img = base + (40 * (1 - yy / h))[..., None] + (18 * np.clip(_smooth_noise(rng, h, w, 24), 0, None))[..., None]
        img = img + rng.normal(0, 2, (h, w, 1)).astype(np.float32)
    elif kind == 1:  # grass: green with strong fine noise and vertical streaks
        base = np.array([70, 140, 45], np.float32) + jitter
        streaks = np.repeat(rng.normal(0, 1, (1, w)).astype(np.float32), h, axis=0) * 12
        fine = rng.normal(0, 18, (h, w)).astype(np.float32)
        img = base + ((streaks + fine)[..., None] * np.array([0.5, 1.0, 0.4], np.float32))
    elif kind == 2:  # water: dark blue-teal with horizontal waves
        base = np.array([35, 95, 145], np.float32) + jitter
        period = rng.uniform(6, 12)
        waves = np.sin(2 * np.pi * yy / period + 1.5 * np.sin(2 * np.pi * xx / rng.uniform(40, 90)))
        img = base + (22 * waves)[..., None] + rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    else:  # wall: grey-beige bricks with dark mortar
        base = np.array([165, 150, 135], np.float32) + jitter
        bh, bw = int(rng.integers(9, 15)), int(rng.integers(20, 32))
        row = (yy // bh).astype(np.int64)
        xs = xx + (row % 2) * (bw // 2)
        mortar = ((yy % bh) < 2) | ((xs % bw) < 2)
        img = base + rng.normal(0, 5, (h, w, 1)).astype(np.float32)
        img = np.where(mortar[..., None], img - 70, img)
    return img


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """1-3 stuff regions: returns the float image ``(h, w, 3)`` and the stuff label map (uint8)."""
    k = int(rng.integers(1, 4))
    kinds = rng.choice(len(STUFF_CLASSES), size=k, replace=False)
    vertical = rng.random() < 0.3
    length, across = (w, h) if vertical else (h, w)  # boundaries cross the 'across' axis
    t = np.arange(across, dtype=np.float32)
    region = np.zeros((length, across), np.int64)
    positions = np.sort(rng.uniform(0.2, 0.8, size=k - 1)) * length
    coord = np.arange(length, dtype=np.float32)[:, None]
    for pos in positions:
        amp = rng.uniform(0, 0.06) * length
        wave = pos + amp * np.sin(2 * np.pi * t / rng.uniform(60, 200) + rng.uniform(0, 2 * np.pi))
        region += (coord > wave[None, :]).astype(np.int64)
    if vertical:
        region = region.T
    img = np.zeros((h, w, 3), np.float32)
    labels = np.zeros((h, w), np.uint8)
    for r, kind in enumerate(kinds):
        sel = region == r
        if sel.any():
            img[sel] = _stuff_texture(int(kind), rng, h, w)[sel]
        labels[sel] = len(THING_CLASSES) + int(kind)  # category id (6 + kind) - 1
    border = np.zeros((h, w), bool)
    border[:-1] |= region[:-1] != region[1:]
    border[:, :-1] |= region[:, :-1] != region[:, 1:]
    labels[border] = 255
    return img, labels


# --------------------------------------------------------------------------- things
def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]], np.float64)


def _circle(r: float, n: int) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _shape_polygons(cls: int, size: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons (centred at 0) of a thing; for a ring ``[outer, inner]`` (inner is a hole)."""
    r = size / 2
    theta = rng.uniform(0, 2 * np.pi)
    n = int(np.clip(size, 16, 48))
    if cls == 0:  # disk
        return [_circle(r, n)]
    if cls == 1:  # box (rectangle, aspect 0.55..1)
        a = rng.uniform(0.55, 1.0)
        hw, hh = r, r * a
        pts = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        return [_rotate(pts, theta) * 0.85]
    if cls == 2:  # triangle (jittered equilateral)
        a = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
        return [_rotate(pts, theta)]
    if cls == 3:  # ring
        inner = r * rng.uniform(0.45, 0.62)
        return [_circle(r, n), _circle(inner, n)]
    # cross (plus sign)
    t = r * rng.uniform(0.28, 0.42)
    pts = np.array([[-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t], [t, r], [-t, r], [-t, t], [-r, t], [-r, -t], [-t, -t]])
    return [_rotate(pts, theta)]


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return decode_rle(rle[0]).astype(bool)


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _make_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: ``(uint8 RGB, stuff-thing label map, instance records)``."""
    img, labels = _background(rng, h, w)
    target = int(rng.integers(2, 11))
    objs: list[dict] = []  # cls, full, visible, polygon
    max_size = max(MIN_THING + 1, 0.45 * min(h, w))
    for _ in range(4 * target):
        if len(objs) >= target:
            break
        cls = int(rng.integers(0, len(THING_CLASSES)))
        size = float(np.exp(rng.uniform(np.log(MIN_THING), np.log(max_size))))
        polys = _shape_polygons(cls, size, rng)
        ext = float(np.abs(polys[0]).max()) + 1
        cx, cy = rng.uniform(ext, w - ext), rng.uniform(ext, h - ext)
        polys = [np.round(p + np.array([cx, cy]), 2) for p in polys]  # as written to the JSON
        mask = _raster(polys[0], h, w)
        if cls == 3:
            mask &= ~_raster(polys[1], h, w)
        area = int(mask.sum())
        if area < 20:
            continue
        if any(int(o["visible"][mask].sum()) > o["vis_area"] - MIN_VISIBLE * o["area"] for o in objs):
            continue  # would hide too much of an earlier object
        under = img[mask].mean(axis=0)
        for _c in range(8):
            color = PALETTE[int(rng.integers(0, len(PALETTE)))] + rng.uniform(-20, 20, 3).astype(np.float32)
            if np.linalg.norm(color - under) > 90:
                break
        # shading: a linear gradient across the object plus fine noise
        g = rng.uniform(-1, 1, 2)
        ys, xs = np.nonzero(mask)
        shade = 1 + 0.18 * ((xs - cx) * g[0] + (ys - cy) * g[1]) / max(size / 2, 1)
        tex = color[None, :] * np.clip(shade, 0.6, 1.4)[:, None] + rng.normal(0, 5, (area, 1))
        img[mask] = tex
        labels[mask] = cls  # category id (cls + 1) - 1
        for o in objs:
            o["visible"][mask] = False
            o["vis_area"] = int(o["visible"].sum())
        objs.append({"cls": cls, "visible": mask.copy(), "area": area, "vis_area": area, "polys": polys})
    img = img + rng.normal(0, 3, img.shape)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    records = []
    for o in objs:
        vis = o["visible"]
        if o["cls"] != 3 and int(vis.sum()) == o["area"]:
            seg: list | dict = [o["polys"][0].reshape(-1).tolist()]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        else:
            seg = _encode(vis)
            rle = seg
        records.append({
            "category_id": o["cls"] + 1,
            "segmentation": seg,
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
        })
    return out, labels, records


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(THING_CLASSES)]


def _write_split(out: Path, split: str, num: int, seed: int, min_size: int, max_size: int) -> Path:
    img_dir, stuff_dir = out / "images" / split, out / "stuffthingmaps" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    stuff_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    split_code = {"train": 0, "val": 1}[split]
    for i in range(num):
        rng = np.random.default_rng([seed, split_code, i])
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        img, labels, records = _make_image(rng, h, w)
        name = f"{split}_{i:05d}"
        Image.fromarray(img).save(img_dir / f"{name}.jpg", quality=92)
        Image.fromarray(labels, mode="L").save(stuff_dir / f"{name}.png")
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "width": w, "height": h})
        for r in records:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **r})
    info = {
        "description": "instseg synthetic shapes",
        "seed": seed,
        "stuff_categories": [{"id": len(THING_CLASSES) + k + 1, "name": n} for k, n in enumerate(STUFF_CLASSES)],
        "num_semantic_classes": NUM_SEMANTIC_CLASSES,
    }
    ann_file = out / "annotations" / f"instances_{split}.json"
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump({"info": info, "images": images, "annotations": annotations, "categories": _categories()}, f)
    return ann_file


def generate_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 120,
    num_val: int = 24,
    seed: int = 0,
    min_size: int = 192,
    max_size: int = 320,
) -> Path:
    """Writes the synthetic data set under ``out_dir`` (see the module doc) and returns ``out_dir``."""
    if min_size < 64 or max_size < min_size:
        raise ValueError(f"need 64 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out_dir)
    _write_split(out, "train", num_train, seed, min_size, max_size)
    _write_split(out, "val", num_val, seed, min_size, max_size)
    return out


def main(argv: list[str] | None = None) -> int:
    """``instseg data synth --out DIR [--train N --val N --seed S]``."""
    p = argparse.ArgumentParser(prog="instseg data synth", description="Write the synthetic shapes data set (COCO format).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=120, help="number of training images")
    p.add_argument("--val", type=int, default=24, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=192, help="smallest image side")
    p.add_argument("--max-size", type=int, default=320, help="largest image side")
    a = p.parse_args(argv)
    out = generate_synthetic_dataset(a.out, num_train=a.train, num_val=a.val, seed=a.seed, min_size=a.min_size, max_size=a.max_size)
    print(f"wrote {a.train} train + {a.val} val images to {out}")
    print(f"  annotations: {out / 'annotations'}/instances_{{train,val}}.json")
    print(f"  stuff maps:  {out / 'stuffthingmaps'}/{{train,val}}/ ({NUM_SEMANTIC_CLASSES} classes, 255 = unlabelled)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
