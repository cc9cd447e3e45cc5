"""Loss helpers against mmdet's definitions written out element by element."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instseg.ops.losses import accuracy, box_regression_loss, mask_bce, smooth_l1


def _ref_smooth_l1(p, t, beta):
    d = abs(p - t)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


@pytest.mark.parametrize("beta", [1.0, 1.0 / 9.0, 0.5])
def test_smooth_l1(beta):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    pred[0, 0] = target[0, 0] + beta  # exactly at beta: linear branch (diff < beta is quadratic)
    got = smooth_l1(pred, target, beta)
    ref = [[_ref_smooth_l1(p, t, beta) for p, t in zip(pr, tr)] for pr, tr in zip(pred.tolist(), target.tolist())]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    # continuous at beta
    assert _ref_smooth_l1(beta, 0, beta) == pytest.approx(0.5 * beta)


def test_smooth_l1_beta_zero_is_l1():
    pred, target = torch.randn(10), torch.randn(10)
    assert torch.equal(smooth_l1(pred, target, 0.0), (pred - target).abs())


def test_box_regression_loss_kinds():
    pred, target = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    torch.testing.assert_close(box_regression_loss(pred, target, "l1"), (pred - target).abs())
    torch.testing.assert_close(box_regression_loss(pred, target, "smooth_l1"), smooth_l1(pred, target, 1.0))
    torch.testing.assert_close(box_regression_loss(pred, target, "smooth_l1_rpn"), smooth_l1(pred, target, 1.0 / 9.0))
    with pytest.raises(ValueError, match="unknown box loss"):
        box_regression_loss(pred, target, "giou")


def test_accuracy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 81, generator=g)
    labels = torch.randint(0, 81, (50,), generator=g)
    labels[:10] = logits[:10].argmax(1)
    ref = 100.0 * sum(int(np.argmax(row)) == int(lab) for row, lab in zip(logits.numpy(), labels)) / 50
    assert float(accuracy(logits, labels)) == pytest.approx(ref)
    assert float(accuracy(logits[:0], labels[:0])) == 0.0


def _ref_bce(x, t):
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


@pytest.mark.parametrize("channels", [1, 5])
def test_mask_bce(channels):
    g = torch.Generator().manual_seed(2)
    k, m = 6, 7
    logits = torch.randn(k, channels, m, m, generator=g, dtype=torch.float64)
    targets = (torch.rand(k, m, m, generator=g) > 0.5).double()
    labels = torch.randint(0, channels, (k,), generator=g)
    got = mask_bce(logits, targets, labels)
    total = 0.0
    for r in range(k):
        c = 0 if channels == 1 else int(labels[r])
        for i in range(m):
            for j in range(m):
                total += _ref_bce(float(logits[r, c, i, j]), float(targets[r, i, j]))
    assert float(got) == pytest.approx(total / (k * m * m), rel=1e-10)


def test_mask_bce_empty_keeps_graph():
    logits = torch.randn(0, 3, 7, 7, requires_grad=True)
    loss = mask_bce(logits, torch.zeros(0, 7, 7), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
