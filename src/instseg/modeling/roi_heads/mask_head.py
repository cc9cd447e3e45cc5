"""FCN mask head (Mask R-CNN) with HTC's optional mask-information-flow input.

Four 3x3 conv + ReLU layers on a 14x14 RoI feature, a 2x2 stride-2 deconv + ReLU to 28x28 and a
1x1 conv to one logit map per class.  With ``with_conv_res`` (HTC stages 1 and 2) the previous
stage's 4th-conv feature passes through a 1x1 conv + ReLU and is added to the input before the
first conv.  Parameter names follow mmdetection (``convs.{i}.conv``, ``upsample``,
``conv_logits``, ``conv_res.conv``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvReLU(nn.Module):
    """Conv + ReLU with the conv stored as ``.conv`` (mmcv ``ConvModule`` key layout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class FCNMaskHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        conv_channels: int = 256,
        num_convs: int = 4,
        num_classes: int,
        class_agnostic: bool = False,
        with_conv_res: bool = False,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [ConvReLU(in_channels if i == 0 else conv_channels, conv_channels, 3) for i in range(num_convs)]
        )
        self.upsample = nn.ConvTranspose2d(conv_channels, conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, 1 if class_agnostic else num_classes, 1)
        self.conv_res = ConvReLU(conv_channels, conv_channels, 1) if with_conv_res else None
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def features(self, x: Tensor, prev_feat: Tensor | None = None) -> Tensor:
        """The 14x14 feature after the last conv (HTC's ``res_feat``), with the info-flow input."""
        if prev_feat is not None:
            if self.conv_res is None:
                raise RuntimeError("this mask head has no conv_res: it cannot take a previous stage's feature")
            x = x + self.conv_res(prev_feat)
        for conv in self.convs:
            x = conv(x)
        return x

    def logits(self, feat: Tensor) -> Tensor:
        """28x28 per-class mask logits from the 14x14 feature."""
        return self.conv_logits(F.relu(self.upsample(feat)))

    def forward(self, x: Tensor, prev_feat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feat = self.features(x, prev_feat)
        return self.logits(feat), feat
