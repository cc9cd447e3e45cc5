"""The Python entry point to a trained model: :class:`Predictor` and its result, :class:`Prediction`.

>>> from instseg import Predictor
>>> predictor = Predictor("runs/x/checkpoints/best.pt")          # device="auto": CUDA if present
>>> pred = predictor("photo.jpg")                                 # one image -> one Prediction
>>> pred.boxes, pred.scores, pred.class_names, pred.masks        # numpy, original image frame
>>> pred.save("photo_overlay.png")
>>> preds = predictor(["a.jpg", "folder/", array, pil_image], batch_size=4)   # -> list
>>> write_coco_json(preds, "predictions.json")

``instseg predict`` and ``instseg serve`` are thin layers over this module: the same checkpoint
loading, test transforms (or test-time augmentation), batching and overlay drawing.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["ImageInput", "Prediction", "Predictor", "PredictorError", "coco_records", "write_coco_json"]

# What a Predictor accepts per image: a file path, a folder path, an (H, W, 3) uint8 RGB array, a PIL image.
ImageInput = Union[str, os.PathLike, np.ndarray, "PILImage.Image"]


class PredictorError(ValueError):
    """A bad input to :class:`Predictor` (wrong array shape or dtype, unsupported TTA, bad device)."""


@dataclass
class Prediction:
    """The detections of one image, in that image's original frame.

    Attributes:
        source: where the image came from: its path, ``'<array N>'`` / ``'<PIL N>'`` for in-memory
            images (N = position in the call), or a video's ``'clip.mp4#frame=N'``.
        index: position of the image in the call that produced it (the default COCO image id).
        image_size: ``(height, width)`` of the image predicted on (after EXIF orientation).
        boxes: ``(n, 4)`` float32 XYXY pixels; scores: ``(n,)`` float32, highest first as the
            model returns them; labels: ``(n,)`` int64 contiguous class indices.
        masks: ``(n, H, W)`` bool, or ``None`` for box-only models.
        classes: the model's class names (``classes[label]``); cat_ids: the COCO category id of
            each class.
        image: the ``(H, W, 3)`` uint8 RGB pixels predicted on (for :meth:`draw`); not compared.
    """

    source: str
    index: int
    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    classes: tuple[str, ...]
    cat_ids: tuple[int, ...]
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def class_names(self) -> list[str]:
        """The class name of each detection."""
        return [self.classes[int(k)] if 0 <= int(k) < len(self.classes) else str(int(k)) for k in self.labels]

    @property
    def category_ids(self) -> list[int]:
        """The COCO category id of each detection."""
        return [int(self.cat_ids[int(k)]) for k in self.labels]

    def filter(self, score_thr: float) -> Prediction:
        """The detections scoring at least ``score_thr``."""
        keep = self.scores >= score_thr
        return replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep],
                       masks=None if self.masks is None else self.masks[keep])

    def detections(self):
        """As ``instseg.structures.Detections`` (CPU tensors sharing this object's memory)."""
        import torch

        from instseg.structures import Detections

        return Detections(torch.from_numpy(self.boxes), torch.from_numpy(self.scores), torch.from_numpy(self.labels),
                          None if self.masks is None else torch.from_numpy(self.masks))

    def to_coco(self, image_id: int | None = None, *, score_thr: float = 0.0) -> list[dict]:
        """COCO result dicts (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``, and
        ``segmentation`` as compressed RLE with a ``str`` counts) of the detections scoring at
        least ``score_thr``; ``image_id`` defaults to :attr:`index`."""
        from instseg.evaluation.coco import detections_to_coco

        kept = self.filter(score_thr) if score_thr > 0 else self
        return detections_to_coco(kept.detections(), self.index if image_id is None else image_id, self.cat_ids)

    def draw(self, image: np.ndarray | None = None, *, score_thr: float = 0.3, **kw: Any):
        """The overlay as a PIL image (``instseg.visualize.draw_detections``: masks tinted by class,
        boxes and ``'name score'`` labels); ``image`` defaults to the pixels predicted on."""
        from instseg.visualize import draw_detections

        pixels = self.image if image is None else image
        if pixels is None:
            raise PredictorError(f"{self.source}: this Prediction keeps no image; pass draw(image=...)")
        return draw_detections(pixels, self.detections(), list(self.classes), score_thr=score_thr, **kw)

    def save(self, path: str | os.PathLike, **kw: Any) -> Path:
        """:meth:`draw` saved to ``path`` (format from its suffix; folders created); returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.draw(**kw).save(path)
        return path


def coco_records(pred: Prediction, score_thr: float = 0.0) -> tuple[list[dict], dict]:
    """The COCO results of one prediction (each with ``file_name`` = :attr:`Prediction.source`)
    and its ``images`` entry (id = :attr:`Prediction.index`)."""
    results = pred.to_coco(score_thr=score_thr)
    for r in results:
        r["file_name"] = pred.source
    h, w = pred.image_size
    return results, {"id": pred.index, "file_name": pred.source, "height": int(h), "width": int(w)}


def write_coco_json(
    predictions: Iterable[Prediction | tuple[list[dict], dict]],
    path: str | os.PathLike,
    *,
    score_thr: float = 0.0,
    images_path: str | os.PathLike | None = None,
    categories: Sequence[dict] | None = None,
) -> int:
    """Writes the COCO results of ``predictions`` (detections scoring >= ``score_thr``; each
    result with its image's ``file_name``) to ``path``; with ``images_path``, also
    ``{"images": [...], "categories": [...]}`` there.  Items may be :func:`coco_records` pairs
    made earlier (so a caller can drop the masks as it goes).  Returns the number of results."""
    from instseg.evaluation.coco import write_results_json

    results: list[dict] = []
    images: list[dict] = []
    for item in predictions:
        if isinstance(item, Prediction):
            categories = [{"id": int(c), "name": n} for c, n in zip(item.cat_ids, item.classes)]
            item = coco_records(item, score_thr)
        results.extend(item[0])
        images.append(item[1])
    write_results_json(results, path)
    if images_path is not None:
        doc = {"images": images, "categories": list(categories or [])}
        Path(images_path).write_text(json.dumps(doc, indent=1) + "\n")
    return len(results)


def _check_array(arr: Any, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        got = f"shape {tuple(arr.shape)}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise PredictorError(f"{where}: expected an (H, W, 3) uint8 RGB array, got {got}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PredictorError(f"{where}: the image is empty (shape {tuple(arr.shape)})")
    return arr


def pil_to_rgb(image: Any) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` uint8 RGB with its EXIF orientation applied (as files are read)."""
    from PIL import ImageOps

    return np.array(ImageOps.exif_transpose(image).convert("RGB"))


def _expand(inputs: ImageInput | Sequence[ImageInput]) -> tuple[list[tuple[str, Callable[[], np.ndarray]]], bool]:
    """``[(source, read)]`` for every image named by ``inputs`` (folders expanded, sorted), and
    whether ``inputs`` named exactly one image (a file, an array or a PIL image)."""
    from PIL import Image

    from instseg.data.coco import load_rgb
    from instseg.engine.inference import collect_images

    single = not isinstance(inputs, (list, tuple))
    items: list[tuple[str, Callable[[], np.ndarray]]] = []
    for k, x in enumerate([inputs] if single else list(inputs)):
        if isinstance(x, np.ndarray):
            arr = _check_array(x, f"input {k}")
            items.append((f"<array {k}>", lambda a=arr: a))
        elif isinstance(x, Image.Image):
            items.append((f"<PIL {k}>", lambda im=x: pil_to_rgb(im)))
        elif isinstance(x, (str, os.PathLike)):
            p = Path(x)
            if p.suffix.lower() in VIDEO_SUFFIXES:
                raise PredictorError(f"{p}: a video; use Predictor.predict_video (or `instseg predict` on it)")
            if p.is_dir():
                single = False
            items.extend((str(f), lambda f=f: load_rgb(f)) for f in collect_images([p]))
        else:
            raise PredictorError(f"input {k}: expected a path, a folder, an (H, W, 3) uint8 RGB numpy array or a "
                                 f"PIL image, got {type(x).__name__}")
    return items, single and len(items) == 1


VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")


class Predictor:
    """A trained model ready to run on images.

    Args:
        checkpoint: an instseg checkpoint (``RUN/checkpoints/best.pt``, or one written by
            ``instseg convert``).  Its own config gives the model, the test transforms and the
            class names; weights load onto the CPU first, so a checkpoint saved on CUDA loads on a
            CPU-only machine.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        tta: test-time augmentation of two-stage models (``"flip"``, ``"ms"``, ``"ms-flip"`` or
            ``"LONGxSHORT,...[+flip]"``, see ``instseg.engine.tta``); ``None`` uses the
            checkpoint's ``model.tta``, ``""`` turns it off.
        overrides: config overrides as ``instseg predict --set`` takes them, e.g.
            ``["model.score_thr=0.05", "model.max_per_img=300"]``.

    Calling it: ``predictor(inputs, batch_size=1)`` where ``inputs`` is an image file path, a
    folder (its image files, sorted, not recursive), an ``(H, W, 3)`` **uint8 RGB** numpy array,
    a PIL image, or a list of any of these.  One file / array / PIL image gives one
    :class:`Prediction`; a folder or a list gives a list.  Image files and PIL images are used with
    their EXIF orientation applied; arrays as given.  The model call holds a lock, so one
    Predictor may serve several threads.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "auto",
        tta: str | None = None,
        *,
        overrides: Sequence[str] = (),
    ) -> None:
        from instseg.config.load import apply_overrides
        from instseg.data.transforms import build_transforms
        from instseg.engine.checkpoint import load_model_from_checkpoint
        from instseg.engine.trainer import resolve_device
        from instseg.engine.tta import raw_transforms, tta_model

        model, cfg, classes = load_model_from_checkpoint(
            checkpoint, "cpu", update_cfg=lambda c: apply_overrides(c, [], list(overrides))
        )
        try:
            self.device = resolve_device(device or "auto")
        except RuntimeError as e:
            raise PredictorError(f"device {device!r}: {e}") from None
        model.to(self.device).optimize_for_inference()
        spec = cfg.model.tta if tta is None else tta
        if spec and not hasattr(model, "roi_head"):
            raise PredictorError(f"tta {spec!r}: test-time augmentation is built for the two-stage models, "
                                 f"not {cfg.model.arch}")
        try:
            self.model = tta_model(model, spec, cfg.data)
        except ValueError as e:
            raise PredictorError(str(e)) from None
        self.tta = spec or ""
        self.transforms = raw_transforms() if spec else build_transforms(cfg.data, train=False)
        self.cfg = cfg
        self.checkpoint = str(checkpoint)
        self.cat_ids = tuple(int(c) for c in classes["cat_ids"])
        self.classes = tuple(str(n) for n in (classes.get("class_names") or [str(c) for c in self.cat_ids]))
        self._lock = threading.Lock()

    @property
    def arch(self) -> str:
        """The model family (``cfg.model.arch``: ``htc``, ``mask_rcnn``, ``yolact``, ...)."""
        return str(self.cfg.model.arch)

    def __call__(self, inputs: ImageInput | Sequence[ImageInput], *, batch_size: int = 1,
                 keep_images: bool = True) -> Prediction | list[Prediction]:
        items, single = _expand(inputs)
        preds = list(self._run(items, batch_size, keep_images))
        return preds[0] if single else preds

    def predict_iter(self, inputs: ImageInput | Sequence[ImageInput], *, batch_size: int = 1,
                     keep_images: bool = True) -> Iterator[Prediction]:
        """Like calling the predictor, but yields the predictions one by one as batches finish
        (memory stays bounded on large folders)."""
        items, _ = _expand(inputs)
        return self._run(items, batch_size, keep_images)

    def predict_arrays(self, arrays: Sequence[np.ndarray], sources: Sequence[str], *, first_index: int = 0,
                       keep_images: bool = True) -> list[Prediction]:
        """One batch of already decoded ``(H, W, 3)`` uint8 RGB images (video frames, uploads)."""
        for k, a in enumerate(arrays):
            _check_array(a, sources[k])
        items = [(s, lambda a=a: a) for s, a in zip(sources, arrays)]
        return list(self._run(items, max(1, len(items)), keep_images, first_index=first_index))

    def predict_video(self, source: str | os.PathLike, out_dir: str | os.PathLike, **kw: Any):
        """``instseg.video.predict_video(self, source, out_dir, **kw)``: an annotated video and one
        JSON line per frame (needs the ``video`` extra, PyAV)."""
        from instseg.video import predict_video

        return predict_video(self, source, out_dir, **kw)

    def _run(self, items: list[tuple[str, Callable[[], np.ndarray]]], batch_size: int, keep_images: bool,
             first_index: int = 0) -> Iterator[Prediction]:
        from instseg.data.collate import collate
        from instseg.engine.inference import image_sample, predict_dataset

        if int(batch_size) < 1:
            raise PredictorError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(items), int(batch_size)):
            chunk = items[start : start + int(batch_size)]
            arrays = [read() for _, read in chunk]
            samples = [image_sample(a, first_index + start + k, src, self.transforms)
                       for k, (a, (src, _)) in enumerate(zip(arrays, chunk))]
            batch = collate(samples, size_divisor=self.cfg.data.size_divisor)
            with self._lock:  # one model call at a time: the model and its buffers are shared
                out = predict_dataset(self.model, [batch], self.device)
            for arr, (meta, dets) in zip(arrays, out):
                yield Prediction(
                    source=meta.file_name, index=meta.image_id, image_size=tuple(int(v) for v in arr.shape[:2]),
                    boxes=dets.boxes.float().numpy(), scores=dets.scores.float().numpy(),
                    labels=dets.labels.long().numpy(), masks=None if dets.masks is None else dets.masks.bool().numpy(),
                    classes=self.classes, cat_ids=self.cat_ids, image=arr if keep_images else None,
                )
