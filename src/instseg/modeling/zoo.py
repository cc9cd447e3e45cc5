"""The one name -> factory table: builds a detector from a ``ModelConfig``.

This is the only place that reads configuration; every module below takes built parts and
typed keyword arguments.
"""

from __future__ import annotations

import math

from torch import nn

from instseg.config.schema import ModelConfig
from instseg.modeling.dense_heads.dense import DenseTestSettings
from instseg.modeling.dense_heads.retinanet import RetinaHead
from instseg.modeling.dense_heads.yolact import FLAVORS as YOLACT_FLAVORS
from instseg.modeling.dense_heads.yolact import YolactBoxHead, YolactHead, YolactProtonet, YolactSettings
from instseg.modeling.detectors.base import Detector
from instseg.modeling.detectors.one_stage import OneStageDetector
from instseg.modeling.detectors.two_stage import TwoStageDetector
from instseg.modeling.dense_heads.rpn import ProposalSettings, RPNHead
from instseg.modeling.necks.fpn import FPN
from instseg.modeling.roi_heads.box_head import Shared2FCBoxHead
from instseg.modeling.roi_heads.cascade import CascadeRoIHead, CascadeStage
from instseg.modeling.roi_heads.mask_head import FCNMaskHead
from instseg.modeling.roi_heads.semantic_head import FusedSemanticHead
from instseg.ops.anchors import AnchorGenerator, YolactPriorGenerator
from instseg.ops.assigner import ForcedMatchAssigner, MaxIoUAssigner
from instseg.ops.nms import NMS_METHODS
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.roi_align import MultiLevelRoIAlign
from instseg.ops.sampler import RandomSampler

TWO_STAGE_ARCHS = ("mask_rcnn", "cascade_mask_rcnn", "htc")
ONE_STAGE_ARCHS = ("retinanet", "yolact", "rdsnet")
PROPOSAL_ARCHS = ("rpn",)  # proposal-only models (model.rpn picks the head)
ARCHS = TWO_STAGE_ARCHS + ONE_STAGE_ARCHS + PROPOSAL_ARCHS
RPN_HEADS = ("rpn", "ga_rpn")

RESNETS = {
    "resnet18": dict(depth=18),
    "resnet34": dict(depth=34),
    "resnet50": dict(depth=50),
    "resnet101": dict(depth=101),
    "resnext101_32x4d": dict(depth=101, groups=32, width_per_group=4),
    "resnext101_64x4d": dict(depth=101, groups=64, width_per_group=4),
}
FISHNETS = {"fishnet99": 99, "fishnet150": 150, "fishnet201": 201}  # official ImageNet file via backbone_weights


def build_backbone(cfg: ModelConfig) -> nn.Module:
    weights = cfg.backbone_weights or None
    if cfg.backbone in RESNETS:
        from instseg.modeling.backbones.resnet import ResNet

        return ResNet(
            **RESNETS[cfg.backbone],
            frozen_stages=cfg.frozen_stages,
            norm_eval=cfg.norm_eval,
            weights=weights,
            dcn=cfg.dcn or None,
            stage_with_dcn=tuple(cfg.stage_with_dcn),
        )
    if cfg.dcn and any(cfg.stage_with_dcn):
        raise ValueError(f"model.dcn={cfg.dcn!r}: deformable conv stages exist for the ResNet/ResNeXt backbones only")
    if cfg.backbone == "mobilenet_v2":
        from instseg.modeling.backbones.mobilenet import MobileNetV2

        return MobileNetV2(frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, weights=weights)
    if cfg.backbone in FISHNETS:
        from instseg.modeling.backbones.fishnet import FishNet

        if weights == "imagenet":
            raise ValueError("model.backbone_weights: FishNet weights are not bundled; give the checkpoint file path")
        return FishNet(
            depth=FISHNETS[cfg.backbone], frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, weights=weights
        )
    valid = ", ".join([*RESNETS, "mobilenet_v2", *FISHNETS])
    raise ValueError(f"model.backbone: unknown backbone {cfg.backbone!r}; expected one of {valid}")


def _rpn_loss_name(kind: str) -> str:
    return {"l1": "l1", "smooth_l1": "smooth_l1_rpn"}[kind]


def octave_scales(base: float, per_octave: int) -> list[float]:
    """mmdet's ``octave_base_scale`` / ``scales_per_octave`` anchor scales: ``base * 2 ** (i / n)``."""
    return [base * 2 ** (i / per_octave) for i in range(per_octave)]


