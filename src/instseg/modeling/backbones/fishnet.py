"""FishNet-99 / 150 / 201 backbones (Sun et al., NeurIPS 2018; code: ``kevin-ssy/FishNet``).

Written from the architecture description (spec section 6, ``../shared/golden/official/README.md``);
the module tree reproduces the official one, so the parameter names ARE the official state-dict keys
(``conv1.0.weight``, ``fish.fish.3.1.weight``, ``fish.fish.9.4.1.bias`` ...) and an official ImageNet
checkpoint (``{'state_dict': {'module.' + key: ...}, 'epoch', 'arch', ...}``) loads after the
``module.`` prefix is stripped (:func:`~instseg.modeling.backbones.resnet.load_backbone_weights` does
that).

Layout (``s`` = stage index of ``fish.fish.<s>``; channels for every depth)::

    stem   conv1 (3->32, /2), conv2 (32->32), conv3 (32->64), pool1 (maxpool 3x3 /2)   64 ch, stride 4
    tail   s=0,1,2   residual blocks, then 2x2 max-pool                  128 / 256 / 512 at 8 / 16 / 32
    bridge s=3       BN-ReLU-1x1(512->256)-BN-ReLU, 1x1(256->1024), SE attention, blocks  512 at 32
    body   s=4,5,6   blocks (first in UP mode) + x2 nearest upsample  ++  transfer blocks
                     of [stage 1, stage 0, stem]                        768 / 512 / 320 at 16 / 8 / 4
    head   s=7,8,9   blocks + 2x2 max-pool  ++  transfer blocks of
                     [stage 5, stage 4, bridge]                         832 / 1600 / 2112 at 8 / 16 / 32
    score  fish.fish.9.3  BN-ReLU-1x1(2112->1056)-BN-ReLU;  fish.fish.9.4  avgpool + 1x1 conv (fc)

Every block is a pre-activation bottleneck (``bn1``-ReLU-``conv1`` 1x1 -> C/4, ``bn2``-ReLU-``conv2``
3x3, ``bn3``-ReLU-``conv3`` 1x1 -> C) with a BN-ReLU-1x1 projection ``shortcut`` when the channel
count changes; the first block of a body stage squeezes its identity instead (sum of k = Cin // Cout
adjacent channels), and every residual block of body stage s has dilation 2 ** (s - 4).

The detector maps (:meth:`FishNet.forward`) are the outputs of stages 6, 7, 8, 9: 320, 832, 1600
and 2112 channels at strides 4, 8, 16, 32. :meth:`FishNet.forward_classifier` gives the ImageNet
logits (``with_classifier=True`` only), :meth:`FishNet.forward_features` every stage output.

**Input size.** The three pools of the tail (floor mode) and the three x2 upsamplings of the body
must meet again, so ``ceil(H / 4)`` and ``ceil(W / 4)`` must be multiples of 8, i.e. H, W in
``{32m - 3, ..., 32m}``; multiples of 32 (the data pipeline's default ``size_divisor=32``) are
always fine. Any other size is zero-padded at the bottom / right to the next multiple of 32 before
the stem (``pad_input=True``, the default; with ``pad_input=False`` it raises ``ValueError``). The
returned maps then cover the padded image, as they would after the collate's own padding.

**Classifier.** ``with_classifier=False`` (the default, for detection) builds no ``fish.fish.9.3``
/ ``fish.fish.9.4`` modules, and loading an official checkpoint then DROPS their keys (every other
key must match); ``with_classifier=True`` keeps them (the full official network, 16,628,904 /
24,959,400 parameters for FishNet-99 / 150) and then requires them in the checkpoint.

**Freezing.** ``frozen_stages=k`` (``k >= 0``) keeps the stem and ``fish.fish.0 .. fish.fish.{k-1}``
(whole stages, transfer blocks included) in eval mode without gradients; ``-1`` freezes nothing.
``norm_eval=True`` keeps every BatchNorm in eval mode while training.

**Fusing.** The blocks are pre-activation, so only a BN that FOLLOWS a convolution can be folded:
``bn2`` into ``conv1``, ``bn3`` into ``conv2``, the stem BNs and the BN after the bridge / score 1x1
convs. :meth:`FishNet.fuse_bn_for_inference` does exactly that; do not apply the generic
:func:`~instseg.modeling.backbones.resnet.fuse_conv_bn` to a FishNet (its ``bn1`` -> ``conv1``
sibling rule assumes post-activation blocks and would fold ``bn1`` wrongly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FrozenStagesBackbone
from .resnet import _fold, _foldable, load_backbone_weights

__all__ = ["FishNet", "FishBottleneck", "FISHNET_ARCH", "fishnet_valid_size"]

NUM_DOWN = 3  # tail stages (0..2); stage 3 is the bridge
NUM_UP = 3  # body stages (4..6); 7..9 are the head
TRANS_MAP = (2, 1, 0, 6, 5, 4)  # official: stage 4+j transfers all_feat[TRANS_MAP[j]] (0 = stem)
PLANES = (64, 128, 256, 512, 512, 512, 384, 256, 320, 832, 1600)  # stem, then stages 0..9
CLASSIFIER_PREFIXES = ("fish.fish.9.3.", "fish.fish.9.4.")


@dataclass(frozen=True)
class _Arch:
    num_res_blks: tuple[int, ...]  # per stage 0..9
    num_trans_blks: tuple[int, ...]  # per stage 4..9


FISHNET_ARCH: dict[int, _Arch] = {
    99: _Arch((2, 2, 6, 2, 1, 1, 1, 1, 2, 2), (1, 1, 1, 1, 1, 4)),
    150: _Arch((2, 4, 8, 4, 2, 2, 2, 2, 2, 4), (2, 2, 2, 2, 2, 4)),
    201: _Arch((3, 4, 12, 4, 2, 2, 2, 2, 3, 10), (2, 2, 2, 2, 2, 9)),
}


def fishnet_valid_size(n: int) -> bool:
    """Whether an input side of ``n`` pixels runs through FishNet unpadded (``ceil(n/4) % 8 == 0``)."""
    return n > 0 and math.ceil(n / 4) % 8 == 0


class FishBottleneck(nn.Module):
    """Pre-activation bottleneck of FishNet (official ``Bottleneck``; keys ``bn1 conv1 bn2 conv2 bn3
    conv3 shortcut.{0,2}``).

    ``up=True`` is the official ``mode='UP'``: no projection; the identity sums groups of ``k``
    adjacent channels (``x.view(n, c // k, k, h, w).sum(2)``).
    """

    def __init__(self, inplanes: int, planes: int, *, dilation: int = 1, up: bool = False, k: int = 1) -> None:
        super().__init__()
        width = planes // 4
        self.up = up
        self.k = k
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        if up:
            if inplanes != planes * k:
                raise ValueError(f"UP block: {inplanes} channels cannot be squeezed by k={k} to {planes}")
            self.shortcut: nn.Module | None = None
        elif inplanes != planes:
            self.shortcut = nn.Sequential(
                nn.BatchNorm2d(inplanes), nn.ReLU(inplace=True), nn.Conv2d(inplanes, planes, 1, bias=False)
            )
        else:
            self.shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.up:
            n, c, h, w = x.shape
            identity = x.reshape(n, c // self.k, self.k, h, w).sum(2)  # reshape: also for channels-last
        elif self.shortcut is not None:
            identity = self.shortcut(x)
        else:
            identity = x
        return out + identity


def _blocks(inplanes: int, planes: int, n: int, *, dilation: int = 1, up: bool = False, k: int = 1) -> nn.Sequential:
    """Official ``_make_residual_block``: the first block changes channels (plain blocks: dilation 1;
    UP block: the stage dilation), the others keep them with the stage dilation."""
    if up:
        first = FishBottleneck(inplanes, planes, dilation=dilation, up=True, k=k)
    else:
        first = FishBottleneck(inplanes, planes)
    return nn.Sequential(first, *[FishBottleneck(planes, planes, dilation=dilation) for _ in range(1, n)])


def _bn_relu_conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Keys ``.0`` BN(cin), ``.2`` conv 1x1 cin->cout (no bias), ``.3`` BN(cout)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Fish(nn.Module):
    """The official ``Fish`` container: only its ``fish`` ModuleList (10 stage ModuleLists) has keys."""

    def __init__(self, arch: _Arch, *, with_classifier: bool, num_classes: int) -> None:
        super().__init__()
        res, trans = arch.num_res_blks, arch.num_trans_blks
        stem_ch = PLANES[0]
        planes = PLANES[1:]
        out_ch: list[int] = []  # channels of each stage's output (official ``cated_planes``)

        def feat_ch(idx: int) -> int:  # channels of all_feat[idx] (0 = stem)
            return stem_ch if idx == 0 else out_ch[idx - 1]

        stages: list[nn.ModuleList] = []
        for s in range(NUM_DOWN + 1 + 2 * NUM_UP):
            cin = stem_ch if s == 0 else out_ch[s - 1]
            cur = planes[s]
            if s < NUM_DOWN:  # tail: blocks, max-pool
                stage = nn.ModuleList([_blocks(cin, cur, res[s]), nn.MaxPool2d(2, stride=2)])
                out_ch.append(cur)
            elif s == NUM_DOWN:  # bridge: [score 1x1s, 1x1 to 2*cur, blocks, SE attention]
                se = nn.Sequential(
                    nn.BatchNorm2d(2 * cur), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                    nn.Conv2d(2 * cur, cur // 16, 1), nn.ReLU(inplace=True),
                    nn.Conv2d(cur // 16, cur, 1), nn.Sigmoid(),
                )
                stage = nn.ModuleList([
                    _bn_relu_conv_bn_relu(cin, cin // 2),
                    nn.Conv2d(cin // 2, 2 * cur, 1, bias=True),
                    _blocks(2 * cur, cur, res[s]),
                    nn.Sequential(se),
                ])
                out_ch.append(cur)
            else:
                j = s - NUM_DOWN - 1
                t_ch = feat_ch(TRANS_MAP[j])
                transfer = _blocks(t_ch, t_ch, trans[j])
                if s <= NUM_DOWN + NUM_UP:  # body: UP blocks, transfer, x2 upsample
                    k, dilation = cin // cur, 2 ** (s - NUM_DOWN - 1)
                    trunk = _blocks(cin, cur, res[s], dilation=dilation, up=True, k=k)
                    stage = nn.ModuleList([trunk, transfer, nn.Upsample(scale_factor=2, mode="nearest")])
                else:  # head: blocks, transfer, max-pool
                    stage = nn.ModuleList([_blocks(cin, cur, res[s]), transfer, nn.MaxPool2d(2, stride=2)])
                out_ch.append(cur + t_ch)
            stages.append(stage)
        if with_classifier:  # fish.fish.9.3 (score 1x1s) and fish.fish.9.4 (pool + fc conv)
            c = out_ch[-1]
            stages[-1].append(_bn_relu_conv_bn_relu(c, c // 2))
            stages[-1].append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c // 2, num_classes, 1, bias=True)))
        self.fish = nn.ModuleList(stages)
        self.stage_channels: list[int] = out_ch

    def forward_features(self, stem: Tensor) -> list[Tensor]:
        """``all_feat``: the stem output, then the outputs of stages 0..9."""
        feats = [stem]
        for s, stage in enumerate(self.fish):
            x = feats[-1]
            if s < NUM_DOWN:
                y = stage[1](stage[0](x))
            elif s == NUM_DOWN:
                score = stage[1](stage[0](x))
                att = stage[3](score)
                y = stage[2](score) * att + att
            else:
                trunk = stage[2](stage[0](x))
                branch = stage[1](feats[TRANS_MAP[s - NUM_DOWN - 1]])
                y = torch.cat([trunk, branch], dim=1)
            feats.append(y)
        return feats


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class FishNet(FrozenStagesBackbone):
    """FishNet-99 / 150 / 201 returning the stage 6..9 maps (320 / 832 / 1600 / 2112 ch, strides 4..32).

    Args:
        depth: 99, 150 or 201.
        frozen_stages: ``k >= 0`` freezes the stem and stages ``0..k-1`` (``fish.fish.<s>``);
            ``-1`` freezes nothing. At most 10.
        norm_eval: keep every BatchNorm in eval mode while training.
        weights: ``None`` (the official random init: conv ``N(0, sqrt(2 / (k*k*out)))``, BN weight 1
            / bias 0) or a checkpoint path / loaded mapping: an official ImageNet checkpoint
            (``{'state_dict': {'module.<key>': ...}}``), a plain state dict, or a detector checkpoint
            (``backbone.*`` keys). Loaded strictly: a missing, unexpected or mis-shaped key raises
            ``RuntimeError`` naming it. The classifier keys (``fish.fish.9.3.*``, ``fish.fish.9.4.*``)
            are dropped unless ``with_classifier``.
        with_classifier: also build the ImageNet score / fc layers (for :meth:`forward_classifier`).
        num_classes: classifier outputs (official: 1000).
        pad_input: zero-pad inputs whose size FishNet cannot take to a multiple of 32 (see module
            docstring); ``False`` raises instead.
    """

    def __init__(
        self,
        *,
        depth: int = 99,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        weights: str | Path | dict | None = None,
        with_classifier: bool = False,
        num_classes: int = 1000,
        pad_input: bool = True,
    ) -> None:
        super().__init__()
        if depth not in FISHNET_ARCH:
            raise ValueError(f"FishNet depth must be one of {sorted(FISHNET_ARCH)}, got {depth}")
        if not -1 <= frozen_stages <= 10:
            raise ValueError(f"frozen_stages must be in [-1, 10], got {frozen_stages}")
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_classifier = with_classifier
        self.pad_input = pad_input
        stem = PLANES[0]
        self.conv1 = _conv_bn_relu(3, stem // 2, stride=2)
        self.conv2 = _conv_bn_relu(stem // 2, stem // 2)
        self.conv3 = _conv_bn_relu(stem // 2, stem)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.fish = _Fish(FISHNET_ARCH[depth], with_classifier=with_classifier, num_classes=num_classes)
        self.stage_channels: list[int] = list(self.fish.stage_channels)  # stages 0..9
        self.out_indices: list[int] = [6, 7, 8, 9]
        self.out_channels: list[int] = [self.stage_channels[i] for i in self.out_indices]  # [320, 832, 1600, 2112]
        self.strides: list[int] = [4, 8, 16, 32]
        if weights is None:
            self._init_weights()
        else:  # a strict load replaces every parameter and buffer
            self.load_weights(weights)
        self._freeze_stages()

    def load_weights(self, weights: str | Path | dict) -> None:
        """Load a checkpoint strictly, in place (see ``weights`` above); classifier keys are dropped
        unless ``with_classifier``."""
        load_backbone_weights(self, weights, ignore_prefixes=() if self.with_classifier else CLASSIFIER_PREFIXES)

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()

    # ------------------------------------------------------------------ freezing
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.conv2, self.conv3, *[self.fish.fish[s] for s in range(self.frozen_stages)]]

    # ------------------------------------------------------------------ forward
    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if fishnet_valid_size(h) and fishnet_valid_size(w):
            return x
        if not self.pad_input:
            raise ValueError(
                f"FishNet input {h}x{w}: ceil(H/4) and ceil(W/4) must be multiples of 8 (sizes 32m-3 .. 32m); "
                "pad to a multiple of 32"
            )
        return F.pad(x, (0, -w % 32, 0, -h % 32))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The stem output (64 ch, stride 4) followed by the outputs of stages 0..9 (official ``all_feat``)."""
        x = self._pad(x)
        x = self.pool1(self.conv3(self.conv2(self.conv1(x))))
        return self.fish.forward_features(x)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.forward_features(x)
        return [feats[i + 1] for i in self.out_indices]

    def score_features(self, stage9: Tensor) -> Tensor:
        """``fish.fish.9.3`` (BN-ReLU-1x1-BN-ReLU, 1056 ch) on the stage-9 map."""
        if not self.with_classifier:
            raise RuntimeError("this FishNet was built with_classifier=False")
        return self.fish.fish[9][3](stage9)

    def forward_classifier(self, x: Tensor) -> Tensor:
        """ImageNet logits ``[N, num_classes]`` (the official ``FishNet.forward``)."""
        if not self.with_classifier:
            raise RuntimeError("this FishNet was built with_classifier=False")
        score = self.score_features(self.forward_features(x)[-1])
        return self.fish.fish[9][4](score).flatten(1)

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def fuse_bn_for_inference(self) -> "FishNet":
        """Fold every eval-mode BN that follows a convolution into it, IN PLACE; returns ``self``.

        Folded: the stem BNs (``convN.1``), ``bn2`` -> ``conv1`` and ``bn3`` -> ``conv2`` of every
        block, and the BN after the 1x1 conv of the bridge / score Sequentials. The pre-activation
        BNs (``bn1``, ``shortcut.0``, the SE and score inputs) cannot be folded and stay. Folded BNs
        become ``nn.Identity``; BNs in training mode are left alone. Idempotent.
        """
        for m in self.modules():
            if isinstance(m, FishBottleneck):
                for conv, bn in (("conv1", "bn2"), ("conv2", "bn3")):
                    if _foldable(getattr(m, conv), getattr(m, bn)):
                        _fold(getattr(m, conv), getattr(m, bn))
                        setattr(m, bn, nn.Identity())
            elif isinstance(m, nn.Sequential):
                names = list(m._modules)
                for a, b in zip(names[:-1], names[1:]):
                    if _foldable(m._modules[a], m._modules[b]):
                        _fold(m._modules[a], m._modules[b])
                        m._modules[b] = nn.Identity()
        return self
