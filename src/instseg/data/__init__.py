"""COCO-format data: datasets, transforms, batching, sampling and the synthetic generator."""

from instseg.data.build import build_dataset, build_test_loader, build_train_loader
from instseg.data.coco import CocoDataset, DataError, DataWarning, ImageMeta, Sample, SkipBadSamples
from instseg.data.collate import collate
from instseg.data.samplers import GroupedBatchSampler
from instseg.data.transforms import Compose, Normalize, RandomFlip, Resize, build_transforms

__all__ = [
    "CocoDataset",
    "Compose",
    "DataError",
    "DataWarning",
    "GroupedBatchSampler",
    "ImageMeta",
    "Normalize",
    "RandomFlip",
    "Resize",
    "Sample",
    "SkipBadSamples",
    "build_dataset",
    "build_test_loader",
    "build_train_loader",
    "build_transforms",
    "collate",
]