def build_rpn(cfg: ModelConfig) -> nn.Module:
    """The proposal head named by ``model.rpn``: ``rpn`` (RPNHead) or ``ga_rpn`` (GARPNHead)."""
    if cfg.rpn == "ga_rpn":
        return build_ga_rpn(cfg)
    if cfg.rpn != "rpn":
        raise ValueError(f"model.rpn: unknown proposal head {cfg.rpn!r}; expected one of {', '.join(RPN_HEADS)}")
    return RPNHead(
        in_channels=cfg.fpn_channels,
        feat_channels=cfg.fpn_channels,
        anchor_generator=AnchorGenerator(strides=cfg.anchor_strides, ratios=cfg.anchor_ratios, scales=cfg.anchor_scales),
        assigner=MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
        sampler=RandomSampler(num=cfg.rpn_batch_per_image, pos_fraction=0.5, add_gt_as_proposals=False),
        loss_bbox=_rpn_loss_name(cfg.rpn_loss_bbox),
        allowed_border=cfg.rpn_allowed_border,
        train_proposals=ProposalSettings(cfg.rpn_train_pre_nms, cfg.rpn_train_post_nms, cfg.rpn_nms_iou),
        test_proposals=ProposalSettings(cfg.rpn_test_pre_nms, cfg.rpn_test_post_nms, cfg.rpn_nms_iou),
    )


def build_ga_rpn(cfg: ModelConfig) -> nn.Module:
    """mmdet's ``GARPNHead`` (``model.ga_rpn``); strides ``model.anchor_strides``."""
    from instseg.modeling.dense_heads.ga_rpn import GARPNHead
    from instseg.ops.ga_targets import ApproxMaxIoUAssigner, wh_ratio_clamp

    gc = cfg.ga_rpn
    scales = octave_scales(gc.octave_base_scale, gc.scales_per_octave)
    return GARPNHead(
        in_channels=cfg.fpn_channels,
        feat_channels=cfg.fpn_channels,
        approx_generator=AnchorGenerator(strides=cfg.anchor_strides, ratios=gc.approx_ratios, scales=scales),
        square_generator=AnchorGenerator(strides=cfg.anchor_strides, ratios=(1.0,), scales=(gc.octave_base_scale,)),
        anchor_coder=DeltaXYWHCoder(stds=gc.anchor_stds, wh_clamp=wh_ratio_clamp(1e-6)),
        bbox_coder=DeltaXYWHCoder(stds=gc.bbox_stds),
        assigner=MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
        sampler=RandomSampler(num=cfg.rpn_batch_per_image, pos_fraction=0.5, add_gt_as_proposals=False),
        ga_assigner=ApproxMaxIoUAssigner(
            pos_iou_thr=gc.ga_pos_iou, neg_iou_thr=gc.ga_neg_iou, min_pos_iou=gc.ga_min_pos_iou, match_low_quality=True
        ),
        ga_sampler=RandomSampler(num=gc.ga_batch_per_image, pos_fraction=0.5, add_gt_as_proposals=False),
        deform_groups=gc.deform_groups,
        loc_filter_thr=gc.loc_filter_thr,
        center_ratio=gc.center_ratio,
        ignore_ratio=gc.ignore_ratio,
        focal_alpha=gc.focal_alpha,
        focal_gamma=gc.focal_gamma,
        loc_loss_mode=gc.loc_loss_mode,
        shape_beta=gc.shape_beta,
        loss_bbox={"l1": "l1", "smooth_l1": "smooth_l1"}[gc.loss_bbox],
        allowed_border=gc.allowed_border,
        nms_post=gc.nms_post,
        train_proposals=ProposalSettings(cfg.rpn_train_pre_nms, cfg.rpn_train_post_nms, cfg.rpn_nms_iou),
        test_proposals=ProposalSettings(cfg.rpn_test_pre_nms, cfg.rpn_test_post_nms, cfg.rpn_nms_iou),
    )


def build_rpn_only(cfg: ModelConfig) -> Detector:
    """mmdet's ``RPN`` detector (``model.arch=rpn``): backbone, FPN and the ``model.rpn`` head."""
    from instseg.modeling.detectors.two_stage import RPNDetector

    backbone = build_backbone(cfg)
    neck = FPN(in_channels=list(backbone.out_channels), out_channels=cfg.fpn_channels, num_outs=len(cfg.anchor_strides))
    return RPNDetector(backbone=backbone, neck=neck, bbox_head=build_rpn(cfg))


