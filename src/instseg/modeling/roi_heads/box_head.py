"""``Shared2FCBBoxHead``: flatten -> fc -> ReLU -> fc -> ReLU -> (class logits, box deltas).

The class logits have ``num_classes + 1`` columns with background LAST, as in mmdetection v2+,
so converted checkpoints line up row for row.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Shared2FCBoxHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        roi_size: int = 7,
        fc_channels: int = 1024,
        num_classes: int,
        class_agnostic: bool,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 if class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)
