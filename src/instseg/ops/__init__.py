"""Stateless, device-agnostic detection ops (thin layer over torchvision.ops)."""
