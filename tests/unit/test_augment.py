"""YOLACT's training augmentations (instseg.data.augment), squash resize and crowd boxes.

The test image encodes its own coordinates (channel 0 = x, channel 1 = y, integers), so after a
geometric transform every original pixel tells where it came from, and the expand fill (the
non-integer mean) is told apart from image content.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from instseg.config.schema import DataConfig
from instseg.data.augment import (
    AUGMENTATIONS,
    Expand,
    FilterSmallBoxes,
    PhotometricDistort,
    RandomSampleCrop,
    build_augmentation,
    crop_sample,
    expand_sample,
    hsv_to_rgb,
    rgb_to_hsv,
)
from instseg.data.coco import CocoDataset, ImageMeta, Sample
from instseg.data.transforms import Normalize, RandomFlip, Resize, build_transforms, flip_sample
from instseg.structures.instances import ImageTargets
from instseg.structures.masks import CroppedMasks

H, W = 150, 200
MEAN = (123.675, 116.28, 103.53)


def _make_coord_image(h: int = H, w: int = W) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xx, yy, (7 * xx + 13 * yy) % 256]).float()


_COORDS = _make_coord_image()


def _coord_image() -> torch.Tensor:
    return _COORDS.clone()


def _sample(seed: int = 0, *, rect_only: bool = False, n: int = 6, crowd: bool = True, gen_seed: int | None = None) -> Sample:
    """Rectangles (and ellipses unless ``rect_only``) with tight boxes; labels 0..n-1 identify them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    masks, boxes = [], []
    for k in range(n):
        rx, ry = rng.uniform(5, 25), rng.uniform(5, 25)
        cx, cy = rng.uniform(rx + 1, W - rx - 1), rng.uniform(ry + 1, H - ry - 1)
        if rect_only or k % 2 == 0:
            m = (abs(xx - cx) <= rx) & (abs(yy - cy) <= ry)
        else:
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        ys, xs = np.nonzero(m)
        masks.append(m.astype(np.uint8))
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    sem = torch.zeros((H, W), dtype=torch.int64)
    for k, m in enumerate(masks):
        sem[torch.from_numpy(m).bool()] = k + 1
    crowd_boxes = torch.tensor([[10.0, 20.0, 60.0, 50.0], [120.0, 90.0, 190.0, 140.0]]) if crowd else None
    targets = ImageTargets(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.arange(n),
        CroppedMasks.from_iter(masks, (H, W)) if n else CroppedMasks.empty((H, W)),
        sem,
        crowd_boxes,
    )
    g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    return Sample(_coord_image(), targets, ImageMeta(1, "x.png", (H, W), (H, W)), g)


def _empty_sample(crowd: bool, gen_seed: int = 0) -> Sample:
    s = _sample(crowd=crowd, n=0, gen_seed=gen_seed)
    assert len(s.targets) == 0 and s.targets.boxes.shape == (0, 4)
    return s


def _assert_valid(s: Sample) -> None:
    """Shapes agree: image vs meta vs mask frame vs semantic, one box/label/mask per instance."""
    t = s.targets
    h, w = s.image.shape[-2:]
    assert s.meta.image_size == (h, w)
    assert t.boxes.shape == (len(t), 4) and t.labels.shape == (len(t),) and t.labels.dtype == torch.int64
    if t.masks is not None:
        assert len(t.masks) == len(t) and t.masks.frame == (h, w)
    if t.semantic is not None:
        assert t.semantic.shape == (h, w)
    if t.crowd_boxes is not None:
        assert t.crowd_boxes.ndim == 2 and t.crowd_boxes.shape[1] == 4
        assert bool((t.crowd_boxes[:, 0::2] >= 0).all() and (t.crowd_boxes[:, 0::2] <= w).all())
        assert bool((t.crowd_boxes[:, 1::2] >= 0).all() and (t.crowd_boxes[:, 1::2] <= h).all())


def _origin(s: Sample) -> tuple[int, int]:
    """Where the output's top-left pixel came from (crop: needs the image's own top-left pixel)."""
    return int(s.image[0, 0, 0]), int(s.image[1, 0, 0])


