"""Annotation formats <-> COCO instances JSON: YOLO-seg (both ways) and LabelMe (to COCO).

YOLO-seg (Ultralytics' segmentation labels): one ``labels/<image stem>.txt`` per image, one line per
instance, ``class x1 y1 x2 y2 ...`` with 0-based class indices and coordinates normalised by the image
width / height; a line of exactly 5 numbers is a detection box ``class cx cy w h`` and becomes a
rectangle.  Class names come from the data set's YAML (``names:`` as a list or an ``{index: name}``
mapping) or a text file with one name per line.  Images without a label file have no instances.

- YOLO-seg -> COCO: category ``id = class index + 1``; polygons in pixels; ``bbox`` and ``area`` from
  the polygon as pycocotools rasterises it.
- COCO -> YOLO-seg: polygons are normalised as they are; an instance made of several polygons is
  joined into one outline by zero-width bridges (what Ultralytics' own COCO converter does); RLE
  masks are traced with ``contourpy`` along the pixel edges, holes joined to their outline by such
  bridges too (see :func:`mask_to_polygons`).  Crowd annotations have no YOLO equivalent and are
  left out (counted).  Class index = position of the category in id order.

LabelMe: one JSON per image (``imagePath``, ``imageHeight``, ``imageWidth``, ``shapes``).  Shapes of
type ``polygon``, ``rectangle``, ``circle`` and ``mask`` become instances; shapes sharing a
``group_id`` (and label) are one instance with several parts; ``point`` / ``line`` / ``linestrip``
shapes are skipped (counted).  Categories are the labels in sorted order unless a names file fixes
the order.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

__all__ = [
    "ConversionReport",
    "FormatError",
    "coco_to_yolo_seg",
    "labelme_to_coco",
    "mask_to_polygons",
    "read_class_names",
    "yolo_seg_to_coco",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FormatError(ValueError):
    """An input file that cannot be read in the format it should have; the message names it."""


@dataclass
class ConversionReport:
    images: int = 0
    instances: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    per_class: Counter = field(default_factory=Counter)  # class name -> instances

    def lines(self) -> list[str]:
        out = [f"{self.images} images, {self.instances} instances"]
        out += [f"  {name}: {n}" for name, n in sorted(self.per_class.items())]
        out += [f"  skipped {n}: {why}" for why, n in sorted(self.skipped.items())]
        return out


# ------------------------------------------------------------------------------------- helpers


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a YOLO data YAML (``names`` list or ``{index: name}``) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names, key=int)]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise FormatError(f"{path}: no 'names' list or mapping")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _image_files(images_dir: Path) -> list[Path]:
    return sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (no decoding), as displayed: EXIF orientations 5-8
    turn the image by 90 degrees.  YOLO tools and LabelMe label the displayed image, and
    ``CocoDataset`` reads it so."""
    try:
        with Image.open(path) as im:
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
            return (int(im.height), int(im.width)) if turned else (int(im.width), int(im.height))
    except Exception as e:
        raise FormatError(f"{path}: cannot read the image size ({type(e).__name__}: {e})") from e


def _polygon_annotation(polys: list[list[float]], h: int, w: int) -> dict | None:
    """``segmentation`` / ``bbox`` / ``area`` of a polygon instance, or ``None`` if it is empty."""
    polys = [[float(round(v, 3)) for v in p] for p in polys if len(p) >= 6]
    if not polys:
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None
    xs = [v for p in polys for v in p[0::2]]
    ys = [v for p in polys for v in p[1::2]]
    x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
    x1, y1 = min(max(xs), float(w)), min(max(ys), float(h))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return {"segmentation": polys, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0}


def _coco(images: list[dict], anns: list[dict], names: Sequence[str]) -> dict:
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }


# --------------------------------------------------------------------------------- YOLO-seg -> COCO


