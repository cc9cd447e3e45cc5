"""Datasets and loaders from a ``DataConfig``."""

from __future__ import annotations

from functools import partial

import torch

from torch.utils.data import DataLoader, Dataset

from instseg.config.schema import DataConfig
from instseg.data.coco import CocoDataset, DataError, SkipBadSamples
from instseg.data.collate import collate
from instseg.data.samplers import GroupedBatchSampler
from instseg.data.transforms import build_transforms

SEMANTIC_MODES = ("stuff", "derive", "none")


def build_dataset(
    cfg: DataConfig, split: str, *, semantic: str = "none", num_semantic_classes: int | None = None
) -> CocoDataset:
    """The ``'train'`` or ``'val'`` dataset of ``cfg`` with its transforms.

    ``semantic``: ``'stuff'`` reads maps from ``cfg.train_stuff`` / ``cfg.val_stuff``; ``'derive'``
    builds things-only maps from the instances (``num_classes + 1`` classes, see ``CocoDataset``);
    ``'none'`` gives no semantic targets.  The train split drops images without instances (mmdet's
    ``filter_empty_gt``) and uses the random train transforms; val keeps every image.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if semantic not in SEMANTIC_MODES:
        raise ValueError(f"semantic must be one of {SEMANTIC_MODES}, got {semantic!r}")
    held_out = uses_holdout(cfg)
    files = "train" if held_out else split  # a held-out val split is read from the training files
    ann = getattr(cfg, f"{files}_ann")
    images = getattr(cfg, f"{files}_images")
    if not ann:
        raise DataError(f"data.{split}_ann is empty: set it to a COCO instances JSON file")
    if not images:
        raise DataError(f"data.{split}_images is empty: set it to the folder of the {split} images")
    stuff = None
    if semantic == "stuff":
        stuff = getattr(cfg, f"{files}_stuff")
        if not stuff:
            raise DataError(
                f"data.{files}_stuff is empty but semantic targets 'stuff' were requested: set "
                f"data.{split}_stuff to a folder of COCO-Stuff-style PNG maps, or set "
                "model.semantic_targets=derive (things-only maps from the instances) or none"
            )
    train = split == "train"
    transforms = build_transforms(cfg, train=train)
    ds = CocoDataset(
        ann,
        images,
        stuff_dir=stuff,
        transforms=transforms,
        filter_empty=train,
        strict=cfg.strict,
        semantic_from_instances=semantic == "derive",
        num_semantic_classes=num_semantic_classes,
    )
    if held_out:
        train_ids, val_ids = holdout_split(ds.all_image_ids(), cfg.val_fraction, cfg.split_seed)
        ds.restrict(train_ids if train else val_ids)
        if len(ds) == 0:
            raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no {split} images of {ann}")
    for t in transforms:  # copy-paste draws its donors from the dataset it augments
        if hasattr(t, "bind_dataset"):
            t.bind_dataset(ds)
    return ds


def uses_holdout(cfg: DataConfig) -> bool:
    """Whether the validation split is held out of the training images (``data.val_fraction``)."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction > 0 and cfg.val_ann:
        raise DataError(
            f"data.val_fraction={cfg.val_fraction} and data.val_ann={cfg.val_ann} are both set: "
            "use a separate validation file or a held-out fraction of the training images, not both"
        )
    return cfg.val_fraction > 0


def holdout_split(image_ids: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Splits image ids into (train, val): ``round(fraction * n)`` ids (at least 1) chosen by a
    seeded permutation of the sorted ids, so the split depends only on the ids, ``fraction`` and
    ``seed`` (not on the JSON's order).  Both lists keep the input order."""
    ids = sorted(int(i) for i in image_ids)
    num_val = max(1, round(fraction * len(ids)))
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(int(seed))).tolist()
    val = {ids[k] for k in perm[:num_val]}
    return [i for i in image_ids if i not in val], [i for i in image_ids if i in val]


def build_train_loader(
    cfg: DataConfig,
    dataset: Dataset,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The loader of one training epoch: aspect-ratio grouped shuffled batches, deterministic in
    ``(seed, epoch)``; ``start_batch`` skips the batches already done (resume).  Bad images are
    skipped with a warning (``SkipBadSamples``) unless ``cfg.strict``.  Build one per epoch.

    Distributed: ``cfg.batch_size`` images per process; process ``rank`` of ``world_size`` gets its
    slice of each total batch (``GroupedBatchSampler``)."""
    base = dataset.dataset if isinstance(dataset, SkipBadSamples) else dataset
    if hasattr(base, "set_epoch"):
        base.set_epoch(epoch, seed=seed)
    ds = base if cfg.strict else SkipBadSamples(base)
    sampler = GroupedBatchSampler(
        base.aspect_ratios(), cfg.batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
    )
    sampler.set_epoch(epoch, start_batch=start_batch)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=partial(collate, size_divisor=cfg.size_divisor),
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )


def build_test_loader(cfg: DataConfig, dataset: Dataset, batch_size: int = 1) -> DataLoader:
    """Sequential loader over every image (no skipping: evaluation must see them all)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate, size_divisor=cfg.size_divisor),
        num_workers=cfg.num_workers,
    )
