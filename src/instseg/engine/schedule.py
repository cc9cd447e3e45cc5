"""Learning-rate schedule: mmdetection v2's linear warmup followed by step decay.

The schedule is a pure function of the global iteration, so the trainer sets every param
group's ``lr`` from it before each step and a resumed run only needs the iteration counter.
"""

from __future__ import annotations

from collections.abc import Sequence


def lr_at(
    it: int,
    *,
    base_lr: float,
    warmup_iters: int,
    warmup_ratio: float,
    steps_iters: Sequence[int],
    gamma: float = 0.1,
) -> float:
    """Learning rate at (0-based) global iteration ``it``.

    Step decay: ``lr = base_lr * gamma ** k`` where ``k`` counts the steps ``s`` with ``it >= s``.
    Linear warmup (mmdet ``warmup='linear'``) scales that rate for ``it < warmup_iters`` by
    ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``, i.e. from ``warmup_ratio`` at
    iteration 0 up to 1 at ``warmup_iters``.
    """
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    decays = sum(1 for s in steps_iters if it >= s)
    lr = base_lr * gamma**decays
    if warmup_iters > 0 and it < warmup_iters:
        lr *= 1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def steps_to_iters(lr_steps: Sequence[int], iters_per_epoch: int, *, by_epoch: bool) -> list[int]:
    """Converts ``train.lr_steps`` to iterations (they are epochs unless ``by_epoch`` is False)."""
    if not by_epoch:
        return [int(s) for s in lr_steps]
    return [int(s) * int(iters_per_epoch) for s in lr_steps]
