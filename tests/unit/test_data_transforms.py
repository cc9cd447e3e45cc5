"""Transforms (resize / flip / normalize) keep image, boxes, masks and semantic map aligned; collate pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instseg.config.schema import DataConfig
from instseg.data.coco import ImageMeta, Sample
from instseg.data.collate import collate
from instseg.data.transforms import Compose, Normalize, RandomFlip, Resize, build_transforms, flip_sample, rescale_size
from instseg.structures.instances import ImageTargets
from instseg.structures.masks import CroppedMasks


def _sample(h=283, w=394, seed=0, generator=None) -> Sample:
    """An image with rectangles/ellipses whose boxes are the tight boxes of their masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    masks, boxes = [], []
    for k in range(5):
        rmax = min(28.0, min(h, w) / 5)
        rx, ry = rng.uniform(rmax / 3, rmax), rng.uniform(rmax / 3, rmax)
        cx, cy = rng.uniform(rmax + 1, w - rmax - 1), rng.uniform(rmax + 1, h - rmax - 1)
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1) if k % 2 else ((abs(xx - cx) <= rx) & (abs(yy - cy) <= ry))
        masks.append(m.astype(np.uint8))
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    cm = CroppedMasks.from_iter(masks, (h, w))
    sem = torch.zeros((h, w), dtype=torch.int64)
    for k, m in enumerate(masks):
        sem[torch.from_numpy(m).bool()] = k + 1
    image = torch.from_numpy(rng.integers(0, 256, (3, h, w))).float()
    targets = ImageTargets(torch.tensor(boxes, dtype=torch.float32), torch.arange(5), cm, sem)
    return Sample(image, targets, ImageMeta(7, "x.jpg", (h, w), (h, w)), generator)


def _mask_box_error(s: Sample) -> float:
    return float((s.targets.masks.boxes() - s.targets.boxes).abs().max())


def test_rescale_matches_mmdet_formula():
    assert rescale_size(394, 283, (512, 512))[0] == (512, 368)
    assert rescale_size(640, 480, (1333, 800))[0] == (1067, 800)
    assert rescale_size(480, 640, (1333, 800))[0] == (800, 1067)
    assert rescale_size(1272, 603, (1333, 800))[0] == (1333, 632)  # long side caps
    s = Resize((512, 512))(_sample())
    assert s.image.shape == (3, 368, 512)
    assert s.meta.image_size == (368, 512) and s.meta.original_size == (283, 394)
    assert s.meta.scale_factor == pytest.approx((512 / 394, 368 / 283))


def test_resize_keeps_boxes_masks_semantic_aligned():
    s0 = _sample()
    s = Resize((512, 512))(s0)
    sx, sy = s.meta.scale_factor
    assert torch.allclose(s.targets.boxes, s0.targets.boxes * torch.tensor([sx, sy, sx, sy]))
    assert s.targets.masks.frame == (368, 512)
    assert _mask_box_error(s) <= 1.5
    assert s.targets.semantic.shape == (368, 512) and s.targets.semantic.dtype == torch.int64
    full = s.targets.masks.to_full()
    painted = torch.zeros((368, 512), dtype=torch.int64)
    for k in range(5):  # nearest-resized semantic map and nearest-resized masks coincide pixel for pixel
        painted[full[k].bool()] = k + 1
    assert torch.equal(painted, s.targets.semantic)
    # image: values in range and integral (cv2-like uint8 resize), a constant image stays constant
    assert s.image.min() >= 0 and s.image.max() <= 255 and torch.equal(s.image, s.image.round())
    c = _sample()
    c.image.fill_(77.0)
    assert torch.all(Resize((100, 100))(c).image == 77.0)


def test_flip_keeps_alignment_and_twice_is_identity():
    s0 = Resize((512, 512))(_sample())
    s = flip_sample(s0)
    w = s0.image.shape[-1]
    assert torch.allclose(s.targets.boxes[:, 0], w - s0.targets.boxes[:, 2])
    assert torch.allclose(s.targets.boxes[:, 2], w - s0.targets.boxes[:, 0])
    assert _mask_box_error(s) <= 1.5
    assert torch.equal(s.image, s0.image.flip(-1)) and torch.equal(s.targets.semantic, s0.targets.semantic.flip(-1))
    assert torch.equal(s.targets.masks.to_full(), s0.targets.masks.to_full().flip(-1))
    assert s.meta.flipped and not flip_sample(s).meta.flipped
    back = flip_sample(s)
    assert torch.allclose(back.targets.boxes, s0.targets.boxes) and torch.equal(back.targets.masks.to_full(), s0.targets.masks.to_full())


