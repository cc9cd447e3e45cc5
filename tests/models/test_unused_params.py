"""DDP-safety: every trainable parameter gets a gradient every iteration (``touch_all_parameters``).

DistributedDataParallel(find_unused_parameters=False) fails when a parameter gets no gradient in an
iteration.  The two-stage heads already return zero losses connected to their outputs on batches
without gt; ``Detector.forward`` adds a zero term over all trainable parameters as a guarantee for
every model and for any head that skips its work.  The tests attach a parameter the loss never uses
(as a head skipped for a batch would be) to see the guarantee act.
"""

from __future__ import annotations

import pytest
import torch

from instseg.modeling.zoo import build_model
from tests.models.tiny import tiny_batch, tiny_config


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["mask_rcnn", "htc"])
def test_empty_gt_batch_gives_every_parameter_a_zero_or_true_gradient(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).train()
    model.skipped_head = torch.nn.Linear(3, 2)  # a head this batch does not use
    batch, targets = tiny_batch()
    empty = [targets[1], targets[1]]

    torch.manual_seed(1)  # same proposals / samples in both passes
    model.zero_grad(set_to_none=True)
    model.loss(batch, empty)["loss"].backward()  # the raw losses, without the zero terms
    raw = _grads(model)
    unused = sorted(n for n, g in raw.items() if g is None)
    assert unused == ["skipped_head.bias", "skipped_head.weight"]

    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    out = model(batch, empty)  # forward(): what the trainer (and DDP) calls
    out["loss"].backward()
    touched = _grads(model)
    assert all(g is not None for g in touched.values()), "every trainable parameter gets a gradient"
    for n, g in touched.items():
        if raw[n] is None:
            assert torch.count_nonzero(g) == 0, n
        else:
            assert torch.equal(g, raw[n]), f"the zero term changed the gradient of {n}"


def test_zero_term_leaves_the_loss_value_and_inference_alone():
    torch.manual_seed(0)
    model = build_model(tiny_config("mask_rcnn")).train()
    batch, targets = tiny_batch()
    torch.manual_seed(3)
    raw = model.loss(batch, targets)["loss"].detach()
    torch.manual_seed(3)
    assert torch.equal(model(batch, targets)["loss"].detach(), raw)
    with torch.no_grad():  # no autograd: nothing is added (evaluation of a loss, e.g. a val loss)
        torch.manual_seed(3)
        assert torch.equal(model(batch, targets)["loss"], raw)
