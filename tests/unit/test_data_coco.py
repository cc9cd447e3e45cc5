"""CocoDataset: polygons / RLE / crowd / empty images / category mapping, and the real data sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from instseg.data.coco import CocoDataset, DataWarning, decode_cropped, decode_rle, decode_segmentation
from instseg.structures.masks import CroppedMasks

H, W = 30, 40


def _rect(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask):
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _bbox(mask):
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))]


CATS = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]  # unsorted, gaps
M_RLE = _rect(20, 26, 20, 31)
M_UNC = _rect(2, 7, 30, 36)
M_CROWD = _rect(14, 19, 0, 9)
POLY = [[5, 5, 15, 5, 15, 12, 5, 12]]


@pytest.fixture
def tiny(write_coco):
    images = [
        {"id": 10, "file_name": "a.png", "width": W, "height": H},
        {"id": 20, "file_name": "b.png", "width": 20, "height": 10},  # no annotations
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "segmentation": POLY, "bbox": [5, 5, 10, 7], "area": 70, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 12, "segmentation": _compressed(M_RLE), "bbox": _bbox(M_RLE), "area": 66, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "segmentation": _uncompressed(M_UNC), "bbox": _bbox(M_UNC), "area": 30, "iscrowd": 0},
        {"id": 4, "image_id": 10, "category_id": 3, "segmentation": _uncompressed(M_CROWD), "bbox": _bbox(M_CROWD), "area": 45, "iscrowd": 1},
    ]
    return write_coco(images, anns, CATS)


def test_category_mapping_round_trip(tiny):
    ds = CocoDataset(*tiny)
    assert ds.cat_ids == [3, 7, 12]
    assert ds.class_names == ["c3", "c7", "c12"]
    assert ds.num_classes == 3
    for label, cid in enumerate(ds.cat_ids):
        assert ds.label_of(cid) == label
    with pytest.raises(KeyError):
        ds.label_of(5)
    assert ds.coco.getCatIds() == [12, 3, 7]  # the raw COCO object is kept for COCOeval


def test_polygon_rle_uncompressed_and_crowd(tiny):
    ds = CocoDataset(*tiny)
    assert ds.image_ids == [10, 20]
    s = ds[0]
    t = s.targets
    assert s.image.shape == (3, H, W) and s.image.dtype == torch.float32
    assert s.meta.image_id == 10 and s.meta.original_size == (H, W) and s.meta.image_size == (H, W)
    assert len(t) == 3  # crowd annotation is not a target
    assert t.labels.tolist() == [ds.label_of(7), ds.label_of(12), ds.label_of(3)] == [1, 2, 0]
    assert [ds.cat_ids[int(l)] for l in t.labels] == [7, 12, 3]
    assert t.boxes.dtype == torch.float32
    assert torch.allclose(t.boxes[0], torch.tensor([5.0, 5.0, 15.0, 12.0]))
    assert torch.allclose(t.boxes[1], torch.tensor([20.0, 20.0, 31.0, 26.0]))
    assert torch.allclose(t.boxes[2], torch.tensor([30.0, 2.0, 36.0, 7.0]))
    full = t.masks.to_full()
    assert t.masks.frame == (H, W)
    poly_ref = decode_rle(mask_utils.merge(mask_utils.frPyObjects(POLY, H, W)))
    assert np.array_equal(full[0].numpy(), poly_ref)
    assert np.array_equal(full[1].numpy(), M_RLE)
    assert np.array_equal(full[2].numpy(), M_UNC)
    # mask tight boxes agree with the annotation boxes
    assert (t.masks.boxes() - t.boxes).abs().max() <= 1.0
    assert t.semantic is None


def test_empty_image_has_shaped_empty_targets(tiny):
    ds = CocoDataset(*tiny)
    t = ds[1].targets
    assert t.boxes.shape == (0, 4) and t.boxes.dtype == torch.float32
    assert t.labels.shape == (0,) and t.labels.dtype == torch.int64
    assert isinstance(t.masks, CroppedMasks) and len(t.masks) == 0 and t.masks.frame == (10, 20)
    assert t.masks.offsets.shape == (0, 2)
    assert t.masks.to_full().shape == (0, 10, 20)


def test_filter_empty_and_aspect_ratios(tiny):
    ds = CocoDataset(*tiny, filter_empty=True)
    assert ds.image_ids == [10] and len(ds) == 1
    assert CocoDataset(*tiny).aspect_ratios() == [W / H, 2.0]


def test_without_masks_and_load_image(tiny):
    ds = CocoDataset(*tiny, with_masks=False)
    s = ds[0]
    assert s.targets.masks is None and len(s.targets) == 3
    raw = ds.load_image(0)
    assert raw.shape == (H, W, 3) and raw.dtype == np.uint8
    assert np.array_equal(raw.transpose(2, 0, 1), s.image.numpy().astype(np.uint8))


def test_semantic_from_instances(tiny):
    ds = CocoDataset(*tiny, semantic_from_instances=True)
    assert ds.num_semantic_classes == 4
    sem = ds[0].targets.semantic
    assert sem.shape == (H, W) and sem.dtype == torch.int64
    assert torch.all(sem[torch.from_numpy(M_RLE).bool()] == ds.label_of(12) + 1)
    assert torch.all(sem[torch.from_numpy(M_UNC).bool()] == ds.label_of(3) + 1)
    assert torch.all(sem[torch.from_numpy(M_CROWD).bool()] == 255)  # crowd regions are ignored
    assert sem[0, 0] == 0 and set(sem.unique().tolist()) == {0, 1, 2, 3, 255}
    assert ds[1].targets.semantic.shape == (10, 20) and int(ds[1].targets.semantic.max()) == 0


def test_stuff_maps_loaded_unchanged(tiny, tmp_path):
    from PIL import Image

    stuff = tmp_path / "stuff"
    stuff.mkdir()
    m = np.full((H, W), 7, np.uint8)
    m[0, :] = 255
    m[5:9, 3:6] = 2
    Image.fromarray(m).save(stuff / "a.png")
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(stuff / "b.png")
    ds = CocoDataset(*tiny, stuff_dir=stuff, num_semantic_classes=8)
    sem = ds[0].targets.semantic
    assert sem.dtype == torch.int64 and np.array_equal(sem.numpy(), m.astype(np.int64))


def test_decode_cropped_equals_from_iter():
    segs = [POLY, _compressed(M_RLE), _uncompressed(M_UNC), _compressed(np.zeros((H, W), np.uint8)), _compressed(_rect(0, H, 0, W))]
    got = decode_cropped(segs, H, W)
    ref = CroppedMasks.from_iter((decode_segmentation(s, H, W) for s in segs), (H, W))
    assert torch.equal(got.offsets, ref.offsets)
    assert all(torch.equal(a, b) for a, b in zip(got.crops, ref.crops))
    assert got.frame == ref.frame


def test_set_epoch_makes_generators_reproducible(tiny):
    ds = CocoDataset(*tiny)
    ds.set_epoch(3, seed=5)
    a = torch.rand(4, generator=ds[0].generator)
    b = torch.rand(4, generator=ds[0].generator)
    assert torch.equal(a, b)
    ds.set_epoch(4)
    assert ds.seed == 5 and not torch.equal(a, torch.rand(4, generator=ds[0].generator))
    assert not torch.equal(torch.rand(4, generator=ds[1].generator), torch.rand(4, generator=ds[0].generator))


# ----------------------------------------------------------------------------- real data
def test_nuclei_most_crowded_image(shared_data):
    d = shared_data / "nuclei"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the real data has no bad instance
        ds = CocoDataset(d / "annotations" / "instances_train.json", d / "images")
    counts = {i: len(ds.coco.getAnnIds(imgIds=[i])) for i in ds.image_ids}
    img_id = max(counts, key=counts.get)
    assert counts[img_id] == 375
    s = ds[ds.image_ids.index(img_id)]
    h, w = s.meta.original_size
    assert len(s.targets) == 375 and len(s.targets.masks) == 375
    assert s.targets.labels.unique().tolist() == [0] and ds.class_names == ["nucleus"]
    crop_bytes = sum(c.numel() * c.element_size() for c in s.targets.masks.crops)
    assert crop_bytes * 100 < 375 * h * w  # far below a dense (375, H, W) uint8 stack
    assert (s.targets.masks.boxes() - s.targets.boxes).abs().max() <= 1.0
    assert torch.all(s.targets.masks.areas() > 0)


def test_coco128_labels_mapping(shared_data):
    d = shared_data / "coco128"
    ds = CocoDataset(d / "annotations" / "instances_train2017.json", d / "images", with_masks=False)
    assert ds.cat_ids == sorted(ds.cat_ids) and ds.cat_ids[0] == 1 and ds.cat_ids[-1] > len(ds.cat_ids)
    assert ds.cat_ids == sorted(c["id"] for c in ds.coco.dataset["categories"])
    for label, cid in enumerate(ds.cat_ids):
        assert ds.label_of(cid) == label
    i = ds.image_ids.index(9)
    s = ds[i]
    raw_ids = [a["category_id"] for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[9])) if not a["iscrowd"]]
    assert [ds.cat_ids[int(l)] for l in s.targets.labels] == raw_ids
    used = {a["category_id"] for a in ds.coco.dataset["annotations"]}
    assert len(used) == 71
    filtered = CocoDataset(d / "annotations" / "instances_train2017.json", d / "images", filter_empty=True, with_masks=False)
    assert len(filtered) == len(ds) - 2 == 126
