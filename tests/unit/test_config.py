"""Presets carry mmdetection's settings (spec sections 1-3); overrides are typed and strict."""

from __future__ import annotations

import pytest

from instseg.config.load import ConfigError, apply_overrides, from_dict, to_dict
from instseg.config.presets import get_preset, list_presets


def test_mask_rcnn_preset_is_the_paper_setting():
    m = get_preset("mask_rcnn_r50_fpn_1x_coco").model
    assert (m.arch, m.backbone, m.num_classes) == ("mask_rcnn", "resnet50", 80)
    assert m.rpn_loss_bbox == m.rcnn_loss_bbox == "l1"
    assert not m.class_agnostic_reg and m.rpn_allowed_border == -1
    assert (m.rpn_train_pre_nms, m.rpn_train_post_nms, m.rpn_test_pre_nms, m.rpn_test_post_nms) == (2000, 1000, 1000, 1000)
    assert m.stage_ious == (0.5,) and m.score_thr == 0.05 and m.max_per_img == 100
    assert m.roi_sampling_ratio == 0 and m.frozen_stages == 1 and m.norm_eval


def test_cascade_and_htc_presets():
    c = get_preset("cascade_mask_rcnn_r50_fpn_1x_coco").model
    assert c.stage_ious == (0.5, 0.6, 0.7) and c.stage_weights == (1.0, 0.5, 0.25)
    assert c.stage_stds[2] == (0.033, 0.033, 0.067, 0.067)
    assert c.class_agnostic_reg and not c.rcnn_match_low_quality and c.score_thr == 0.05
    assert (c.rpn_train_pre_nms, c.rpn_train_post_nms, c.rpn_allowed_border) == (2000, 2000, 0)
    assert c.rpn_loss_bbox == c.rcnn_loss_bbox == "smooth_l1"
    assert not (c.interleaved or c.mask_info_flow or c.semantic)
    h = get_preset("htc_r50_fpn_1x_coco")
    assert h.model.interleaved and h.model.mask_info_flow and h.model.semantic
    assert h.model.semantic_classes == 183 and h.model.semantic_loss_weight == 0.2
    assert h.model.rcnn_match_low_quality and h.model.score_thr == 0.001
    assert h.data.train_stuff and h.train.lr == 0.02 and h.train.lr_steps == (8, 11) and h.train.epochs == 12
    assert not get_preset("htc_without_semantic_r50_fpn_1x_coco").model.semantic
    twenty = get_preset("htc_r50_fpn_20e_coco").train
    assert (twenty.epochs, twenty.lr_steps) == (20, (16, 19))
    x101 = get_preset("htc_x101_64x4d_fpn_16x1_20e_coco")
    assert x101.model.backbone == "resnext101_64x4d" and x101.data.batch_size == 1


def test_every_preset_round_trips_through_plain_data():
    for name in list_presets():
        cfg = get_preset(name)
        assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_overrides_are_typed():
    cfg = apply_overrides(get_preset("htc_synth_cpu"), assignments=[
        "train.lr=0.005", "model.semantic=false", "data.scale=[640,480]", "model.stage_ious=[0.4,0.5,0.6]",
    ])
    assert cfg.train.lr == 0.005 and cfg.model.semantic is False
    assert cfg.data.scale == (640, 480) and cfg.model.stage_ious == (0.4, 0.5, 0.6)


@pytest.mark.parametrize("assignment,message", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("model.semantic=maybe", "expected a boolean"),
    ("train.epochs=1.5", "expected int"),
    ("data.scale=[1,2,3]", "expected 2 values"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_are_clear_errors(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("mask_rcnn_r50_fpn_1x_coco"), assignments=[assignment])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(KeyError, match="htc_r50_fpn_1x_coco"):
        get_preset("htc_r5O")
