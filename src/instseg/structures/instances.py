"""Batches, per-image targets and per-image detections.

Conventions (used everywhere in instseg):
- boxes are ``(N, 4)`` float XYXY in absolute pixels, width = x2 - x1 (no +1);
- inside the model boxes live in the frame of the resized network input; ``Detections``
  returned by ``predict`` live in the original image frame;
- labels are contiguous ``0 .. num_classes - 1``; COCO category ids are mapped only in
  ``instseg.data`` and ``instseg.evaluation``;
- semantic maps use 255 for "ignore".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from instseg.structures.masks import CroppedMasks

IGNORE_LABEL = 255


@dataclass
class ImageBatch:
    """A padded batch of normalised images plus what is needed to map results back.

    Attributes:
        images: ``(B, 3, Hp, Wp)`` float, normalised, zero-padded at bottom/right.
        image_sizes: per image, ``(h, w)`` of the resized, un-padded image.
        original_sizes: per image, ``(h, w)`` of the image as read from disk.
        scale_factors: ``(B, 2)`` float tensor of ``(w_scale, h_scale)`` = resized / original.
        image_ids: COCO image ids (or -1 when unknown).
        flipped: whether each image was horizontally flipped by the transforms.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    scale_factors: Tensor
    image_ids: list[int] = field(default_factory=list)
    flipped: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> ImageBatch:
        return replace(self, images=self.images.to(device), scale_factors=self.scale_factors.to(device))


@dataclass
class ImageTargets:
    """Ground truth of one image, in the frame of the resized network input.

    Attributes:
        boxes: ``(N, 4)`` float XYXY.
        labels: ``(N,)`` int64 contiguous labels.
        masks: instance masks as crops (or ``None`` for box-only training).
        semantic: ``(Hp, Wp)`` int64 stuff+thing map padded with 255 (or ``None``).
        crowd_boxes: ``(K, 4)`` float XYXY boxes of the image's crowd (``iscrowd=1``) regions, in
            the same frame as ``boxes`` (or ``None`` when the source has none, e.g. synthetic
            data).  Never training instances: only used to neutralise anchors that overlap them.
    """

    boxes: Tensor
    labels: Tensor
    masks: CroppedMasks | None = None
    semantic: Tensor | None = None
    crowd_boxes: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> ImageTargets:
        return replace(
            self,
            boxes=self.boxes.to(device),
            labels=self.labels.to(device),
            semantic=None if self.semantic is None else self.semantic.to(device),
            crowd_boxes=None if self.crowd_boxes is None else self.crowd_boxes.to(device),
        )


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: ``(n, 4)`` float XYXY.
        scores: ``(n,)`` float.
        labels: ``(n,)`` int64 contiguous labels.
        masks: ``(n, H, W)`` bool masks pasted at the frame's resolution, or ``None``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty(frame: tuple[int, int] | None = None, device: torch.device | str = "cpu") -> Detections:
        masks = None if frame is None else torch.zeros((0, *frame), dtype=torch.bool, device=device)
        return Detections(
            boxes=torch.zeros((0, 4), device=device),
            scores=torch.zeros((0,), device=device),
            labels=torch.zeros((0,), dtype=torch.int64, device=device),
            masks=masks,
        )

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
        )
