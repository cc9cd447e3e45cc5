"""Prediction over a data loader and COCO evaluation of a model on a data set."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from instseg.structures import Detections


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def predict_dataset(
    model: nn.Module,
    loader,
    device: str | torch.device | None = None,
    *,
    progress: bool = False,
    left_out: list | None = None,
    amp: torch.dtype | None = None,
) -> list:
    """Runs ``model.predict`` over ``loader``; returns ``[(ImageMeta, Detections on CPU), ...]``.

    ``loader`` yields ``(ImageBatch, targets, metas)`` as ``instseg.data.build_test_loader`` does,
    or ``(ImageBatch | None, targets, metas, [LeftOut, ...])`` as the loader of :func:`evaluate`
    does; the images left out are appended to ``left_out``.  ``amp``: autocast dtype
    (``instseg.engine.amp``), ``None`` = float32; the detections come back in float32.
    """
    from instseg.engine.amp import autocast

    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    out: list[tuple[Any, Detections]] = []
    bar = None
    if progress:
        from tqdm import tqdm
        import sys

        bar = tqdm(total=len(loader), desc="predict", leave=False, disable=not sys.stderr.isatty())
    try:
        with torch.inference_mode():
            for item in loader:
                batch, _targets, metas = item[:3]
                if len(item) > 3 and left_out is not None:
                    left_out.extend(item[3])
                if batch is None:  # every image of this batch was left out
                    if bar is not None:
                        bar.update(1)
                    continue
                with autocast(device, amp):
                    dets = model.predict(batch.to(device))
                if amp is not None:
                    dets = [_float32(d) for d in dets]
                if len(dets) != len(metas):
                    raise RuntimeError(f"model.predict returned {len(dets)} results for {len(metas)} images")
                out.extend((meta, d.to("cpu")) for meta, d in zip(metas, dets))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out


def _float32(d: Detections) -> Detections:
    """Detections with float32 boxes and scores (autocast may leave them in half precision)."""
    return Detections(d.boxes.float(), d.scores.float(), d.labels, d.masks)


@dataclass
class LeftOut:
    """An image evaluation had to leave out (unreadable file, size differing from the JSON, ...)."""

    image_id: int
    file_name: str
    reason: str

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "file_name": self.file_name, "reason": self.reason}


class LeaveOutBadImages(torch.utils.data.Dataset):
    """Wraps an evaluation dataset: an image whose loading raises ``DataError`` becomes a
    :class:`LeftOut` record instead of ending the evaluation (see :func:`collate_leaving_out`)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from instseg.data import DataError

        try:
            return self.dataset[i]
        except DataError as e:
            info = self.dataset.image_info(i) if hasattr(self.dataset, "image_info") else {}
            return LeftOut(int(info.get("id", -1)), str(info.get("file_name", i)), str(e))


def collate_leaving_out(items: list, size_divisor: int = 32):
    """``collate`` of the good samples, plus the :class:`LeftOut` records of the others:
    ``(ImageBatch | None, targets, metas, left_out)``."""
    from instseg.data.collate import collate

    good = [x for x in items if not isinstance(x, LeftOut)]
    left = [x for x in items if isinstance(x, LeftOut)]
    if not good:
        return None, [], [], left
    batch, targets, metas = collate(good, size_divisor=size_divisor)
    return batch, targets, metas, left


@dataclass
class EvalOutcome:
    """What :func:`run_evaluation` found: the flat COCO metrics and the images it left out."""

    metrics: dict[str, float]
    left_out: list[LeftOut] = field(default_factory=list)
    num_images: int = 0


def evaluate(
    model: nn.Module,
    dataset,
    cfg,
    out_dir: str | Path | None,
    *,
    cat_ids: Sequence[int] | None = None,
    loader=None,
    verbose: bool = True,
    confusion_score_thr: float = 0.3,
) -> dict[str, float]:
    """COCO-evaluates ``model`` on ``dataset`` (bbox, plus segm when the model returns masks).

    Detections' contiguous labels are mapped to COCO category ids with ``cat_ids`` (default:
    ``dataset.cat_ids``; pass the checkpoint's ids when the data set is a different one).
    ``evaluate_coco`` writes ``results.json``, ``metrics.json``, ``summary.txt`` and the per-class /
    precision-recall / confusion reports to ``out_dir``.  See :func:`run_evaluation` for images
    that cannot be read.
    """
    return run_evaluation(
        model, dataset, cfg, out_dir, cat_ids=cat_ids, loader=loader, verbose=verbose,
        confusion_score_thr=confusion_score_thr,
    ).metrics


