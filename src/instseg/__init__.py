"""instseg: Hybrid Task Cascade, Cascade / Mask R-CNN and friends, in plain PyTorch.

``instseg.Predictor`` (see :mod:`instseg.api`) is imported on first use, so ``import instseg``
stays cheap (no torch import).
"""

__version__ = "0.1.0"

_LAZY = {"Predictor": "instseg.api", "Prediction": "instseg.api", "write_coco_json": "instseg.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'instseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
