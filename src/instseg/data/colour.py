"""Colour train-time augmentations for data whose appearance varies by acquisition rather than by
content: stain and polarity in microscopy (dark nuclei on bright H&E or bright-field images,
bright nuclei on dark fluorescence), sensor and illumination in industrial or aerial imagery.

Both are ``Sample -> Sample`` transforms that change only the image (boxes, masks and stuff maps
are untouched) and draw from ``sample.generator``, so a resumed run sees bit-identical data.
Images are ``(3, H, W)`` float RGB in 0..255, as ``CocoDataset`` gives them.
"""

from __future__ import annotations

from dataclasses import replace

import torchvision.transforms.v2.functional as TF

from instseg.data.augment import _SometimesTransform
from instseg.data.coco import Sample


class RandomGrayscale(_SometimesTransform):
    """With probability ``prob``, the image's luma in all three channels (torchvision's ITU-R 601
    weights: 0.2989 R + 0.587 G + 0.114 B): the model cannot lean on stain colour alone."""

    def apply(self, sample: Sample) -> Sample:
        return replace(sample, image=TF.rgb_to_grayscale(sample.image.float(), num_output_channels=3))


class RandomInvert(_SometimesTransform):
    """With probability ``prob``, ``255 - image``: bright objects on a dark background become dark
    objects on a bright one and back, so both polarities are seen for every training image."""

    def apply(self, sample: Sample) -> Sample:
        # (torchvision's invert assumes floats in 0..1; instseg's float images are 0..255)
        return replace(sample, image=255.0 - sample.image.float())
