"""Checkpoints: atomic writes, clear load errors, and model rebuilding from a checkpoint.

Format (``format == 'instseg-v1'``), a plain dict loadable with ``torch.load(weights_only=True)``::

    {'format': 'instseg-v1',
     'model': state_dict,
     'config': to_dict(cfg),
     'classes': {'cat_ids': [...], 'class_names': [...]},
     # training state (absent in converted checkpoints):
     'optimizer': optimizer.state_dict(), 'scaler': GradScaler.state_dict() | None,
     'epoch': int,            # epoch to continue in (0-based)
     'iter': int,             # iterations completed
     'batch_in_epoch': int,   # batches of ``epoch`` already done
     'rng': capture_rng_state(),
     'best': {'metric': name, 'value': float, 'iter': int},
     'early_stop': {'bad_evals': int},   # train.patience
     'skipped_steps': int,               # train.skip_nonfinite
     'ema': {'model': state_dict, 'updates': int} | None}   # train.ema

With ``train.ema`` on, ``best.pt``'s ``model`` is the EMA weights, and ``last.pt`` has the raw
weights in ``model`` (to resume) and the EMA weights in ``ema``; ``load_model_from_checkpoint``
(what ``instseg eval`` / ``predict`` use) loads the EMA weights when a checkpoint has them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "instseg-v1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not have the instseg format."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Writes ``state`` to ``path`` atomically: ``path.tmp`` in the same folder, fsync, rename.

    If anything fails before the rename, the previous file at ``path`` is left untouched and
    the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Loads an instseg checkpoint (tensors, plain containers only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on bad input (IndexError, UnpicklingError, ...)
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a PyTorch file): {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an instseg checkpoint (no 'model' entry)")
    fmt = state.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path} has format {fmt!r}, expected {FORMAT!r}; mmdetection checkpoints must first be "
            "converted with `instseg convert mmdet`"
        )
    return state


def load_model_from_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    model_builder: Callable[[Any], nn.Module] | None = None,
    update_cfg: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any, dict]:
    """Rebuilds the model of a checkpoint: returns ``(model in eval mode, cfg, classes)``.

    The model is built from the checkpoint's own config (after ``update_cfg(cfg)``, e.g. to change
    test-time settings such as ``model.max_per_img``) with ``instseg.modeling.zoo.build_model`` (or
    ``model_builder``) and its weights are loaded strictly: the EMA weights (``state['ema']``) when
    the run kept them, else ``state['model']``.
    """
    from instseg.config.load import from_dict

    state = load_checkpoint(path)
    if "config" not in state:
        raise CheckpointError(f"{path} has no 'config' entry; cannot rebuild its model")
    cfg = from_dict(state["config"])
    if update_cfg is not None:
        update_cfg(cfg)
    cfg.model.backbone_weights = ""  # the checkpoint holds all weights
    if model_builder is None:
        from instseg.modeling.zoo import build_model as model_builder
    model = model_builder(cfg.model)
    ema = state.get("ema")
    weights = ema["model"] if isinstance(ema, dict) and ema.get("model") else state["model"]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights of {path} do not fit the model built from its config: {e}") from e
    model.to(device).eval()
    classes = dict(state.get("classes") or {})
    classes.setdefault("cat_ids", list(range(1, cfg.model.num_classes + 1)))
    classes.setdefault("class_names", [str(c) for c in classes["cat_ids"]])
    return model, cfg, classes


def read_init_weights(path: str, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of ``train.init_from`` and where they came from (``instseg`` | ``mmdetection``).

    mmdetection checkpoints are told apart by their ``state_dict`` entry and renamed with
    ``instseg.convert.mmdet``; their ``meta`` may hold non-tensor objects, so (as ``instseg convert
    mmdet`` does) they are read with ``weights_only=False`` when the safe load refuses them.
    """
    from instseg.convert.mmdet import is_mmdet_checkpoint, mmdet_state_dict_for_init
    from instseg.modeling.zoo import TWO_STAGE_ARCHS

    if not Path(path).is_file():
        raise FileNotFoundError(f"train.init_from: checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled mmdet meta, or not a checkpoint at all: retried below
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad input
            raise CheckpointError(f"train.init_from: cannot read {path} as a checkpoint: {e}") from e
    if is_mmdet_checkpoint(raw):
        return mmdet_state_dict_for_init(raw, two_stage=arch in TWO_STAGE_ARCHS), "mmdetection"
    state = load_checkpoint(path)  # the format checks and messages of instseg checkpoints
    ema = state.get("ema")
    return (ema["model"] if isinstance(ema, dict) and ema.get("model") else state["model"]), "instseg"


# ----------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch (and CUDA when initialised), as plain data + tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