def run_evaluation(
    model: nn.Module,
    dataset,
    cfg,
    out_dir: str | Path | None,
    *,
    cat_ids: Sequence[int] | None = None,
    loader=None,
    verbose: bool = True,
    confusion_score_thr: float = 0.3,
    amp: torch.dtype | None = None,
) -> EvalOutcome:
    """:func:`evaluate`, returning the images left out too.

    An image that cannot be loaded (``DataError``: missing, truncated or corrupt file, size
    differing from the JSON) is left out with a ``DataWarning`` naming it, and the evaluation goes
    on over the others (COCOeval then sees only the images evaluated); ``metrics.json`` lists the
    images left out under ``images_left_out``.  With ``cfg.data.strict`` the ``DataError`` is
    raised instead.  ``amp``: autocast dtype of the forward passes (``None`` = float32).

    Distributed (a process group of N > 1, e.g. under ``torchrun``): rank ``r`` predicts images
    ``r, r + N, ...``; the predictions are gathered in the data set's order, rank 0 computes the
    metrics (and writes ``out_dir``) once, and every rank returns them.  The metrics equal a
    single-process evaluation's: each image's detections do not depend on the others.  A custom
    ``loader`` is not sharded (every rank runs it whole).
    """
    from instseg.engine import distributed as dist_utils

    max_dets = int(cfg.data.max_dets)
    if int(cfg.model.max_per_img) < max_dets:
        warnings.warn(
            f"model.max_per_img={cfg.model.max_per_img} < data.max_dets={max_dets}: COCO AP at "
            f"maxDets={max_dets} is computed from at most {cfg.model.max_per_img} detections per image",
            stacklevel=2,
        )
    sharded = loader is None and dist_utils.get_world_size() > 1
    if loader is None:
        source = dataset if cfg.data.strict else LeaveOutBadImages(dataset)
        if sharded:
            source = torch.utils.data.Subset(source, dist_utils.shard(len(dataset)))
        if cfg.data.strict:
            from instseg.data import build_test_loader

            loader = build_test_loader(cfg.data, source, batch_size=1)
        else:
            loader = torch.utils.data.DataLoader(
                source,
                batch_size=1,
                shuffle=False,
                collate_fn=partial(collate_leaving_out, size_divisor=cfg.data.size_divisor),
                num_workers=cfg.data.num_workers,
            )
    cat_ids = list(dataset.cat_ids if cat_ids is None else cat_ids)
    left_out: list[LeftOut] = []
    preds = predict_dataset(model, loader, progress=dist_utils.is_main(), left_out=left_out, amp=amp)
    if not sharded:
        return _score(preds, left_out, dataset, cfg, out_dir, cat_ids, verbose, confusion_score_thr)
    # every rank's predictions to rank 0, back in the data set's order (so results.json and COCOeval
    # see exactly what one process would); rank 0 scores them once and every rank gets the outcome
    gathered = dist_utils.all_gather_object((preds, left_out))
    outcome = None
    if dist_utils.is_main():
        order = {int(i): k for k, i in enumerate(getattr(dataset, "image_ids", []))}
        all_preds = sorted((x for p, _ in gathered for x in p), key=lambda md: order.get(int(md[0].image_id), -1))
        all_left = sorted((x for _, lo in gathered for x in lo), key=lambda x: order.get(int(x.image_id), -1))
        outcome = _score(all_preds, all_left, dataset, cfg, out_dir, cat_ids, verbose, confusion_score_thr)
    return dist_utils.broadcast_object(outcome)


