"""The configuration schema.  Defaults are the paper (mmdetection) settings of Mask R-CNN R-50-FPN 1x.

Every field is typed; presets (``presets.py``) are functions returning a ``Config``; YAML files and
``--set key=value`` override fields by dotted path, and unknown keys are an error (``load.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetinaNetConfig:
    """RetinaNet's head (``model.arch=retinanet``); defaults: mmdet's ``retinanet_r50_fpn_1x_coco``.

    Anchors: ``model.anchor_strides`` / ``model.anchor_ratios`` with the scales
    ``octave_base_scale * 2 ** (i / scales_per_octave)``.
    """

    feat_channels: int = 256
    stacked_convs: int = 4
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    loss_bbox: str = "l1"  # l1 | smooth_l1
    nms_pre: int = 1000


@dataclass
class YolactConfig:
    """YOLACT (``model.arch=yolact``); defaults: the official ``yolact_base_config`` (550 px).

    ``flavor`` picks the source the model follows where the official code and mmdetection's port
    differ (see ``instseg.modeling.dense_heads.yolact``): ``official`` or ``mmdet``.
    """

    flavor: str = "official"
    head_channels: int = 256
    proto_channels: int = 256
    num_protos: int = 32
    num_head_convs: int = 1
    # official priors: pixel scales per level (P3..P7), aspect ratios, the v1 square-anchor quirk
    prior_scales: tuple[float, ...] = (24.0, 48.0, 96.0, 192.0, 384.0)
    aspect_ratios: tuple[float, ...] = (1.0, 0.5, 2.0)
    square_anchors: bool = True
    input_size: int = 550  # max_size the official priors are relative to
    # mmdet anchors: base sizes x octave_base_scale with anchor_ratios, centred in their cell
    base_sizes: tuple[float, ...] = (8.0, 16.0, 32.0, 64.0, 128.0)
    octave_base_scale: float = 3.0
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    crowd_iof: float = 0.7
    neg_pos_ratio: int = 3
    box_weight: float = 1.5
    mask_alpha: float = 6.125
    semantic: bool = True
    semantic_weight: float = 1.0
    masks_to_train: int = 100
    nms_pre: int = 1000  # mmdet flavour: candidates per level


@dataclass
class RDSNetConfig:
    """RDSNet (``model.arch=rdsnet``); defaults: the official ``rdsnet_r50_fpn_1x`` config
    (``instseg.modeling.dense_heads.rdsnet``).

    Anchors: mmdet v1 geometry on ``model.anchor_strides`` / ``model.anchor_ratios`` with the
    scales ``octave_base_scale * 2 ** (i / scales_per_octave)``.  Test: ``model.score_thr``,
    ``model.nms``, ``model.nms_iou``, ``model.max_per_img``, masks binarised at ``model.mask_thr``.
    """

    feat_channels: int = 256
    stacked_convs: int = 4
    rep_channels: int = 32  # d: objects get 2 d, pixels d
    norm_groups: int = 32  # GroupNorm groups in the towers and the pixel stream
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 0.11
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    nms_pre: int = 1000  # candidates per level (by max class score)
    # pixel stream
    pixel_channels: int = 256
    pixel_levels: int = 3  # P3..P5 fused at stride 8
    pixel_final_convs: int = 1  # [conv, up x2] after the fusion: stride 4
    # correlation + cropping
    masks_to_train: int = 100  # objects per image (random)
    min_mask_area: float = 100.0  # objects whose gt mask has <= this many pixels (input frame) are dropped
    train_crop: float = 0.25  # gt box expansion per side, x (w + 1): 1.5x; outside = ignored
    test_crop: float = 0.1  # predicted box expansion per side: 1.2x
    ohem_ratio: float = 1.0  # background : foreground pixels kept per object; 0 = all background in the crop
    mask_loss_weight: float = 1.0
    # MBRM (instseg.modeling.refiners.mbrm)
    refine: bool = False  # refine the boxes with MBRM at test time (the official *_refine configs)
    mbrm_kernel: int = 9  # 2 s + 1
    mbrm_gamma: float = 0.05
    mbrm_cutoff: float = 0.0044
    mbrm_train: bool = False  # second stage: train only MBRM's kernel (start from train.init_from)
    mbrm_train_iou: float = 0.5  # detections matched to a gt box at this IoU give the MBRM targets
    mbrm_train_max_dets: int = 100  # matched detections per image used by the MBRM loss


@dataclass
class GARPNConfig:
    """Guided-Anchoring RPN (``model.rpn=ga_rpn``); defaults: mmdet's ``ga-rpn_r50_fpn_1x_coco``.

    Strides are ``model.anchor_strides``; square anchors have ratio 1 and scale
    ``octave_base_scale``; approx anchors ``octave_base_scale * 2 ** (i / scales_per_octave)`` x
    ``approx_ratios``.  Objectness / regression use the RPN's assigner and sampler
    (``model.rpn_batch_per_image``) and ``model.rpn_test_pre_nms`` (per level) /
    ``model.rpn_test_post_nms`` (after merging the levels; mmdet's ``max_per_img``).
    ``loc_loss_mode``: ``paper`` trains object centres towards 1; ``mmdet`` reproduces mmdetection
    3.3.0's inverted location targets (for loss / checkpoint parity only).
    """

    octave_base_scale: float = 8.0
    scales_per_octave: int = 3
    approx_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_stds: tuple[float, float, float, float] = (0.07, 0.07, 0.14, 0.14)
    bbox_stds: tuple[float, float, float, float] = (0.07, 0.07, 0.11, 0.11)
    deform_groups: int = 4
    loc_filter_thr: float = 0.01
    center_ratio: float = 0.2
    ignore_ratio: float = 0.5
    ga_pos_iou: float = 0.7
    ga_neg_iou: float = 0.3
    ga_min_pos_iou: float = 0.3
    ga_batch_per_image: int = 256
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loc_loss_mode: str = "paper"  # paper | mmdet
    shape_beta: float = 0.2
    loss_bbox: str = "smooth_l1"  # smooth_l1 (beta 1) | l1
    nms_post: int = 1000  # proposals kept per level after its NMS
    allowed_border: float = -1.0  # GA configs' train_cfg.rpn.allowed_border (not model.rpn_allowed_border)


@dataclass
class ModelConfig:
    """What network to build (read by ``instseg.modeling.zoo.build_model``).

    The flat fields serve every family (backbone, FPN width, anchors, test-time thresholds) and
    the two-stage heads; each one-stage family has its own sub-config (``retinanet``, ``yolact``,
    ``rdsnet``).
    """

    arch: str = "mask_rcnn"  # mask_rcnn | cascade_mask_rcnn | htc | rpn (proposals only) | retinanet | yolact | rdsnet
    num_classes: int = 80
    backbone: str = "resnet50"  # resnet18/34/50/101, resnext101_32x4d, resnext101_64x4d, mobilenet_v2, fishnet99/150/201
    backbone_weights: str = ""  # ImageNet state dict file; "imagenet" = the bundled one (MobileNetV2 only)
    frozen_stages: int = 1
    norm_eval: bool = True
    # deformable conv in the ResNet/ResNeXt stages (mmdet dcn / stage_with_dcn): "" | dcn | dcnv2
    dcn: str = ""
    stage_with_dcn: tuple[bool, bool, bool, bool] = (False, False, False, False)  # c3-c5: F, T, T, T
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
    rpn: str = "rpn"  # proposal head of the two-stage and RPN-only models: rpn | ga_rpn (see ga_rpn)
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
    nms: str = "hard"  # hard | fast | fast_cross_class | soft_linear | soft_gaussian (ops/nms.py)
    nms_iou: float = 0.5
    nms_top_k: int = 200  # Fast NMS: candidates per class
    soft_nms_sigma: float = 0.5
    soft_nms_min_score: float = 0.001
    max_per_img: int = 100
    mask_thr: float = 0.5
    # test-time augmentation of the two-stage models used by eval / predict unless --tta is given:
    # "" (none) | flip | ms | ms-flip | LONGxSHORT,...[+flip]  (instseg.engine.tta.parse_tta)
    tta: str = ""
    # one-stage families
    retinanet: RetinaNetConfig = field(default_factory=RetinaNetConfig)
    yolact: YolactConfig = field(default_factory=YolactConfig)
    rdsnet: RDSNetConfig = field(default_factory=RDSNetConfig)
    ga_rpn: GARPNConfig = field(default_factory=GARPNConfig)


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
    # False: squash to exactly (w, h) = scale at train and test (YOLACT's 550x550, mmdet keep_ratio=False)
    keep_ratio: bool = True
    train_short_range: tuple[int, int] = (0, 0)  # (min, max) short side sampled per image; (0, 0) = fixed
    flip_prob: float = 0.5
    # extra train-time augmentations (names in instseg.data.augment.AUGMENTATIONS), in order:
    # before Resize (YOLACT: photometric_yolact, expand, crop_yolact) ...
    train_pipeline: tuple[str, ...] = ()
    # ... and after Resize + RandomFlip, before Normalize (mmdet's YOLACT: photometric_mmdet)
    train_pipeline_post: tuple[str, ...] = ()
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisor: int = 32
    batch_size: int = 2
    num_workers: int = 0
    strict: bool = False  # raise on a bad sample instead of skipping it with a warning
    # with no val_ann: hold out this fraction of the training images (a seeded random choice) as the
    # validation split that evaluation and best.pt use; 0 = none
    val_fraction: float = 0.0
    split_seed: int = 0  # the seed of that choice (fixed, so train and eval agree on the split)
    max_dets: int = 100  # COCOeval maxDets (nuclei needs 400)


@dataclass
class TrainConfig:
    """Optimisation schedule and bookkeeping."""

    epochs: int = 12
    max_iters: int = 0  # > 0: stop after this many iterations (overrides epochs)
    max_minutes: float = 0.0  # > 0: stop (and evaluate) after this wall-clock budget (summed over resumes)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9  # (sgd only)
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)  # epochs (or iterations when max_iters > 0) at which lr *= 0.1
    # fractions of the max_minutes budget at which lr *= 0.1 (replaces lr_steps; the iteration each
    # happens at is recorded, so a resumed run keeps it): a schedule that ends with the budget
    budget_lr_steps: tuple[float, ...] = ()
    grad_clip: float = 0.0  # max grad norm; 0 = off
    # mixed precision on CUDA: "" (float32) | fp16 (with a grad scaler) | bf16; true/false of older
    # configs read as fp16 / "" (instseg.engine.amp.parse_amp)
    amp: str = ""
    # distributed (torchrun; see README "Distributed training")
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm when distributed on CUDA (norm_eval-frozen BN stays frozen)
    auto_scale_lr: bool = False  # lr *= world_size * data.batch_size / base_batch_size (mmdetection's auto_scale_lr)
    base_batch_size: int = 16  # the total batch the preset's lr was tuned for (mmdetection: 8 GPUs x 2 images)
    eval_interval: int = 1  # epochs between COCO evaluations (0 = only at the end)
    log_interval: int = 10
    checkpoint_interval: int = 1  # epochs between last.pt writes
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    output_dir: str = "runs"
    # quality of life (see instseg.engine.trainer)
    patience: int = 0  # > 0: stop when the val metric has not improved for this many evaluations
    ema: bool = False  # keep an exponential moving average of the weights (best.pt and evaluation use it)
    ema_decay: float = 0.9998  # EMA decay per iteration
    ema_tau: int = 2000  # decay ramp: decay * (1 - exp(-updates / tau)); 0 = constant decay
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the `tensorboard` extra)
    skip_nonfinite: bool = False  # skip the optimizer step of an iteration with a NaN/inf loss (else stop)
    init_from: str = ""  # instseg or mmdetection checkpoint whose weights start a NEW run (fitting names / shapes)
    init_strict: bool = False  # train.init_from: any tensor that does not fit (name or shape) is an error


@dataclass
class Config:
    name: str = "mask_rcnn_r50_fpn_1x_coco"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
