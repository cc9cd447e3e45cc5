"""Augmentations for rotation-invariant data (vertical flip, 90-degree rotations, large-scale jitter),
copy-paste, and the held-out validation split (``data.val_fraction``).

The test samples (from ``test_augment``) have tight boxes, a semantic map that labels each mask's
pixels with ``label + 1`` and an image whose channels encode the pixel's own coordinates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from instseg.config.schema import DataConfig
from instseg.data.augment import build_augmentation
from instseg.data.build import build_dataset, holdout_split
from instseg.data.collate import collate
from instseg.data.colour import RandomGrayscale, RandomInvert
from instseg.data.copy_paste import CopyPaste, paste
from instseg.data.geometric import LargeScaleJitter, RandomRot90, RandomVerticalFlip, rot90_sample, vflip_sample
from instseg.data.transforms import build_transforms
from tests.unit.test_augment import H, W, _empty_sample, _sample


def _assert_consistent(sample, *, semantic: bool = True) -> None:
    """Boxes are the masks' tight boxes; the semantic map is the masks' union labelled ``label+1``
    (later masks over earlier ones, as the test samples draw it)."""
    t = sample.targets
    h, w = sample.image.shape[-2:]
    assert t.masks.frame == (h, w) and sample.meta.image_size == (h, w)
    assert len(t.boxes) == len(t.labels) == len(t.masks)
    torch.testing.assert_close(t.boxes, t.masks.boxes(), rtol=0, atol=0)
    if semantic and t.semantic is not None:
        assert t.semantic.shape == (h, w)
        expect = torch.zeros((h, w), dtype=torch.int64)
        full = t.masks.to_full().bool()
        for k in range(len(t)):
            expect[full[k]] = int(t.labels[k]) + 1
        inside = full.any(0) if len(t) else torch.zeros((h, w), dtype=torch.bool)
        assert torch.equal(t.semantic[inside], expect[inside])


def test_vflip_twice_and_rot90_four_times_are_identity():
    s = _sample(3)
    for once, times in ((vflip_sample, 2), (lambda x: rot90_sample(x, 1), 4)):
        out = s
        for _ in range(times):
            out = once(out)
        assert torch.equal(out.image, s.image)
        assert torch.equal(out.targets.boxes, s.targets.boxes)
        assert torch.equal(out.targets.crowd_boxes, s.targets.crowd_boxes)
        assert torch.equal(out.targets.semantic, s.targets.semantic)
        assert torch.equal(out.targets.masks.to_full(), s.targets.masks.to_full())
        assert out.meta.image_size == (H, W)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_moves_everything_like_torch_rot90(k):
    s = _sample(5)
    out = rot90_sample(s, k)
    assert torch.equal(out.image, torch.rot90(s.image, k, dims=(-2, -1)))
    assert torch.equal(out.targets.masks.to_full(), torch.rot90(s.targets.masks.to_full(), k, dims=(-2, -1)))
    assert torch.equal(out.targets.semantic, torch.rot90(s.targets.semantic, k, dims=(-2, -1)))
    _assert_consistent(out)
    # a crowd box maps to the box of its rotated rectangle
    crowd = torch.zeros((H, W), dtype=torch.uint8)
    x0, y0, x1, y1 = (int(v) for v in s.targets.crowd_boxes[0])
    crowd[y0:y1, x0:x1] = 1
    ys, xs = torch.nonzero(torch.rot90(crowd, k), as_tuple=True)
    expect = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.equal(out.targets.crowd_boxes[0], expect)


def test_vflip_moves_everything_like_a_flip():
    s = _sample(7)
    out = vflip_sample(s)
    assert torch.equal(out.image, s.image.flip(-2))
    assert torch.equal(out.targets.masks.to_full(), s.targets.masks.to_full().flip(-2))
    assert torch.equal(out.targets.semantic, s.targets.semantic.flip(-2))
    _assert_consistent(out)


@pytest.mark.parametrize("make", [RandomVerticalFlip, RandomRot90, lambda: LargeScaleJitter((200, 150))])
def test_random_geometric_keep_boxes_tight_and_maps_aligned(make):
    t = make()
    seen_sizes = set()
    for seed in range(12):
        out = t(_sample(seed, gen_seed=seed))
        _assert_consistent(out)
        seen_sizes.add(tuple(out.image.shape[-2:]))
    assert len(seen_sizes) >= 2 or isinstance(t, RandomVerticalFlip)


def test_large_scale_jitter_range_and_crop_window():
    lsj = LargeScaleJitter((200, 150), ratio_range=(0.1, 2.0))
    sizes = [tuple(lsj(_sample(0, gen_seed=s)).image.shape[-2:]) for s in range(40)]
    assert max(h for h, _ in sizes) <= 150 and max(w for _, w in sizes) <= 200  # cropped to the fitted size
    assert min(h for h, _ in sizes) < 75  # and scaled well below it
    # the coordinate image shows a crop of the upscaled image: x grows by ~1/r per pixel
    big = LargeScaleJitter((200, 150), ratio_range=(2.0, 2.0))(_sample(1, gen_seed=3))
    assert tuple(big.image.shape[-2:]) == (150, 200)
    dx = (big.image[0, 75, 150] - big.image[0, 75, 50]) / 100
    assert abs(float(dx) - 0.5) < 0.02


def test_lsj_crop_that_removes_every_instance_gives_valid_empty_sample():
    """One small instance in the top-left corner; at 2x, windows away from it lose it."""
    s = _sample(0, n=1, crowd=False)
    empties = 0
    for seed in range(30):
        s2 = _sample(0, n=1, crowd=False, gen_seed=seed)
        out = LargeScaleJitter((200, 150), ratio_range=(2.0, 2.0))(s2)
        if len(out.targets) == 0:
            empties += 1
            t = out.targets
            assert t.boxes.shape == (0, 4) and t.labels.shape == (0,) and len(t.masks) == 0
            assert t.masks.frame == tuple(out.image.shape[-2:])
            batch, targets, _ = collate([out, s], size_divisor=32)
            assert len(targets[0]) == 0 and batch.images.shape[0] == 2
    assert empties > 0


def test_copy_paste_pastes_donor_pixels_and_hides_what_is_under():
    s, donor = _sample(11), _sample(12)
    donor = type(donor)(donor.image + 1000.0, donor.targets, donor.meta, None)  # tell pixels apart
    g = torch.Generator().manual_seed(0)
    out = paste(s, donor, g, paste_prob=1.0)
    cover = donor.targets.masks.to_full().bool().any(0)
    assert torch.equal(out.image[:, cover], donor.image[:, cover])
    assert torch.equal(out.image[:, ~cover], s.image[:, ~cover])
    n_donor = len(donor.targets)
    assert torch.equal(out.targets.labels[-n_donor:], donor.targets.labels)
    # the sample's instances keep exactly their unhidden pixels; fully hidden ones are gone
    kept = out.targets.masks.to_full()[:-n_donor].bool()
    for m in kept:
        assert not (m & cover).any()
    orig = s.targets.masks.to_full().bool()
    visible = [(m & ~cover) for m in orig if (m & ~cover).any()]
    assert len(visible) == len(kept) and all(torch.equal(a, b) for a, b in zip(visible, kept))
    _assert_consistent(out)
    assert torch.equal(out.targets.semantic[cover], donor.targets.semantic[cover])


def test_copy_paste_hides_an_instance_fully_then_drops_it():
    s = _sample(2, rect_only=True, n=1, crowd=False)
    donor = type(s)(s.image + 1000.0, s.targets, s.meta, None)  # same object pasted on top
    out = paste(s, donor, torch.Generator().manual_seed(0), paste_prob=1.0)
    assert len(out.targets) == 1 and torch.equal(out.image, donor.image) is False
    assert torch.equal(out.targets.masks.to_full(), s.targets.masks.to_full())


class _Donors:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        return self.samples[i]


def test_copy_paste_transform_is_seeded_and_consistent():
    cp = CopyPaste(prob=1.0)
    with pytest.raises(RuntimeError, match="bind_dataset"):
        cp(_sample(0, gen_seed=0))
    cp.bind_dataset(_Donors([_sample(20 + k) for k in range(4)]))
    grew = 0
    for seed in range(8):
        a = cp(_sample(seed, gen_seed=seed))
        b = cp(_sample(seed, gen_seed=seed))
        assert torch.equal(a.image, b.image) and torch.equal(a.targets.boxes, b.targets.boxes)
        # (pasted pixels carry the donor's own map, where a donor instance left behind may lie
        # over a pasted one: the map is checked against the donor in the test above)
        _assert_consistent(a, semantic=False)
        grew += len(a.targets) > len(_sample(seed).targets)
    assert grew > 0


def test_colour_transforms_change_only_the_image_and_follow_the_sample_seed():
    s = _sample(4)
    inverted = RandomInvert(1.0)(s)
    torch.testing.assert_close(inverted.image, 255.0 - s.image.float())
    grey = RandomGrayscale(1.0)(s).image
    luma = 0.2989 * s.image[0] + 0.587 * s.image[1] + 0.114 * s.image[2]
    for c in range(3):
        torch.testing.assert_close(grey[c], luma, atol=1e-3, rtol=0)
    for out in (inverted, RandomGrayscale(1.0)(s)):
        assert out.targets is s.targets and out.meta == s.meta
    assert torch.equal(RandomInvert(0.0)(s).image, s.image)
    # p = 0.5: the per-sample generator decides, so equal seeds give equal images, and both outcomes occur
    outcomes = set()
    for seed in range(12):
        a, b = RandomInvert()(_sample(4, gen_seed=seed)), RandomInvert()(_sample(4, gen_seed=seed))
        assert torch.equal(a.image, b.image)
        outcomes.add(bool(torch.equal(a.image, s.image)))
    assert outcomes == {True, False}


def test_pipeline_names_build_and_lsj_replaces_resize():
    for name in ("vflip", "rot90", "lsj", "copy_paste", "grayscale", "invert"):
        assert build_augmentation(name) is not None
    cfg = DataConfig(scale=(200, 150), train_pipeline=("rot90", "vflip", "lsj"))
    names = [type(t).__name__ for t in build_transforms(cfg, train=True)]
    assert names == ["RandomRot90", "RandomVerticalFlip", "LargeScaleJitter", "RandomFlip", "Normalize"]
    assert "Resize" in [type(t).__name__ for t in build_transforms(cfg, train=False)]


def test_zero_instance_samples_pass_the_new_transforms():
    for t in (RandomVerticalFlip(1.0), RandomRot90(), LargeScaleJitter((200, 150))):
        out = t(_empty_sample(crowd=True, gen_seed=1))
        assert len(out.targets) == 0 and out.targets.boxes.shape == (0, 4)


# ------------------------------------------------------------------------------ datasets on disk
@pytest.fixture()
def tiny_coco(tmp_path):
    """10 images of 40x30 px with one square instance each."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(10):
        arr = np.full((30, 40, 3), 20 * i, dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 40, "height": 30})
        x, y = 2 + i, 3
        poly = [x, y, x + 10, y, x + 10, y + 10, x, y + 10]
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": 1, "bbox": [x, y, 10, 10],
                     "area": 100, "iscrowd": 0, "segmentation": [poly]})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "sq"}]}))
    return str(ann), str(img_dir)


