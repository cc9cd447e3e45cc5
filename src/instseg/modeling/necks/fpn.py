"""Feature Pyramid Network as mmdetection v2 builds it (``mmdet/models/necks/fpn.py``).

Default use (HTC / Mask R-CNN / Cascade): ``FPN(in_channels=[256, 512, 1024, 2048],
out_channels=256, num_outs=5)`` -> [P2, P3, P4, P5, P6] where P6 = ``max_pool2d(P5, 1, stride=2)``.

* laterals: 1x1 conv with bias on each input level;
* top-down: ``lat[i-1] += interpolate(lat[i], size=lat[i-1].shape[-2:], mode="nearest")``;
* outputs: 3x3 conv (padding 1, bias) on each merged lateral;
* extra levels: parameter-free max-pool (``add_extra_convs=False``) or stride-2 3x3 convs
  (``add_extra_convs="on_input" | "on_lateral" | "on_output"``; ``True`` means ``"on_input"``, as in
  mmdetection v2), appended to ``fpn_convs`` after the output convs as mmdetection does;
* no norm, no activation (except the optional ``relu_before_extra_convs``); Xavier-uniform init,
  bias 0.

Parameter names equal mmdetection's ``neck.*`` keys: ``lateral_convs.{i}.conv.weight/bias`` and
``fpn_convs.{i}.conv.weight/bias``.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPN", "ConvWrapper"]


class ConvWrapper(nn.Module):
    """A bare ``nn.Conv2d`` under the attribute ``conv`` (mmcv ``ConvModule`` without norm/act)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=True
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """mmdetection's FPN: 1x1 laterals (bias), nearest top-down to the exact size, 3x3 outputs.

    Args:
        in_channels: channels of every backbone level passed to ``forward``.
        out_channels: channels of every output level.
        num_outs: number of outputs; levels beyond the used backbone levels are extra levels.
        start_level: first backbone level used (RetinaNet: 1, i.e. C3..C5).
        add_extra_convs: ``False`` -> extra levels by ``max_pool2d(x, 1, stride=2)`` of the last
            output; otherwise the source of the first stride-2 extra conv.
        relu_before_extra_convs: apply ReLU before the 2nd and later extra convs.
        upsample_mode: top-down interpolation, ``"nearest"`` (mmdet default) or ``"bilinear"``
            (``align_corners=False``; mmdet's YOLACT config and the official YOLACT).
        relu_outputs: ReLU on the outputs of the used levels, before the extra levels are built
            from them (the official YOLACT's ``relu_pred_layers``; its P6 comes from the ReLU'd P5).
    """

    def __init__(
        self,
        *,
        in_channels: list[int],
        out_channels: int = 256,
        num_outs: int = 5,
        start_level: int = 0,
        add_extra_convs: bool | Literal["on_input", "on_lateral", "on_output"] = False,
        relu_before_extra_convs: bool = False,
        upsample_mode: Literal["nearest", "bilinear"] = "nearest",
        relu_outputs: bool = False,
    ) -> None:
        super().__init__()
        if upsample_mode not in ("nearest", "bilinear"):
            raise ValueError(f"invalid upsample_mode={upsample_mode!r}")
        self.upsample_mode = upsample_mode
        self.relu_outputs = relu_outputs
        in_channels = list(in_channels)
        if not 0 <= start_level < len(in_channels):
            raise ValueError(f"start_level {start_level} out of range for {len(in_channels)} inputs")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_ins = len(in_channels)
        self.start_level = start_level
        self.backbone_end_level = self.num_ins
        self.num_outs = num_outs
        used = self.backbone_end_level - start_level
        if num_outs < used:
            raise ValueError(f"num_outs={num_outs} < number of used input levels ({used})")
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs not in (False, "on_input", "on_lateral", "on_output"):
            raise ValueError(f"invalid add_extra_convs={add_extra_convs!r}")
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvWrapper(in_channels[i], out_channels, 1))
            self.fpn_convs.append(ConvWrapper(out_channels, out_channels, 3))
        if add_extra_convs:
            for j in range(num_outs - used):
                if j == 0 and add_extra_convs == "on_input":
                    c_in = in_channels[self.backbone_end_level - 1]
                else:
                    c_in = out_channels
                self.fpn_convs.append(ConvWrapper(c_in, out_channels, 3, stride=2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1.0)
                nn.init.zeros_(m.bias)

    def _upsample(self, x: Tensor, size) -> Tensor:
        if self.upsample_mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, feats: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        if len(feats) != self.num_ins:
            raise ValueError(f"FPN expects {self.num_ins} feature maps, got {len(feats)}")
        s = self.start_level
        laterals = [conv(feats[i + s]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.relu_outputs:
            outs = [F.relu(o) for o in outs]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    src = feats[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    src = laterals[-1]
                else:
                    src = outs[-1]
                outs.append(self.fpn_convs[used](src))
                for i in range(used + 1, self.num_outs):
                    x = outs[-1]
                    if self.relu_before_extra_convs:
                        x = F.relu(x)
                    outs.append(self.fpn_convs[i](x))
        return outs