def build_stages(cfg: ModelConfig) -> list[CascadeStage]:
    n = len(cfg.stage_ious)
    if not (len(cfg.stage_weights) == len(cfg.stage_stds) == n):
        raise ValueError(
            "model.stage_ious, model.stage_weights and model.stage_stds must have one entry per stage; "
            f"got {len(cfg.stage_ious)}, {len(cfg.stage_weights)}, {len(cfg.stage_stds)}"
        )
    stages = []
    for t in range(n):
        iou = cfg.stage_ious[t]
        stages.append(
            CascadeStage(
                box_head=Shared2FCBoxHead(
                    in_channels=cfg.fpn_channels,
                    fc_channels=cfg.roi_fc_channels,
                    num_classes=cfg.num_classes,
                    class_agnostic=cfg.class_agnostic_reg,
                ),
                mask_head=FCNMaskHead(
                    in_channels=cfg.fpn_channels,
                    conv_channels=cfg.mask_channels,
                    num_classes=cfg.num_classes,
                    with_conv_res=cfg.mask_info_flow and t > 0,
                ),
                assigner=MaxIoUAssigner(
                    pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou, match_low_quality=cfg.rcnn_match_low_quality
                ),
                sampler=RandomSampler(
                    num=cfg.rcnn_batch_per_image, pos_fraction=cfg.rcnn_pos_fraction, add_gt_as_proposals=True
                ),
                coder=DeltaXYWHCoder(stds=cfg.stage_stds[t]),
                loss_weight=cfg.stage_weights[t],
                loss_bbox=cfg.rcnn_loss_bbox,
            )
        )
    return stages


def build_model(cfg: ModelConfig) -> Detector:
    """Builds the detector named by ``cfg.arch`` (see ``ARCHS``)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; expected one of {', '.join(ARCHS)}")
    if cfg.nms not in NMS_METHODS:
        raise ValueError(f"model.nms: unknown NMS {cfg.nms!r}; expected one of {', '.join(NMS_METHODS)}")
    if cfg.arch == "retinanet":
        return build_retinanet(cfg)
    if cfg.arch == "yolact":
        return build_yolact(cfg)
    if cfg.arch == "rdsnet":
        return build_rdsnet(cfg)
    if cfg.arch == "rpn":
        return build_rpn_only(cfg)
    return build_two_stage(cfg)


def _dense_test(cfg: ModelConfig, nms_pre: int) -> DenseTestSettings:
    return DenseTestSettings(
        nms_pre=nms_pre,
        score_thr=cfg.score_thr,
        nms=cfg.nms,
        nms_iou=cfg.nms_iou,
        nms_top_k=cfg.nms_top_k,
        max_per_img=cfg.max_per_img,
        soft_nms_sigma=cfg.soft_nms_sigma,
        soft_nms_min_score=cfg.soft_nms_min_score,
    )


def _p3_p7_fpn(cfg: ModelConfig, backbone: nn.Module, **kw) -> FPN:
    """FPN on C3-C5 with two extra stride-2 levels: P3-P7 (RetinaNet, YOLACT)."""
    return FPN(in_channels=list(backbone.out_channels), out_channels=cfg.fpn_channels, num_outs=5, start_level=1, **kw)


def build_retinanet(cfg: ModelConfig) -> OneStageDetector:
    """mmdet's RetinaNet: FPN P3-P7 (P6 from C5), RetinaHead, focal loss, MaxIoU 0.5 / 0.4."""
    rc = cfg.retinanet
    backbone = build_backbone(cfg)
    scales = octave_scales(rc.octave_base_scale, rc.scales_per_octave)
    head = RetinaHead(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        feat_channels=rc.feat_channels,
        stacked_convs=rc.stacked_convs,
        anchor_generator=AnchorGenerator(strides=cfg.anchor_strides, ratios=cfg.anchor_ratios, scales=scales),
        assigner=MaxIoUAssigner(pos_iou_thr=rc.pos_iou, neg_iou_thr=rc.neg_iou, min_pos_iou=0.0, match_low_quality=True),
        focal_alpha=rc.focal_alpha,
        focal_gamma=rc.focal_gamma,
        loss_bbox=rc.loss_bbox,
        test=_dense_test(cfg, rc.nms_pre),
    )
    neck = _p3_p7_fpn(cfg, backbone, add_extra_convs="on_input")
    return OneStageDetector(backbone=backbone, neck=neck, bbox_head=head)