def test_random_flip_uses_the_sample_generator():
    flips = []
    for i in range(40):
        g = torch.Generator().manual_seed(i)
        flips.append(RandomFlip(0.5)(_sample(h=64, w=80, generator=g)).meta.flipped)
        g2 = torch.Generator().manual_seed(i)
        assert RandomFlip(0.5)(_sample(h=64, w=80, generator=g2)).meta.flipped == flips[-1]
    assert 5 < sum(flips) < 35
    assert not RandomFlip(0.0)(_sample(h=64, w=80)).meta.flipped
    assert RandomFlip(1.0)(_sample(h=64, w=80)).meta.flipped


def test_short_range_is_reproducible_and_in_range():
    r = Resize((1333, 96), short_range=(48, 96))
    shorts = set()
    for i in range(30):
        a = r(_sample(h=64, w=80, generator=torch.Generator().manual_seed(i)))
        b = r(_sample(h=64, w=80, generator=torch.Generator().manual_seed(i)))
        assert a.image.shape == b.image.shape
        shorts.add(a.image.shape[-2])
        assert 48 <= a.image.shape[-2] <= 96
    assert len(shorts) > 5
    own = [Resize((1333, 96), short_range=(48, 96), seed=3)(_sample(h=64, w=80)).image.shape for _ in range(2)]
    assert own[0] == own[1]


def test_normalize_and_build_transforms():
    s = _sample(h=32, w=32)
    n = Normalize()(s)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    assert torch.allclose(n.image, (s.image - mean) / std)
    cfg = DataConfig(scale=(512, 512), train_short_range=(300, 400), flip_prob=0.5)
    train, test = build_transforms(cfg, True), build_transforms(cfg, False)
    assert isinstance(train, Compose) and [type(t) for t in train] == [Resize, RandomFlip, Normalize]
    assert [type(t) for t in test] == [Resize, Normalize]
    assert train.transforms[0].short_range == (300, 400) and test.transforms[0].short_range is None
    assert build_transforms(DataConfig(), True).transforms[0].short_range is None
    out = test(_sample())
    assert out.image.shape == (3, 368, 512) and abs(float(out.image.mean())) < 1.0


def test_collate_pads_to_multiple_of_32():
    a = Resize((100, 100))(_sample(h=70, w=90, seed=1))
    b = flip_sample(_sample(h=50, w=40, seed=2))
    a.image.add_(1.0)  # make sure padding is distinguishable from content
    b.image.add_(1.0)
    batch, targets, metas = collate([a, b])
    assert batch.images.shape == (2, 3, 96, 128)
    assert batch.padded_size[0] % 32 == 0 and batch.padded_size[1] % 32 == 0
    ha, wa = a.image.shape[-2:]
    assert torch.equal(batch.images[0, :, :ha, :wa], a.image)
    assert torch.all(batch.images[0, :, ha:, :] == 0) and torch.all(batch.images[0, :, :, wa:] == 0)
    assert torch.all(batch.images[1, :, 50:, :] == 0) and torch.all(batch.images[1, :, :, 40:] == 0)
    assert batch.image_sizes == [(int(ha), int(wa)), (50, 40)]
    assert batch.original_sizes == [(70, 90), (50, 40)]
    assert batch.scale_factors.shape == (2, 2) and batch.scale_factors.dtype == torch.float32
    assert torch.allclose(batch.scale_factors[0], torch.tensor(a.meta.scale_factor, dtype=torch.float32))
    assert batch.image_ids == [7, 7] and batch.flipped == [False, True]
    sem = targets[1].semantic
    assert sem.shape == (96, 128) and torch.all(sem[50:, :] == 255) and torch.all(sem[:, 40:] == 255)
    assert torch.equal(sem[:50, :40], b.targets.semantic)
    assert targets[0].masks.frame == (int(ha), int(wa))  # masks are not padded
    assert metas[1] is b.meta
    assert collate([a], size_divisor=1)[0].images.shape[-2:] == a.image.shape[-2:]
