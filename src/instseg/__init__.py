"""instseg: Hybrid Task Cascade, Cascade / Mask R-CNN and friends, in plain PyTorch."""

__version__ = "0.1.0"
