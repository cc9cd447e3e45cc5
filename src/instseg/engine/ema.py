"""Exponential moving average of a model's weights (``train.ema``).

After every optimizer step ``ema = d * ema + (1 - d) * weights`` for each floating-point entry of the
state dict (parameters and float buffers such as BatchNorm statistics; integer buffers are copied),
with ``d = decay * (1 - exp(-updates / tau))`` (YOLOv5's ramp, so early, poor weights fade out
quickly; ``tau = 0`` gives a constant ``decay``).  The trainer evaluates, and writes ``best.pt``
from, the averaged copy.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Holds ``module``, a frozen copy of the model whose weights are the moving average."""

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, tau: int = 2000, updates: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.tau = int(tau)
        self.updates = int(updates)

    def current_decay(self) -> float:
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"], strict=True)
        self.updates = int(state.get("updates", 0))
