"""The HTC switches do exactly what the paper says, and nothing else.

- interleaved: stage t's mask branch trains on boxes re-sampled after stage t's refinement;
- mask information flow: stage 2's mask loss reaches stage 0's mask convs (no detach);
- semantic fusion: the semantic feature enters box features and/or mask features as configured.
"""

from __future__ import annotations

import pytest
import torch

from instseg.modeling.roi_heads.cascade import CascadeRoIHead
from instseg.modeling.zoo import build_model
from tests.models.tiny import tiny_batch, tiny_config


def _record_mask_samples(model, monkeypatch):
    """Records, per stage, the box-branch sample, the refined boxes and the mask-branch sample."""
    box_samples, refined, mask_samples = [], [], []
    head: CascadeRoIHead = model.roi_head
    orig_box, orig_refine, orig_mask = head._box_stage, head._refine, head._mask_loss

    def box_stage(t, *a, **k):
        out = orig_box(t, *a, **k)
        box_samples.append(out.samples)
        return out

    def refine(*a, **k):
        out = orig_refine(*a, **k)
        refined.append(out)
        return out

    def mask_loss(t, feats, samples, *a, **k):
        mask_samples.append(samples)
        return orig_mask(t, feats, samples, *a, **k)

    monkeypatch.setattr(head, "_box_stage", box_stage)
    monkeypatch.setattr(head, "_refine", refine)
    monkeypatch.setattr(head, "_mask_loss", mask_loss)
    return box_samples, refined, mask_samples


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    if rows.numel() == 0:
        return True
    return bool((torch.cdist(rows, pool, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values < 1e-4).all())


@pytest.mark.parametrize("interleaved", [True, False])
def test_which_boxes_each_mask_branch_sees(interleaved, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_config("htc", interleaved=interleaved)).train()
    for stage in model.roi_head.stages:  # make refinement shift boxes visibly (a small dx, dy)
        stage.box_head.fc_reg.bias.data = torch.tensor([0.2, 0.2, 0.0, 0.0])
    batch, targets = tiny_batch()
    box_samples, refined, mask_samples = _record_mask_samples(model, monkeypatch)
    model(batch, targets)
    assert len(mask_samples) == 3
    gt = targets[0].boxes
    for t in range(3):
        mask_pos = mask_samples[t][0].pos_boxes
        box_sample = box_samples[t][0]
        assert mask_pos.shape[0] > 0
        if interleaved:
            # re-sampled from stage t's refined boxes (GT boxes are re-added by the sampler)
            assert mask_samples[t][0] is not box_sample
            assert _rows_in(mask_pos, torch.cat([refined[t][0], gt]))
            # ... and not from the box branch's own (unrefined) proposals
            non_gt = mask_pos[~mask_samples[t][0].pos_is_gt]
            assert non_gt.numel() > 0
            assert (torch.cdist(non_gt, box_sample.sampled_boxes, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values > 1e-3).any()
        else:
            # the mask branch trains on the box branch's own positives
            assert mask_samples[t][0] is box_sample
    # either way stage t+1 starts from stage t's refined boxes, GT rows dropped
    for t in range(2):
        assert _rows_in(box_samples[t + 1][0].boxes[~torch.isin(torch.arange(box_samples[t + 1][0].boxes.shape[0]),
                        torch.arange(gt.shape[0]))], refined[t][0])


def _grad_of_stage2_mask_loss(info_flow: bool):
    torch.manual_seed(0)
    model = build_model(tiny_config("htc", mask_info_flow=info_flow)).train()
    batch, targets = tiny_batch()
    losses = model(batch, targets)
    losses["s2.loss_mask"].backward()
    return model


def test_mask_info_flow_reaches_stage0_convs():
    model = _grad_of_stage2_mask_loss(True)
    g = model.roi_head.stages[0].mask_head.convs[0].conv.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    assert float(model.roi_head.stages[2].mask_head.conv_res.conv.weight.grad.abs().sum()) > 0
    # stage 0's logits are not part of stage 2's chain
    assert model.roi_head.stages[0].mask_head.conv_logits.weight.grad is None


def test_without_info_flow_stage2_mask_loss_stays_in_stage2():
    model = _grad_of_stage2_mask_loss(False)
    assert model.roi_head.stages[0].mask_head.convs[0].conv.weight.grad is None
    assert model.roi_head.stages[1].mask_head.convs[0].conv.weight.grad is None
    assert model.roi_head.stages[2].mask_head.conv_res is None


@pytest.mark.parametrize("fusion", [("bbox", "mask"), ("bbox",), ("mask",)])
def test_semantic_fusion_paths(fusion):
    torch.manual_seed(0)
    model = build_model(tiny_config("htc", semantic_fusion=fusion)).train()
    batch, targets = tiny_batch()
    losses = model(batch, targets)
    sem_conv = model.roi_head.semantic_head.conv_embedding.conv.weight
    (g_cls,) = torch.autograd.grad(losses["s0.loss_cls"], sem_conv, retain_graph=True, allow_unused=True)
    (g_mask,) = torch.autograd.grad(losses["s0.loss_mask"], sem_conv, retain_graph=True, allow_unused=True)
    assert (g_cls is not None and float(g_cls.abs().sum()) > 0) == ("bbox" in fusion)
    assert (g_mask is not None and float(g_mask.abs().sum()) > 0) == ("mask" in fusion)


def test_semantic_off_has_no_branch_and_no_semantic_loss():
    model = build_model(tiny_config("htc", semantic=False)).train()
    assert model.roi_head.semantic_head is None
    batch, targets = tiny_batch()
    assert "loss_semantic_seg" not in model(batch, targets)


def test_semantic_label_out_of_range_is_a_clear_error():
    model = build_model(tiny_config("htc", semantic_classes=3)).train()
    batch, targets = tiny_batch()
    targets[0].semantic[:8, :8] = 5
    with pytest.raises(ValueError, match="semantic label 5 is outside 0..2"):
        model(batch, targets)


def test_test_time_scores_average_stage_logits_and_masks_average_stage_probs():
    torch.manual_seed(0)
    model = build_model(tiny_config("htc", score_thr=0.0)).eval()
    batch, _ = tiny_batch()
    raw = model.predict_raw(batch)
    roi = raw.roi[0]
    assert len(roi.stage_mask_probs) == 3
    torch.testing.assert_close(roi.mask_probs, torch.stack(roi.stage_mask_probs).mean(0))
    model.roi_head.mask_merge = "last"
    last = model.predict_raw(batch).roi[0]
    torch.testing.assert_close(last.mask_probs, last.stage_mask_probs[2])
