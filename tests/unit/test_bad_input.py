"""Every kind of bad input gives a DataError naming the file / field, or a warning and a skip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from instseg.data.coco import CocoDataset, DataError, DataWarning, SkipBadSamples

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
IMG = {"id": 1, "file_name": "img.png", "width": 32, "height": 24}
GOOD = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "area": 80, "iscrowd": 0}


def _ann(aid, **kw):
    return {**GOOD, "id": aid, **kw}


def _load(write_coco, anns, strict, images=None):
    ann_file, image_dir = write_coco(images or [IMG], [GOOD, *anns], CATS)
    return ann_file, image_dir, (lambda **kw: CocoDataset(ann_file, image_dir, strict=strict, **kw))


# ----------------------------------------------------------------- JSON structure: always an error
def test_not_json(write_coco):
    ann_file, image_dir = write_coco(raw="{not json")
    with pytest.raises(DataError, match="not valid JSON") as e:
        CocoDataset(ann_file, image_dir)
    assert str(ann_file) in str(e.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("missing", ["images", "annotations", "categories"])
def test_missing_top_level_key(write_coco, missing):
    data = {"images": [IMG], "annotations": [GOOD], "categories": CATS}
    del data[missing]
    ann_file, image_dir = write_coco(raw=json.dumps(data))
    with pytest.raises(DataError, match=f"missing top-level key '{missing}'") as e:
        CocoDataset(ann_file, image_dir)
    assert str(ann_file) in str(e.value)


def test_annotation_without_bbox(write_coco):
    bad = {k: v for k, v in GOOD.items() if k != "bbox"}
    ann_file, image_dir = write_coco([IMG], [bad], CATS)
    with pytest.raises(DataError, match=r"no field 'bbox'") as e:
        CocoDataset(ann_file, image_dir)
    assert str(ann_file) in str(e.value) and "annotations[0]" in str(e.value)


def test_image_without_size(write_coco):
    ann_file, image_dir = write_coco(raw=json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], "categories": CATS}))
    with pytest.raises(DataError, match="'width'"):
        CocoDataset(ann_file, image_dir)


# ----------------------------------------------------------------- per instance: strict raises, else warn + skip
BAD_INSTANCES = {
    "unknown_category": (_ann(7, category_id=42), "category_id", "42"),
    "polygon_2_points": (_ann(7, segmentation=[[1, 1, 5, 5]]), "segmentation", "at least 3 points"),
    "zero_area_box": (_ann(7, bbox=[5, 5, 0, 4]), "bbox", "zero area"),
    "box_outside_image": (_ann(7, bbox=[40, 30, 5, 5]), "bbox", "zero area"),
    "rle_size_mismatch": (_ann(7, segmentation={"size": [10, 10], "counts": [100]}), "segmentation", "differs from the image size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INSTANCES))
def test_bad_instance_strict_raises(write_coco, case):
    ann, field, words = BAD_INSTANCES[case]
    ann_file, _, make = _load(write_coco, [ann], strict=True)
    with pytest.raises(DataError) as e:
        make()
    msg = str(e.value)
    assert str(ann_file) in msg and "annotation id 7" in msg and f"'{field}'" in msg and words in msg


@pytest.mark.parametrize("case", sorted(BAD_INSTANCES))
def test_bad_instance_lenient_warns_and_skips(write_coco, case):
    ann, field, words = BAD_INSTANCES[case]
    ann_file, _, make = _load(write_coco, [ann, _ann(8, category_id=2)], strict=False)
    with pytest.warns(DataWarning) as rec:
        ds = make()
    msgs = [str(r.message) for r in rec if issubclass(r.category, DataWarning)]
    assert len(msgs) == 1 and "annotation id 7" in msgs[0] and str(ann_file) in msgs[0] and words in msgs[0]
    t = ds[0].targets
    assert len(t) == 2 and t.labels.tolist() == [0, 1]  # the good ones stay


# ----------------------------------------------------------------- per image: DataError from __getitem__
def test_missing_image_file(write_coco):
    _, image_dir, make = _load(write_coco, [], strict=False, images=[{**IMG, "_no_file": True}])
    ds = make()
    with pytest.raises(DataError, match="not found") as e:
        ds[0]
    assert str(image_dir / "img.png") in str(e.value)


def test_corrupt_image_file(write_coco):
    _, image_dir, make = _load(write_coco, [], strict=False)
    (image_dir / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode image") as e:
        make()[0]
    assert "img.png" in str(e.value)


def test_image_size_differs_from_json(write_coco):
    _, image_dir, make = _load(write_coco, [], strict=False)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image_dir / "img.png")
    with pytest.raises(DataError, match="'height'/'width'"):
        make()[0]


def test_stuff_map_label_out_of_range(write_coco, tmp_path):
    _, _, make = _load(write_coco, [], strict=False)
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    m = np.zeros((24, 32), np.uint8)
    m[3, 4] = 200
    m[0, 0] = 255  # ignore is allowed
    Image.fromarray(m).save(stuff / "img.png")
    with pytest.raises(DataError) as e:
        make(stuff_dir=stuff, num_semantic_classes=9)[0]
    msg = str(e.value)
    assert "img.png" in msg and "200" in msg and "9" in msg
    assert make(stuff_dir=stuff, num_semantic_classes=201)[0].targets.semantic[3, 4] == 200


def test_stuff_map_wrong_size_or_missing(write_coco, tmp_path):
    _, _, make = _load(write_coco, [], strict=False)
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    with pytest.raises(DataError, match="stuff map not found"):
        make(stuff_dir=stuff)[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(stuff / "img.png")
    with pytest.raises(DataError, match="differs from the image size"):
        make(stuff_dir=stuff)[0]
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(stuff / "img.png")
    with pytest.raises(DataError, match="single-channel"):
        make(stuff_dir=stuff)[0]


def test_image_with_no_instances(write_coco):
    ann_file, image_dir = write_coco([IMG], [], CATS)
    ds = CocoDataset(ann_file, image_dir, strict=True)
    t = ds[0].targets
    assert t.boxes.shape == (0, 4) and t.labels.shape == (0,) and len(t.masks) == 0
    assert len(CocoDataset(ann_file, image_dir, filter_empty=True)) == 0


def test_skip_bad_samples_moves_to_next_good_image(write_coco):
    images = [IMG, {**IMG, "id": 2, "file_name": "b.png"}, {**IMG, "id": 3, "file_name": "c.png"}]
    ann_file, image_dir = write_coco(images, [GOOD, _ann(2, image_id=2), _ann(3, image_id=3)], CATS)
    (image_dir / "b.png").write_bytes(b"not an image")
    ds = CocoDataset(ann_file, image_dir)
    wrapped = SkipBadSamples(ds)
    assert len(wrapped) == 3 and wrapped.cat_ids == [1, 2]
    with pytest.warns(DataWarning, match="b.png"):
        s = wrapped[1]
    assert s.meta.image_id == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wrapped[0].meta.image_id == 1
    for name in ("img.png", "c.png"):
        (image_dir / name).write_bytes(b"broken")
    with pytest.warns(DataWarning), pytest.raises(DataError):
        wrapped[0]  # nothing good left: the error surfaces
