import math

import pytest

from instseg.engine.schedule import lr_at, steps_to_iters

BASE = dict(base_lr=0.02, warmup_iters=500, warmup_ratio=0.001, steps_iters=[8000, 11000])


def test_warmup_starts_at_ratio():
    assert math.isclose(lr_at(0, **BASE), 0.02 * 0.001, rel_tol=1e-12)


def test_warmup_is_linear_and_ends_at_base():
    mid = lr_at(250, **BASE)
    assert math.isclose(mid, 0.02 * (1 - 0.5 * (1 - 0.001)), rel_tol=1e-12)
    assert lr_at(499, **BASE) < 0.02
    assert math.isclose(lr_at(500, **BASE), 0.02, rel_tol=1e-12)
    assert math.isclose(lr_at(7999, **BASE), 0.02, rel_tol=1e-12)
    values = [lr_at(i, **BASE) for i in range(0, 501, 50)]
    assert values == sorted(values)


def test_step_decay():
    assert math.isclose(lr_at(8000, **BASE), 0.002, rel_tol=1e-12)
    assert math.isclose(lr_at(10999, **BASE), 0.002, rel_tol=1e-12)
    assert math.isclose(lr_at(11000, **BASE), 0.0002, rel_tol=1e-12)
    assert math.isclose(lr_at(10**6, **BASE), 0.0002, rel_tol=1e-12)


def test_no_warmup_and_gamma():
    kw = dict(base_lr=1.0, warmup_iters=0, warmup_ratio=0.1, steps_iters=[3])
    assert lr_at(0, **kw) == 1.0
    assert math.isclose(lr_at(3, **kw, gamma=0.5), 0.5)


def test_warmup_applies_to_decayed_rate():
    # mmdet v2 warms up the regular (already step-decayed) rate
    kw = dict(base_lr=1.0, warmup_iters=10, warmup_ratio=0.5, steps_iters=[0])
    assert math.isclose(lr_at(0, **kw), 0.1 * 0.5)


def test_steps_to_iters():
    assert steps_to_iters((8, 11), 100, by_epoch=True) == [800, 1100]
    assert steps_to_iters((8, 11), 100, by_epoch=False) == [8, 11]


def test_negative_iteration_rejected():
    with pytest.raises(ValueError):
        lr_at(-1, **BASE)


def test_build_optimizer_sgd_adamw_and_unknown():
    from torch import nn

    from instseg.config.load import ConfigError
    from instseg.config.schema import TrainConfig
    from instseg.engine.trainer import build_optimizer

    params = list(nn.Linear(2, 2).parameters())
    sgd = build_optimizer(params, TrainConfig(lr=0.1, momentum=0.8, weight_decay=1e-3))
    assert type(sgd).__name__ == "SGD" and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(params, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert type(adamw).__name__ == "AdamW" and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="train.optimizer"):
        build_optimizer(params, TrainConfig(optimizer="lamb"))
