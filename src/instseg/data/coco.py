"""COCO-format instance data (+ optional COCO-Stuff semantic maps) as ``Sample`` objects.

What a ``CocoDataset`` item holds (see ``Sample``):

- ``image``: ``(3, H, W)`` float32 RGB in 0..255, decoded with PIL (EXIF orientation is NOT
  applied, as COCO annotations refer to the stored pixel grid);
- ``targets``: boxes from the annotations' ``bbox`` (xywh -> xyxy, clipped to the image), contiguous
  labels, masks as ``CroppedMasks`` (polygons, compressed RLE and uncompressed RLE are decoded one
  instance at a time with ``pycocotools.mask``), and an optional semantic map;
- ``meta``: ids, file name and the sizes / scale factors the transforms update.

Crowd annotations (``iscrowd=1``, or ``ignore=1``) are not training targets; COCOeval reads them from
``dataset.coco``.  Their boxes come as ``targets.crowd_boxes`` (``(K, 4)``, empty when none), which
the transforms move like the boxes (YOLACT neutralises anchors that overlap them).  COCO category ids are mapped to labels ``0..C-1`` in sorted id order
(``cat_ids[label]`` is the id, ``label_of(id)`` the label).

Bad-input policy:

- the JSON structure itself (not JSON, missing ``images`` / ``annotations`` / ``categories``, an
  image without ``id`` / ``file_name`` / ``width`` / ``height``, an annotation without ``id`` /
  ``image_id`` / ``category_id`` / ``bbox``, two images or two annotations sharing an ``id``):
  ``DataError`` at construction;
- one instance (unknown category, polygon with fewer than 3 points, zero-area or out-of-image box,
  RLE whose size disagrees with the image; a crowd region whose box or segmentation cannot be
  read): checked at construction; ``strict=True`` raises ``DataError``, otherwise the instance is
  skipped with one ``DataWarning`` naming the file, the annotation id and the reason.  ``coco``
  (the ground truth for COCOeval) holds only the annotations kept, so evaluation sees the same
  cleaned ground truth as training;
- one image (missing or corrupt file, size differing from the JSON, bad stuff map): ``DataError``
  from ``__getitem__``.  Wrap the dataset in ``SkipBadSamples`` to warn and move on to the next good
  image instead (what ``build_train_loader`` does unless ``data.strict``).

Randomness of the transforms: ``__getitem__`` attaches a ``torch.Generator`` seeded from
``(seed, epoch, index)`` to the sample (``Sample.generator``); random transforms draw from it, so the
data of a given epoch is the same whatever the worker count, and a resumed run sees the same data.
Call ``set_epoch(epoch, seed=...)`` before each epoch (``build_train_loader`` does).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from instseg.structures.instances import IGNORE_LABEL, ImageTargets
from instseg.structures.masks import MARGIN, CroppedMasks


class DataError(ValueError):
    """Bad input data.  The message names the file, the field and what was expected."""


class DataWarning(UserWarning):
    """A bad instance or image that was skipped (non-strict mode)."""


@dataclass
class ImageMeta:
    """Where an image came from and how the transforms changed its geometry.

    ``original_size`` / ``image_size`` are ``(h, w)``; ``scale_factor`` is ``(w_scale, h_scale)`` =
    resized / original per axis.
    """

    image_id: int
    file_name: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    scale_factor: tuple[float, float] = (1.0, 1.0)
    flipped: bool = False


@dataclass
class Sample:
    """One image with its targets.

    ``generator`` is the per-(seed, epoch, index) random generator random transforms draw from
    (``None``: they use their own generator or torch's global one).
    """

    image: Tensor
    targets: ImageTargets
    meta: ImageMeta
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, epoch, index)``, identical in every process."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint64)[0] >> 1)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_rgb(path: Path, *, exif: bool = True) -> np.ndarray:
    """Decodes an image file to ``(H, W, 3)`` uint8 RGB; any failure becomes a ``DataError``.

    With ``exif`` (default) the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``),
    so a phone photo comes out as it is displayed, as cv2 / mmcv / detectron2 read it.
    """
    if not path.is_file():
        raise DataError(f"{path}: image file not found (field 'file_name' of the annotation file)")
    try:
        with Image.open(path) as im:
            arr = np.array((ImageOps.exif_transpose(im) if exif else im).convert("RGB"))
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); expected a readable image file") from e
    return arr


class CocoDataset(torch.utils.data.Dataset):
    """COCO instance annotations (+ COCO-Stuff maps) as ``Sample`` objects.

    EXIF orientation: images are read as displayed (the orientation tag applied, as mmdetection's
    cv2 reader does), which is what annotation tools show their users.  When that reading is
    rotated by 90 degrees against the JSON's ``height``/``width`` but the stored pixels match them,
    the annotations were made on the stored pixels and the tag is ignored for that image.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder the images' ``file_name`` are relative to.
        stuff_dir: optional folder of semantic label maps: ``<stuff_dir>/<file_name with .png>``, a
            single-channel uint8 PNG of the image's size (COCO-Stuff: pixel = category_id - 1,
            255 = unlabelled), loaded unchanged into ``targets.semantic`` (int64).
        transforms: callable ``Sample -> Sample`` (see ``instseg.data.transforms``).
        with_masks: decode instance masks (``False``: ``targets.masks`` is ``None``).
        filter_empty: drop images without any valid non-crowd instance (training, like mmdet's
            ``filter_empty_gt``).
        strict: raise on a bad instance instead of skipping it with a warning.
        semantic_from_instances: for data without stuff maps (e.g. nuclei), derive a things-only
            map: background 0, pixels of an instance of label ``l`` get ``l + 1`` (later instances
            over earlier ones), crowd regions 255 (ignore); so it has ``num_classes + 1`` classes.
        num_semantic_classes: when given, stuff-map values must be ``< num_semantic_classes`` or
            255, else ``DataError``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        stuff_dir: str | Path | None = None,
        transforms: Callable[[Sample], Sample] | None = None,
        with_masks: bool = True,
        filter_empty: bool = False,
        strict: bool = False,
        semantic_from_instances: bool = False,
        num_semantic_classes: int | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.stuff_dir = None if stuff_dir in (None, "") else Path(stuff_dir)
        self.transforms = transforms
        self.with_masks = with_masks
        self.filter_empty = filter_empty
        self.strict = strict
        if semantic_from_instances and self.stuff_dir is not None:
            raise ValueError("give either stuff_dir or semantic_from_instances=True, not both")
        self.semantic_from_instances = semantic_from_instances
        self.seed = 0
        self.epoch = 0

        data = self._read_json()
        self._check_structure(data)
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.cat_ids: list[int] = [int(c["id"]) for c in cats]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self._label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        if semantic_from_instances and num_semantic_classes is None:
            num_semantic_classes = len(self.cat_ids) + 1
        self.num_semantic_classes = num_semantic_classes

        self._images: dict[int, dict] = {int(im["id"]): im for im in data["images"]}
        self._anns: dict[int, list[dict]] = {i: [] for i in self._images}  # valid, non-crowd
        self._crowd: dict[int, list[dict]] = {i: [] for i in self._images}
        for ann in data["annotations"]:
            self._add_annotation(ann)
        self.coco = self._evaluation_ground_truth(data)
        ids = [int(im["id"]) for im in data["images"]]
        if filter_empty:
            ids = [i for i in ids if self._anns[i]]
        self.image_ids: list[int] = ids

    # ------------------------------------------------------------------ construction helpers
    def _read_json(self) -> dict:
        if not self.ann_file.is_file():
            raise DataError(f"{self.ann_file}: annotation file not found")
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.ann_file}: not valid JSON ({e}); expected a COCO instances file") from e
        return data

    def _check_structure(self, data: Any) -> None:
        f = self.ann_file
        if not isinstance(data, dict):
            raise DataError(f"{f}: top level is {type(data).__name__}; expected a JSON object with "
                            "'images', 'annotations' and 'categories'")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DataError(f"{f}: missing top-level key '{key}'; expected a COCO instances file "
                                "with 'images', 'annotations' and 'categories'")
            if not isinstance(data[key], list):
                raise DataError(f"{f}: field '{key}' is {type(data[key]).__name__}; expected a list")
        seen: set[int] = set()
        for k, im in enumerate(data["images"]):
            for key in ("id", "file_name", "width", "height"):
                if not isinstance(im, dict) or key not in im:
                    raise DataError(f"{f}: images[{k}] has no field '{key}'; expected id, file_name, width, height")
            if not (isinstance(im["width"], int) and isinstance(im["height"], int) and im["width"] > 0 and im["height"] > 0):
                raise DataError(f"{f}: images[{k}] (id {im['id']}) field 'width'/'height' = "
                                f"{im['width']!r}/{im['height']!r}; expected positive integers")
            if im["id"] in seen:
                raise DataError(f"{f}: images[{k}] field 'id' = {im['id']} is duplicated; expected unique ids")
            seen.add(im["id"])
        for k, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or "id" not in c:
                raise DataError(f"{f}: categories[{k}] has no field 'id'")
        ann_index: dict[Any, int] = {}
        for k, ann in enumerate(data["annotations"]):
            for key in ("id", "image_id", "category_id", "bbox"):
                if not isinstance(ann, dict) or key not in ann:
                    aid = ann.get("id", "?") if isinstance(ann, dict) else "?"
                    raise DataError(f"{f}: annotations[{k}] (id {aid}) has no field '{key}'; expected "
                                    "id, image_id, category_id, bbox (and segmentation for masks)")
            if self.with_masks and not ann.get("iscrowd", 0) and "segmentation" not in ann:
                raise DataError(f"{f}: annotation id {ann['id']} has no field 'segmentation'; expected "
                                "polygons or RLE (or use with_masks=False)")
            first = ann_index.setdefault(ann["id"], k)
            if first != k:  # pycocotools indexes annotations by id: it would keep only one of them
                raise DataError(f"{f}: annotations[{k}] field 'id' = {ann['id']} is duplicated (also "
                                f"annotations[{first}]); expected unique annotation ids")

    def _bad(self, ann: dict, field_: str, reason: str) -> None:
        msg = f"{self.ann_file}: annotation id {ann.get('id')} (image {ann.get('image_id')}) field '{field_}': {reason}"
        if self.strict:
            raise DataError(msg)
        warnings.warn(msg + "; instance skipped", DataWarning, stacklevel=3)

    def _add_annotation(self, ann: dict) -> None:
        img = self._images.get(ann["image_id"])
        if img is None:
            return self._bad(ann, "image_id", f"{ann['image_id']!r} is not an id in 'images'")
        h, w = int(img["height"]), int(img["width"])
        if ann.get("iscrowd", 0) or ann.get("ignore", 0):
            bbox = ann["bbox"]
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                return self._bad(ann, "bbox", f"{bbox!r}; expected [x, y, w, h] numbers (crowd region)")
            if "segmentation" in ann:
                reason = _check_segmentation(ann["segmentation"], h, w)
            else:
                reason = "missing; expected polygons or RLE" if self.with_masks else None
            if reason:
                return self._bad(ann, "segmentation", reason + " (crowd region)")
            self._crowd[int(img["id"])].append(ann)
            return None
        if ann["category_id"] not in self._label_of:
            return self._bad(ann, "category_id", f"{ann['category_id']!r} is not in 'categories' "
                             f"(expected one of {self.cat_ids[:10]}{'...' if len(self.cat_ids) > 10 else ''})")
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            return self._bad(ann, "bbox", f"{bbox!r}; expected [x, y, w, h] numbers")
        x, y, bw, bh = (float(v) for v in bbox)
        x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            return self._bad(ann, "bbox", f"{bbox!r} has zero area inside the {w}x{h} image; "
                             "expected a box with positive width and height inside the image")
        if self.with_masks:
            reason = _check_segmentation(ann["segmentation"], h, w)
            if reason:
                return self._bad(ann, "segmentation", reason)
        self._anns[int(img["id"])].append(ann)
        return None

    def _evaluation_ground_truth(self, data: dict) -> COCO:
        """The ground truth COCOeval sees: exactly the annotations this loader kept.

        Instances the loader skipped (bad polygon, unknown category, ...) would otherwise crash
        pycocotools or count as misses; ``area`` and ``iscrowd``, which COCOeval reads but the
        loader does not need, are filled in (mask area, else box area; 0) where missing.
        """
        kept = {id(a) for lists in (self._anns, self._crowd) for anns in lists.values() for a in anns}
        anns = []
        for ann in data["annotations"]:
            if id(ann) not in kept:
                continue
            if "area" not in ann or "iscrowd" not in ann:
                ann = dict(ann)
                ann.setdefault("iscrowd", 0)
                if "area" not in ann:
                    img = self._images[ann["image_id"]]
                    if self.with_masks and ann.get("segmentation") is not None:
                        rle = segmentation_to_rle(ann["segmentation"], int(img["height"]), int(img["width"]))
                        ann["area"] = float(mask_utils.area(rle))
                    else:
                        ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            anns.append(ann)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO()
            coco.dataset = {**data, "annotations": anns}
            coco.createIndex()
        return coco

    def check_stuff_maps(self, *, progress: bool = False) -> int:
        """Reads every image's stuff map once (before training): a missing, unreadable or wrongly
        sized map, or a label outside ``0..num_semantic_classes-1`` (other than 255), is a
        ``DataError`` naming the file.  Returns the number of maps checked (0 without ``stuff_dir``)."""
        if self.stuff_dir is None:
            return 0
        ids = list(self.image_ids)
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="checking stuff maps", leave=False, disable=not sys.stderr.isatty())
        try:
            for image_id in ids:
                info = self._images[image_id]
                self._load_stuff(info, (int(info["height"]), int(info["width"])))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return len(ids)

    # ------------------------------------------------------------------ public API
    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def label_of(self, cat_id: int) -> int:
        """Contiguous label of a COCO category id (``KeyError`` if unknown)."""
        return self._label_of[int(cat_id)]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Selects the random stream of the transforms: sample ``i`` uses ``sample_seed(seed, epoch, i)``."""
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.image_ids)

    def all_image_ids(self) -> list[int]:
        """Every image id of the JSON, in its order (before ``filter_empty`` and ``restrict``)."""
        return list(self._images)

    def restrict(self, image_ids) -> None:
        """Keeps only the images whose id is in ``image_ids`` (a held-out split)."""
        wanted = {int(i) for i in image_ids}
        self.image_ids = [i for i in self.image_ids if i in wanted]

    def aspect_ratios(self) -> list[float]:
        """``w / h`` of every image (from the JSON, no decoding)."""
        return [self._images[i]["width"] / self._images[i]["height"] for i in self.image_ids]

    def image_info(self, i: int) -> dict:
        return self._images[self.image_ids[i]]

    def load_image(self, i: int) -> np.ndarray:
        """The raw image ``i`` as ``(H, W, 3)`` uint8 RGB (for visualisation)."""
        return load_rgb(self.image_dir / self.image_info(i)["file_name"])

    def __getitem__(self, i: int) -> Sample:
        sample = self.load(i)
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def load(self, i: int) -> Sample:
        """Sample ``i`` as read from disk, before the transforms (copy-paste's donors)."""
        if i < 0:
            i += len(self)
        info = self.image_info(i)
        path = self.image_dir / info["file_name"]
        arr = load_rgb(path)
        h, w = int(info["height"]), int(info["width"])
        if arr.shape[:2] == (w, h) != (h, w):
            # An EXIF rotation by 90 degrees whose unrotated size is the JSON's: the annotation tool
            # worked on the stored pixels, so the annotations are in that frame; read them so.
            arr = load_rgb(path, exif=False)
        if arr.shape[:2] != (h, w):
            raise DataError(f"{path}: decoded size (h={arr.shape[0]}, w={arr.shape[1]}) differs from "
                            f"fields 'height'/'width' = ({h}, {w}) of image id {info['id']} in {self.ann_file}")
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        del arr
        anns = self._anns[int(info["id"])]
        boxes = torch.zeros((len(anns), 4), dtype=torch.float32)
        for k, ann in enumerate(anns):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            boxes[k] = torch.tensor([x, y, x + bw, y + bh])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = None
        if self.with_masks or self.semantic_from_instances:
            masks = decode_cropped([a["segmentation"] for a in anns], h, w)
        semantic = None
        if self.stuff_dir is not None:
            semantic = self._load_stuff(info, (h, w))
        elif self.semantic_from_instances:
            semantic = self._derive_semantic(masks, labels, info, (h, w))
        if not self.with_masks:
            masks = None
        crowd_boxes = crowd_boxes_of(self._crowd[int(info["id"])], h, w)
        sample = Sample(
            image=image,
            targets=ImageTargets(boxes=boxes, labels=labels, masks=masks, semantic=semantic, crowd_boxes=crowd_boxes),
            meta=ImageMeta(int(info["id"]), str(info["file_name"]), (h, w), (h, w), (1.0, 1.0), False),
            generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i)),
        )
        return sample

    # ------------------------------------------------------------------ per-image helpers
    def _load_stuff(self, info: dict, size: tuple[int, int]) -> Tensor:
        path = self.stuff_dir / Path(info["file_name"]).with_suffix(".png")
        if not path.is_file():
            raise DataError(f"{path}: stuff map not found (expected <stuff_dir>/<image file stem>.png "
                            f"for image {info['file_name']})")
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P"):
                    raise DataError(f"{path}: stuff map has mode {im.mode}; expected a single-channel "
                                    "uint8 label map (mode L or P)")
                arr = np.array(im)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot decode stuff map ({type(e).__name__}: {e})") from e
        if arr.shape != size:
            raise DataError(f"{path}: stuff map size (h={arr.shape[0]}, w={arr.shape[1]}) differs from the "
                            f"image size (h={size[0]}, w={size[1]}) of {info['file_name']}")
        if self.num_semantic_classes is not None:
            bad = (arr >= self.num_semantic_classes) & (arr != IGNORE_LABEL)
            if bad.any():
                raise DataError(f"{path}: stuff map label {int(arr[bad].max())} out of range; expected "
                                f"labels < num_semantic_classes = {self.num_semantic_classes} or 255 (ignore)")
        return torch.from_numpy(arr.astype(np.int64))

    def _derive_semantic(self, masks: CroppedMasks, labels: Tensor, info: dict, size: tuple[int, int]) -> Tensor:
        sem = torch.zeros(size, dtype=torch.int64)
        for k, crop in enumerate(masks.crops):
            x0, y0 = (int(v) for v in masks.offsets[k])
            region = sem[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            region[crop.bool()] = int(labels[k]) + 1
        for ann in self._crowd[int(info["id"])]:
            seg = ann.get("segmentation")
            if seg is None or _check_segmentation(seg, size[0], size[1]):
                continue
            sem[torch.from_numpy(decode_segmentation(seg, size[0], size[1]).astype(bool))] = IGNORE_LABEL
        return sem


def crowd_boxes_of(anns: list[dict], h: int, w: int) -> Tensor:
    """``(K, 4)`` float32 XYXY boxes of crowd annotations, clipped to the ``h x w`` image.

    A ``bbox`` that is not four numbers, or that has no area inside the image, is left out: such a
    box could not neutralise any anchor anyway (YOLACT's only use of crowd boxes).
    """
    rows = []
    for ann in anns:
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        if x2 > x1 and y2 > y1:
            rows.append((x1, y1, x2, y2))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _check_segmentation(seg: Any, h: int, w: int) -> str | None:
    """Returns why a segmentation cannot be decoded for an ``h x w`` image, or ``None`` if it is fine."""
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list; expected at least one polygon of >= 3 points"
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return "polygon is not a list of numbers; expected [x1, y1, x2, y2, ...]"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon with {len(poly)} coordinates; expected an even number >= 6 (at least 3 points)"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE without 'counts' and 'size'"
        size = seg["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and [int(size[0]), int(size[1])] == [h, w]):
            return f"RLE size {size!r} differs from the image size [{h}, {w}] (height, width)"
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                return f"uncompressed RLE counts sum to {sum(c for c in counts if isinstance(c, int))}; expected h*w = {h * w}"
        elif not isinstance(counts, (str, bytes)):
            return f"RLE 'counts' is {type(counts).__name__}; expected a string (compressed) or a list (uncompressed)"
        return None
    return f"segmentation is {type(seg).__name__}; expected a polygon list or an RLE dict"


def segmentation_to_rle(seg: Any, h: int, w: int) -> dict:
    """One COCO segmentation (polygons, compressed or uncompressed RLE) as a compressed RLE."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return seg


def decode_rle(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` of one RLE, without its numpy-2 ``DeprecationWarning`` noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode([rle])[:, :, 0]


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """Decodes one COCO segmentation to a full ``(h, w)`` uint8 mask."""
    return decode_rle(segmentation_to_rle(seg, h, w))


def decode_cropped(segs: list[Any], h: int, w: int) -> CroppedMasks:
    """Decodes segmentations one at a time straight into ``CroppedMasks``.

    Gives exactly what ``CroppedMasks.from_iter`` gives on the full masks (tight box of the pixels
    plus ``MARGIN``, clamped; a 1x1 zero crop at (0, 0) for an empty mask), but finds the box from
    the RLE (``toBbox``) instead of scanning every full-frame mask, which matters for crowded images.
    Only one full-frame mask is alive at a time.
    """
    crops: list[Tensor] = []
    offsets: list[tuple[int, int]] = []
    for seg in segs:
        rle = segmentation_to_rle(seg, h, w)
        bx, by, bw, bh = (int(round(float(v))) for v in mask_utils.toBbox(rle))
        if bw <= 0 or bh <= 0:
            crops.append(torch.zeros((1, 1), dtype=torch.uint8))
            offsets.append((0, 0))
            continue
        x0, y0 = max(bx - MARGIN, 0), max(by - MARGIN, 0)
        x1, y1 = min(bx + bw + MARGIN, w), min(by + bh + MARGIN, h)
        full = decode_rle(rle)  # (h, w) Fortran-ordered uint8
        crops.append(torch.from_numpy(np.ascontiguousarray(full[y0:y1, x0:x1]) != 0).to(torch.uint8))
        offsets.append((x0, y0))
        del full
    off = torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2)
    return CroppedMasks(crops, off, (int(h), int(w)))


class SkipBadSamples(torch.utils.data.Dataset):
    """Wraps a dataset so that a bad image (``DataError``) does not stop a long training run.

    ``dataset[i]`` is tried first; on a ``DataError`` a ``DataWarning`` naming the problem is issued
    and the next indices ``i+1, i+2, ...`` (wrapping around) are tried, up to ``max_tries`` in all,
    after which the last error is raised.  So a batch may contain a duplicate image in place of the
    bad one.  Only for training: evaluation must see every image, so test loaders do not use it.
    Attributes of the wrapped dataset (``coco``, ``cat_ids``, ``aspect_ratios``, ``set_epoch`` ...)
    are reachable through the wrapper.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, max_tries: int = 16) -> None:
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "max_tries") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.dataset)
        last: DataError | None = None
        for k in range(min(self.max_tries, n)):
            j = (i + k) % n
            try:
                return self.dataset[j]
            except DataError as e:
                warnings.warn(f"skipping bad sample {j}: {e}", DataWarning, stacklevel=2)
                last = e
        assert last is not None
        raise last
