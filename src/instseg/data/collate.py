"""Batching: pad images to a common size that is a multiple of ``size_divisor``."""

from __future__ import annotations

from dataclasses import replace

import torch

from instseg.data.coco import ImageMeta, Sample
from instseg.structures.instances import IGNORE_LABEL, ImageBatch, ImageTargets


def _round_up(v: int, d: int) -> int:
    return ((v + d - 1) // d) * d if d > 1 else v


def collate(samples: list[Sample], size_divisor: int = 32) -> tuple[ImageBatch, list[ImageTargets], list[ImageMeta]]:
    """Stacks samples into an ``ImageBatch`` (+ per-image targets and metas).

    Images are zero-padded at the bottom/right to the largest height/width in the batch rounded up
    to a multiple of ``size_divisor``; semantic maps are padded with 255 (ignore) to the same padded
    size; instance masks keep ``frame`` = the un-padded image ``(h, w)``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    hp = _round_up(max(int(s.image.shape[-2]) for s in samples), size_divisor)
    wp = _round_up(max(int(s.image.shape[-1]) for s in samples), size_divisor)
    images = samples[0].image.new_zeros((len(samples), 3, hp, wp))
    targets: list[ImageTargets] = []
    for k, s in enumerate(samples):
        h, w = s.image.shape[-2:]
        images[k, :, :h, :w] = s.image
        t = s.targets
        if t.semantic is not None:
            sem = torch.full((hp, wp), IGNORE_LABEL, dtype=t.semantic.dtype)
            sem[: t.semantic.shape[0], : t.semantic.shape[1]] = t.semantic
            t = replace(t, semantic=sem)
        targets.append(t)
    metas = [s.meta for s in samples]
    batch = ImageBatch(
        images=images,
        image_sizes=[tuple(int(v) for v in m.image_size) for m in metas],
        original_sizes=[tuple(int(v) for v in m.original_size) for m in metas],
        scale_factors=torch.tensor([list(m.scale_factor) for m in metas], dtype=torch.float32).reshape(-1, 2),
        image_ids=[int(m.image_id) for m in metas],
        flipped=[bool(m.flipped) for m in metas],
    )
    return batch, targets, metas
