"""What every detector shares: the ``forward`` dispatch and the inference speed-ups.

Subclasses implement ``loss(batch, targets) -> dict`` and ``predict(batch) -> list[Detections]``
(in each image's original frame); everything above ``modeling/`` sees only that contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from instseg.structures.instances import Detections, ImageBatch, ImageTargets


def total_loss(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds ``loss``: the sum of every entry whose name contains ``loss`` (what mmdetection's
    ``parse_losses`` back-propagates; metrics such as ``acc`` are left out)."""
    losses["loss"] = sum(v for k, v in losses.items() if "loss" in k)
    return losses


def touch_all_parameters(losses: dict[str, Tensor], module: nn.Module) -> dict[str, Tensor]:
    """Adds ``0 * sum(p)`` of every trainable parameter of ``module`` to ``losses['loss']``.

    Why: a head that a batch does not use (mask heads when no RoI is positive, HTC's later stages
    on an image without gt, a branch switched off for one iteration) would get no gradient, and
    DistributedDataParallel with ``find_unused_parameters=False`` then fails on the next iteration
    (it waits for a gradient that never comes).  With this term every trainable parameter gets a
    gradient every iteration: exactly zero where the batch did not use it (as mmdetection's heads
    return ``pred.sum() * 0`` on empty batches), unchanged elsewhere; the loss value is unchanged.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if params and "loss" in losses and torch.is_grad_enabled():
        zero = torch.stack([p.sum() for p in params]).sum() * 0.0
        losses["loss"] = losses["loss"] + zero.to(losses["loss"].dtype)
    return losses


class Detector(nn.Module):
    """Base of the one- and two-stage detectors: ``backbone`` + ``neck`` plus heads."""

    backbone: nn.Module
    neck: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._channels_last = False  # see use_channels_last()

    def forward(
        self, batch: ImageBatch, targets: Sequence[ImageTargets] | None = None
    ) -> dict[str, Tensor] | list[Detections]:
        if targets is None:
            return self.predict(batch)
        return touch_all_parameters(self.loss(batch, targets), self)

    def loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, batch: ImageBatch) -> list[Detections]:
        raise NotImplementedError

    @torch.no_grad()
    def optimize_for_inference(self, *, channels_last: bool = True) -> "Detector":
        """Prepares the model for fast inference, IN PLACE; returns ``self``. Idempotent.

        - Puts the model in eval mode and folds the backbone's BatchNorm layers into the
          convolutions before them (one conv instead of conv + BN per layer).  Folding is exact
          only for eval-mode BN and changes the parameterisation, so do not train (or save for
          training) a model after calling this.  Backbones without BN folding are left alone.
        - With ``channels_last``, convolutions run in NHWC memory format (see
          :meth:`use_channels_last`); results equal NCHW up to float rounding.
        """
        self.eval()
        fuse = getattr(self.backbone, "fuse_bn_for_inference", None)
        if fuse is not None:
            # re-running is a no-op: folded BN layers are already nn.Identity
            fuse()
        if channels_last:
            self.use_channels_last()
        return self

    def use_channels_last(self, enabled: bool = True) -> "Detector":
        """Stores every conv weight channels-last (NHWC) and feeds the backbone NHWC; returns ``self``.

        oneDNN (CPU) and cuDNN convolutions, forward and backward, are faster in NHWC (on CPU
        about 25-30 % for the R-50-FPN backbone and the 100-RoI mask head).  Memory format is only
        a layout: every op still sees the same logical tensor, so results change by float rounding
        at most, and parameter names and values (hence checkpoints) are unaffected.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.to(memory_format=fmt)  # only 4-D parameters (conv weights) change layout
        self._channels_last = enabled
        return self

    def extract_feats(self, images: Tensor) -> list[Tensor]:
        """Neck outputs for a batch of images (channels-last input when enabled)."""
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.neck(self.backbone(images))
