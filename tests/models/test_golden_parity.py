"""instseg computes what mmdetection 3.3.0 computes, given the same weights and input tensor.

References: ``../shared/golden`` (see its README).  Tolerances are the README's suggestions:
features/logits/probabilities 1e-4, boxes 1e-3 px, scores 1e-5, masks IoU > 0.99.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.config.presets import get_preset
from instseg.convert.mmdet import convert_checkpoint
from instseg.modeling.zoo import build_model
from instseg.structures import ImageBatch
from instseg.structures.masks import paste_masks
from tests.golden_utils import GOLDEN, IMAGES, MODELS, decode_rles, mask_iou, match_detections, requires_golden

pytestmark = [requires_golden, pytest.mark.golden]


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, (preset, ckpt) in MODELS.items():
        cfg = get_preset(preset)
        model = build_model(cfg.model)
        model.load_state_dict(convert_checkpoint(GOLDEN / ckpt, cfg)["model"])
        built[name] = model.eval()
    return built


@pytest.fixture(scope="module")
def outputs(models):
    out = {}
    torch.set_num_threads(1)
    for name, model in models.items():
        for image in IMAGES:
            ref = torch.load(GOLDEN / f"ref_{name}_{image}.pt", weights_only=True)
            batch = ImageBatch(
                ref["inputs"], [tuple(ref["img_shape"])], [tuple(ref["ori_shape"])],
                torch.tensor(ref["scale_factor"])[None],
            )
            out[name, image] = (ref, model.predict_raw(batch), model.predict(batch))
    return out


CASES = [(m, i) for m in MODELS for i in IMAGES]


@pytest.mark.parametrize("name,image", CASES)
def test_fpn_and_proposals(outputs, name, image):
    ref, raw, _ = outputs[name, image]
    for level in range(5):
        torch.testing.assert_close(raw.fpn[level], ref[f"fpn_p{level + 2}"], atol=1e-4, rtol=0)
    # proposals: same set (scores bunch, so allow order swaps among near-equal scores)
    boxes, scores = raw.proposals[0], raw.proposal_scores[0]
    assert boxes.shape == ref["rpn_boxes"].shape
    idx = match_detections(boxes, scores, torch.zeros(len(boxes)), ref["rpn_boxes"], ref["rpn_scores"],
                           torch.zeros(len(boxes)), iou_thr=0.999, score_tol=1e-5)
    assert min(idx) >= 0


@pytest.mark.parametrize("name,image", CASES)
def test_stage_logits_and_boxes(outputs, name, image):
    ref, raw, _ = outputs[name, image]
    roi = raw.roi[0]
    for t in range(len(roi.stage_logits)):
        torch.testing.assert_close(roi.stage_rois[t], ref[f"stage{t}_rois"], atol=1e-3, rtol=0)
        torch.testing.assert_close(roi.stage_logits[t], ref[f"stage{t}_cls_logits"], atol=1e-4, rtol=0)
    if name == "htc":
        torch.testing.assert_close(raw.semantic_logits[0], ref["semantic_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(raw.semantic_feat[0], ref["semantic_feat"], atol=1e-4, rtol=0)
        assert len(roi.stage_logits) == 3


@pytest.mark.parametrize("name,image", CASES)
def test_final_detections_and_mask_probs(outputs, name, image):
    ref, raw, dets = outputs[name, image]
    roi = raw.roi[0]
    idx = match_detections(roi.boxes, roi.scores, roi.labels, ref["det_boxes_input_frame"], ref["det_scores"],
                           ref["det_labels"], iou_thr=0.999, score_tol=1e-5)
    assert min(idx) >= 0 and len(roi.boxes) == len(ref["det_boxes"])
    ours = torch.tensor(idx)
    torch.testing.assert_close(dets[0].boxes[ours], ref["det_boxes"], atol=1e-3, rtol=0)
    stages = 3 if name == "htc" else 1
    for t in range(stages):
        torch.testing.assert_close(roi.stage_mask_probs[t][ours], ref[f"mask_probs_stage{t}"], atol=1e-4, rtol=0)
    if name == "htc":
        torch.testing.assert_close(roi.mask_probs[ours], ref["mask_probs_v2_mean"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,image", CASES)
def test_pasted_masks(outputs, name, image):
    """Full-resolution masks: v2 mean masks for HTC (instseg's default), plain masks for Mask R-CNN;
    and, for HTC, mmdet 3.3.0's last-stage-only masks via mask_merge='last'."""
    ref, raw, dets = outputs[name, image]
    roi = raw.roi[0]
    idx = match_detections(roi.boxes, roi.scores, roi.labels, ref["det_boxes_input_frame"], ref["det_scores"],
                           ref["det_labels"], iou_thr=0.999, score_tol=1e-5)
    ours = dets[0].masks[torch.tensor(idx)].numpy()
    expected = decode_rles(ref["masks_v2_mean_rle"] if name == "htc" else ref["masks_rle"])
    ious = [mask_iou(a, b) for a, b in zip(ours, expected)]
    assert min(ious) > 0.99, f"worst mask IoU {min(ious):.4f}"
    if name == "htc":
        last = paste_masks(roi.stage_mask_probs[2][torch.tensor(idx)], dets[0].boxes[torch.tensor(idx)],
                           tuple(ref["ori_shape"]))
        expected_v3 = decode_rles(ref["masks_rle"])
        ious = [mask_iou(a, b) for a, b in zip(last.numpy(), expected_v3)]
        assert min(ious) > 0.99
        assert np.array_equal(ref["masks_area"].numpy(), expected_v3.reshape(len(expected_v3), -1).sum(1))
