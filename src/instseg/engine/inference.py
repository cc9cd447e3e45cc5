"""Prediction over a data loader and COCO evaluation of a model on a data set."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instseg.structures import Detections


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def predict_dataset(model: nn.Module, loader, device: str | torch.device | None = None, *, progress: bool = False) -> list:
    """Runs ``model.predict`` over ``loader``; returns ``[(ImageMeta, Detections on CPU), ...]``.

    ``loader`` yields ``(ImageBatch, targets, metas)`` as ``instseg.data.build_test_loader`` does.
    """
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
            for batch, _targets, metas in loader:
                dets = model.predict(batch.to(device))
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


def evaluate(
    model: nn.Module,
    dataset,
    cfg,
    out_dir: str | Path | None,
    *,
    cat_ids: Sequence[int] | None = None,
    loader=None,
    verbose: bool = True,
) -> dict[str, float]:
    """COCO-evaluates ``model`` on ``dataset`` (bbox, plus segm when the model returns masks).

    Detections' contiguous labels are mapped to COCO category ids with ``cat_ids`` (default:
    ``dataset.cat_ids``; pass the checkpoint's ids when the data set is a different one).
    ``evaluate_coco`` writes ``results.json``, ``metrics.json`` and ``summary.txt`` to ``out_dir``.
    """
    from instseg.data import build_test_loader
    from instseg.evaluation.coco import detections_to_coco, evaluate_coco

    max_dets = int(cfg.data.max_dets)
    if int(cfg.model.max_per_img) < max_dets:
        warnings.warn(
            f"model.max_per_img={cfg.model.max_per_img} < data.max_dets={max_dets}: COCO AP at "
            f"maxDets={max_dets} is computed from at most {cfg.model.max_per_img} detections per image",
            stacklevel=2,
        )
    if loader is None:
        loader = build_test_loader(cfg.data, dataset, batch_size=1)
    cat_ids = list(dataset.cat_ids if cat_ids is None else cat_ids)
    preds = predict_dataset(model, loader, progress=True)
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
        verbose=verbose,
    )
    return {k: float(v) for k, v in metrics.items()}


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The metric used to pick ``best.pt``: segm_AP when masks were evaluated, else bbox_AP."""
    for key in ("segm_AP", "bbox_AP"):
        if key in metrics:
            return key
    return None


def format_metrics(metrics: dict[str, float]) -> str:
    """A small AP table: one row per IoU type, columns AP, AP50, AP75, APs, APm, APl."""
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
        from instseg.data.coco import ImageMeta, Sample
        from instseg.structures import ImageTargets

        arr = self.load_image(i)
        h, w = int(arr.shape[0]), int(arr.shape[1])
        image = torch.from_numpy(arr).permute(2, 0, 1).float()
        targets = ImageTargets(boxes=torch.zeros((0, 4)), labels=torch.zeros((0,), dtype=torch.int64))
        meta = ImageMeta(i, str(self.files[i]), (h, w), (h, w), (1.0, 1.0), False)
        return self.transforms(Sample(image=image, targets=targets, meta=meta))
