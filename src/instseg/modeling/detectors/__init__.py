"""Detectors: backbone + neck + heads, with ``loss`` and ``predict``."""
