"""Mixed precision: which autocast dtype ``train.amp`` / ``--amp`` asks for, and whether the device
can run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from instseg.config.load import ConfigError

AMP_MODES = ("", "fp16", "bf16")
# the booleans older configs wrote (YAML true/false, then str() by the schema's str field)
_LEGACY = {"true": "fp16", "1": "fp16", "yes": "fp16", "on": "fp16",
           "false": "", "0": "", "no": "", "off": "", "none": ""}


def parse_amp(value: object, key: str = "train.amp") -> str:
    """``''``, ``'fp16'`` or ``'bf16'``; the booleans of older configs (``amp: true``) mean fp16."""
    text = str(value).strip().lower()
    text = _LEGACY.get(text, text)
    if text not in AMP_MODES:
        raise ConfigError(f"{key}={value!r}: expected '' (float32), fp16 or bf16")
    return text


def amp_dtype(mode: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``, or ``None`` for float32.

    fp16 needs CUDA (CPU autocast in float16 is slow and unsupported by many CPU kernels): on CPU
    it is a ``ConfigError``.  bf16 runs on CUDA devices that support it and on CPU.
    """
    mode = parse_amp(mode, key)
    if not mode:
        return None
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"{key}=fp16 needs a CUDA device (this run is on {device}); use bf16 or ''")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}=bf16: this GPU does not support bfloat16; use fp16")
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` in ``dtype``; a no-op for ``None``."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
