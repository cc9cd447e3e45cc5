"""Named presets.  The COCO ones are named and set exactly as mmdetection's configs
(``../specs``); the small ones train on 2 CPU cores in minutes.

Each preset is a plain function returning a fresh ``Config``; ``get_preset(name)`` looks it up.
"""

from __future__ import annotations

from collections.abc import Callable

from instseg.config.schema import Config, DataConfig, ModelConfig, TrainConfig

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = (1.0, 0.5, 0.25)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))

_PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    _PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> Config:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(_PRESETS))}")
    cfg = _PRESETS[name]()
    cfg.name = name
    return cfg


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def _coco_data(*, stuff: bool = False) -> DataConfig:
    root = "data/coco"
    return DataConfig(
        train_ann=f"{root}/annotations/instances_train2017.json",
        train_images=f"{root}/train2017",
        train_stuff=f"{root}/stuffthingmaps/train2017" if stuff else "",
        val_ann=f"{root}/annotations/instances_val2017.json",
        val_images=f"{root}/val2017",
    )


# --------------------------------------------------------------------------- COCO (paper settings)
@preset
def mask_rcnn_r50_fpn_1x_coco() -> Config:
    """Mask R-CNN R-50-FPN 1x: one stage, class-specific regression, L1 box losses."""
    return Config(model=ModelConfig(), data=_coco_data(), train=TrainConfig())


def _cascade_model(**overrides) -> ModelConfig:
    base = dict(
        arch="cascade_mask_rcnn",
        rpn_loss_bbox="smooth_l1",
        rpn_allowed_border=0.0,
        rpn_train_pre_nms=2000,
        rpn_train_post_nms=2000,
        rcnn_loss_bbox="smooth_l1",
        class_agnostic_reg=True,
        stage_ious=CASCADE_IOUS,
        stage_weights=CASCADE_WEIGHTS,
        stage_stds=CASCADE_STDS,
        rcnn_match_low_quality=False,
        score_thr=0.05,
    )
    base.update(overrides)
    return ModelConfig(**base)


def _htc_model(*, semantic: bool, **overrides) -> ModelConfig:
    return _cascade_model(
        arch="htc",
        interleaved=True,
        mask_info_flow=True,
        semantic=semantic,
        rcnn_match_low_quality=True,
        score_thr=0.001,
        **overrides,
    )


@preset
def cascade_mask_rcnn_r50_fpn_1x_coco() -> Config:
    return Config(model=_cascade_model(), data=_coco_data(), train=TrainConfig())


@preset
def htc_without_semantic_r50_fpn_1x_coco() -> Config:
    return Config(model=_htc_model(semantic=False), data=_coco_data(), train=TrainConfig())


@preset
def htc_r50_fpn_1x_coco() -> Config:
    return Config(model=_htc_model(semantic=True), data=_coco_data(stuff=True), train=TrainConfig())


def _htc_20e(backbone: str, batch_size: int) -> Config:
    data = _coco_data(stuff=True)
    data.batch_size = batch_size
    return Config(
        model=_htc_model(semantic=True, backbone=backbone),
        data=data,
        train=TrainConfig(epochs=20, lr_steps=(16, 19)),
    )


@preset
def htc_r50_fpn_20e_coco() -> Config:
    return _htc_20e("resnet50", 2)


@preset
def htc_r101_fpn_20e_coco() -> Config:
    return _htc_20e("resnet101", 2)


@preset
def htc_x101_32x4d_fpn_16x1_20e_coco() -> Config:
    """16 GPUs x 1 image at lr 0.02 (use lr 0.01 on 8 GPUs x 1, as the mmdet README says)."""
    return _htc_20e("resnext101_32x4d", 1)


@preset
def htc_x101_64x4d_fpn_16x1_20e_coco() -> Config:
    return _htc_20e("resnext101_64x4d", 1)


