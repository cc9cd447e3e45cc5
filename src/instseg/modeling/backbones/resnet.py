"""ResNet / ResNeXt backbones built from torchvision's block definitions.

The module keeps torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``; the
classifier ``fc`` is dropped), so its state dict keys are exactly mmdetection's ``backbone.*`` keys
without the prefix, and a torchvision ImageNet state dict loads into it unchanged.

Behaviour follows mmdetection v2's ``ResNet`` with ``style='pytorch'`` (the stride-2 convolution is
the 3x3 ``conv2`` of a bottleneck, which is torchvision's layout):

* ``frozen_stages=k`` (k >= 0): the stem (``conv1``, ``bn1``) and ``layer1`` .. ``layer{k}`` get
  ``requires_grad=False`` and are kept in eval mode; ``-1`` freezes nothing.
* ``norm_eval=True``: every BatchNorm layer stays in eval mode while the model trains (running
  statistics frozen); the affine parameters of unfrozen stages still receive gradients.

Deformable convolution (mmdetection's ``dcn`` + ``stage_with_dcn``): in the stages where
``stage_with_dcn[i]`` is True, the 3x3 ``conv2`` of every Bottleneck becomes mmcv's
``DeformConv2dPack`` (``dcn="dcn"``, mmdet ``type='DCN'``) or ``ModulatedDeformConv2dPack``
(``dcn="dcnv2"``, ``type='DCNv2'``) with the same stride / padding / dilation / groups, no bias and
``deform_groups`` offset groups, so the keys are mmdetection's (``layer2.0.conv2.weight``,
``layer2.0.conv2.conv_offset.weight`` / ``.bias``). Nothing else changes; with ``dcn=None`` the
module, its keys and its random init are exactly the plain ResNet's.

Also here, because every backbone uses them: :func:`load_backbone_weights` (torchvision or
mmdetection checkpoints, strict key check) and :func:`fuse_conv_bn` (fold eval-mode BatchNorm into
the preceding convolution for inference).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from instseg.ops.deform_conv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
)

from .base import FrozenStagesBackbone

__all__ = ["ResNet", "load_backbone_weights", "fuse_conv_bn", "torchvision_weights_filename"]

_ARCH: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    50: (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    101: (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    152: (tv_resnet.Bottleneck, [3, 8, 36, 3]),
}

# torchvision ImageNet files (IMAGENET1K_V1, plus the legacy ResNet file names that mmdetection's
# ``torchvision://resnetXX`` resolved to in 2019-2020). Looked up in torch.hub's cache only: nothing
# is ever downloaded.
_TV_FILES: dict[tuple[int, int, int], tuple[str, ...]] = {
    (18, 1, 64): ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    (34, 1, 64): ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    (50, 1, 64): ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    (101, 1, 64): ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
    (152, 1, 64): ("resnet152-394f9c45.pth", "resnet152-b121ed2d.pth"),
    (50, 32, 4): ("resnext50_32x4d-7cdf4587.pth",),
    (101, 32, 8): ("resnext101_32x8d-8ba56ff5.pth",),
    (101, 64, 4): ("resnext101_64x4d-173b62eb.pth",),
}


def torchvision_weights_filename(depth: int, groups: int = 1, width_per_group: int = 64) -> Path:
    """Path of torchvision's ImageNet file for this architecture in torch.hub's local cache.

    Raises FileNotFoundError (with the expected location) when it is not there; never downloads.
    """
    names = _TV_FILES.get((depth, groups, width_per_group))
    if names is None:
        raise FileNotFoundError(
            f"torchvision publishes no ImageNet weights for depth={depth}, groups={groups}, "
            f"width_per_group={width_per_group}; pass a file path as `weights`"
        )
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise FileNotFoundError(
        f"ImageNet weights not found: expected one of {list(names)} in {ckpt_dir}. Nothing is "
        f"downloaded at run time; copy the file from https://download.pytorch.org/models/{names[0]} "
        "there, or pass its path as `weights`."
    )


class ResNet(FrozenStagesBackbone):
    """ResNet / ResNeXt on torchvision's definitions, returning C2..C5 (strides 4, 8, 16, 32).

    Args:
        depth: 18, 34, 50, 101 or 152.
        groups, width_per_group: ResNeXt cardinality and width (32x4d: ``groups=32,
            width_per_group=4``; 64x4d: ``groups=64, width_per_group=4``). Bottleneck depths only.
        frozen_stages: ``k >= 0`` freezes the stem and ``layer1..layer{k}``; ``-1`` freezes nothing.
        norm_eval: keep every BatchNorm in eval mode while training.
        weights: ``None`` (mmdetection-like random init: Kaiming-normal fan_out convolutions, BN
            weight 1 / bias 0), a checkpoint path (see :func:`load_backbone_weights`), or
            ``"imagenet"`` / ``"torchvision"`` for torchvision's file in the local torch.hub cache.
            A checkpoint without any ``conv_offset`` key (ImageNet) leaves the offsets at zero.
        dcn: ``None`` / ``""`` (plain), ``"dcn"`` (DCN v1, mmcv ``DeformConv2dPack``) or ``"dcnv2"``
            (modulated DCN v2, ``ModulatedDeformConv2dPack``) for the 3x3 ``conv2`` of the
            Bottlenecks of the stages in ``stage_with_dcn`` (mmdet: ResNet-18/34 support none).
        stage_with_dcn: one flag per stage ``layer1..layer4``; mmdet's "c3-c5" is
            ``(False, True, True, True)``.
        deform_groups: offset groups of each DCN layer (mmdet ``dcn=dict(deform_groups=...)``).
        fallback_on_stride: mmdet's ``dcn=dict(fallback_on_stride=True)``. mmdetection pops the key
            from the one ``dcn`` dict every block shares, so only the first DCN bottleneck built
            (``layerK.0`` of the first DCN stage) gets a plain ``conv2``; reproduced as such. Every
            mmdetection config sets it False.

    The weights of a DCN layer start as the plain ``conv2``'s (same init, same seed stream) and its
    ``conv_offset`` at zero (mmcv's init), so at construction a DCN v1 network computes exactly
    what the plain one does (a v2 one: every ``conv2`` output halved, ``sigmoid(0) = 0.5``).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        weights: str | Path | None = None,
        dcn: str | None = None,
        stage_with_dcn: tuple[bool, bool, bool, bool] = (False, False, False, False),
        deform_groups: int = 1,
        fallback_on_stride: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth}")
        block, layers = _ARCH[depth]
        if block is tv_resnet.BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError("ResNet-18/34 (BasicBlock) support only groups=1, width_per_group=64")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        self.depth = depth
        self.groups = groups
        self.width_per_group = width_per_group
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        # torchvision builds the layers (and initialises them exactly as mmdetection does:
        # kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs, BN weight 1 / bias 0).
        tv = tv_resnet.ResNet(block, layers, groups=groups, width_per_group=width_per_group)
        self.conv1 = tv.conv1
        self.bn1 = tv.bn1
        self.relu = tv.relu
        self.maxpool = tv.maxpool
        self.layer1 = tv.layer1
        self.layer2 = tv.layer2
        self.layer3 = tv.layer3
        self.layer4 = tv.layer4
        del tv  # drops fc / avgpool

        self.dcn = _check_dcn(dcn, stage_with_dcn, block)
        self.stage_with_dcn = tuple(bool(s) for s in stage_with_dcn)
        self.deform_groups = deform_groups
        if self.dcn is not None:
            self._add_dcn(self.dcn, deform_groups, fallback_on_stride)

        expansion = block.expansion
        self.out_channels: list[int] = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.strides: list[int] = [4, 8, 16, 32]

        if weights is not None:
            if isinstance(weights, str) and weights in ("imagenet", "torchvision"):
                weights = torchvision_weights_filename(depth, groups, width_per_group)
            load_backbone_weights(self, weights)
        self._freeze_stages()

    @torch.no_grad()
    def _add_dcn(self, kind: str, deform_groups: int, fallback_on_stride: bool) -> None:
        """Replace ``conv2`` of every Bottleneck in the DCN stages (mmdet's Bottleneck / ResNeXt
        Bottleneck: ``build_conv_layer(dcn, width, width, 3, stride, padding=dilation, dilation,
        groups, bias=False)``)."""
        cls = {"dcn": DeformConv2dPack, "dcnv2": ModulatedDeformConv2dPack}[kind]
        pop_fallback = fallback_on_stride
        # the DCN layers' own init draws random numbers: keep the global stream as the plain
        # network leaves it, so everything built after the backbone is the same too
        with torch.random.fork_rng(devices=[]):
            for i, on in enumerate(self.stage_with_dcn):
                if not on:
                    continue
                for block in getattr(self, f"layer{i + 1}"):
                    plain: nn.Conv2d = block.conv2
                    if pop_fallback:  # dcn.pop('fallback_on_stride'): the first DCN block only
                        pop_fallback = False
                        continue
                    conv = cls(
                        plain.in_channels,
                        plain.out_channels,
                        plain.kernel_size,
                        stride=plain.stride,
                        padding=plain.padding,
                        dilation=plain.dilation,
                        groups=plain.groups,
                        deform_groups=deform_groups,
                        bias=False,
                    ).to(device=plain.weight.device, dtype=plain.weight.dtype)
                    conv.weight.copy_(plain.weight)
                    block.conv2 = conv

    # ------------------------------------------------------------------ freezing / modes
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: list[nn.Module] = [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return mods

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def fuse_bn_for_inference(self) -> "ResNet":
        """Fold every eval-mode BatchNorm into its convolution, IN PLACE; returns ``self``.

        Call it after ``.eval()`` (or with ``norm_eval=True``, where all BN layers are in eval mode
        anyway). Folded BN layers become ``nn.Identity``; BN layers still in training mode are left
        alone. Use :func:`fuse_conv_bn` (``inplace=False``) for a fused copy instead.
        """
        fuse_conv_bn(self, inplace=True)
        return self


_DCN_KINDS = ("dcn", "dcnv2")


def _check_dcn(dcn: str | None, stage_with_dcn, block: type[nn.Module]) -> str | None:
    if len(tuple(stage_with_dcn)) != 4:
        raise ValueError(f"stage_with_dcn needs one flag per stage (4), got {tuple(stage_with_dcn)}")
    if dcn is None or dcn == "":
        return None
    kind = str(dcn).lower()
    if kind not in _DCN_KINDS:
        raise ValueError(f"dcn must be one of {_DCN_KINDS} or None/'' (mmdet type 'DCN' / 'DCNv2'), got {dcn!r}")
    if block is tv_resnet.BasicBlock and any(stage_with_dcn):
        raise ValueError("deformable conv is not implemented for BasicBlock (ResNet-18/34), as in mmdetection")
    return kind


# ====================================================================== weight loading
_NUM_BATCHES = "num_batches_tracked"
_OFFSET = ".conv_offset."
_LEGACY_OFFSET = re.compile(r"^(.*)_offset\.(weight|bias)$")


def _upgrade_offset_keys(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmcv < version 2 (mmdet v1) checkpoints: ``layerX.Y.conv2_offset.*`` ->
    ``layerX.Y.conv2.conv_offset.*`` (what ``DeformConv2dPack._load_from_state_dict`` does)."""
    out = {}
    for k, v in state.items():
        m = _LEGACY_OFFSET.match(k)
        new = f"{m.group(1)}.conv_offset.{m.group(2)}" if m else None
        out[new if new is not None and new in own and new not in state else k] = v
    return out


def _read_checkpoint(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # e.g. mmengine checkpoints with numpy objects in 'meta'/'message_hub'
        warnings.warn(
            f"{path}: weights_only load failed ({type(err).__name__}); loading with full unpickling "
            "- only do this with files you trust",
            stacklevel=3,
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def _extract_state_dict(
    ckpt: object, ignore_prefixes: Iterable[str], prefix: str = "backbone."
) -> dict[str, Tensor]:
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoint must be a mapping (state dict), got {type(ckpt).__name__}")
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    state = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):  # DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith(prefix) for k in state):  # full detector checkpoint: keep the backbone
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignore = tuple(ignore_prefixes)
    return {k: v for k, v in state.items() if not k.startswith(ignore)}


def _fmt(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(
    module: nn.Module,
    path: str | Path | Mapping[str, object],
    *,
    ignore_prefixes: Iterable[str] = ("fc.", "classifier."),
) -> None:
    """Load backbone weights strictly, in place.

    Accepts a file path or an already loaded mapping holding either a torchvision state dict, or an
    mmdetection / mmcv checkpoint ``{'state_dict': ...}`` whose keys may carry a ``backbone.``
    prefix (then only the ``backbone.*`` keys are used, so a whole detector checkpoint works too).
    A ``module.`` (DataParallel) prefix is stripped. Keys starting with ``ignore_prefixes`` (the
    ImageNet classifier: ``fc.*``, ``classifier.*``) are dropped. Missing ``num_batches_tracked``
    buffers (old torchvision files) are tolerated; so are the deformable convolutions' missing
    ``conv_offset`` keys when the checkpoint has none at all (ImageNet weights into a DCN backbone:
    the offsets keep their zero init, as mmdetection's non-strict pretrained load leaves them).
    Any other missing key, unexpected key or shape mismatch raises ``RuntimeError`` naming the
    offending keys. mmcv's old offset names ``conv2_offset.*`` are read as ``conv2.conv_offset.*``.
    """
    ckpt = path if isinstance(path, Mapping) else _read_checkpoint(path)
    src = "<mapping>" if isinstance(path, Mapping) else str(path)
    state = _extract_state_dict(ckpt, ignore_prefixes)
    own = module.state_dict()
    state = _upgrade_offset_keys(state, own)
    no_offsets = not any(_OFFSET in k for k in state)

    def tolerated(k: str) -> bool:
        return k.endswith(_NUM_BATCHES) or (no_offsets and _OFFSET in k)

    missing = [k for k in own if k not in state and not tolerated(k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"cannot load backbone weights from {src} into {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt(mismatched)}")
        raise RuntimeError("\n".join(lines))
    result = module.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if not tolerated(k)]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded above
        raise RuntimeError(f"backbone weights: missing {leftover}, unexpected {result.unexpected_keys}")


# ====================================================================== conv + BN folding
_BN_TYPES = (_BatchNorm, FrozenBatchNorm2d)
# deformable convs fold like plain ones (BN acts per output channel after the weighted sum)
_CONV_TYPES = (nn.Conv2d, DeformConv2d, ModulatedDeformConv2d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(conv, _CONV_TYPES) or not isinstance(bn, _BN_TYPES):
        return False
    if isinstance(bn, _BatchNorm) and (bn.training or bn.running_mean is None):
        return False
    return bn.running_mean.shape[0] == conv.out_channels


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> None:
    w = conv.weight
    mean, var = bn.running_mean.to(w.dtype), bn.running_var.to(w.dtype)
    gamma = bn.weight if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    beta = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    scale = gamma.to(w.dtype) * torch.rsqrt(var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    new_bias = beta.to(w.dtype) + (bias - mean) * scale
    conv.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fuse_conv_bn(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold eval-mode BatchNorm layers into the convolution that feeds them.

    Returns a fused deep copy (``inplace=False``, the default) or fuses ``module`` itself and
    returns it (``inplace=True``). Recognised patterns, which cover torchvision's ResNet/ResNeXt
    and MobileNetV2 (and mmdetection's naming):

    * sibling children ``conv{N}`` -> ``bn{N}`` (``conv1``/``bn1``, ... in blocks and the stem;
      ``conv2`` may be a deformable convolution, which then gets a bias),
    * consecutive ``nn.Conv2d`` -> BN children of an ``nn.Sequential`` (``downsample``,
      ``Conv2dNormActivation``, MobileNet's projection).

    Folded BN layers are replaced by ``nn.Identity``. BN layers in training mode are left unfused,
    so put the model in eval mode first. The fused module is meant for inference only.
    """
    if not inplace:
        module = copy.deepcopy(module)
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names[:-1], names[1:]):
                if _foldable(children[a], children[b]):
                    _fold(children[a], children[b])
                    setattr(parent, b, nn.Identity())
                    children[b] = parent._modules[b]
            continue
        for name, bn in children.items():
            m = re.fullmatch(r"bn(\d*)", name)
            conv = children.get(f"conv{m.group(1)}") if m else None
            if conv is not None and _foldable(conv, bn):
                _fold(conv, bn)
                setattr(parent, name, nn.Identity())
    return module
