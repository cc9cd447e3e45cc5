"""Tiny randomly initialised checkpoints of every model family, and synthetic images, for the
Predictor / video / serve tests (no ../shared needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCHS = ("mask_rcnn", "cascade_mask_rcnn", "htc", "retinanet", "yolact", "rdsnet")
CLASS_NAMES = ["disk", "box", "triangle", "ring"]
CAT_IDS = [3, 5, 7, 9]


def tiny_model_config(arch: str):
    """A ResNet-18, 32-channel variant of ``arch`` with 4 classes that keeps low-score detections."""
    from instseg.config.schema import ModelConfig

    from tests.models.tiny import tiny_config

    if arch in ("mask_rcnn", "cascade_mask_rcnn", "htc"):
        return tiny_config(arch, score_thr=0.0, max_per_img=20)
    cfg = ModelConfig(arch=arch, backbone="resnet18", num_classes=4, fpn_channels=32,
                      anchor_strides=(8, 16, 32, 64, 128), max_per_img=20)
    if arch == "yolact":
        cfg.anchor_strides = ModelConfig().anchor_strides
        cfg.yolact.head_channels = cfg.yolact.proto_channels = 32
        cfg.yolact.input_size = 160
    if arch == "rdsnet":
        cfg.rdsnet.feat_channels = cfg.rdsnet.pixel_channels = 32
        cfg.rdsnet.norm_groups = 8
    for key in ("score_thr",):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    return cfg


def tiny_checkpoint(arch: str, path: Path, *, train_device: str = "cpu", seed: int = 0) -> Path:
    """Writes an instseg checkpoint of a tiny random ``arch`` model (test scale 160x120)."""
    from instseg.config.schema import Config
    from instseg.convert.mmdet import package_checkpoint, write_checkpoint
    from instseg.modeling.zoo import build_model

    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = tiny_model_config(arch)
    cfg.data.scale = (160, 160) if arch == "yolact" else (160, 120)
    cfg.data.keep_ratio = arch != "yolact"
    cfg.train.device = train_device
    state = build_model(cfg.model).state_dict()
    return write_checkpoint(package_checkpoint(state, cfg, CAT_IDS, CLASS_NAMES, {}), path)


def synthetic_image(seed: int = 0, h: int = 90, w: int = 120) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 RGB image: noise plus a few flat rectangles and a disk."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y : y + rng.integers(10, 20), x : x + rng.integers(10, 20)] = rng.integers(120, 255, 3)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(15, h - 15), rng.integers(15, w - 15)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = (230, 200, 40)
    return img
