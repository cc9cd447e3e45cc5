"""Loss functions with mmdetection's reductions (sum / avg_factor where mmdet uses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32(t: Tensor) -> Tensor:
    """Half-precision tensors (from autocast) upcast to float32: loss terms need its precision and
    range (a squared difference or a sum over thousands of elements overflows or rounds in fp16)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Element-wise smooth L1 as mmdet defines it (quadratic below ``beta``)."""
    diff = (_fp32(pred) - _fp32(target)).abs()
    if beta <= 0:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def box_regression_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Element-wise box loss: ``l1``, ``smooth_l1`` (beta 1.0) or ``smooth_l1_rpn`` (beta 1/9)."""
    if kind == "l1":
        return (_fp32(pred) - _fp32(target)).abs()
    if kind == "smooth_l1":
        return smooth_l1(pred, target, 1.0)
    if kind == "smooth_l1_rpn":
        return smooth_l1(pred, target, 1.0 / 9.0)
    raise ValueError(f"unknown box loss {kind!r}; expected l1, smooth_l1 or smooth_l1_rpn")


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy in percent (mmdet logs it as ``acc``)."""
    if labels.numel() == 0:
        return logits.new_tensor(0.0)
    return (logits.argmax(dim=1) == labels).float().mean() * 100.0


def mask_bce(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """BCE-with-logits on each RoI's ground-truth class channel, averaged over RoIs and pixels."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if logits.shape[1] == 1:
        chosen = logits[:, 0]
    else:
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(_fp32(chosen), _fp32(targets), reduction="mean")
