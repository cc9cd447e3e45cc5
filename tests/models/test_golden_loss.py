"""Training losses and gradients match mmdetection's on one fixed image (PseudoSampler everywhere)."""

from __future__ import annotations

import re

import pytest
import torch

from instseg.config.presets import get_preset
from instseg.convert.mmdet import convert_checkpoint
from instseg.modeling.zoo import build_model
from instseg.structures import CroppedMasks, ImageBatch, ImageTargets
from tests.golden_utils import GOLDEN, MODELS, decode_rles, requires_golden

pytestmark = [requires_golden, pytest.mark.golden]


def _instseg_param_name(mmdet_name: str) -> str:
    m = re.match(r"^roi_head\.(bbox_head|mask_head)\.(?:(\d+)\.)?(.*)$", mmdet_name)
    if not m:
        return mmdet_name
    head = "box_head" if m.group(1) == "bbox_head" else "mask_head"
    return f"roi_head.stages.{m.group(2) or '0'}.{head}.{m.group(3)}"


@pytest.mark.parametrize("name", list(MODELS))
def test_losses_and_gradients(name):
    torch.set_num_threads(1)
    preset, ckpt = MODELS[name]
    cfg = get_preset(preset)
    cfg.model.rpn_batch_per_image = 0  # 0 = PseudoSampler: keep every assigned anchor / RoI
    cfg.model.rcnn_batch_per_image = 0
    model = build_model(cfg.model)
    model.load_state_dict(convert_checkpoint(GOLDEN / ckpt, cfg)["model"])
    model.train()
    ref = torch.load(GOLDEN / f"loss_ref_{name}.pt", weights_only=True)
    h, w = ref["gt_masks_shape"][-2:]
    masks = CroppedMasks.from_full(decode_rles(ref["gt_masks_rle"]))
    assert masks.frame == (h, w)
    semantic = ref["gt_sem_seg"][0].long() if "gt_sem_seg" in ref else None
    targets = ImageTargets(ref["gt_bboxes"].float(), ref["gt_labels"], masks, semantic)
    batch = ImageBatch(ref["inputs"], [tuple(ref["img_shape"])], [tuple(ref["ori_shape"])],
                       torch.tensor(ref["scale_factor"])[None])
    losses = model(batch, [targets])
    for key, value in ref["losses"].items():
        assert float(losses[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key
    losses["loss"].backward()
    params = dict(model.named_parameters())
    for key, value in ref["grad_norms"].items():
        if key == "__all_params__":
            total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
            assert float(total) == pytest.approx(value, rel=1e-3)
        else:
            assert float(params[_instseg_param_name(key)].grad.norm()) == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert sum(p.grad is not None for p in model.parameters()) == ref["num_params_with_grad"]
