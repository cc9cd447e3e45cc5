"""HTC's semantic segmentation branch (mmdetection's ``FusedSemanticHead``).

All pyramid levels are resized (bilinear, ``align_corners=True``) to the fusion level (P3,
stride 8), each goes through its own 1x1 conv + ReLU, and they are summed.  Four 3x3 conv + ReLU
follow; ``conv_logits`` gives the per-pixel class logits and ``conv_embedding`` (1x1 + ReLU) the
semantic feature that the RoI heads pool and add to their box and mask features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.roi_heads.mask_head import ConvReLU
from instseg.structures.instances import IGNORE_LABEL


class FusedSemanticHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        conv_channels: int = 256,
        num_inputs: int = 5,
        fusion_level: int = 1,
        num_convs: int = 4,
        num_classes: int = 183,
        loss_weight: float = 0.2,
    ) -> None:
        super().__init__()
        self.fusion_level = fusion_level
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.lateral_convs = nn.ModuleList([ConvReLU(in_channels, in_channels, 1) for _ in range(num_inputs)])
        self.convs = nn.ModuleList(
            [ConvReLU(in_channels if i == 0 else conv_channels, conv_channels, 3) for i in range(num_convs)]
        )
        self.conv_embedding = ConvReLU(conv_channels, conv_channels, 1)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_logits.bias)

    @property
    def stride_factor(self) -> int:
        return 2 ** (self.fusion_level + 2)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Returns (logits ``(B, C, H/8, W/8)``, semantic feature ``(B, channels, H/8, W/8)``)."""
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        for i, f in enumerate(feats):
            if i != self.fusion_level:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=True)
                x = x + self.lateral_convs[i](f)
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(x), self.conv_embedding(x)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Weighted CE against padded label maps ``(B, Hp, Wp)`` downsampled (nearest) to the logits.

        Like mmdet (``avg_non_ignore=False``), the mean runs over all pixels, ignored ones included.
        """
        small = F.interpolate(labels[:, None].float(), scale_factor=1.0 / self.stride_factor, mode="nearest")
        small = small[:, 0].long()
        if small.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"semantic labels downsample to {tuple(small.shape[-2:])} but logits are {tuple(logits.shape[-2:])}"
            )
        bad = (small != IGNORE_LABEL) & ((small < 0) | (small >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"semantic label {int(small[bad][0])} is outside 0..{self.num_classes - 1} (and is not "
                f"{IGNORE_LABEL} = ignore); set model.semantic_classes to the data's class count"
            )
        ce = F.cross_entropy(logits.float(), small, ignore_index=IGNORE_LABEL, reduction="sum")
        return self.loss_weight * ce / max(small.numel(), 1)


def empty_like_labels(batch_size: int, height: int, width: int, device: torch.device) -> Tensor:
    """An all-ignore label map, for images that have no semantic annotation."""
    return torch.full((batch_size, height, width), IGNORE_LABEL, dtype=torch.int64, device=device)
