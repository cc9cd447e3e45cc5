"""mmdetection checkpoint -> instseg checkpoint.

mmdetection v2 and v3 share key names (``specs`` section 4); instseg keeps them except that
RoI-head stages live under ``roi_head.stages.{t}``:

    roi_head.bbox_head[.{t}].X  -> roi_head.stages.{t}.box_head.X
    roi_head.mask_head[.{t}].X  -> roi_head.stages.{t}.mask_head.X

Everything else (``backbone.``, ``neck.``, ``rpn_head.``, ``roi_head.semantic_head.``) maps
unchanged.  Old v1 checkpoints (no ``roi_head.`` prefix, background in row 0 of ``fc_cls`` and
channel 0 of ``conv_logits``) are upgraded on the way, as mmdetection's
``upgrade_model_version.py`` does.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from instseg.config.load import apply_overrides, to_dict
from instseg.config.presets import get_preset
from instseg.config.schema import Config

_V1_PREFIXES = ("bbox_head.", "mask_head.", "semantic_head.")
_STAGE_KEY = re.compile(r"^roi_head\.(bbox_head|mask_head)\.(?:(\d+)\.)?(.*)$")


class ConversionError(ValueError):
    """The checkpoint does not fit the chosen preset."""


def _upgrade_v1(state: dict[str, Tensor], num_classes: int) -> dict[str, Tensor]:
    """v1 layout -> v2 layout: add ``roi_head.``, move background from first to last."""
    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if key.startswith(_V1_PREFIXES):
            key = "roi_head." + key
            if re.search(r"bbox_head(\.\d+)?\.fc_cls\.", key) and value.shape[0] == num_classes + 1:
                value = torch.cat([value[1:], value[:1]])
            elif re.search(r"bbox_head(\.\d+)?\.fc_reg\.", key) and value.shape[0] == 4 * (num_classes + 1):
                value = value[4:]
            elif re.search(r"mask_head(\.\d+)?\.conv_logits\.", key) and value.shape[0] == num_classes + 1:
                value = value[1:]
        out[key] = value
    return out


def convert_state_dict(state: dict[str, Tensor], num_classes: int, *, two_stage: bool = True) -> dict[str, Tensor]:
    """Renames mmdetection keys to instseg keys (floats cast to float32).

    One-stage models (RetinaNet, YOLACT: ``bbox_head.*``, ``mask_head.*``) keep mmdetection's names;
    for them a top-level ``bbox_head.`` is not the v1 two-stage layout.
    """
    if two_stage and any(k.startswith(_V1_PREFIXES) for k in state):
        state = _upgrade_v1(state, num_classes)
    out: dict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if key.startswith("data_preprocessor."):
            continue
        m = _STAGE_KEY.match(key)
        if m:
            kind, stage, rest = m.group(1), m.group(2) or "0", m.group(3)
            key = f"roi_head.stages.{stage}.{'box_head' if kind == 'bbox_head' else 'mask_head'}.{rest}"
        out[key] = value.float() if value.is_floating_point() else value
    return out


def is_mmdet_checkpoint(raw: object) -> bool:
    """An mmdetection checkpoint is a dict with a ``state_dict`` (and no instseg ``format`` tag)."""
    return isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict) and "format" not in raw


def mmdet_state_dict_for_init(raw: dict, *, two_stage: bool) -> dict[str, Tensor]:
    """The converted (instseg-named) weights of a loaded mmdetection checkpoint, unchecked.

    Fine-tuning (``train.init_from``) loads what fits into a model whose class count may differ, so
    the class count that the v1 upgrade needs is the checkpoint's own, read from its ``fc_cls``.
    """
    state = raw["state_dict"]
    num_classes = 0
    for key, value in state.items():
        if re.search(r"bbox_head(\.\d+)?\.fc_cls\.weight$", key):
            num_classes = int(value.shape[0]) - 1
            break
    return convert_state_dict(state, num_classes, two_stage=two_stage)


def _class_names(meta: dict) -> list[str] | None:
    ds = meta.get("dataset_meta") or {}
    names = ds.get("classes") or meta.get("CLASSES")
    return list(names) if names else None


def convert_checkpoint(src: str | Path, cfg: Config, cat_ids: list[int] | None = None) -> dict:
    """Loads an mmdetection ``.pth`` and returns an instseg checkpoint dict for ``cfg``.

    The state dict is checked against a model built from ``cfg``: every key must exist with the
    same shape, so a wrong preset fails here with the offending keys named, not at inference.
    """
    raw = torch.load(src, map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{src}: expected an mmdetection checkpoint with a 'state_dict'")
    meta = raw.get("meta", {}) if isinstance(raw, dict) else {}
    two_stage = cfg.model.arch in ("mask_rcnn", "cascade_mask_rcnn", "htc")
    converted = convert_state_dict(state, cfg.model.num_classes, two_stage=two_stage)
    check_against_model(converted, cfg, src)
    names = _class_names(meta) or [f"class_{i}" for i in range(cfg.model.num_classes)]
    ids = cat_ids or list(range(1, cfg.model.num_classes + 1))
    source = {"mmdet_checkpoint": str(src), "mmdet_version": meta.get("mmdet_version", "unknown")}
    return package_checkpoint(converted, cfg, ids, names, source)


def write_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Saves a converted checkpoint atomically (temporary file, then rename); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    return out


def check_against_model(converted: dict[str, Tensor], cfg: Config, src: str | Path) -> None:
    """Raises :class:`ConversionError` naming every key that is missing, unexpected or of the
    wrong shape for a model built from ``cfg``."""
    from instseg.modeling.zoo import build_model

    expected = build_model(cfg.model).state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:4]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(converted[k].shape)} vs "
                f"model {tuple(expected[k].shape)}); a different class count needs --set model.num_classes=N"
            )
        raise ConversionError(f"{src} does not fit preset {cfg.name!r}: " + "; ".join(parts))


def package_checkpoint(
    converted: dict[str, Tensor], cfg: Config, cat_ids: list[int], class_names: list[str], source: dict
) -> dict:
    """The instseg checkpoint dict (what ``instseg eval`` / ``predict`` load)."""
    n = cfg.model.num_classes
    if len(class_names) != n or len(cat_ids) != n:
        raise ConversionError(
            f"{len(class_names)} class names / {len(cat_ids)} category ids, but the preset has {n} classes"
        )
    return {
        "format": "instseg-v1",
        "model": converted,
        "config": to_dict(cfg),
        "classes": {"cat_ids": list(cat_ids), "class_names": list(class_names)},
        "source": source,
    }


def main(argv: list[str] | None = None) -> int:
    """``instseg convert mmdet CHECKPOINT --config PRESET --out FILE``.

    Every problem a user can cause (unknown preset, an mmdetection ``.py`` config without a preset of
    the same name, a missing or unreadable checkpoint, weights that do not fit the preset) is a
    :class:`ConversionError` with a one-line message; the CLI prints it and exits with code 2.
    """
    import pickle
    import zipfile

    parser = argparse.ArgumentParser(
        prog="instseg convert mmdet",
        description=__doc__.split("\n\n")[0],
        epilog="PRESET is an instseg preset name (`instseg presets` lists them). An mmdetection config "
        "file (e.g. configs/htc/htc_r50_fpn_1x_coco.py) is accepted when a preset of the same name exists.",
    )
    parser.add_argument("checkpoint", help="mmdetection .pth file")
    parser.add_argument("--config", required=True, metavar="PRESET", help="instseg preset the weights belong to")
    parser.add_argument("--out", required=True, help="output instseg checkpoint (.pt)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--cat-ids", default="", help="comma-separated COCO category ids of the classes (default 1..N)"
    )
    args = parser.parse_args(argv)
    name = args.config
    if name.endswith(".py"):  # an mmdetection config file: its stem is the preset name, if we have it
        stem = Path(name).stem
        try:
            get_preset(stem)
        except KeyError:
            raise ConversionError(
                f"--config {name}: expected an instseg preset name, not an mmdetection config file, and "
                f"there is no preset named {stem!r}; run `instseg presets` to list them"
            ) from None
        print(f"note: --config {name} is an mmdetection config file; using the instseg preset {stem}")
        name = stem
    try:
        cfg = get_preset(name)
    except KeyError:
        raise ConversionError(
            f"--config {name!r} is not a preset; expected an instseg preset name such as "
            "htc_r50_fpn_1x_coco (run `instseg presets` to list them)"
        ) from None
    cfg = apply_overrides(cfg, assignments=args.set)
    src = Path(args.checkpoint)
    if not src.is_file():
        raise ConversionError(f"checkpoint not found: {src}")
    with open(src, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip (torch >= 1.6) or legacy pickle
        raise ConversionError(f"{src} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        cat_ids = [int(x) for x in args.cat_ids.split(",") if x.strip()] or None
    except ValueError:
        raise ConversionError(f"--cat-ids {args.cat_ids!r}: expected comma-separated integers") from None
    try:
        ckpt = convert_checkpoint(src, cfg, cat_ids)
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError,
            ModuleNotFoundError, ValueError) as e:
        raise ConversionError(f"cannot read {src} as an mmdetection checkpoint ({type(e).__name__}: {e})") from e
    out = write_checkpoint(ckpt, args.out)
    print(f"wrote {out} ({len(ckpt['model'])} tensors, preset {cfg.name}, classes {ckpt['classes']['class_names']})")
    return 0