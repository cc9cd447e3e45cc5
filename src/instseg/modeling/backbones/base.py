"""What every backbone shares: mmdetection's ``frozen_stages`` and ``norm_eval`` semantics."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenStagesBackbone(nn.Module):
    """Keeps frozen stages (no gradients, eval mode) and, with ``norm_eval``, every BN in eval mode.

    Subclasses set ``self.norm_eval`` and implement :meth:`_frozen_modules`.
    """

    norm_eval: bool

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenStagesBackbone:
        """Set train/eval mode; frozen stages, and with ``norm_eval`` every BN, stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
