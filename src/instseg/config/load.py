"""Overrides (YAML files and ``key=value`` strings) applied to a preset, with strict keys."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from instseg.config.schema import Config


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts a YAML / command-line value to the type of the schema field."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        if isinstance(value, str) and annotation is not str:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from e
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from e
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"{key}: expected a tuple, got {value!r}") from e
        if not isinstance(value, (list, tuple)):
            value = (value,)
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    return value


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Sets ``cfg.<dotted>`` (e.g. ``train.lr``) to ``value`` converted to the field's type."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key {dotted!r}")
        types = _field_types(node)
        if part not in types:
            valid = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}; valid keys here: {valid}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: expected a mapping of sub-keys")
                for k, v in value.items():
                    set_value(cfg, f"{dotted}.{k}", v)
            else:
                setattr(node, part, _coerce(value, types[part], dotted))
        else:
            node = getattr(node, part)


def apply_overrides(cfg: Config, yaml_files: list[str] = (), assignments: list[str] = ()) -> Config:
    """Applies YAML override files, then ``key=value`` assignments, in order."""
    for path in yaml_files:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
        for key, value in _flatten(data):
            set_value(cfg, key, value)
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return cfg


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def to_dict(cfg: Config) -> dict:
    """Plain-data form of a config (tuples as lists), for YAML dumps and checkpoints."""

    def conv(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        if isinstance(x, dict):  # nested sub-configs (model.retinanet, model.yolact)
            return {k: conv(v) for k, v in x.items()}
        return x

    return {
        sec.name: {k: conv(v) for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items()}
        if dataclasses.is_dataclass(getattr(cfg, sec.name))
        else getattr(cfg, sec.name)
        for sec in dataclasses.fields(cfg)
    }


def from_dict(data: dict) -> Config:
    """Rebuilds a ``Config`` from ``to_dict`` output (strict keys)."""
    cfg = Config()
    for key, value in _flatten(data):
        set_value(cfg, key, value)
    return cfg


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
