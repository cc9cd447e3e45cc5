"""Colour train-time augmentations for data whose appearance varies by acquisition rather than by
content: stain and polarity in microscopy (dark nuclei on bright H&E or bright-field images,
bright nuclei on dark fluorescence), sensor and illumination in industrial or aerial imagery.

Both are ``Sample -> Sample`` transforms that change only the image (boxes, masks and stuff maps
are untouched) and draw from ``sample.generator``, so a resumed run sees bit-identical data.
Images are ``(3, H, W)`` float RGB in 0..255, as ``CocoDataset`` gives them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torchvision.transforms.v2.functional as TF

from instseg.data.augment import _RandomTransform
from instseg.data.coco import Sample


class _CoinFlipTransform(_RandomTransform):
    """Applies ``_apply`` to the image with probability ``p`` (one uniform draw per sample)."""

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand((), generator=self._gen(sample))) >= self.p:
            return sample
        return replace(sample, image=self._apply(sample.image.float()))

    def _apply(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomGrayscale(_CoinFlipTransform):
    """With probability ``p``, the image's luma in all three channels (torchvision's ITU-R 601
    weights: 0.2989 R + 0.587 G + 0.114 B): the model cannot lean on stain colour alone."""

    def _apply(self, image: torch.Tensor) -> torch.Tensor:
        return TF.rgb_to_grayscale(image, num_output_channels=3)


class RandomInvert(_CoinFlipTransform):
    """With probability ``p``, ``255 - image``: bright objects on a dark background become dark
    objects on a bright one and back, so both polarities are seen for every training image."""

    def _apply(self, image: torch.Tensor) -> torch.Tensor:
        # (torchvision's invert assumes floats in 0..1; instseg's float images are 0..255)
        return 255.0 - image