def test_holdout_split_is_deterministic_disjoint_and_order_free():
    ids = list(range(100, 150))
    tr, va = holdout_split(ids, 0.2, 0)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == ids
    tr2, va2 = holdout_split(list(reversed(ids)), 0.2, 0)
    assert set(va2) == set(va)
    assert set(holdout_split(ids, 0.2, 1)[1]) != set(va)
    assert len(holdout_split(ids[:3], 0.01, 0)[1]) == 1  # at least one image


def test_val_fraction_holds_out_training_images(tiny_coco):
    ann, images = tiny_coco
    cfg = DataConfig(train_ann=ann, train_images=images, val_fraction=0.3, scale=(40, 30))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(val) == 3 and len(train) == 7
    assert not set(train.image_ids) & set(val.image_ids)
    cfg.val_ann, cfg.val_images = ann, images
    with pytest.raises(Exception, match="val_fraction"):
        build_dataset(cfg, "val")


def test_copy_paste_bound_by_build_dataset_and_resume_exact(tiny_coco):
    ann, images = tiny_coco
    cfg = DataConfig(train_ann=ann, train_images=images, scale=(40, 30),
                     train_pipeline=("copy_paste", "rot90", "vflip", "lsj"))
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    for ds in (a, b):
        ds.set_epoch(2, seed=5)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.image, y.image) and torch.equal(x.targets.boxes, y.targets.boxes)
    a.set_epoch(3, seed=5)
    assert any(not torch.equal(a[i].image, b[i].image) for i in range(len(a)))