def yolo_seg_to_coco(
    images_dir: str | Path, labels_dir: str | Path, names: Sequence[str]
) -> tuple[dict, ConversionReport]:
    """Reads a YOLO-seg data set; returns ``(COCO dict, report)``.  ``file_name`` is relative to
    ``images_dir``; the label of ``images_dir/a/b.jpg`` is ``labels_dir/a/b.txt``."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"labels folder not found: {labels_dir}")
    report = ConversionReport()
    images, anns = [], []
    for img_id, path in enumerate(_image_files(images_dir), start=1):
        rel = path.relative_to(images_dir)
        w, h = _image_size(path)
        images.append({"id": img_id, "file_name": rel.as_posix(), "width": w, "height": h})
        report.images += 1
        label = (labels_dir / rel).with_suffix(".txt")
        if not label.is_file():
            continue
        for n, line in enumerate(label.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                cls = int(parts[0])
                vals = [float(v) for v in parts[1:]]
            except ValueError:
                raise FormatError(f"{label}:{n}: expected 'class x1 y1 x2 y2 ...' numbers, got {line!r}") from None
            if not 0 <= cls < len(names):
                raise FormatError(f"{label}:{n}: class {cls} is not in the {len(names)} class names")
            if len(vals) == 4:  # detection box: cx cy w h
                cx, cy, bw, bh = vals
                vals = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, cx - bw / 2, cy + bh / 2]
            if len(vals) < 6 or len(vals) % 2:
                report.skipped[f"line with {len(vals)} coordinates (need an even number >= 6)"] += 1
                continue
            poly = [v * (w if k % 2 == 0 else h) for k, v in enumerate(vals)]
            ann = _polygon_annotation([poly], h, w)
            if ann is None:
                report.skipped["polygon with zero area"] += 1
                continue
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cls + 1, **ann})
            report.instances += 1
            report.per_class[names[cls]] += 1
    return _coco(images, anns, names), report


# --------------------------------------------------------------------------------- COCO -> YOLO-seg


def _simplify(points: np.ndarray) -> np.ndarray:
    """Drops points on a straight line between their neighbours (closed ring, no repeat)."""
    if len(points) <= 3:
        return points
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (points[:, 1] - prev[:, 1]) * (nxt[:, 0] - prev[:, 0])
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """A binary mask as COCO polygons in pixel-edge coordinates, one per connected region; a region's
    holes are joined to its outline by zero-width bridges ("keyholes"), so pycocotools rasterises
    the polygons back to the same pixels."""
    import contourpy

    m = np.pad(np.asarray(mask, dtype=np.float64) > 0, 1).astype(np.float64)
    if not m.any():
        return []
    hp, wp = m.shape
    # padded index i is original pixel i - 1, whose centre is at i - 0.5
    gen = contourpy.contour_generator(
        x=np.arange(wp) - 0.5, y=np.arange(hp) - 0.5, z=m, fill_type=contourpy.FillType.OuterOffset
    )
    points, offsets = gen.filled(0.5, 1.5)
    polys = []
    for pts, off in zip(points, offsets):  # one filled region: its outline, then its holes
        rings = []
        for a, b in zip(off[:-1], off[1:]):
            ring = pts[a:b]
            if len(ring) > 1 and np.allclose(ring[0], ring[-1]):
                ring = ring[:-1]
            ring = _simplify(ring)
            if len(ring) >= 3:
                rings.append([float(v) for v in ring.reshape(-1)])
        if rings:
            polys.append(_join_polygons(rings))
    return polys


def _join_polygons(polys: list[list[float]]) -> list[float]:
    """One outline from several: each next part is reached by a zero-width bridge from the
    nearest point of the previous ones, and left the same way back (Ultralytics' approach)."""
    rings = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys]
    if len(rings) == 1:
        return [float(v) for v in rings[0].reshape(-1)]
    out = rings[0]
    for ring in rings[1:]:
        d = ((out[:, None, :] - ring[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        ring = np.roll(ring, -j, axis=0)
        loop = np.concatenate([ring, ring[:1]])  # around the new part, back to its bridge point
        out = np.concatenate([out[: i + 1], loop, out[i:]])
    return [float(v) for v in out.reshape(-1)]


def coco_to_yolo_seg(ann_file: str | Path, out_dir: str | Path) -> ConversionReport:
    """Writes ``out_dir/labels/<file_name stem>.txt`` for every image of ``ann_file`` and
    ``out_dir/data.yaml`` (class names); returns a report."""
    import yaml

    from instseg.data.coco import segmentation_to_rle, decode_rle

    ann_file, out_dir = Path(ann_file), Path(out_dir)
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{ann_file}: cannot read a COCO JSON ({e})") from e
    cats = sorted(data.get("categories", []), key=lambda c: int(c["id"]))
    index = {int(c["id"]): k for k, c in enumerate(cats)}
    names = [str(c.get("name", c["id"])) for c in cats]
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for a in data.get("annotations", []):
        by_image[a["image_id"]].append(a)
    report = ConversionReport()
    labels_dir = out_dir / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    for im in data.get("images", []):
        h, w = int(im["height"]), int(im["width"])
        lines = []
        for a in by_image.get(im["id"], []):
            if a.get("iscrowd", 0):
                report.skipped["crowd annotation (no YOLO equivalent)"] += 1
                continue
            if int(a["category_id"]) not in index:
                report.skipped["unknown category_id"] += 1
                continue
            seg = a.get("segmentation")
            if isinstance(seg, list):
                polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
            elif isinstance(seg, dict):
                polys = mask_to_polygons(decode_rle(segmentation_to_rle(seg, h, w)))
            else:
                polys = []
            if not polys:
                report.skipped["no usable segmentation"] += 1
                continue
            flat = _join_polygons(polys)
            coords = " ".join(
                f"{min(max(v / (w if k % 2 == 0 else h), 0.0), 1.0):.6f}" for k, v in enumerate(flat)
            )
            cls = index[int(a["category_id"])]
            lines.append(f"{cls} {coords}")
            report.instances += 1
            report.per_class[names[cls]] += 1
        label = (labels_dir / im["file_name"]).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines))
        report.images += 1
    (out_dir / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(names))}, sort_keys=False))
    return report


