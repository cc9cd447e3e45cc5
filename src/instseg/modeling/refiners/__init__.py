"""Post-hoc refiners that work on any model's detections (boxes + per-detection mask probabilities)."""

from instseg.modeling.refiners.mbrm import MBRM, train_mbrm

__all__ = ["MBRM", "train_mbrm"]
