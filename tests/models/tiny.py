"""Tiny model variants and inputs for fast model tests."""

from __future__ import annotations

import torch

from instseg.config.presets import get_preset
from instseg.config.schema import ModelConfig
from instseg.structures import CroppedMasks, ImageBatch, ImageTargets

ARCH_PRESETS = {
    "mask_rcnn": "mask_rcnn_r50_fpn_1x_coco",
    "cascade_mask_rcnn": "cascade_mask_rcnn_r50_fpn_1x_coco",
    "htc": "htc_r50_fpn_1x_coco",
}


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """The preset of ``arch`` shrunk to a ResNet-18 with 32-channel heads and 4 classes."""
    cfg = get_preset(ARCH_PRESETS[arch]).model
    cfg.backbone = "resnet18"
    cfg.num_classes = 4
    cfg.fpn_channels = 32
    cfg.roi_fc_channels = 64
    cfg.mask_channels = 32
    cfg.semantic_classes = 6
    cfg.rpn_train_pre_nms = cfg.rpn_test_pre_nms = 300
    cfg.rpn_train_post_nms = cfg.rpn_test_post_nms = 200
    cfg.rcnn_batch_per_image = 64
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_batch(device: str = "cpu") -> tuple[ImageBatch, list[ImageTargets]]:
    """Two images (one with three objects, one with none) of 128x160, padded to 128x160."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 160, generator=g)
    batch = ImageBatch(
        images=images,
        image_sizes=[(120, 160), (128, 150)],
        original_sizes=[(240, 320), (128, 150)],
        scale_factors=torch.tensor([[0.5, 0.5], [1.0, 1.0]]),
        image_ids=[1, 2],
    )
    full = torch.zeros(3, 120, 160, dtype=torch.uint8)
    full[0, 10:50, 20:70] = 1
    full[1, 60:110, 80:150] = 1
    full[2, 30:45, 100:130] = 1
    masks = CroppedMasks.from_full(full)
    semantic = torch.randint(0, 6, (128, 160), generator=g)
    semantic[120:] = 255
    with_objects = ImageTargets(masks.boxes(), torch.tensor([0, 1, 3]), masks, semantic)
    empty = ImageTargets(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), CroppedMasks.empty((128, 150)),
        torch.full((128, 160), 255, dtype=torch.int64),
    )
    return batch.to(device), [with_objects.to(device), empty.to(device)]