def build_yolact(cfg: ModelConfig) -> OneStageDetector:
    """YOLACT after ``model.yolact.flavor``: the official code or mmdetection's port."""
    yc = cfg.yolact
    if yc.flavor not in YOLACT_FLAVORS:
        raise ValueError(f"model.yolact.flavor: expected one of {YOLACT_FLAVORS}, got {yc.flavor!r}")
    official = yc.flavor == "official"
    backbone = build_backbone(cfg)
    if official:
        # P3-P5 get a ReLU and P6 / P7 are stride-2 convs on P5 / P6
        neck = _p3_p7_fpn(cfg, backbone, add_extra_convs="on_output", upsample_mode="bilinear", relu_outputs=True)
        priors = YolactPriorGenerator(
            scales=yc.prior_scales, aspect_ratios=yc.aspect_ratios, max_size=yc.input_size, square=yc.square_anchors
        )
        assigner = ForcedMatchAssigner(pos_iou_thr=yc.pos_iou, neg_iou_thr=yc.neg_iou, crowd_iof_thr=yc.crowd_iof)
    else:
        neck = _p3_p7_fpn(cfg, backbone, add_extra_convs="on_input", upsample_mode="bilinear")
        cells = _yolact_cells(yc.input_size)
        priors = AnchorGenerator(
            strides=[yc.input_size / c for c in cells],
            ratios=cfg.anchor_ratios,
            scales=[yc.octave_base_scale],
            base_sizes=yc.base_sizes,
            centers=[(yc.input_size * 0.5 / c, yc.input_size * 0.5 / c) for c in cells],
        )
        assigner = MaxIoUAssigner(
            pos_iou_thr=yc.pos_iou, neg_iou_thr=yc.neg_iou, min_pos_iou=0.0, match_low_quality=True, gt_max_assign_all=False
        )
    bbox_head = YolactBoxHead(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        feat_channels=yc.head_channels,
        num_anchors=priors.num_base_anchors,
        num_protos=yc.num_protos,
        num_head_convs=yc.num_head_convs,
    )
    mask_head = YolactProtonet(
        in_channels=cfg.fpn_channels,
        channels=yc.proto_channels,
        num_protos=yc.num_protos,
        num_classes=cfg.num_classes,
        semantic=yc.semantic,
    )
    logic = YolactHead(
        num_classes=cfg.num_classes,
        priors=priors,
        settings=YolactSettings(
            flavor=yc.flavor,
            neg_pos_ratio=yc.neg_pos_ratio,
            box_weight=yc.box_weight,
            mask_alpha=yc.mask_alpha,
            semantic_weight=yc.semantic_weight,
            masks_to_train=yc.masks_to_train,
            mask_thr=cfg.mask_thr,
        ),
        test=_dense_test(cfg, yc.nms_pre),
        assigner=assigner,
    )
    return OneStageDetector(backbone=backbone, neck=neck, bbox_head=bbox_head, mask_head=mask_head, logic=logic)


