"""The one name -> factory table: builds a detector from a ``ModelConfig``.

This is the only place that reads configuration; every module below takes built parts and
typed keyword arguments.
"""

from __future__ import annotations

from torch import nn

from instseg.config.schema import ModelConfig
from instseg.modeling.detectors.two_stage import TwoStageDetector
from instseg.modeling.dense_heads.rpn import ProposalSettings, RPNHead
from instseg.modeling.necks.fpn import FPN
from instseg.modeling.roi_heads.box_head import Shared2FCBoxHead
from instseg.modeling.roi_heads.cascade import CascadeRoIHead, CascadeStage
from instseg.modeling.roi_heads.mask_head import FCNMaskHead
from instseg.modeling.roi_heads.semantic_head import FusedSemanticHead
from instseg.ops.anchors import AnchorGenerator
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.roi_align import MultiLevelRoIAlign
from instseg.ops.sampler import RandomSampler

ARCHS = ("mask_rcnn", "cascade_mask_rcnn", "htc")

RESNETS = {
    "resnet18": dict(depth=18),
    "resnet34": dict(depth=34),
    "resnet50": dict(depth=50),
    "resnet101": dict(depth=101),
    "resnext101_32x4d": dict(depth=101, groups=32, width_per_group=4),
    "resnext101_64x4d": dict(depth=101, groups=64, width_per_group=4),
}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    weights = cfg.backbone_weights or None
    if cfg.backbone in RESNETS:
        from instseg.modeling.backbones.resnet import ResNet

        return ResNet(**RESNETS[cfg.backbone], frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, weights=weights)
    if cfg.backbone == "mobilenet_v2":
        from instseg.modeling.backbones.mobilenet import MobileNetV2

        return MobileNetV2(frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval, weights=weights)
    valid = ", ".join([*RESNETS, "mobilenet_v2"])
    raise ValueError(f"model.backbone: unknown backbone {cfg.backbone!r}; expected one of {valid}")


def _rpn_loss_name(kind: str) -> str:
    return {"l1": "l1", "smooth_l1": "smooth_l1_rpn"}[kind]


def build_rpn(cfg: ModelConfig) -> RPNHead:
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


def build_model(cfg: ModelConfig) -> TwoStageDetector:
    """Builds the detector named by ``cfg.arch`` (``mask_rcnn``, ``cascade_mask_rcnn`` or ``htc``)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; expected one of {', '.join(ARCHS)}")
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
    )
    return TwoStageDetector(
        backbone=backbone,
        neck=neck,
        rpn_head=build_rpn(cfg),
        roi_head=roi_head,
        pad_masks_to_input=cfg.arch == "mask_rcnn",
    )
