"""Dense (per-location) heads."""
