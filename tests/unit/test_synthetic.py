"""The synthetic data generator writes valid, deterministic COCO + COCO-Stuff data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from instseg.data.coco import CocoDataset, DataWarning
from instseg.data.synthetic import NUM_SEMANTIC_CLASSES, STUFF_CLASSES, THING_CLASSES, generate_synthetic_dataset, main

# pycocotools' annToMask under numpy 2 warns on every call; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return generate_synthetic_dataset(out, num_train=10, num_val=3, seed=3, min_size=96, max_size=160)


def test_layout_and_valid_coco(synth):
    for split, n in (("train", 10), ("val", 3)):
        ann = synth / "annotations" / f"instances_{split}.json"
        coco = COCO(str(ann))
        assert len(coco.getImgIds()) == n
        assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
        assert [c["name"] for c in coco.loadCats([1, 2, 3, 4, 5])] == list(THING_CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            assert (synth / "images" / split / img["file_name"]).is_file()
            assert (synth / "stuffthingmaps" / split / img["file_name"].replace(".jpg", ".png")).is_file()
            assert 96 <= img["width"] <= 160 and 96 <= img["height"] <= 160
            with Image.open(synth / "images" / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
            assert 2 <= len(coco.getAnnIds(imgIds=[img["id"]])) <= 10
        for a in coco.loadAnns(coco.getAnnIds()):
            assert a["iscrowd"] == 0 and a["area"] > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0
            m = coco.annToMask(a)
            assert int(m.sum()) == int(a["area"])


def test_polygons_rle_occlusion_and_scale_variety(synth):
    d = json.loads((synth / "annotations" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in d["annotations"]}
    assert kinds == {"list", "dict"}
    for a in d["annotations"]:
        if isinstance(a["segmentation"], dict):
            assert isinstance(a["segmentation"]["counts"], str)  # compressed RLE
    assert {a["category_id"] for a in d["annotations"]} == {1, 2, 3, 4, 5}
    sides = [max(a["bbox"][2:]) for a in d["annotations"]]
    assert min(sides) < 20 and max(sides) > 40
    assert d["info"]["num_semantic_classes"] == NUM_SEMANTIC_CLASSES == 9


def test_readable_by_cocodataset_with_stuff_maps(synth):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = CocoDataset(synth / "annotations" / "instances_train.json", synth / "images" / "train",
                         stuff_dir=synth / "stuffthingmaps" / "train", num_semantic_classes=9, strict=True)
    assert ds.class_names == list(THING_CLASSES)
    stuff_seen = set()
    for i in range(len(ds)):
        s = ds[i]
        sem = s.targets.semantic
        assert sem.shape == s.image.shape[-2:]
        values = set(sem.unique().tolist())
        assert values <= set(range(9)) | {255}
        stuff_seen |= values & {5, 6, 7, 8}
        full = s.targets.masks.to_full().bool()
        for k in range(len(s.targets)):  # visible instance pixels carry the thing label in the map
            assert torch.all(sem[full[k]] == s.targets.labels[k])
        assert (s.targets.masks.boxes() - s.targets.boxes).abs().max() <= 1.0
    assert len(stuff_seen) >= 3 and len(STUFF_CLASSES) == 4
    assert any(bool((ds[i].targets.semantic == 255).any()) for i in range(len(ds)))  # thin unlabelled borders


def test_deterministic_and_cli(tmp_path, synth):
    assert main(["--out", str(tmp_path / "a"), "--train", "2", "--val", "1", "--seed", "3", "--min-size", "96", "--max-size", "160"]) == 0
    a = json.loads((tmp_path / "a" / "annotations" / "instances_train.json").read_text())
    ref = json.loads((synth / "annotations" / "instances_train.json").read_text())
    first_two = [x for x in ref["annotations"] if x["image_id"] <= 2]
    assert a["images"] == ref["images"][:2] and a["annotations"] == first_two
    ia = np.asarray(Image.open(tmp_path / "a" / "images" / "train" / "train_00001.jpg"))
    ib = np.asarray(Image.open(synth / "images" / "train" / "train_00001.jpg"))
    assert np.array_equal(ia, ib)
    generate_synthetic_dataset(tmp_path / "b", num_train=2, num_val=0, seed=4, min_size=96, max_size=160)
    b = json.loads((tmp_path / "b" / "annotations" / "instances_train.json").read_text())
    assert b["annotations"] != a["annotations"]
