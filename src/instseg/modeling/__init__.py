"""Models: backbones, necks, heads and detectors."""
