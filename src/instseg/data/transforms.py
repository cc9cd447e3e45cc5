"""Sample -> Sample transforms: image, boxes, crowd boxes, masks and semantic map move together.

YOLACT's extra train-time augmentations (photometric, expand, random crop, small-box filter) live in
``instseg.data.augment``; ``build_transforms`` places them around Resize/RandomFlip by name.

Random transforms draw from ``sample.generator`` when the dataset attached one (seeded from
``(seed, epoch, index)``, see ``CocoDataset.set_epoch``), else from their own generator (``seed`` /
``generator`` argument), else from torch's global generator.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from instseg.config.schema import DataConfig
from instseg.data.augment import build_augmentation
from instseg.data.coco import Sample
from instseg.ops.boxes import flip_boxes

Transform = Callable[[Sample], Sample]


class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __iter__(self):
        return iter(self.transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """mmcv's keep-ratio rule: ``f = min(long / max(h, w), short / min(h, w))``.

    Returns ``((new_w, new_h), f)`` with ``new = int(old * f + 0.5)``.
    """
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return (int(w * f + 0.5), int(h * f + 0.5)), f


def _pick_generator(sample: Sample, own: torch.Generator | None) -> torch.Generator | None:
    return sample.generator if sample.generator is not None else own


def resize_nearest(label_map: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of a 2-D label map: new pixel ``(i, j)`` takes old ``(floor(i * H / H'),
    floor(j * W / W'))`` computed in float64, i.e. cv2's ``INTER_NEAREST`` (what mmdet uses) and
    exactly what ``CroppedMasks.resize`` does, so maps and masks stay pixel-aligned.  (Like
    ``F.interpolate(mode='nearest')`` up to float32 rounding at a few rows.)"""
    h, w = label_map.shape[-2:]
    nh, nw = size
    sy = (torch.arange(nh, dtype=torch.float64) * (h / nh)).floor().long().clamp_(max=h - 1)
    sx = (torch.arange(nw, dtype=torch.float64) * (w / nw)).floor().long().clamp_(max=w - 1)
    return label_map[..., sy, :][..., sx]


