"""Backbones: each returns a list of feature maps and exposes ``out_channels`` and ``strides``."""

from .mobilenet import MobileNetV2, imagenet_weights_path
from .resnet import ResNet, fuse_conv_bn, load_backbone_weights

__all__ = ["MobileNetV2", "ResNet", "fuse_conv_bn", "imagenet_weights_path", "load_backbone_weights"]