def build_rdsnet(cfg: ModelConfig) -> OneStageDetector:
    """RDSNet (official code, mmdet v1): FPN P3-P7 (P6 from C5), the object stream with GN towers
    and mmdet-v1 anchors, the pixel stream on P3-P5, correlation + cropping, MBRM."""
    from instseg.modeling.dense_heads.rdsnet import (
        RDSNetHead,
        RDSNetMaskLogic,
        RDSNetPixelHead,
        RDSNetSettings,
        V1AnchorGenerator,
    )
    from instseg.modeling.detectors.rdsnet import RDSNetDetector
    from instseg.modeling.refiners.mbrm import MBRM

    rc = cfg.rdsnet
    backbone = build_backbone(cfg)
    scales = octave_scales(rc.octave_base_scale, rc.scales_per_octave)
    bbox_head = RDSNetHead(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        feat_channels=rc.feat_channels,
        stacked_convs=rc.stacked_convs,
        rep_channels=rc.rep_channels,
        norm_groups=rc.norm_groups,
        anchor_generator=V1AnchorGenerator(strides=cfg.anchor_strides, ratios=cfg.anchor_ratios, scales=scales),
        assigner=MaxIoUAssigner(pos_iou_thr=rc.pos_iou, neg_iou_thr=rc.neg_iou, min_pos_iou=0.0, match_low_quality=True),
        focal_alpha=rc.focal_alpha,
        focal_gamma=rc.focal_gamma,
        smooth_l1_beta=rc.smooth_l1_beta,
        test=_dense_test(cfg, rc.nms_pre),
    )
    mask_head = RDSNetPixelHead(
        in_channels=cfg.fpn_channels,
        channels=rc.pixel_channels,
        rep_channels=rc.rep_channels,
        num_levels=rc.pixel_levels,
        num_final_convs=rc.pixel_final_convs,
        norm_groups=rc.norm_groups,
    )
    logic = RDSNetMaskLogic(
        RDSNetSettings(
            masks_to_train=rc.masks_to_train,
            min_mask_area=rc.min_mask_area,
            train_crop=rc.train_crop,
            test_crop=rc.test_crop,
            ohem_ratio=rc.ohem_ratio,
            mask_loss_weight=rc.mask_loss_weight,
            mask_thr=cfg.mask_thr,
        )
    )
    neck = _p3_p7_fpn(cfg, backbone, add_extra_convs="on_input")
    return RDSNetDetector(
        backbone=backbone,
        neck=neck,
        bbox_head=bbox_head,
        mask_head=mask_head,
        logic=logic,
        mbrm=MBRM(kernel_size=rc.mbrm_kernel, gamma=rc.mbrm_gamma, cutoff=rc.mbrm_cutoff),
        refine=rc.refine,
        mbrm_train=rc.mbrm_train,
        mbrm_train_iou=rc.mbrm_train_iou,
        mbrm_train_max_dets=rc.mbrm_train_max_dets,
    )


def _yolact_cells(input_size: int) -> list[int]:
    """Cells per side of P3-P7 for a square input: a ResNet's stride-2 convs (pad 1) give
    ``ceil`` at every halving (550 -> 69, 35, 18, 9, 5)."""
    size = input_size
    out = []
    for level in range(7):
        size = math.ceil(size / 2)
        if level >= 2:
            out.append(size)
    return out


def build_two_stage(cfg: ModelConfig) -> TwoStageDetector:
    """Mask R-CNN, Cascade Mask R-CNN or HTC."""
    backbone = build_backbone(cfg)
    neck = FPN(in_channels=list(backbone.out_channels), out_channels=cfg.fpn_channels, num_outs=len(cfg.anchor_strides))
    semantic_head = None
    semantic_roi_align = None
    if cfg.semantic:
        semantic_head = FusedSemanticHead(
            in_channels=cfg.fpn_channels,
            conv_channels=cfg.fpn_channels,
            num_inputs=len(cfg.anchor_strides),
            num_classes=cfg.semantic_classes,
            loss_weight=cfg.semantic_loss_weight,
        )
        semantic_roi_align = MultiLevelRoIAlign(output_size=14, strides=[8], sampling_ratio=cfg.roi_sampling_ratio)
    strides = list(cfg.anchor_strides[:4])
    roi_head = CascadeRoIHead(
        stages=build_stages(cfg),
        box_roi_align=MultiLevelRoIAlign(output_size=7, strides=strides, sampling_ratio=cfg.roi_sampling_ratio),
        mask_roi_align=MultiLevelRoIAlign(output_size=14, strides=strides, sampling_ratio=cfg.roi_sampling_ratio),
        semantic_head=semantic_head,
        semantic_roi_align=semantic_roi_align,
        semantic_fusion=cfg.semantic_fusion,
        interleaved=cfg.interleaved,
        mask_info_flow=cfg.mask_info_flow,
        score_thr=cfg.score_thr,
        nms_iou=cfg.nms_iou,
        max_per_img=cfg.max_per_img,
        mask_thr=cfg.mask_thr,
        mask_merge=cfg.mask_merge,
        nms=cfg.nms,
        nms_top_k=cfg.nms_top_k,
        soft_nms_sigma=cfg.soft_nms_sigma,
        soft_nms_min_score=cfg.soft_nms_min_score,
    )
    return TwoStageDetector(
        backbone=backbone,
        neck=neck,
        rpn_head=build_rpn(cfg),
        roi_head=roi_head,
        pad_masks_to_input=cfg.arch == "mask_rcnn",
    )