# --------------------------------------------------------------------------- golden (mmdet parity)
def _golden_model(**overrides) -> ModelConfig:
    base = dict(
        backbone="resnet18",
        num_classes=5,
        fpn_channels=64,
        roi_fc_channels=256,
        mask_channels=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


def _golden_data() -> DataConfig:
    return DataConfig(scale=(512, 512), batch_size=4)


@preset
def mask_rcnn_r18_fpn_c64_shapes() -> Config:
    """The small Mask R-CNN of ``../shared/golden`` (ResNet-18, 64-channel heads, 5 classes)."""
    return Config(model=_golden_model(), data=_golden_data(), train=TrainConfig(lr=0.02, warmup_iters=50, grad_clip=35.0))


@preset
def htc_r18_fpn_c64_shapes() -> Config:
    """The small HTC of ``../shared/golden`` (9-class semantic branch)."""
    model = _htc_model(semantic=True, semantic_classes=9)
    golden = _golden_model()
    for key, value in golden.__dict__.items():
        if key in ("backbone", "num_classes", "fpn_channels", "roi_fc_channels", "mask_channels"):
            setattr(model, key, value)
    return Config(model=model, data=_golden_data(), train=TrainConfig(lr=0.02, warmup_iters=10, grad_clip=35.0))


# --------------------------------------------------------------------------- small CPU presets
def _cpu_model(arch: str, **overrides) -> ModelConfig:
    """A MobileNetV2 (ImageNet) FPN model narrowed for 2 CPU cores.

    What makes it cheap: 64-channel FPN and heads, a fixed 2x2 RoIAlign sampling grid instead
    of mmdet's adaptive one (the adaptive grid dominates CPU time for large RoIs), 128 sampled
    RoIs per image and fewer RPN proposals.
    """
    if arch == "mask_rcnn":
        model = ModelConfig()
    elif arch == "htc":
        model = _htc_model(semantic=True)
    else:
        model = _cascade_model()
    base = dict(
        backbone="mobilenet_v2",
        backbone_weights="imagenet",
        frozen_stages=1,
        fpn_channels=64,
        roi_fc_channels=256,
        mask_channels=64,
        roi_sampling_ratio=2,
        rcnn_batch_per_image=128,
        rpn_train_pre_nms=1000,
        rpn_train_post_nms=500,
        rpn_test_pre_nms=500,
        rpn_test_post_nms=300,
        anchor_scales=(4.0,),
        score_thr=0.05,
    )
    base.update(overrides)
    for key, value in base.items():
        setattr(model, key, value)
    return model


def _synth_data() -> DataConfig:
    root = "demo_data/synth"
    return DataConfig(
        train_ann=f"{root}/annotations/instances_train.json",
        train_images=f"{root}/images/train",
        train_stuff=f"{root}/stuffthingmaps/train",
        val_ann=f"{root}/annotations/instances_val.json",
        val_images=f"{root}/images/val",
        val_stuff=f"{root}/stuffthingmaps/val",
        scale=(320, 320),
        batch_size=4,
    )


def _synth_train() -> TrainConfig:
    # lr 0.02 (mmdet's, for 16 images per step) diverges here at 4 images per step
    return TrainConfig(epochs=7, lr=0.01, warmup_iters=50, lr_steps=(6,), grad_clip=35.0, eval_interval=0,
                       max_minutes=9.0, log_interval=5)


@preset
def htc_synth_cpu() -> Config:
    """HTC on the built-in synthetic data (things + stuff maps): what ``make demo`` trains."""
    return Config(model=_cpu_model("htc", semantic_classes=9), data=_synth_data(), train=_synth_train())


@preset
def cascade_mask_rcnn_synth_cpu() -> Config:
    return Config(model=_cpu_model("cascade_mask_rcnn"), data=_synth_data(), train=_synth_train())


@preset
def mask_rcnn_synth_cpu() -> Config:
    return Config(model=_cpu_model("mask_rcnn"), data=_synth_data(), train=_synth_train())


def _nuclei_data() -> DataConfig:
    root = "../shared/data/nuclei"
    return DataConfig(
        train_ann=f"{root}/annotations/instances_train.json",
        train_images=f"{root}/images",
        val_ann=f"{root}/annotations/instances_val.json",
        val_images=f"{root}/images",
        # (long, short) keep-ratio cap: the many 256x256 images (13 px nuclei) are upscaled 2x,
        # 696x520 ones (27 px nuclei) stay about as they are, 1272x603 ones go to 1024x485
        scale=(1024, 512),
        batch_size=2,
        max_dets=400,
        # microscopy has no up or down: the 8 symmetries of the square (with the horizontal flip)
        train_pipeline=("rot90", "vflip"),
    )


def _nuclei_model(arch: str, **overrides) -> ModelConfig:
    # nuclei are 7-50 px at the original scale (median 20), 14-60 px after the resize: anchors
    # of 16..256 px (scale 4 on strides 4..64, the CPU default), up to 400 detections per image
    return _cpu_model(
        arch,
        max_per_img=400,
        rpn_test_post_nms=1000,
        rpn_test_pre_nms=1000,
        rcnn_batch_per_image=256,
        **overrides,
    )


def _nuclei_train() -> TrainConfig:
    # the 30-minute budget ends the run (epochs is only a cap) and the lr steps down (x0.1) when
    # 80% of it is spent, so the schedule ends with the budget on any machine
    return TrainConfig(epochs=100, lr=0.005, warmup_iters=100, lr_steps=(), budget_lr_steps=(0.8,), grad_clip=35.0,
                       eval_interval=0, max_minutes=30.0, log_interval=20)


@preset
def mask_rcnn_nuclei_cpu() -> Config:
    """Mask R-CNN for the DSB2018 nuclei data, ImageNet MobileNetV2, 30 CPU minutes."""
    return Config(model=_nuclei_model("mask_rcnn"), data=_nuclei_data(), train=_nuclei_train())


@preset
def htc_nuclei_cpu() -> Config:
    """HTC for nuclei; no stuff maps, so semantic targets are derived from the instance masks
    (background 0, nucleus 1)."""
    return Config(
        model=_nuclei_model("htc", semantic_classes=2, semantic_targets="derive"),
        data=_nuclei_data(),
        train=_nuclei_train(),
    )


# --------------------------------------------------------------------------- RetinaNet
def _retinanet_model(**overrides) -> ModelConfig:
    model = ModelConfig(arch="retinanet", anchor_strides=(8, 16, 32, 64, 128), score_thr=0.05, nms_iou=0.5)
    for key, value in overrides.items():
        setattr(model, key, value)
    return model


@preset
def retinanet_r50_fpn_1x_coco() -> Config:
    """mmdet's RetinaNet R-50-FPN 1x: lr 0.01 for 16 images, 12 epochs."""
    return Config(model=_retinanet_model(), data=_coco_data(), train=TrainConfig(lr=0.01))


@preset
def retinanet_r18_fpn_c64_shapes() -> Config:
    """The small RetinaNet of ``../shared/golden/retinanet_r18_fpn_c64_shapes.py``."""
    model = _retinanet_model(backbone="resnet18", num_classes=5, fpn_channels=64)
    model.retinanet.feat_channels = 64
    return Config(model=model, data=_golden_data(), train=TrainConfig(lr=0.01, warmup_iters=20, grad_clip=35.0))


@preset
def retinanet_synth_cpu() -> Config:
    """RetinaNet on the built-in synthetic data: ImageNet MobileNetV2, 64-channel FPN and towers."""
    model = _retinanet_model(backbone="mobilenet_v2", backbone_weights="imagenet", fpn_channels=64)
    model.retinanet.feat_channels = 64
    # two tower convs instead of four: at 64 channels the std-0.01 init shrinks the signal ~4x per
    # conv, and four of them left the classifier without gradient for the whole CPU budget
    # (measured: grad norm 0.34, focal loss flat at its 1.129 starting value after 50 iterations)
    model.retinanet.stacked_convs = 2
    # the synthetic objects are 20-120 px at 320 px: anchors from 16 px (base scale 2 on stride 8)
    model.retinanet.octave_base_scale = 2.0
    train = _synth_train()
    # a one-stage detector needs more passes than the two-stage presets' 7 epochs; with SGD (lr
    # 0.04) the focal loss barely moved in 180 iterations (bbox AP 0.0), AdamW at lr 1e-3 (what
    # the golden mmdetection fixtures were trained with, there at 2e-4) reaches 14.2 bbox AP in
    # 360 iterations (measured)
    train.optimizer, train.lr, train.epochs, train.lr_steps = "adamw", 1e-3, 12, (10,)
    return Config(model=model, data=_synth_data(), train=train)


# --------------------------------------------------------------------------- YOLACT
# YOLACT's normalisation (official BGR means/stds, written in RGB order)
YOLACT_MEAN = (123.68, 116.78, 103.94)
YOLACT_STD = (58.40, 57.12, 57.38)


def _yolact_model(flavor: str, backbone: str, input_size: int = 550, **overrides) -> ModelConfig:
    """YOLACT: nothing frozen, BN trained (the official code freezes BN below 6 images per GPU;
    set ``model.norm_eval=true`` then), Fast NMS, 0.05 / top 200 / 100 detections."""
    model = ModelConfig(
        arch="yolact",
        backbone=backbone,
        frozen_stages=-1,
        norm_eval=False,
        score_thr=0.05,
        nms="fast",
        nms_iou=0.5,
        nms_top_k=200,
        max_per_img=100,
        mask_thr=0.5,
    )
    model.yolact.flavor = flavor
    model.yolact.input_size = input_size
    # official pixel scales of P3-P7 follow the input size (floored, as the official configs do)
    model.yolact.prior_scales = tuple(float(int(s * input_size / 550)) for s in (24, 48, 96, 192, 384))
    for key, value in overrides.items():
        target = model.yolact if hasattr(model.yolact, key) else model
        setattr(target, key, value)
    return model


def _yolact_data(input_size: int, flavor: str, base: DataConfig | None = None) -> DataConfig:
    """550 x 550 squash resize (no padding), YOLACT's mean / std and its source's augmentations."""
    data = base or _coco_data()
    data.scale = (input_size, input_size)
    data.mean = YOLACT_MEAN
    data.std = YOLACT_STD
    data.size_divisor = 1
    data.keep_ratio = False
    if flavor == "official":  # SSDAugmentation: photometric, expand, crop, mirror, resize
        data.train_pipeline = ("photometric_yolact", "expand", "crop_yolact")
        data.train_pipeline_post = ()
    else:  # mmdet: filter, expand, min-IoU crop, resize, flip, photometric
        data.train_pipeline = ("filter_small", "expand", "crop_mmdet")
        data.train_pipeline_post = ("photometric_mmdet",)
    return data


def _yolact_official_train(batch_size: int = 8) -> TrainConfig:
    """800k iterations of 8 images, lr 1e-3 (warmup from 1e-4 over 500), steps 280k/600k/700k/750k;
    non-finite losses skip the step, as the official train.py does."""
    train = TrainConfig(
        max_iters=800_000, lr=1e-3, momentum=0.9, weight_decay=5e-4, warmup_iters=500, warmup_ratio=0.1,
        lr_steps=(280_000, 600_000, 700_000, 750_000),
    )
    train.skip_nonfinite = True
    return train


def _yolact_official(backbone: str, input_size: int = 550, **overrides) -> Config:
    data = _yolact_data(input_size, "official")
    data.batch_size = 8
    return Config(model=_yolact_model("official", backbone, input_size, **overrides), data=data, train=_yolact_official_train())


@preset
def yolact_base() -> Config:
    """Official ``yolact_base_config``: R-101-FPN, 550 x 550 (29.8 mask AP on test-dev in the paper)."""
    return _yolact_official("resnet101")


@preset
def yolact_resnet50() -> Config:
    """Official ``yolact_resnet50_config``: R-50-FPN, 550."""
    return _yolact_official("resnet50")


@preset
def yolact_im400() -> Config:
    """Official ``yolact_im400_config``: R-101-FPN, 400 x 400, prior scales x 400/550."""
    return _yolact_official("resnet101", 400)


@preset
def yolact_im700() -> Config:
    """Official ``yolact_im700_config``: R-101-FPN, 700 x 700, 300 masks trained per image."""
    return _yolact_official("resnet101", 700, masks_to_train=300)


def _yolact_mmdet(backbone: str) -> Config:
    data = _yolact_data(550, "mmdet")
    data.batch_size = 8
    train = TrainConfig(
        epochs=55, lr=1e-3, momentum=0.9, weight_decay=5e-4, warmup_iters=500, warmup_ratio=0.1, lr_steps=(20, 42, 49, 52)
    )
    train.skip_nonfinite = True
    return Config(model=_yolact_model("mmdet", backbone), data=data, train=train)


@preset
def yolact_r50_1x8_coco() -> Config:
    """mmdetection's ``yolact_r50_1xb8-55e_coco`` (its README: 29.0 mask AP on val)."""
    return _yolact_mmdet("resnet50")


@preset
def yolact_r101_1x8_coco() -> Config:
    """mmdetection's ``yolact_r101_1xb8-55e_coco`` (30.4 mask AP on val)."""
    return _yolact_mmdet("resnet101")


@preset
def yolact_r18_c64_shapes() -> Config:
    """The small mmdet YOLACT of ``../shared/golden/yolact_r18_c64_shapes.py`` (64-channel FPN,
    head and protonet, 32 prototypes, 5 classes)."""
    model = _yolact_model("mmdet", "resnet18", num_classes=5, fpn_channels=64, head_channels=64, proto_channels=64)
    data = _yolact_data(550, "mmdet", _golden_data())
    data.train_pipeline = ("filter_small",)  # the brief CPU run left expand / crop / photometric out
    data.train_pipeline_post = ()
    train = TrainConfig(lr=1e-3, warmup_iters=20, grad_clip=35.0)
    train.skip_nonfinite = True
    return Config(model=model, data=data, train=train)


def _yolact_cpu(data: DataConfig, input_size: int, **overrides) -> ModelConfig:
    """Official-flavour YOLACT on an ImageNet MobileNetV2 with 64-channel FPN, head and protonet.

    BN statistics stay frozen (``norm_eval``), as the official code does below 6 images per step.
    """
    model = _yolact_model(
        "official",
        "mobilenet_v2",
        input_size,
        backbone_weights="imagenet",
        frozen_stages=1,
        norm_eval=True,
        fpn_channels=64,
        head_channels=64,
        proto_channels=64,
    )
    for key, value in overrides.items():
        setattr(model.yolact if hasattr(model.yolact, key) else model, key, value)
    _yolact_data(input_size, "official", data)
    return model


def _yolact_cpu_train(train: TrainConfig, *, lr: float, epochs: int) -> TrainConfig:
    """A one-stage model needs more passes than the two-stage CPU presets: ``epochs`` with one
    step at 80 %; YOLACT's momentum / weight decay and warmup from lr / 10 (official: 500
    iterations; 100 here) -- without it the shared head's ReLUs die at these learning rates
    (measured: 0.0 AP at lr 4e-3 with a 50-iteration warmup from lr / 1000); non-finite losses
    skip the step."""
    train.lr, train.momentum, train.weight_decay = lr, 0.9, 5e-4
    train.warmup_iters, train.warmup_ratio = 100, 0.1
    train.epochs, train.lr_steps = epochs, (int(epochs * 0.8 + 0.5),)
    train.skip_nonfinite = True
    return train


@preset
def yolact_synth_cpu() -> Config:
    """YOLACT on the built-in synthetic data: 352 x 352 squash, 4 images per step, 14 epochs."""
    data = _synth_data()
    model = _yolact_cpu(data, 352)
    train = _yolact_cpu_train(_synth_train(), lr=2e-3, epochs=14)
    return Config(model=model, data=data, train=train)


@preset
def yolact_nuclei_cpu() -> Config:
    """YOLACT for the DSB2018 nuclei: 512 x 512 squash, prior scales 16-256 px, up to 400
    detections per image (Fast NMS keeps the top 1000 candidates of the one class)."""
    data = _nuclei_data()
    model = _yolact_cpu(data, 512, prior_scales=(16.0, 32.0, 64.0, 128.0, 256.0), max_per_img=400, nms_top_k=1000)
    train = _yolact_cpu_train(_nuclei_train(), lr=1e-3, epochs=10)
    train.max_minutes = 28.0
    train.budget_lr_steps = ()  # (epoch steps, as measured in the README; the budget rule is not measured yet)
    return Config(model=model, data=data, train=train)


# --------------------------------------------------------------------------- DCN (mmdet configs/dcn, htc)
def preset_named(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    """``@preset`` under an explicit name, for mmdetection names that are not identifiers
    (``..._dconv_c3-c5_...``)."""

    def register(fn: Callable[[], Config]) -> Callable[[], Config]:
        _PRESETS[name] = fn
        return fn

    return register


DCN_C3_C5 = (False, True, True, True)  # mmdet stage_with_dcn for "c3-c5"


def _with_dcn(cfg: Config, kind: str = "dcn") -> Config:
    """mmdet ``dcn=dict(type='DCN' | 'DCNv2', deform_groups=1, fallback_on_stride=False)``,
    ``stage_with_dcn=(False, True, True, True)`` on top of the base config."""
    cfg.model.dcn, cfg.model.stage_with_dcn = kind, DCN_C3_C5
    return cfg


@preset_named("mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco")
def _mask_rcnn_r50_fpn_dconv_c3_c5_1x_coco() -> Config:
    return _with_dcn(mask_rcnn_r50_fpn_1x_coco())


@preset_named("mask_rcnn_r50_fpn_mdconv_c3-c5_1x_coco")
def _mask_rcnn_r50_fpn_mdconv_c3_c5_1x_coco() -> Config:
    """Modulated DCN (v2)."""
    return _with_dcn(mask_rcnn_r50_fpn_1x_coco(), "dcnv2")


@preset_named("mask_rcnn_r101_fpn_dconv_c3-c5_1x_coco")
def _mask_rcnn_r101_fpn_dconv_c3_c5_1x_coco() -> Config:
    return _with_dcn(Config(model=ModelConfig(backbone="resnet101"), data=_coco_data(), train=TrainConfig()))


@preset_named("cascade_mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco")
def _cascade_mask_rcnn_r50_fpn_dconv_c3_c5_1x_coco() -> Config:
    return _with_dcn(cascade_mask_rcnn_r50_fpn_1x_coco())


@preset_named("cascade_mask_rcnn_r101_fpn_dconv_c3-c5_1x_coco")
def _cascade_mask_rcnn_r101_fpn_dconv_c3_c5_1x_coco() -> Config:
    return _with_dcn(Config(model=_cascade_model(backbone="resnet101"), data=_coco_data(), train=TrainConfig()))


@preset_named("cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco")
def _cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3_c5_1x_coco() -> Config:
    model = _cascade_model(backbone="resnext101_32x4d")
    return _with_dcn(Config(model=model, data=_coco_data(), train=TrainConfig()))


@preset_named("htc_x101_64x4d_fpn_dconv_c3-c5_mstrain_400_1400_16x1_20e_coco")
def _htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e_coco() -> Config:
    """The HTC README's strongest model (50.4 box / 43.8 mask AP): HTC X-101-64x4d-FPN, DCN on
    c3-c5, 16 GPUs x 1 image, 20e (steps 16, 19), multi-scale training ``img_scale=[(1600, 400),
    (1600, 1400)]``, 'range' mode: short side uniform in 400..1400, long side capped at 1600.

    One ``data.scale`` serves as the training long-side cap and the test scale: (1600, 800) tests
    exactly as mmdet's (1333, 800) for every image with long / short <= 5 / 3 (short side 800);
    wider images are tested at long side <= 1600 instead of 1333.
    """
    cfg = _with_dcn(htc_x101_64x4d_fpn_16x1_20e_coco())
    cfg.data.train_short_range = (400, 1400)
    cfg.data.scale = (1600, 800)
    return cfg


# --------------------------------------------------------------------------- RDSNet
def _rdsnet_model(backbone: str, *, refine: bool = False, **overrides) -> ModelConfig:
    """The official RDSNet model settings (``wangsr126/RDSNet`` ``configs/rdsnet``): RetinaNet
    anchors on P3-P7, GN(32) towers, 1000 candidates per level, NMS 0.5, 100 detections, masks
    at 0.4; ``refine`` turns MBRM on (the official ``*_refine`` configs, same weights)."""
    model = ModelConfig(
        arch="rdsnet", backbone=backbone, anchor_strides=(8, 16, 32, 64, 128), score_thr=0.05, nms="hard",
        nms_iou=0.5, max_per_img=100, mask_thr=0.4,
    )
    model.rdsnet.refine = refine
    for key, value in overrides.items():
        setattr(model.rdsnet if hasattr(model.rdsnet, key) else model, key, value)
    return model


def _rdsnet_coco(backbone: str, *, refine: bool, two_x: bool = False) -> Config:
    """COCO, 2 images per GPU at lr 0.005 (the official 4 GPUs x 2 = 8 images per step), warmup
    500 iterations from lr / 3, gradient clip 35; 1x: 12 epochs, steps 8 / 11; 2x: 24 epochs,
    steps 16 / 22, short side 640-800 (the official samples 640 OR 800; instseg's multiscale is a
    range)."""
    data = _coco_data()
    train = TrainConfig(lr=0.005, momentum=0.9, weight_decay=1e-4, grad_clip=35.0, warmup_iters=500,
                        warmup_ratio=1.0 / 3)
    if two_x:
        data.train_short_range = (640, 800)
        train.epochs, train.lr_steps = 24, (16, 22)
    return Config(model=_rdsnet_model(backbone, refine=refine), data=data, train=train)


@preset
def rdsnet_r50_fpn_1x() -> Config:
    """Official RDSNet R-50-FPN 1x (README: 36.8 box / 32.1 mask AP on minival)."""
    return _rdsnet_coco("resnet50", refine=False)


@preset
def rdsnet_refine_r50_fpn_1x() -> Config:
    """Official RDSNet R-50-FPN 1x with MBRM (README: 37.8 box / 32.1 mask AP on minival)."""
    return _rdsnet_coco("resnet50", refine=True)


@preset
def rdsnet_r101_fpn_1x() -> Config:
    """Official RDSNet R-101-FPN 1x (README: 38.7 box / 34.1 mask AP on minival)."""
    return _rdsnet_coco("resnet101", refine=False)


@preset
def rdsnet_refine_r101_fpn_1x() -> Config:
    """Official RDSNet R-101-FPN 1x with MBRM (README: 39.7 box / 34.1 mask AP on minival)."""
    return _rdsnet_coco("resnet101", refine=True)


@preset
@preset_named("rdsnet_640_800_r101_fpn_2x")  # the official config's own name
def rdsnet_r101_fpn_2x() -> Config:
    """Official ``rdsnet_640_800_r101_fpn_2x`` (README: 40.8 box / 36.2 mask AP on minival)."""
    return _rdsnet_coco("resnet101", refine=False, two_x=True)


@preset
@preset_named("rdsnet_640_800_refine_r101_fpn_2x")
def rdsnet_refine_r101_fpn_2x() -> Config:
    """Official ``rdsnet_640_800_refine_r101_fpn_2x`` (README: 41.8 box / 36.2 mask AP on minival)."""
    return _rdsnet_coco("resnet101", refine=True, two_x=True)


def _rdsnet_cpu(**overrides) -> ModelConfig:
    """RDSNet on an ImageNet MobileNetV2 with a 64-channel FPN, towers and pixel stream (GN(32)
    as the official); anchors from 16 px (base scale 2 on stride 8)."""
    return _rdsnet_model(
        "mobilenet_v2", backbone_weights="imagenet", frozen_stages=1, fpn_channels=64, feat_channels=64,
        pixel_channels=64, octave_base_scale=2.0, **overrides,
    )


@preset
def rdsnet_synth_cpu() -> Config:
    """RDSNet on the built-in synthetic data: 320 px, 4 images per step, 12 epochs."""
    train = _synth_train()
    train.lr, train.epochs, train.lr_steps = 0.005, 12, (10,)  # the one-stage recipe of retinanet_synth_cpu
    return Config(model=_rdsnet_cpu(), data=_synth_data(), train=train)


@preset
def rdsnet_nuclei_cpu() -> Config:
    """RDSNet for the DSB2018 nuclei: anchors from 16 px, up to 400 detections per image, 10
    epochs in at most 28 CPU minutes (MBRM off; ``--set model.rdsnet.refine=true`` at eval)."""
    train = _nuclei_train()
    train.epochs, train.lr_steps, train.max_minutes = 10, (8,), 28.0
    train.budget_lr_steps = ()  # (epoch steps, as this preset was written; not yet measured with the budget rule)
    return Config(model=_rdsnet_cpu(max_per_img=400), data=_nuclei_data(), train=train)


# --------------------------------------------------------------------------- RPN / Guided-Anchoring RPN
# Proposal-only models (model.arch=rpn; `instseg eval` reports AR@100/300/1000 and AR by size).
# model.rpn=ga_rpn also drops the GA-RPN into Mask R-CNN, Cascade and HTC.
def _ga_rpn(model: ModelConfig, octave_base_scale: float = 8.0) -> ModelConfig:
    """GA-RPN head with mmdet's ``ga-rpn_r50_fpn_1x_coco`` settings (squares of ``octave_base_scale``)."""
    model.rpn = "ga_rpn"
    model.ga_rpn.octave_base_scale = octave_base_scale
    return model


@preset
def rpn_r50_fpn_1x_coco() -> Config:
    """mmdet's RPN R-50-FPN 1x (proposals only; its README: AR@1000 58.2)."""
    model = ModelConfig(arch="rpn", rpn_test_pre_nms=2000, rpn_test_post_nms=1000)
    return Config(model=model, data=_coco_data(), train=TrainConfig())


@preset
def ga_rpn_r50_fpn_1x_coco() -> Config:
    """mmdet's Guided-Anchoring RPN R-50-FPN 1x (proposals only; caffe R-50 in its README: AR@1000 68.4)."""
    model = _ga_rpn(ModelConfig(arch="rpn", rpn_test_pre_nms=2000, rpn_test_post_nms=1000))
    return Config(model=model, data=_coco_data(), train=TrainConfig(grad_clip=35.0))


@preset
def ga_rpn_r18_fpn_c64_shapes() -> Config:
    """The small GA-RPN of ``../shared/golden/ga_rpn_r18_fpn_c64_shapes.py`` (ResNet-18, 64-channel
    FPN and head, proposals only; location loss as mmdetection 3.3.0 computes it, for parity)."""
    model = _ga_rpn(_golden_model(arch="rpn", rpn_test_pre_nms=2000, rpn_test_post_nms=1000, rpn_nms_iou=0.7))
    model.ga_rpn.loc_loss_mode = "mmdet"
    model.ga_rpn.nms_post = 1000
    return Config(model=model, data=_golden_data(), train=TrainConfig(lr=0.02, warmup_iters=20, grad_clip=35.0))


def _proposal_nuclei_model(rpn: str) -> ModelConfig:
    """Proposal-only nuclei model (ImageNet MobileNetV2, 64-channel FPN and head): anchors of
    16-256 px (scale 4 on strides 4-64) for both heads, 1000 proposals per image."""
    model = _nuclei_model("mask_rcnn")  # (its rpn_test_pre_nms / post_nms are 1000)
    model.arch = "rpn"
    return _ga_rpn(model, octave_base_scale=4.0) if rpn == "ga_rpn" else model


@preset
def rpn_nuclei_cpu() -> Config:
    """RPN (proposals only) for the DSB2018 nuclei, ImageNet MobileNetV2: the AR baseline of ga_rpn_nuclei_cpu."""
    return Config(model=_proposal_nuclei_model("rpn"), data=_nuclei_data(), train=_nuclei_train())


@preset
def ga_rpn_nuclei_cpu() -> Config:
    """Guided-Anchoring RPN (proposals only) for the DSB2018 nuclei, ImageNet MobileNetV2, lr 0.0025."""
    train = _nuclei_train()
    # mmdet's lr scaled to 2 images (0.02 x 2 / 16); at the RPN's 0.005 the gradient norm spikes
    # to ~100 within 20 iterations on nuclei and most ReLUs after rpn_conv die (measured)
    train.lr = 0.0025
    return Config(model=_proposal_nuclei_model("ga_rpn"), data=_nuclei_data(), train=train)


# --------------------------------------------------------------------------- COCO 2018 challenge
@preset
def htc_coco2018_challenge() -> Config:
    """The pieces the COCO 2018 winning entry stacked on HTC (``seeds/coco2018_mmdet_team_slides.md``),
    composed: HTC X-101-64x4d-FPN with DCN on c3-c5, GA-RPN proposals, multi-scale training (short
    side 400-1400, long side <= 1600), Soft-NMS (linear, IoU 0.5, min score 0.05, as mmdetection's
    ``soft_nms`` configs) and test-time augmentation at the slides' five scales with flips.
    For GPUs: 16 x 1 image, 20 epochs."""
    cfg = _htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e_coco()
    _ga_rpn(cfg.model)
    cfg.model.nms = "soft_linear"
    cfg.model.nms_iou = 0.5
    cfg.model.soft_nms_min_score = 0.05
    cfg.model.tta = "ms-flip"
    return cfg


# --------------------------------------------------------------------------- FishNet backbone
@preset
def htc_fishnet150_fpn_20e_coco() -> Config:
    """HTC (semantic branch, 20e) as ``htc_r50_fpn_20e_coco`` on a FishNet-150 backbone: FPN on the
    stage 6-9 maps (320 / 832 / 1600 / 2112 ch, strides 4-32); ``frozen_stages=1`` freezes the stem
    and tail stage 0. ImageNet weights: ``--set model.backbone_weights=fishnet150_ckpt_welltrained.tar``
    (an official ``kevin-ssy/FishNet`` checkpoint file; its classifier keys are dropped)."""
    return _htc_20e("fishnet150", 2)
