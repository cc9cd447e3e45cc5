"""Geometric train-time augmentations for data without a preferred orientation or scale
(microscopy, aerial, industrial images): vertical flip, 90-degree rotations, large-scale jitter.

Like the rest of ``instseg.data.augment`` they are ``Sample -> Sample`` transforms that move the
image, boxes, crowd boxes, ``CroppedMasks`` and the semantic map together and draw every random
number from ``sample.generator`` (seeded per ``(seed, epoch, index)``), so a resumed run sees
bit-identical data.  The image ops are ``torchvision.transforms.v2.functional``'s where one fits.

Boxes: flips and rotations map box corners exactly, so a box that was the tight box of its mask
stays the tight box of the moved mask.  Large-scale jitter resizes and crops; there the boxes are
re-fitted to the transformed masks (as copy-paste's reference implementation computes boxes from
masks), and instances whose mask vanished are dropped with their box and label.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from instseg.data.augment import _coin, _RandomTransform, _SometimesTransform, _uniform, crop_sample, select_instances
from instseg.data.coco import Sample
from instseg.ops.boxes import flip_boxes
from instseg.structures.instances import ImageTargets


def _rot90_boxes(boxes: Tensor, width: int) -> Tensor:
    """One counter-clockwise quarter turn of XYXY boxes in a ``width`` pixels wide image:
    ``(x1, y1, x2, y2) -> (y1, W - x2, y2, W - x1)``."""
    return torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1).reshape(-1, 4)


def vflip_sample(sample: Sample) -> Sample:
    """Deterministic vertical flip of a sample (``meta.flipped`` stays the horizontal-flip flag)."""
    h = int(sample.image.shape[-2])
    t = sample.targets
    targets = replace(
        t,
        boxes=flip_boxes(t.boxes, h, vertical=True),
        masks=None if t.masks is None else t.masks.flip_vertical(),
        semantic=None if t.semantic is None else t.semantic.flip(-2),
        crowd_boxes=None if t.crowd_boxes is None else flip_boxes(t.crowd_boxes, h, vertical=True),
    )
    return replace(sample, image=TF.vertical_flip(sample.image), targets=targets)


def rot90_sample(sample: Sample, k: int) -> Sample:
    """Deterministic rotation by ``k`` counter-clockwise quarter turns (``torch.rot90`` convention);
    an odd ``k`` swaps the image's height and width."""
    k = int(k) % 4
    if k == 0:
        return sample
    image = sample.image
    t = sample.targets
    boxes, crowd = t.boxes, t.crowd_boxes
    h, w = int(image.shape[-2]), int(image.shape[-1])
    for _ in range(k):
        boxes = _rot90_boxes(boxes, w)
        crowd = None if crowd is None else _rot90_boxes(crowd, w)
        h, w = w, h
    targets = replace(
        t,
        boxes=boxes,
        masks=None if t.masks is None else t.masks.rot90(k),
        semantic=None if t.semantic is None else torch.rot90(t.semantic, k, dims=(-2, -1)).contiguous(),
        crowd_boxes=crowd,
    )
    meta = replace(sample.meta, image_size=(h, w))
    return replace(sample, image=torch.rot90(image, k, dims=(-2, -1)).contiguous(), targets=targets, meta=meta)


class RandomVerticalFlip(_SometimesTransform):
    """Vertical flip with probability ``prob``."""

    def apply(self, sample: Sample) -> Sample:
        return vflip_sample(sample)


class RandomRot90(_RandomTransform):
    """A rotation by 0, 90, 180 or 270 degrees, each with probability 1/4.  With a horizontal flip
    after it, this covers all eight symmetries of the square (the dihedral group D4)."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)

    def __repr__(self) -> str:
        return "RandomRot90()"

    def __call__(self, sample: Sample) -> Sample:
        g = self._gen(sample)
        k = 2 * int(_coin(g)) + int(_coin(g))
        return rot90_sample(sample, k)


def refit_boxes(targets: ImageTargets) -> ImageTargets:
    """Boxes := tight boxes of the masks; instances whose mask is empty are dropped."""
    if targets.masks is None:
        return targets
    targets = select_instances(targets, targets.masks.nonempty())
    return replace(targets, boxes=targets.masks.boxes().to(targets.boxes.dtype))


class LargeScaleJitter(_RandomTransform):
    """Large-scale jitter (Ghiasi et al., "Simple Copy-Paste", CVPR 2021; Du et al. 2021).

    The image is first sized to fit ``scale = (long, short)`` as the keep-ratio ``Resize`` would
    (output ``bw x bh``), then scaled again by ``r ~ U(ratio_range)`` (the paper's 0.1 to 2.0); when
    the result is larger than ``bw x bh`` in a dimension, a random ``min(w, bw) x min(h, bh)``
    window of it is kept.  Smaller results are left as they are (the batch collate pads them), so
    the network sees objects from a tenth to twice their usual size.  Boxes are re-fitted to the
    masks; instances without a pixel left are dropped.  This transform *is* the training resize:
    ``build_transforms`` leaves out its own Resize when it is in ``data.train_pipeline``.
    """

    replaces_resize = True

    def __init__(
        self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.1, 2.0), seed: int | None = None
    ) -> None:
        super().__init__(seed)
        if not 0.0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (lo, hi) with 0 < lo <= hi, got {ratio_range}")
        if min(scale) <= 0:
            raise ValueError(f"scale must be a positive (long, short), got {scale}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def __repr__(self) -> str:
        return f"LargeScaleJitter(scale={self.scale}, ratio_range={self.ratio_range})"

    def __call__(self, sample: Sample) -> Sample:
        from instseg.data.transforms import rescale_size, resize_sample

        g = self._gen(sample)
        h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
        (bw, bh), f = rescale_size(w, h, self.scale)
        r = _uniform(g, *self.ratio_range)
        nw, nh = max(1, int(w * f * r + 0.5)), max(1, int(h * f * r + 0.5))
        sample = resize_sample(sample, (nw, nh))
        cw, ch = min(nw, bw), min(nh, bh)
        if (cw, ch) != (nw, nh):
            x0 = int(torch.randint(0, nw - cw + 1, (), generator=g))
            y0 = int(torch.randint(0, nh - ch + 1, (), generator=g))
            sample = crop_sample(sample, (x0, y0, x0 + cw, y0 + ch))
        return replace(sample, targets=refit_boxes(sample.targets))