def _clip_shift(boxes: torch.Tensor, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(x0, x1) - x0
    out[:, 1::2] = out[:, 1::2].clamp(y0, y1) - y0
    return out


# ------------------------------------------------------------------------------ colour
def test_hsv_matches_colorsys_and_round_trips():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 16, 16), generator=g).float()
    img[:, 0, 0] = torch.tensor([255.0, 0.0, 0.0])  # pure red: hue 0
    img[:, 0, 1] = torch.tensor([80.0, 80.0, 80.0])  # grey: saturation 0
    hsv = rgb_to_hsv(img)
    for y, x in [(0, 0), (0, 1), (3, 5), (7, 2), (15, 15), (9, 11)]:
        r, gg, b = (float(v) / 255 for v in img[:, y, x])
        eh, es, ev = colorsys.rgb_to_hsv(r, gg, b)
        assert float(hsv[0, y, x]) == pytest.approx((eh * 360) % 360, abs=1e-3)
        assert float(hsv[1, y, x]) == pytest.approx(es, abs=1e-5)
        assert float(hsv[2, y, x]) == pytest.approx(ev * 255, abs=1e-4)
    assert float((hsv_to_rgb(hsv) - img).abs().max()) < 1e-3
    # a 120-degree hue shift turns red into green, 240 into blue
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    h = rgb_to_hsv(red)
    assert torch.allclose(hsv_to_rgb(torch.stack([h[0] + 120, h[1], h[2]])).flatten(), torch.tensor([0.0, 255.0, 0.0]), atol=1e-3)
    assert torch.allclose(hsv_to_rgb(torch.stack([h[0] + 240, h[1], h[2]])).flatten(), torch.tensor([0.0, 0.0, 255.0]), atol=1e-3)


@pytest.mark.parametrize("style", ["yolact", "mmdet"])
def test_photometric_range_determinism_and_probabilities(style):
    s0 = _sample(gen_seed=0)
    outs = [PhotometricDistort(style)(_sample(gen_seed=k)) for k in range(6)]
    for o in outs:
        assert o.image.min() >= 0 and o.image.max() <= 255 and o.image.shape == s0.image.shape
        assert o.targets is not None and torch.equal(o.targets.boxes, s0.targets.boxes)
    again = PhotometricDistort(style)(_sample(gen_seed=3))
    assert torch.equal(again.image, outs[3].image)
    assert len({o.image.sum().item() for o in outs}) > 3  # different seeds, different images
    # the references do not clamp: clamp=False lets bright pixels exceed 255 for some draws
    assert any(PhotometricDistort(style, clamp=False)(_sample(gen_seed=k)).image.max() > 255 for k in range(20))
    # a grey image only sees brightness (p 0.5) and contrast (p 0.5): unchanged with p 1/4
    unchanged = 0
    for k in range(200):
        grey = Sample(torch.full((3, 4, 4), 100.0), s0.targets, s0.meta, torch.Generator().manual_seed(k))
        out = PhotometricDistort(style, clamp=False)(grey).image
        assert float(out.std()) < 1e-3  # still grey: saturation, hue and channel swap do nothing
        unchanged += abs(float(out.mean()) - 100.0) < 1e-3
    assert 30 < unchanged < 75
    # saturation x > 1 on a strongly coloured pixel: mmdet clips S to 1 (no channel goes below 0
    # for positive input), the official code does not (the smallest channel turns negative)
    vivid = torch.tensor([250.0, 60.0, 60.0]).view(3, 1, 1).repeat(1, 2, 2)
    lows = [float(PhotometricDistort(style, clamp=False)(Sample(vivid, s0.targets, s0.meta, torch.Generator().manual_seed(k))).image.min())
            for k in range(40)]
    assert (min(lows) >= 0) == (style == "mmdet")


# ------------------------------------------------------------------------------ masks
def test_cropped_masks_translate_and_crop_match_full_frame_ops():
    s = _sample(3)
    m = s.targets.masks
    full = m.to_full()
    moved = m.translate(17, 9, (H + 40, W + 30))
    ref = torch.zeros((len(m), H + 40, W + 30), dtype=torch.uint8)
    ref[:, 9 : 9 + H, 17 : 17 + W] = full
    assert torch.equal(moved.to_full(), ref)
    again = CroppedMasks.from_iter(ref, (H + 40, W + 30))  # margins re-established exactly as from_iter
    assert torch.equal(moved.offsets, again.offsets) and all(torch.equal(a, b) for a, b in zip(moved.crops, again.crops))
    c = m.crop(30, 20, 120, 100)
    assert c.frame == (80, 90) and torch.equal(c.to_full(), full[:, 20:100, 30:120])
    assert torch.equal(c.nonempty(), full[:, 20:100, 30:120].flatten(1).any(1))
    with pytest.raises(ValueError):
        m.crop(10, 10, 10, 20)


