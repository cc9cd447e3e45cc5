"""Official RDSNet checkpoint (``wangsr126/RDSNet``, mmdetection v1.0) -> instseg.

instseg's RDSNet keeps the official module names, so keys map unchanged:

    backbone.*                                   torchvision-style ResNet (mmdet v1 = v2 names)
    neck.lateral_convs.{i}.conv / fpn_convs.{i}.conv    FPN, P6 from C5 (fpn_convs.3), P7 (fpn_convs.4)
    bbox_head.{cls,reg,rep}_convs.{i}.conv.weight       tower convs (no bias: ConvModule bias='auto' with GN)
    bbox_head.{cls,reg,rep}_convs.{i}.gn.{weight,bias}  GroupNorm(32)
    bbox_head.retina_{cls,reg,rep}.{weight,bias}        A*80 sigmoid logits, A*4 deltas, A*2*32 reps
    mask_head.lateral_convs.{l}.{j}.{conv,gn}           pixel stream (odd j: parameter-free upsamplers)
    mask_head.final_convs.0.0.{conv,gn}, mask_head.conv_reps
    mbrm.weight (1, 1, 9), mbrm.bias (1,)               only in checkpoints saved from a refine config

The README says the refine models share the checkpoint with the plain ones: a checkpoint without
``mbrm.*`` gets the official hard-coded MBRM values (what the official refine config uses), one
with them keeps its own.  A leading ``module.`` (DataParallel) is stripped; BatchNorm
``num_batches_tracked`` counters that old checkpoints lack are filled with 0 (unused in eval mode).
Every other key and every shape is checked against the model built from the preset, and what
does not fit is named.  mmdet v1 class channels are the 80 COCO classes without background, in the
order of its ``CLASSES`` (= COCO category id order), which is instseg's.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from instseg.config.load import apply_overrides
from instseg.config.presets import get_preset
from instseg.config.schema import Config
from instseg.convert.mmdet import ConversionError, check_against_model, package_checkpoint, write_checkpoint
from instseg.convert.yolact import COCO_CATEGORY_IDS, COCO_CLASSES


def convert_state_dict(state: dict[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], list[str]]:
    """Official keys -> instseg keys (floats to float32); returns ``(state, notes)`` where the
    notes say what was filled in."""
    from instseg.modeling.zoo import build_model

    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value.float() if value.is_floating_point() else value
    notes: list[str] = []
    expected = build_model(cfg.model).state_dict()
    if not any(k.startswith("mbrm.") for k in out):
        out["mbrm.weight"] = expected["mbrm.weight"].clone()
        out["mbrm.bias"] = expected["mbrm.bias"].clone()
        notes.append("no mbrm.* in the checkpoint: MBRM gets the official hard-coded kernel")
    filled = [k for k in expected if k.endswith("num_batches_tracked") and k not in out]
    for k in filled:
        out[k] = torch.zeros((), dtype=torch.int64)
    if filled:
        notes.append(f"{len(filled)} BatchNorm num_batches_tracked counters filled with 0")
    return out, notes


def convert_checkpoint(src: str | Path, cfg: Config, cat_ids: list[int] | None = None) -> dict:
    """Loads an official RDSNet ``.pth`` and returns an instseg checkpoint for ``cfg`` (checked)."""
    if cfg.model.arch != "rdsnet":
        raise ConversionError(
            f"preset {cfg.name!r} is not RDSNet (model.arch={cfg.model.arch!r}); use rdsnet_r50_fpn_1x, "
            "rdsnet_r101_fpn_1x, rdsnet_r101_fpn_2x or their rdsnet_refine_* versions"
        )
    if not Path(src).is_file():
        raise ConversionError(f"checkpoint not found: {src}")
    try:
        raw = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - many types on bad input
        raise ConversionError(f"cannot read {src} as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{src}: expected an mmdetection v1 checkpoint (a 'state_dict' of tensors)")
    converted, notes = convert_state_dict(state, cfg)
    try:
        check_against_model(converted, cfg, src)
    except ConversionError as e:
        hint = ""
        if any(k.endswith(".conv.bias") and ("_convs." in k) for k in converted):
            hint = (" (the checkpoint has biases on GN convs: this converter assumes mmdet v1's ConvModule "
                    "bias='auto', i.e. no conv bias before GroupNorm)")
        raise ConversionError(str(e) + hint) from None
    meta = raw.get("meta", {}) if isinstance(raw, dict) else {}
    n = cfg.model.num_classes
    names = list(meta.get("CLASSES") or []) if isinstance(meta, dict) else []
    if cat_ids is None and n == 80:
        ids, names = COCO_CATEGORY_IDS, names if len(names) == 80 else COCO_CLASSES
    else:
        ids = cat_ids or list(range(1, n + 1))
        names = names if len(names) == n else [f"class_{i}" for i in range(n)]
    source = {"rdsnet_checkpoint": str(src), "notes": notes}
    if isinstance(meta, dict) and meta.get("mmdet_version"):
        source["mmdet_version"] = str(meta["mmdet_version"])
    return package_checkpoint(converted, cfg, ids, names, source)


def main(argv: list[str] | None = None) -> int:
    """``instseg convert rdsnet CHECKPOINT --config PRESET --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="instseg convert rdsnet",
        description="Convert an official RDSNet checkpoint (wangsr126/RDSNet, mmdetection v1) to instseg.",
        epilog="The refine presets (rdsnet_refine_*) use the same checkpoint as the plain ones; MBRM gets the "
        "official kernel unless the checkpoint has mbrm.* weights.",
    )
    parser.add_argument("checkpoint", help="official RDSNet .pth file")
    parser.add_argument("--config", required=True, metavar="PRESET",
                        help="rdsnet_r50_fpn_1x, rdsnet_r101_fpn_1x, rdsnet_r101_fpn_2x or a rdsnet_refine_* one")
    parser.add_argument("--out", required=True, help="output instseg checkpoint (.pt)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--cat-ids", default="", help="comma-separated COCO category ids (default: COCO's 80)")
    args = parser.parse_args(argv)
    try:
        cfg = get_preset(args.config)
    except KeyError as e:
        raise ConversionError(str(e.args[0])) from None
    cfg = apply_overrides(cfg, assignments=args.set)
    try:
        cat_ids = [int(x) for x in args.cat_ids.split(",") if x.strip()] or None
    except ValueError:
        raise ConversionError(f"--cat-ids {args.cat_ids!r}: expected comma-separated integers") from None
    ckpt = convert_checkpoint(args.checkpoint, cfg, cat_ids)
    out = write_checkpoint(ckpt, args.out)
    for note in ckpt["source"]["notes"]:
        print(f"note: {note}")
    print(f"wrote {out} ({len(ckpt['model'])} tensors, preset {cfg.name})")
    return 0
