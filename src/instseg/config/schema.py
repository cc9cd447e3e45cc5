"""The configuration schema.  Defaults are the paper (mmdetection) settings of Mask R-CNN R-50-FPN 1x.

Every field is typed; presets (``presets.py``) are functions returning a ``Config``; YAML files and
``--set key=value`` override fields by dotted path, and unknown keys are an error (``load.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """What network to build (read by ``instseg.modeling.zoo.build_model``)."""

    arch: str = "mask_rcnn"  # mask_rcnn | cascade_mask_rcnn | htc
    num_classes: int = 80
    backbone: str = "resnet50"  # resnet18/34/50/101, resnext101_32x4d, resnext101_64x4d, mobilenet_v2
    backbone_weights: str = ""  # ImageNet state dict file; "imagenet" = the bundled one (MobileNetV2 only)
    frozen_stages: int = 1
    norm_eval: bool = True
    fpn_channels: int = 256
    # RPN / anchors
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    rpn_loss_bbox: str = "l1"  # l1 | smooth_l1 (beta 1/9)
    rpn_allowed_border: float = -1.0
    rpn_train_pre_nms: int = 2000
    rpn_train_post_nms: int = 1000
    rpn_test_pre_nms: int = 1000
    rpn_test_post_nms: int = 1000
    rpn_nms_iou: float = 0.7
    rpn_batch_per_image: int = 256
    # RoI heads
    roi_sampling_ratio: int = 0  # RoIAlign samples per bin side; 0 = adaptive (mmdet); 2 is faster on CPU
    roi_fc_channels: int = 1024
    mask_channels: int = 256
    rcnn_batch_per_image: int = 512
    rcnn_pos_fraction: float = 0.25
    rcnn_loss_bbox: str = "l1"  # l1 | smooth_l1 (beta 1)
    class_agnostic_reg: bool = False
    stage_ious: tuple[float, ...] = (0.5,)
    stage_weights: tuple[float, ...] = (1.0,)
    stage_stds: tuple[tuple[float, float, float, float], ...] = ((0.1, 0.1, 0.2, 0.2),)
    rcnn_match_low_quality: bool = True
    # HTC switches
    interleaved: bool = False
    mask_info_flow: bool = False
    semantic: bool = False
    semantic_classes: int = 183
    semantic_loss_weight: float = 0.2
    semantic_fusion: tuple[str, ...] = ("bbox", "mask")
    semantic_targets: str = "stuff"  # stuff: COCO-Stuff maps | derive: from instance masks | none
    mask_merge: str = "mean"  # cascade test-time masks: mean of stages (v2) | last (mmdet 3.3.0)
    # test
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5


@dataclass
class DataConfig:
    """Where the data is and how images are turned into network inputs."""

    train_ann: str = ""
    train_images: str = ""
    train_stuff: str = ""  # folder of COCO-Stuff-style PNG maps (same stem as the image); "" = none
    val_ann: str = ""
    val_images: str = ""
    val_stuff: str = ""
    scale: tuple[int, int] = (1333, 800)  # keep-ratio target (long, short) at test and train
    train_short_range: tuple[int, int] = (0, 0)  # (min, max) short side sampled per image; (0, 0) = fixed
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisor: int = 32
    batch_size: int = 2
    num_workers: int = 0
    strict: bool = False  # raise on a bad sample instead of skipping it with a warning
    max_dets: int = 100  # COCOeval maxDets (nuclei needs 400)


@dataclass
class TrainConfig:
    """Optimisation schedule and bookkeeping."""

    epochs: int = 12
    max_iters: int = 0  # > 0: stop after this many iterations (overrides epochs)
    max_minutes: float = 0.0  # > 0: stop (and evaluate) after this wall-clock budget
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)  # epochs (or iterations when max_iters > 0) at which lr *= 0.1
    grad_clip: float = 0.0  # max grad norm; 0 = off
    amp: bool = False  # mixed precision on CUDA
    eval_interval: int = 1  # epochs between COCO evaluations (0 = only at the end)
    log_interval: int = 10
    checkpoint_interval: int = 1  # epochs between last.pt writes
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    output_dir: str = "runs"


@dataclass
class Config:
    name: str = "mask_rcnn_r50_fpn_1x_coco"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