# ------------------------------------------------------------------------------ expand
def test_expand_moves_everything_together():
    for k in range(4):
        s0 = _sample(k, gen_seed=k)
        s = Expand(MEAN, prob=1.0)(s0)
        _assert_valid(s)
        eh, ew = s.image.shape[-2:]
        assert H <= eh <= 4 * H and W <= ew <= 4 * W
        dx, dy = (s.targets.boxes[0, :2] - s0.targets.boxes[0, :2]).int().tolist()
        assert torch.equal(s.image[:, dy : dy + H, dx : dx + W], s0.image)
        fill = s.image.clone()
        fill[:, dy : dy + H, dx : dx + W] = torch.tensor(MEAN).view(3, 1, 1)
        assert torch.allclose(fill, torch.tensor(MEAN).view(3, 1, 1).expand_as(fill))
        shift = torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
        assert torch.equal(s.targets.boxes, s0.targets.boxes + shift)
        assert torch.equal(s.targets.crowd_boxes, s0.targets.crowd_boxes + shift)
        assert torch.equal(s.targets.masks.boxes(), s.targets.boxes)
        assert torch.equal(s.targets.semantic[dy : dy + H, dx : dx + W], s0.targets.semantic)
        assert int((s.targets.semantic == 255).sum()) == eh * ew - H * W
    assert Expand(MEAN, prob=0.0)(_sample(gen_seed=0)).image.shape == (3, H, W)
    s0 = _sample(0)
    fixed = expand_sample(s0, 3, 4, (H + 10, W + 10), MEAN)
    assert torch.equal(fixed.targets.boxes, s0.targets.boxes + torch.tensor([3.0, 4.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        expand_sample(s0, 11, 0, (H + 10, W + 10), MEAN)
    # p 0.5: some samples expanded, some not
    sizes = [Expand(MEAN)(_sample(n=1, gen_seed=k)).image.shape for k in range(20)]
    assert 3 < sum(sz == (3, H, W) for sz in sizes) < 17


# ------------------------------------------------------------------------------ crop
def _check_crop(s0: Sample, s: Sample) -> None:
    """``s`` is a crop of ``s0`` (window recovered from the coordinate image)."""
    _assert_valid(s)
    x0, y0 = _origin(s)
    h, w = s.image.shape[-2:]
    x1, y1 = x0 + w, y0 + h
    assert torch.equal(s.image, s0.image[:, y0:y1, x0:x1])
    assert torch.equal(s.targets.semantic, s0.targets.semantic[y0:y1, x0:x1])
    idx = s.targets.labels  # labels are the original instance indices
    assert torch.equal(s.targets.boxes, _clip_shift(s0.targets.boxes[idx], x0, y0, x1, y1))
    assert torch.equal(s.targets.masks.to_full(), s0.targets.masks.to_full(idx)[:, y0:y1, x0:x1])
    assert bool(s.targets.masks.nonempty().all())
    # kept ground truths are exactly those whose centre is strictly inside the window
    for boxes, kept in ((s0.targets.boxes, s.targets.boxes), (s0.targets.crowd_boxes, s.targets.crowd_boxes)):
        c = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (c[:, 0] > x0) & (c[:, 1] > y0) & (c[:, 0] < x1) & (c[:, 1] < y1)
        if boxes is s0.targets.crowd_boxes:
            assert torch.equal(kept, _clip_shift(boxes[inside], x0, y0, x1, y1))
        else:
            assert set(idx.tolist()) <= set(torch.nonzero(inside).flatten().tolist())


@pytest.mark.parametrize("style", ["yolact", "mmdet"])
def test_random_crop_keeps_targets_consistent(style):
    cropped = 0
    for k in range(15):
        s0 = _sample(k, rect_only=True, gen_seed=k)
        s = RandomSampleCrop(style)(s0)
        if s is s0:
            continue
        cropped += 1
        _check_crop(s0, s)
        # rectangles: the clipped box is exactly the tight box of the cropped mask
        assert torch.equal(s.targets.masks.boxes(), s.targets.boxes)
        if style == "yolact":
            assert len(s.targets) >= 1  # the official code insists on one non-crowd instance
        # numpy's uniform(w - new_w) quirk: the window starts at x >= 1 unless nearly full width
        x0, y0 = _origin(s)
        assert x0 >= 1 or s.image.shape[-1] >= W - 1
        assert y0 >= 1 or s.image.shape[-2] >= H - 1
    assert cropped >= 6
    # non-rectangular masks: boxes are clipped (not refitted), so they contain their mask's box
    for k in range(6):
        s0 = _sample(k, gen_seed=100 + k)
        s = RandomSampleCrop(style)(s0)
        if s is not s0:
            _check_crop(s0, s)
        mb, b = s.targets.masks.boxes(), s.targets.boxes
        assert bool((mb[:, :2] >= b[:, :2]).all() and (mb[:, 2:] <= b[:, 2:]).all())


def test_min_iou_rule_mmdet_enforced_yolact_noop():
    """One tiny box: mmdet's 0.1..0.9 modes can never succeed, so only 'whole' and 'min IoU 0' end
    the loop (half each); in the official code the IoU test is a no-op and 'whole' is 1 in 6."""
    m = torch.zeros((1, H, W), dtype=torch.uint8)
    m[0, 74:77, 99:102] = 1
    t = ImageTargets(torch.tensor([[99.0, 74.0, 102.0, 77.0]]), torch.tensor([0]), CroppedMasks.from_full(m))

    def tiny(k):  # the transforms never write into their input, so the image can be shared
        return Sample(_COORDS, t, ImageMeta(1, "x.png", (H, W), (H, W)), torch.Generator().manual_seed(k))

    whole = {"mmdet": 0, "yolact": 0}
    n = 40
    for style in whole:
        for k in range(n):
            s0 = tiny(k)
            s = RandomSampleCrop(style)(s0)
            whole[style] += s is s0
    assert 0.25 * n < whole["mmdet"] < 0.75 * n  # expected 1/2
    assert whole["yolact"] < 0.35 * n  # expected about 1/6


def test_crop_removing_all_instances_gives_valid_empty_sample():
    s0 = _sample(1, rect_only=True)
    s = crop_sample(s0, (0, 0, 10, 10), keep=torch.zeros(len(s0.targets), dtype=torch.bool))
    _assert_valid(s)
    t = s.targets
    assert t.boxes.shape == (0, 4) and t.labels.shape == (0,) and len(t.masks) == 0 and t.masks.frame == (10, 10)
    # a kept instance with no mask pixel in the window is dropped with its box and label
    m = torch.zeros((1, H, W), dtype=torch.uint8)
    m[0, 0:5, 0:5] = 1  # L-shaped "box" content: the mask sits in a corner of its box
    m[0, 40:45, 40:45] = 1
    ts = ImageTargets(torch.tensor([[0.0, 0.0, 45.0, 45.0]]), torch.tensor([3]), CroppedMasks.from_full(m), None, None)
    out = crop_sample(Sample(s0.image, ts, s0.meta), (15, 15, 35, 35))
    assert len(out.targets) == 0 and out.targets.boxes.shape == (0, 4) and out.targets.masks.frame == (20, 20)
    # official YOLACT: without a non-crowd instance every try fails -> only the whole-image mode ends the loop
    crowd_only = _empty_sample(crowd=True)
    assert RandomSampleCrop("yolact")(crowd_only) is crowd_only
    # mmdet: crowd boxes are ground truths too; the crop happens and the targets stay valid
    for k in range(5):
        out = RandomSampleCrop("mmdet")(_empty_sample(crowd=True, gen_seed=k))
        _assert_valid(out)
        assert len(out.targets) == 0 and len(out.targets.masks) == 0


# ------------------------------------------------------------------------------ filter
def test_filter_small_boxes_is_strict_and_drops_together():
    s0 = _sample(0, n=4)
    b = s0.targets.boxes.clone()
    b[0, 2] = b[0, 0] + 4.0  # width exactly 4: dropped (mmdet keeps w > 4)
    b[1, 3] = b[1, 1] + 4.5  # height 4.5: kept
    crowd = torch.tensor([[0.0, 0.0, 3.0, 30.0], [0.0, 0.0, 30.0, 30.0]])
    s0 = Sample(s0.image, ImageTargets(b, s0.targets.labels, s0.targets.masks, s0.targets.semantic, crowd), s0.meta)
    s = FilterSmallBoxes((4.0, 4.0))(s0)
    assert s.targets.labels.tolist() == [1, 2, 3]
    assert torch.equal(s.targets.boxes, b[1:])
    assert torch.equal(s.targets.masks.to_full(), s0.targets.masks.to_full()[1:])
    assert torch.equal(s.targets.crowd_boxes, crowd[1:])


# ------------------------------------------------------------------------------ squash resize
def test_squash_resize_exact_size_and_per_axis_factors():
    s0 = _sample(2, gen_seed=0)
    s = Resize((50, 60), keep_ratio=False)(s0)
    assert s.image.shape == (3, 60, 50) and s.meta.image_size == (60, 50)
    sx, sy = s.meta.scale_factor
    assert (sx, sy) == pytest.approx((50 / W, 60 / H)) and sx != pytest.approx(sy)
    f = torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(s.targets.boxes / f, s0.targets.boxes, atol=1e-4)  # maps back to the original
    assert torch.allclose(s.targets.crowd_boxes / f, s0.targets.crowd_boxes, atol=1e-4)
    assert s.targets.masks.frame == (60, 50) and s.targets.semantic.shape == (60, 50)
    assert float((s.targets.masks.boxes() - s.targets.boxes).abs().max()) <= 1.5
    cfg = DataConfig(scale=(550, 550), keep_ratio=False)
    for train in (True, False):
        out = build_transforms(cfg, train)(_sample(gen_seed=1))
        assert out.image.shape == (3, 550, 550)
    with pytest.raises(ValueError):
        build_transforms(DataConfig(scale=(550, 550), keep_ratio=False, train_short_range=(400, 500)), True)


def test_flip_and_resize_move_crowd_boxes():
    s0 = _sample(0)
    f = flip_sample(s0)
    assert torch.equal(f.targets.crowd_boxes[:, 0], W - s0.targets.crowd_boxes[:, 2])
    assert torch.equal(f.targets.crowd_boxes[:, 2], W - s0.targets.crowd_boxes[:, 0])
    r = Resize((100, 100))(s0)
    sx, sy = r.meta.scale_factor
    assert torch.allclose(r.targets.crowd_boxes, s0.targets.crowd_boxes * torch.tensor([sx, sy, sx, sy]))
    assert r.targets.to("cpu").crowd_boxes is not None


# ------------------------------------------------------------------------------ pipeline / determinism
_RANDOM = [
    lambda: PhotometricDistort("yolact"),
    lambda: PhotometricDistort("mmdet"),
    lambda: Expand(MEAN),
    lambda: RandomSampleCrop("yolact"),
    lambda: RandomSampleCrop("mmdet"),
]


def _same(a: Sample, b: Sample) -> bool:
    return (
        a.image.shape == b.image.shape
        and torch.equal(a.image, b.image)
        and torch.equal(a.targets.boxes, b.targets.boxes)
        and torch.equal(a.targets.masks.to_full(), b.targets.masks.to_full())
    )


@pytest.mark.parametrize("make", _RANDOM)
def test_same_seed_same_output_different_seed_different(make):
    t = make()
    for k in range(2):
        assert _same(t(_sample(gen_seed=k)), t(_sample(gen_seed=k)))
    outs = [t(_sample(gen_seed=k)) for k in range(5)]
    assert any(not _same(outs[0], o) for o in outs[1:])
    # without a sample generator, the transform's own seeded generator makes it reproducible
    own = [type(t)(**({"style": t.style} if hasattr(t, "style") else {}), seed=5)(_sample()) for _ in range(2)]
    assert _same(*own)


def test_zero_instance_samples_pass_every_transform():
    cfg = DataConfig(scale=(96, 64), keep_ratio=False, train_pipeline=("photometric_yolact", "expand", "crop_yolact", "filter_small"),
                     train_pipeline_post=("photometric_mmdet", "crop_mmdet", "expand", "filter_small"))
    transforms = [m() for m in _RANDOM] + [FilterSmallBoxes(), Resize((96, 64)), Resize((96, 64), keep_ratio=False), RandomFlip(1.0)]
    for crowd in (False, True):
        for k in range(2):
            for t in transforms:
                out = t(_empty_sample(crowd, gen_seed=k))
                _assert_valid(out)
                assert len(out.targets) == 0 and len(out.targets.masks) == 0
            out = build_transforms(cfg, True)(_empty_sample(crowd, gen_seed=k))
            assert len(out.targets) == 0 and out.targets.masks.frame == tuple(out.image.shape[-2:])
    # degenerate (zero-size) boxes do not crash either
    s0 = _sample(0, n=2, gen_seed=0)
    b = s0.targets.boxes.clone()
    b[0, 2] = b[0, 0]
    deg = Sample(s0.image, ImageTargets(b, s0.targets.labels, s0.targets.masks, s0.targets.semantic, s0.targets.crowd_boxes), s0.meta, s0.generator)
    for t in transforms:
        _assert_valid(t(deg))


def test_build_transforms_pipelines_and_names():
    assert [type(t) for t in build_transforms(DataConfig(), True)] == [Resize, RandomFlip, Normalize]  # defaults unchanged
    cfg = DataConfig(train_pipeline=("photometric_yolact", "expand", "crop_yolact"), train_pipeline_post=("photometric_mmdet",))
    train = build_transforms(cfg, True)
    assert [type(t) for t in train] == [PhotometricDistort, Expand, RandomSampleCrop, Resize, RandomFlip, PhotometricDistort, Normalize]
    assert train.transforms[0].style == "yolact" and train.transforms[5].style == "mmdet"
    assert train.transforms[1].mean == tuple(cfg.mean)
    assert [type(t) for t in build_transforms(cfg, False)] == [Resize, Normalize]
    for name in AUGMENTATIONS:
        assert callable(build_augmentation(name))
    for bad in (DataConfig(train_pipeline=("expand", "cutout")), DataConfig(train_pipeline_post=("flip",))):
        with pytest.raises(ValueError, match="photometric_yolact.*filter_small"):
            build_transforms(bad, True)
    out = train(_sample(gen_seed=0))
    assert out.image.dtype == torch.float32 and out.targets.masks.frame == tuple(out.image.shape[-2:])


def test_expand_then_crop_keeps_image_under_masks():
    """Pixels under each surviving mask are original pixels that were under the same instance."""
    pipe = [Expand(MEAN, prob=1.0), RandomSampleCrop("yolact")]
    for k in range(6):
        s0 = _sample(k, gen_seed=k)
        s = s0
        for t in pipe:
            s = t(s)
        _assert_valid(s)
        full0 = s0.targets.masks.to_full()
        full = s.targets.masks.to_full()
        for j, label in enumerate(s.targets.labels.tolist()):
            px = s.image[:, full[j].bool()]
            assert torch.equal(px, px.round())  # no expand fill under a mask
            xs, ys = px[0].long(), px[1].long()
            assert bool(full0[label, ys, xs].all())  # decoded positions were inside the original mask
            assert torch.equal(px, s0.image[:, ys, xs])


def test_coco_dataset_gives_crowd_boxes(write_coco):
    m = np.zeros((30, 40), np.uint8)
    m[5:12, 5:15] = 1
    seg = [[5, 5, 15, 5, 15, 12, 5, 12]]
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}, {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 7], "segmentation": seg, "area": 70, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 30, 8], "segmentation": seg, "area": 70, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 8, 8], "segmentation": seg, "area": 70, "iscrowd": 0},
    ]
    ds = CocoDataset(*write_coco(images, anns, [{"id": 1, "name": "a"}]))
    a, b = ds[0], ds[1]
    assert torch.equal(a.targets.crowd_boxes, torch.tensor([[20.0, 10.0, 40.0, 18.0]]))  # clipped to the image
    assert b.targets.crowd_boxes.shape == (0, 4) and len(a.targets) == 1
    flipped = build_transforms(DataConfig(scale=(80, 60), flip_prob=0.0), True)(a)
    assert torch.allclose(flipped.targets.crowd_boxes, torch.tensor([[40.0, 20.0, 80.0, 36.0]]))
