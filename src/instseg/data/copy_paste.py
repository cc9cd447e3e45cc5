"""Simple Copy-Paste (Ghiasi et al., CVPR 2021) for ``CroppedMasks`` samples.

A random subset of the instances of another training image (the *donor*), scale-jittered, is
pasted onto the sample at a random place: the donor's pixels replace the sample's under the pasted
masks, the sample's masks lose the pixels now hidden (fully hidden instances are dropped), and the
boxes of changed instances are re-fitted to their masks.  The paper finds plain pasting (no
blending) as good as Gaussian-blended pasting; this pastes plainly.

The donor comes from the dataset the transform is bound to (``bind_dataset``; ``build_dataset``
does it), loaded without transforms; its index, scale, place and subset are drawn from the
sample's own generator, so resumed runs are bit-exact.  A donor that cannot be read is skipped
with a warning (the sample goes on unchanged): one bad file must not end a long run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor

from instseg.data.augment import _RandomTransform, _uniform, select_instances
from instseg.data.coco import DataError, DataWarning, Sample


class DonorSource(Protocol):
    """What copy-paste needs of a dataset: its size and an untransformed sample by index."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> Sample: ...


def _union(masks, frame: tuple[int, int]) -> Tensor:
    """Bool ``(H, W)`` union of ``CroppedMasks`` ``masks``."""
    cover = torch.zeros(frame, dtype=torch.bool)
    for crop, off in zip(masks.crops, masks.offsets):
        x0, y0 = int(off[0]), int(off[1])
        cover[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] |= crop.bool()
    return cover


class CopyPaste(_RandomTransform):
    """Pastes donor instances onto the sample (see the module docstring).

    Args:
        scale_range: the donor is resized to fit the sample's frame, times ``r ~ U(scale_range)``.
        paste_prob: each donor instance is pasted with this probability (at least one is).
        prob: probability that copy-paste happens at all for a sample.
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.3, 1.0),
        paste_prob: float = 0.5,
        prob: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi <= 1, got {scale_range}")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.paste_prob = float(paste_prob)
        self.prob = float(prob)
        self.source: DonorSource | None = None

    def __repr__(self) -> str:
        return f"CopyPaste(scale_range={self.scale_range}, paste_prob={self.paste_prob}, prob={self.prob})"

    def bind_dataset(self, source: DonorSource) -> None:
        self.source = source

    def __call__(self, sample: Sample) -> Sample:
        if self.source is None:
            raise RuntimeError("copy_paste needs a dataset to draw donors from (CopyPaste.bind_dataset)")
        g = self._gen(sample)
        if _uniform(g, 0.0, 1.0) >= self.prob or sample.targets.masks is None:
            return sample
        j = int(torch.randint(0, len(self.source), (), generator=g))
        try:
            donor = self.source.load(j)
        except DataError as e:
            warnings.warn(f"copy_paste: skipping unreadable donor {j}: {e}", DataWarning, stacklevel=2)
            return sample
        if donor.targets.masks is None or len(donor.targets) == 0:
            return sample
        return paste(sample, self._place(donor, sample, g), g, self.paste_prob)

    def _place(self, donor: Sample, sample: Sample, g: torch.Generator | None) -> Sample:
        """The donor resized (keep ratio, fits the sample's frame, times the jitter) and moved to a
        random place of a canvas of the sample's size."""
        from instseg.data.augment import expand_sample
        from instseg.data.transforms import resize_sample

        h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
        dh, dw = int(donor.image.shape[-2]), int(donor.image.shape[-1])
        f = min(h / dh, w / dw) * _uniform(g, *self.scale_range)
        nw, nh = max(1, min(w, int(dw * f + 0.5))), max(1, min(h, int(dh * f + 0.5)))
        donor = resize_sample(donor, (nw, nh))
        left = int(torch.randint(0, w - nw + 1, (), generator=g))
        top = int(torch.randint(0, h - nh + 1, (), generator=g))
        return expand_sample(donor, left, top, (h, w), (0.0, 0.0, 0.0))


def paste(sample: Sample, donor: Sample, g: torch.Generator | None, paste_prob: float = 0.5) -> Sample:
    """Pastes a random subset of ``donor``'s instances (same frame as ``sample``) onto ``sample``."""
    dt, t = donor.targets, sample.targets
    if dt.masks is None or t.masks is None or len(dt) == 0:
        return sample
    if tuple(donor.image.shape[-2:]) != tuple(sample.image.shape[-2:]):
        raise ValueError(f"donor frame {tuple(donor.image.shape[-2:])} differs from {tuple(sample.image.shape[-2:])}")
    chosen = torch.rand(len(dt), generator=g) < paste_prob
    if not bool(chosen.any()):
        chosen[int(torch.randint(0, len(dt), (), generator=g))] = True
    dt = select_instances(dt, chosen & dt.masks.nonempty())
    if len(dt) == 0:
        return sample
    frame = t.masks.frame
    cover = _union(dt.masks, frame)
    image = torch.where(cover, donor.image, sample.image)

    # the sample's instances lose their hidden pixels; changed ones get boxes fitted to the rest
    before = t.masks.areas()
    masks = t.masks.occlude(cover)
    after = masks.areas()
    boxes = t.boxes.clone()
    changed = (after != before).nonzero()[:, 0]
    if len(changed):
        boxes[changed] = masks.select(changed).boxes().to(boxes.dtype)
    visible = after > 0
    kept = select_instances(replace(t, boxes=boxes, masks=masks), visible)

    semantic = t.semantic
    if semantic is not None:
        pasted = dt.semantic if dt.semantic is not None else torch.full_like(semantic, 255)
        semantic = torch.where(cover, pasted, semantic)
    targets = replace(
        kept,
        boxes=torch.cat([kept.boxes, dt.masks.boxes().to(kept.boxes.dtype)]),
        labels=torch.cat([kept.labels, dt.labels]),
        masks=kept.masks.concat(dt.masks),
        semantic=semantic,
    )
    return replace(sample, image=image, targets=targets)
