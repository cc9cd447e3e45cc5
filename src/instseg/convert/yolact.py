"""Official YOLACT checkpoint (``dbolya/yolact``, e.g. ``yolact_base_54_800000.pth``) -> instseg.

The official ``Yolact.state_dict()`` is a flat dict (no ``state_dict`` wrapper, no ``module.``).
Its names map onto instseg's (which are mmdetection's) as follows:

    backbone.conv1 / bn1                    -> backbone.conv1 / bn1
    backbone.layers.{L}.{b}.X               -> backbone.layer{L+1}.{b}.X
    fpn.lat_layers.{0,1,2}  (C5, C4, C3)    -> neck.lateral_convs.{2,1,0}.conv   (reversed!)
    fpn.pred_layers.{0,1,2} (P5, P4, P3)    -> neck.fpn_convs.{2,1,0}.conv       (reversed!)
    fpn.downsample_layers.{0,1} (P6, P7)    -> neck.fpn_convs.{3,4}.conv
    proto_net.{i}                           -> mask_head.protonet.{i}
    prediction_layers.0.upfeature.0         -> bbox_head.head_convs.0.conv
    prediction_layers.0.{bbox,conf,mask}_layer -> bbox_head.conv_{reg,cls,coeff}
    semantic_seg_conv                       -> mask_head.segm_branch.segm_conv

As ``Yolact.load_weights`` does, keys ``backbone.layer*`` that are not ``backbone.layers*`` (the
ImageNet classifier's leftovers) and ``fpn.downsample_layers.{i}`` beyond the two used are dropped.
The class layout stays the official one (background in channel 0 of each anchor's 81), which is
what the ``official`` YOLACT flavour reads.  Category ids default to COCO's 80 (``COCO_LABEL_MAP``).
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from instseg.config.load import apply_overrides
from instseg.config.presets import get_preset
from instseg.config.schema import Config
from instseg.convert.mmdet import ConversionError, check_against_model, package_checkpoint, write_checkpoint

# COCO's 80 category ids in the order of the official COCO_CLASSES
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

_FIXED = {
    "prediction_layers.0.upfeature.0.": "bbox_head.head_convs.0.conv.",
    "prediction_layers.0.bbox_layer.": "bbox_head.conv_reg.",
    "prediction_layers.0.conf_layer.": "bbox_head.conv_cls.",
    "prediction_layers.0.mask_layer.": "bbox_head.conv_coeff.",
    "semantic_seg_conv.": "mask_head.segm_branch.segm_conv.",
    "proto_net.": "mask_head.protonet.",
}
_LAYERS = re.compile(r"^backbone\.layers\.(\d+)\.(.*)$")
_FPN = re.compile(r"^fpn\.(lat_layers|pred_layers|downsample_layers)\.(\d+)\.(.*)$")


def rename_key(key: str, num_downsample: int = 2) -> str | None:
    """The instseg name of an official key, or ``None`` for keys the official loader drops."""
    if key.startswith("backbone.layer") and not key.startswith("backbone.layers"):
        return None
    m = _LAYERS.match(key)
    if m:
        return f"backbone.layer{int(m.group(1)) + 1}.{m.group(2)}"
    m = _FPN.match(key)
    if m:
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "downsample_layers":
            if i >= num_downsample:
                return None
            return f"neck.fpn_convs.{3 + i}.conv.{rest}"
        target = "lateral_convs" if kind == "lat_layers" else "fpn_convs"
        return f"neck.{target}.{2 - i}.conv.{rest}"
    for prefix, new in _FIXED.items():
        if key.startswith(prefix):
            return new + key[len(prefix) :]
    return key  # backbone.conv1 / bn1 and anything unknown (the model check names it)


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        new = rename_key(key)
        if new is not None:
            out[new] = value.float() if value.is_floating_point() else value
    return out


def convert_checkpoint(src: str | Path, cfg: Config, cat_ids: list[int] | None = None) -> dict:
    """Loads an official YOLACT ``.pth`` and returns an instseg checkpoint for ``cfg`` (checked)."""
    if cfg.model.arch != "yolact" or cfg.model.yolact.flavor != "official":
        raise ConversionError(
            f"preset {cfg.name!r} is not an official-flavour YOLACT (model.arch={cfg.model.arch!r}); use "
            "yolact_base, yolact_resnet50, yolact_im400 or yolact_im700"
        )
    if not Path(src).is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    raw = torch.load(src, map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{src}: expected an official YOLACT state dict (a flat name -> tensor dict)")
    converted = convert_state_dict(state)
    check_against_model(converted, cfg, src)
    n = cfg.model.num_classes
    if cat_ids is None and n == 80:
        ids, names = COCO_CATEGORY_IDS, COCO_CLASSES
    else:
        ids = cat_ids or list(range(1, n + 1))
        names = [f"class_{i}" for i in range(n)]
    return package_checkpoint(converted, cfg, ids, names, {"yolact_checkpoint": str(src)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instseg convert yolact",
        description="Convert an official YOLACT checkpoint (e.g. yolact_base_54_800000.pth) to instseg.",
    )
    parser.add_argument("checkpoint", help="official YOLACT .pth file")
    parser.add_argument("--config", default="", help="instseg preset (default: from the file name, e.g. yolact_base)")
    parser.add_argument("--out", required=True, help="output instseg checkpoint (.pt)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--cat-ids", default="", help="comma-separated COCO category ids (default: COCO's 80)")
    args = parser.parse_args(argv)
    name = args.config or preset_from_filename(args.checkpoint)
    try:
        cfg = get_preset(name)
    except KeyError as e:
        raise ConversionError(str(e.args[0])) from None
    cfg = apply_overrides(cfg, assignments=args.set)
    cat_ids = [int(x) for x in args.cat_ids.split(",") if x.strip()] or None
    ckpt = convert_checkpoint(args.checkpoint, cfg, cat_ids)
    out = write_checkpoint(ckpt, args.out)
    print(f"wrote {out} ({len(ckpt['model'])} tensors, preset {cfg.name})")
    return 0


def preset_from_filename(path: str | Path) -> str:
    """``yolact_base_54_800000.pth`` -> ``yolact_base`` (what ``eval.py`` derives the config from)."""
    stem = Path(path).stem
    m = re.match(r"^(.*?)_\d+_\d+$", stem)
    if not m:
        raise ConversionError(
            f"cannot tell the preset from the file name {Path(path).name!r} (expected NAME_EPOCH_ITER.pth); pass --config"
        )
    return m.group(1)
