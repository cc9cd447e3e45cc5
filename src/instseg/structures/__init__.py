"""Plain data containers passed between pipeline stages (no nn.Module here)."""

from instseg.structures.instances import Detections, ImageBatch, ImageTargets
from instseg.structures.masks import CroppedMasks

__all__ = ["CroppedMasks", "Detections", "ImageBatch", "ImageTargets"]
