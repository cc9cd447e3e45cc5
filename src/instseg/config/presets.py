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
    return TrainConfig(epochs=3, lr=0.005, warmup_iters=100, lr_steps=(3,), grad_clip=35.0, eval_interval=0,
                       max_minutes=30.0, log_interval=20)


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
    # the synthetic objects are 20-120 px at 320 px: anchors from 16 px (base scale 2 on stride 8)
    model.retinanet.octave_base_scale = 2.0
    return Config(model=model, data=_synth_data(), train=_synth_train())


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
    step at 80 %; YOLACT's momentum / weight decay; non-finite losses skip the step."""
    train.lr, train.momentum, train.weight_decay = lr, 0.9, 5e-4
    train.epochs, train.lr_steps = epochs, (int(epochs * 0.8 + 0.5),)
    train.skip_nonfinite = True
    return train


@preset
def yolact_synth_cpu() -> Config:
    """YOLACT on the built-in synthetic data: 352 x 352 squash, 4 images per step, 14 epochs."""
    data = _synth_data()
    model = _yolact_cpu(data, 352)
    train = _yolact_cpu_train(_synth_train(), lr=4e-3, epochs=14)
    return Config(model=model, data=data, train=train)


@preset
def yolact_nuclei_cpu() -> Config:
    """YOLACT for the DSB2018 nuclei: 512 x 512 squash, prior scales 16-256 px, up to 400
    detections per image (Fast NMS keeps the top 1000 candidates of the one class)."""
    data = _nuclei_data()
    model = _yolact_cpu(data, 512, prior_scales=(16.0, 32.0, 64.0, 128.0, 256.0), max_per_img=400, nms_top_k=1000)
    train = _yolact_cpu_train(_nuclei_train(), lr=2e-3, epochs=10)
    train.max_minutes = 28.0
    return Config(model=model, data=data, train=train)