class Resize:
    """Keep-ratio resize to ``scale = (long, short)``, exactly as mmdet's ``Resize(keep_ratio=True)``.

    With ``short_range=(lo, hi)`` the short side is drawn uniformly from the integers ``lo..hi`` per
    call and the long side capped at ``scale[0]`` (mmdet's multiscale 'range' mode).

    With ``keep_ratio=False`` the image is squashed to exactly ``scale = (w, h)``, i.e. output size
    ``(h, w) = (scale[1], scale[0])`` whatever its aspect ratio (mmdet's
    ``Resize(scale=(550, 550), keep_ratio=False)``, YOLACT's 550x550 input); ``meta.scale_factor``
    then holds two different per-axis factors, which is all that is needed to map boxes back.

    The image is resized with ``F.interpolate(mode='bilinear', align_corners=False,
    antialias=False)`` on float values, then rounded and clamped to 0..255: this mimics cv2's
    ``INTER_LINEAR`` on uint8 images (what mmcv uses), up to +-1 rounding at a few pixels.  Boxes
    are scaled per axis and clipped to the new image; masks are resized nearest
    (``CroppedMasks.resize``); the semantic map nearest with the same rule (``resize_nearest``).
    """

    def __init__(
        self,
        scale: tuple[int, int],
        short_range: tuple[int, int] | None = None,
        seed: int | None = None,
        keep_ratio: bool = True,
    ) -> None:
        self.scale = (int(scale[0]), int(scale[1]))
        if short_range is not None and (short_range[0] <= 0 or short_range[1] < short_range[0]):
            raise ValueError(f"short_range must be (lo, hi) with 0 < lo <= hi, got {short_range}")
        if not keep_ratio and short_range is not None:
            raise ValueError("short_range (multiscale training) needs keep_ratio=True; a squash resize has a fixed size")
        if not keep_ratio and min(self.scale) <= 0:
            raise ValueError(f"keep_ratio=False needs a positive scale (w, h), got {self.scale}")
        self.keep_ratio = bool(keep_ratio)
        self.short_range = None if short_range is None else (int(short_range[0]), int(short_range[1]))
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, short_range={self.short_range}, keep_ratio={self.keep_ratio})"

    def target_scale(self, sample: Sample) -> tuple[int, int]:
        if self.short_range is None:
            return self.scale
        lo, hi = self.short_range
        short = int(torch.randint(lo, hi + 1, (1,), generator=_pick_generator(sample, self.generator)))
        return (self.scale[0], short)

    def __call__(self, sample: Sample) -> Sample:
        h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
        if self.keep_ratio:
            (nw, nh), _ = rescale_size(w, h, self.target_scale(sample))
        else:
            nw, nh = self.scale
        return resize_sample(sample, (nw, nh))


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Deterministic resize of a sample to ``size = (w, h)``: image bilinear (see ``Resize``), boxes
    scaled per axis and clipped, masks and semantic map nearest; ``meta.scale_factor`` updated."""
    h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
    nw, nh = int(size[0]), int(size[1])
    if nw <= 0 or nh <= 0:
        raise ValueError(f"resize size must be positive (w, h), got {size}")
    sx, sy = nw / w, nh / h
    image = sample.image
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)[0]
        image = image.round_().clamp_(0, 255)
    t = sample.targets
    boxes = _scale_boxes(t.boxes, sx, sy, nw, nh)
    crowd = None if t.crowd_boxes is None else _scale_boxes(t.crowd_boxes, sx, sy, nw, nh)
    masks = None if t.masks is None else t.masks.resize((nh, nw))
    semantic = t.semantic
    if semantic is not None and semantic.shape[-2:] != (nh, nw):
        semantic = resize_nearest(semantic, (nh, nw))
    m = sample.meta
    osx, osy = m.scale_factor
    meta = replace(m, image_size=(nh, nw), scale_factor=(osx * sx, osy * sy))
    targets = replace(t, boxes=boxes, masks=masks, semantic=semantic, crowd_boxes=crowd)
    return replace(sample, image=image, targets=targets, meta=meta)


def _scale_boxes(boxes: Tensor, sx: float, sy: float, w: int, h: int) -> Tensor:
    """XYXY boxes scaled per axis and clipped to a ``w x h`` image."""
    out = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


class RandomFlip:
    """Horizontal flip with probability ``prob``: ``x -> W - x`` for boxes and crowd boxes (x1, x2
    swapped), masks, semantic map and image; toggles ``meta.flipped``."""

    def __init__(self, prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip prob must be in [0, 1], got {prob}")
        self.prob = float(prob)
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"

    def __call__(self, sample: Sample) -> Sample:
        if self.prob <= 0.0:
            return sample
        u = float(torch.rand((), generator=_pick_generator(sample, self.generator)))
        if u >= self.prob:
            return sample
        return flip_sample(sample)


def flip_sample(sample: Sample) -> Sample:
    """Deterministic horizontal flip of a sample."""
    w = int(sample.image.shape[-1])
    t = sample.targets
    targets = replace(
        t,
        boxes=flip_boxes(t.boxes, w),
        masks=None if t.masks is None else t.masks.flip_horizontal(),
        semantic=None if t.semantic is None else t.semantic.flip(-1),
        crowd_boxes=None if t.crowd_boxes is None else flip_boxes(t.crowd_boxes, w),
    )
    meta = replace(sample.meta, flipped=not sample.meta.flipped)
    return replace(sample, image=sample.image.flip(-1), targets=targets, meta=meta)


class Normalize:
    """``(image - mean) / std`` per RGB channel (defaults: mmdet's ImageNet statistics)."""

    def __init__(
        self,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        self.mean = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"

    def __call__(self, sample: Sample) -> Sample:
        return replace(sample, image=(sample.image.float() - self.mean) / self.std)


def build_transforms(cfg: DataConfig, train: bool) -> Compose:
    """Train: ``data.train_pipeline`` augmentations + Resize(scale, short_range if set, keep_ratio)
    + RandomFlip(flip_prob) + ``data.train_pipeline_post`` augmentations + Normalize; test: Resize
    (same ``keep_ratio``: YOLACT also infers on the squashed image) + Normalize.

    Augmentation names are those of ``instseg.data.augment.AUGMENTATIONS`` (an unknown one is a
    ``ValueError`` listing them); they are checked for the test transforms too, so a bad config
    fails at once.  The official YOLACT order is ``train_pipeline = (photometric_yolact, expand,
    crop_yolact)``; mmdet's is ``(filter_small, expand, crop_mmdet)`` with
    ``train_pipeline_post = (photometric_mmdet,)``.
    """
    pre = [build_augmentation(n, cfg.mean, scale=tuple(cfg.scale)) for n in cfg.train_pipeline]
    post = [build_augmentation(n, cfg.mean, scale=tuple(cfg.scale)) for n in cfg.train_pipeline_post]
    short_range = tuple(cfg.train_short_range)
    use_range = train and short_range != (0, 0)
    resize = Resize(tuple(cfg.scale), short_range if use_range else None, keep_ratio=cfg.keep_ratio)
    # a scale-jitter augmentation (``lsj``) is the training resize itself: a Resize after it
    # would undo the jitter
    jitter_resizes = train and any(getattr(t, "replaces_resize", False) for t in pre)
    ts: list[Transform] = (pre if train else []) + ([] if jitter_resizes else [resize])
    if train and cfg.flip_prob > 0:
        ts.append(RandomFlip(cfg.flip_prob))
    if train:
        ts.extend(post)
    ts.append(Normalize(cfg.mean, cfg.std))
    return Compose(ts)