def _score(
    preds: list, left_out: list[LeftOut], dataset, cfg, out_dir: str | Path | None, cat_ids: list[int],
    verbose: bool, confusion_score_thr: float,
) -> EvalOutcome:
    """COCO (or proposal recall) metrics of ``[(meta, detections), ...]``; writes ``out_dir``."""
    from instseg.data import DataWarning
    from instseg.evaluation.coco import detections_to_coco, evaluate_coco

    max_dets = int(cfg.data.max_dets)
    for item in left_out:
        warnings.warn(f"evaluation leaves out image {item.file_name} (id {item.image_id}): {item.reason}",
                      DataWarning, stacklevel=2)
    if getattr(cfg.model, "arch", "") == "rpn":  # proposals: recall (AR@100/300/1000, by size), as mmdet
        from instseg.evaluation.proposals import evaluate_proposal_predictions

        metrics = evaluate_proposal_predictions(
            dataset.coco, [(m.image_id, d.boxes.numpy(), d.scores.numpy()) for m, d in preds],
            out_dir=out_dir, category_id=cat_ids[0] if cat_ids else None, verbose=verbose,
        )
        if out_dir is not None:
            record = {**metrics, "images_evaluated": len(preds), "images_left_out": [x.as_dict() for x in left_out]}
            (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        return EvalOutcome(metrics, left_out, len(preds))
    results: list[dict] = []
    has_masks = False
    for meta, dets in preds:
        has_masks = has_masks or dets.masks is not None
        results.extend(detections_to_coco(dets, meta.image_id, cat_ids))
    iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    image_ids = [meta.image_id for meta, _ in preds]
    metrics = evaluate_coco(
        dataset.coco, results, iou_types=iou_types, max_dets=max_dets, out_dir=out_dir, image_ids=image_ids,
        verbose=verbose, confusion_score_thr=confusion_score_thr,
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    if out_dir is not None:
        record = {**metrics, "images_evaluated": len(image_ids),
                  "images_left_out": [x.as_dict() for x in left_out]}
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return EvalOutcome(metrics, left_out, len(image_ids))


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The metric used to pick ``best.pt``: segm_AP when masks were evaluated, else bbox_AP
    (AR@1000 for proposal models)."""
    for key in ("segm_AP", "bbox_AP", "AR@1000"):
        if key in metrics:
            return key
    return None


def format_metrics(metrics: dict[str, float]) -> str:
    """A small AP table: one row per IoU type, columns AP, AP50, AP75, APs, APm, APl (for
    proposal models the AR table of ``instseg.evaluation.proposals``)."""
    if any(k.startswith("AR@") for k in metrics):
        from instseg.evaluation.proposals import format_proposal_summary

        return format_proposal_summary(metrics)
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    types = [t for t in ("bbox", "segm") if any(k.startswith(t + "_") for k in metrics)]
    lines = [f"{'':6s}" + "".join(f"{c:>8s}" for c in cols)]
    for t in types:
        row = f"{t:6s}"
        for c in cols:
            v = metrics.get(f"{t}_{c}")
            row += f"{100 * v:8.1f}" if isinstance(v, (int, float)) and v >= 0 else f"{'-':>8s}"
        lines.append(row)
    return "\n".join(lines)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in the given folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image file or folder not found: {p}")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Plain image files as ``Sample`` objects (no annotations), through the test transforms.

    Image ids are the positions in ``files`` (0, 1, ...); ``meta.file_name`` is the path.
    """

    def __init__(self, files: Sequence[str | Path], data_cfg) -> None:
        from instseg.data.transforms import build_transforms

        self.files = [Path(f) for f in files]
        self.transforms = build_transforms(data_cfg, train=False)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int):
        from instseg.data.coco import load_rgb

        return load_rgb(self.files[i])

    def __getitem__(self, i: int):
        return image_sample(self.load_image(i), i, str(self.files[i]), self.transforms)


def image_sample(arr, image_id: int, file_name: str, transforms):
    """An un-annotated ``(H, W, 3)`` uint8 RGB array as a ``Sample`` passed through ``transforms``
    (the test transforms, or ``raw_transforms()`` for TTA): what every prediction path feeds the
    model, so files, arrays, video frames and uploads are preprocessed alike."""
    from instseg.data.coco import ImageMeta, Sample
    from instseg.structures import ImageTargets

    h, w = int(arr.shape[0]), int(arr.shape[1])
    image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    targets = ImageTargets(boxes=torch.zeros((0, 4)), labels=torch.zeros((0,), dtype=torch.int64))
    meta = ImageMeta(int(image_id), str(file_name), (h, w), (h, w), (1.0, 1.0), False)
    return transforms(Sample(image=image, targets=targets, meta=meta))