# ---------------------------------------------------------------------------------- LabelMe -> COCO


def _circle(points: list[list[float]], n: int = 32) -> list[float]:
    (cx, cy), (px, py) = points[:2]
    r = math.hypot(px - cx, py - cy)
    return [v for k in range(n) for v in (cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n))]


def _labelme_mask(shape: dict, h: int, w: int, where: str) -> np.ndarray:
    """A LabelMe ``mask`` shape: a PNG (base64) covering the box of its two points."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as im:
            crop = np.asarray(im.convert("L")) > 0
    except Exception as e:
        raise FormatError(f"{where}: shape 'mask' is not a base64 PNG ({type(e).__name__}: {e})") from e
    (x0, y0) = (int(round(v)) for v in shape["points"][0])
    full = np.zeros((h, w), dtype=bool)
    ch, cw = min(crop.shape[0], h - y0), min(crop.shape[1], w - x0)
    if ch > 0 and cw > 0:
        full[y0 : y0 + ch, x0 : x0 + cw] = crop[:ch, :cw]
    return full


def labelme_to_coco(
    json_dir: str | Path, images_dir: str | Path | None = None, names: Sequence[str] | None = None
) -> tuple[dict, ConversionReport]:
    """Reads every ``*.json`` LabelMe file under ``json_dir``; returns ``(COCO dict, report)``.

    ``file_name`` is the image path (``imagePath`` relative to its JSON) relative to ``images_dir``
    (default: ``json_dir``).
    """
    json_dir = Path(json_dir)
    images_dir = Path(images_dir) if images_dir is not None else json_dir
    if not json_dir.is_dir():
        raise FileNotFoundError(f"LabelMe folder not found: {json_dir}")
    files = sorted(json_dir.rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"no LabelMe .json files in {json_dir}")
    records = []
    report = ConversionReport()
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(d, dict) or "shapes" not in d or "imagePath" not in d:
            report.skipped["JSON file that is not a LabelMe file (no 'imagePath' and 'shapes')"] += 1
            continue
        records.append((f, d))
    if not records:
        raise FormatError(f"no LabelMe files (JSON with 'imagePath' and 'shapes') in {json_dir}")
    labels = sorted({str(s["label"]) for _, d in records for s in d["shapes"]})
    names = list(names) if names else labels
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise FormatError(f"labels {unknown} are not in the class names {list(names)}")
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    for img_id, (f, d) in enumerate(records, start=1):
        img_path = (f.parent / d["imagePath"]).resolve()
        try:
            rel = img_path.relative_to(images_dir.resolve()).as_posix()
        except ValueError:
            rel = Path(d["imagePath"]).name
        h, w = d.get("imageHeight"), d.get("imageWidth")
        if not (isinstance(h, int) and isinstance(w, int)):
            w, h = _image_size(img_path)
        images.append({"id": img_id, "file_name": rel, "width": int(w), "height": int(h)})
        report.images += 1
        groups: dict[Any, list[dict]] = defaultdict(list)
        for k, s in enumerate(d["shapes"]):
            gid = s.get("group_id")
            groups[(str(s["label"]), gid if gid is not None else f"shape{k}")].append(s)
        for (label, _), shapes in groups.items():
            polys, masks = [], []
            for s in shapes:
                kind = s.get("shape_type") or "polygon"
                pts = s.get("points") or []
                if kind == "polygon" and len(pts) >= 3:
                    polys.append([float(v) for p in pts for v in p])
                elif kind == "rectangle" and len(pts) >= 2:
                    (x0, y0), (x1, y1) = pts[:2]
                    x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
                    polys.append([x0, y0, x1, y0, x1, y1, x0, y1])
                elif kind == "circle" and len(pts) >= 2:
                    polys.append(_circle(pts))
                elif kind == "mask" and s.get("mask"):
                    masks.append(_labelme_mask(s, int(h), int(w), f"{f}"))
                else:
                    report.skipped[f"shape_type {kind!r} with {len(pts)} points"] += 1
            if masks:  # any mask part: the instance is an RLE of the union of all parts
                m = np.zeros((int(h), int(w)), dtype=bool)
                for part in masks:
                    m |= part
                if polys:
                    m |= mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, int(h), int(w)))).astype(bool)
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                area = float(mask_utils.area(rle))
                if area <= 0:
                    report.skipped["empty mask"] += 1
                    continue
                bbox = [float(v) for v in mask_utils.toBbox(rle)]
                rle["counts"] = rle["counts"].decode("ascii")
                ann = {"segmentation": rle, "bbox": bbox, "area": area, "iscrowd": 0}
            elif polys:
                ann = _polygon_annotation(polys, int(h), int(w))
                if ann is None:
                    report.skipped["polygon with zero area"] += 1
                    continue
            else:
                continue
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat[label], **ann})
            report.instances += 1
            report.per_class[label] += 1
    return _coco(images, anns, names), report
