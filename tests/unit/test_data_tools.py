"""`instseg data check | browse | convert`: the loader's rules over a whole data set, drawings,
and format round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from instseg.cli import main as cli_main
from instseg.data.coco import decode_segmentation
from instseg.data.formats import labelme_to_coco, mask_to_polygons, read_class_names, yolo_seg_to_coco
from instseg.data.tools import check_dataset
from tests.unit.test_bad_input import BAD_INSTANCES, CATS, GOOD, IMG, _ann

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _write_stuff(tmp_path, value):
    stuff = tmp_path / "stuff"
    stuff.mkdir(exist_ok=True)
    m = np.zeros((24, 32), np.uint8)
    m[3, 4] = value
    Image.fromarray(m).save(stuff / "img.png")
    return stuff


# every bad-input fixture of tests/unit/test_bad_input.py (and the newer ones): name -> how to make it
def _case_instance(name):
    def make(write_coco, tmp_path):
        ann_file, image_dir = write_coco([IMG], [GOOD, BAD_INSTANCES[name][0]], CATS)
        return ann_file, image_dir, {}, "annotation id 7"
    return make


def _missing_image(write_coco, tmp_path):
    return (*write_coco([{**IMG, "_no_file": True}], [GOOD], CATS), {}, "not found")


def _corrupt_image(write_coco, tmp_path):
    ann_file, image_dir = write_coco([IMG], [GOOD], CATS)
    (image_dir / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return ann_file, image_dir, {}, "cannot decode image"


def _truncated_image(write_coco, tmp_path):
    ann_file, image_dir = write_coco([IMG], [GOOD], CATS)
    data = (image_dir / "img.png").read_bytes()
    (image_dir / "img.png").write_bytes(data[: len(data) // 2])
    return ann_file, image_dir, {}, "img.png"


def _size_differs(write_coco, tmp_path):
    ann_file, image_dir = write_coco([IMG], [GOOD], CATS)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image_dir / "img.png")
    return ann_file, image_dir, {}, "'height'/'width'"


def _stuff_out_of_range(write_coco, tmp_path):
    return (*write_coco([IMG], [GOOD], CATS), {"stuff_dir": _write_stuff(tmp_path, 200), "semantic_classes": 9}, "200")


def _stuff_missing(write_coco, tmp_path):
    (tmp_path / "nostuff").mkdir()
    return (*write_coco([IMG], [GOOD], CATS), {"stuff_dir": tmp_path / "nostuff"}, "stuff map not found")


def _raw(text, words):
    def make(write_coco, tmp_path):
        return (*write_coco(raw=text), {}, words)
    return make


def _duplicate_ids(write_coco, tmp_path):
    return (*write_coco([IMG], [GOOD, _ann(1, category_id=2)], CATS), {}, "'id' = 1 is duplicated")


CASES = {
    **{f"instance_{k}": _case_instance(k) for k in BAD_INSTANCES},
    "missing_image": _missing_image,
    "corrupt_image": _corrupt_image,
    "truncated_image": _truncated_image,
    "image_size_differs": _size_differs,
    "stuff_label_out_of_range": _stuff_out_of_range,
    "stuff_map_missing": _stuff_missing,
    "not_json": _raw("{not json", "not valid JSON"),
    "missing_top_level_key": _raw(json.dumps({"images": [IMG], "categories": CATS}), "missing top-level key"),
    "annotation_without_bbox": _raw(json.dumps({"images": [IMG], "categories": CATS,
                                                "annotations": [{k: v for k, v in GOOD.items() if k != "bbox"}]}), "'bbox'"),
    "image_without_size": _raw(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [],
                                           "categories": CATS}), "'width'"),
    "duplicate_annotation_ids": _duplicate_ids,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_flags_every_bad_input_fixture(write_coco, tmp_path, case, capsys):
    ann_file, image_dir, kw, words = CASES[case](write_coco, tmp_path)
    report = check_dataset(ann_file, image_dir, **kw)
    assert not report.ok and any(words in p for p in report.problems), report.problems
    argv = ["data", "check", str(ann_file), "--images", str(image_dir)]
    if "stuff_dir" in kw:
        argv += ["--stuff-dir", str(kw["stuff_dir"])]
    if kw.get("semantic_classes"):
        argv += ["--semantic-classes", str(kw["semantic_classes"])]
    assert cli_main(argv) == 1
    assert words in capsys.readouterr().out


def test_check_clean_data_counts_per_class(write_coco, capsys):
    images = [IMG, {**IMG, "id": 2, "file_name": "b.png"}, {**IMG, "id": 3, "file_name": "empty.png"}]
    anns = [GOOD, _ann(2, category_id=2), _ann(3, image_id=2, category_id=2),
            _ann(4, image_id=2, iscrowd=1, segmentation={"size": [24, 32], "counts": [100, 668]})]
    ann_file, image_dir = write_coco(images, anns, CATS)
    report = check_dataset(ann_file, image_dir)
    assert report.ok and report.images == report.images_checked == 3
    assert dict(report.instances) == {1: 1, 2: 2} and dict(report.images_with) == {1: 1, 2: 2}
    assert report.crowd == 1 and report.empty_images == ["empty.png"]
    assert cli_main(["data", "check", str(ann_file), "--images", str(image_dir)]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "1 images have no instances" in out
    assert cli_main(["data", "check", str(ann_file), "--images", str(image_dir / "nope")]) == 2


def test_browse_draws_raw_and_transformed(write_coco, tmp_path, capsys):
    ann_file, image_dir = write_coco([IMG], [GOOD], CATS)
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image_dir / "img.png")
    out = tmp_path / "browse"
    assert cli_main(["data", "browse", str(ann_file), "--images", str(image_dir), "--out", str(out), "--no-labels"]) == 0
    raw = np.asarray(Image.open(out / "1_img.png"))
    assert raw.shape == (24, 32, 3)
    assert raw[6, 5].any() and not raw[20, 28].any()  # the polygon (x 2..12, y 2..10) is tinted
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  scale: [64, 48]\n  flip_prob: 1.0\n")
    out2 = tmp_path / "browse2"
    assert cli_main(["data", "browse", str(ann_file), "--images", str(image_dir), "--out", str(out2),
                     "--config", str(cfg), "--no-labels"]) == 0
    flipped = np.asarray(Image.open(out2 / "1_img.png"))
    assert flipped.shape == (48, 64, 3)  # resized x2 by the training transforms
    assert flipped[12, 64 - 10].any() and not flipped[12, 10].any()  # and flipped
    assert "after the training transforms" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ formats


def _mask_iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_coco_yolo_seg_coco_round_trip(tmp_path):
    """Polygons, multi-part polygons and RLE masks with holes survive COCO -> YOLO-seg -> COCO."""
    h, w = 90, 120
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    yy, xx = np.mgrid[:h, :w]
    ring = (((yy + 0.5 - 45) ** 2 + (xx + 0.5 - 80) ** 2) <= 18**2) & (((yy + 0.5 - 45) ** 2 + (xx + 0.5 - 80) ** 2) >= 7**2)
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(ring.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [5, 5, 30, 20], "iscrowd": 0, "area": 0,
         "segmentation": [[5, 5, 35, 5, 35, 25, 5, 25]]},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [5, 40, 40, 40], "iscrowd": 0, "area": 0,
         "segmentation": [[5, 40, 25, 40, 15, 60], [30, 60, 45, 60, 45, 80, 30, 80]]},  # two parts
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [62, 27, 36, 36], "iscrowd": 0, "area": 0,
         "segmentation": rle},  # an RLE ring (with a hole)
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [10.5, 10.25, 50, 30], "iscrowd": 0, "area": 0,
         "segmentation": [[10.5, 10.25, 60.5, 12.0, 40.0, 40.25]]},
        {"id": 5, "image_id": 2, "category_id": 5, "bbox": [0, 0, 120, 90], "iscrowd": 1, "area": 0,
         "segmentation": {"size": [h, w], "counts": [0, h * w]}},  # crowd: no YOLO equivalent
    ]
    images = [{"id": 1, "file_name": "a.png", "height": h, "width": w}, {"id": 2, "file_name": "b.png", "height": h, "width": w}]
    for im in images:
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(images_dir / im["file_name"])
    cats = [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    assert cli_main(["data", "convert", "--to", "yolo-seg", "--ann", str(src), "--out", str(tmp_path / "yolo")]) == 0
    lines = (tmp_path / "yolo" / "labels" / "a.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "1"]
    assert all(0.0 <= float(v) <= 1.0 for line in lines for v in line.split()[1:])
    assert read_class_names(tmp_path / "yolo" / "data.yaml") == ["five", "nine"]
    back_file = tmp_path / "back.json"
    assert cli_main(["data", "convert", "--from", "yolo-seg", "--images", str(images_dir), "--labels",
                     str(tmp_path / "yolo" / "labels"), "--names", str(tmp_path / "yolo" / "data.yaml"),
                     "--out", str(back_file)]) == 0
    back = json.loads(back_file.read_text())
    assert [c["name"] for c in back["categories"]] == ["five", "nine"]
    # per-class counts kept (the crowd region is left out)
    names_src = {c["id"]: c["name"] for c in cats}
    names_back = {c["id"]: c["name"] for c in back["categories"]}
    from collections import Counter

    assert Counter(names_back[a["category_id"]] for a in back["annotations"]) == \
        Counter(names_src[a["category_id"]] for a in anns if not a["iscrowd"])
    # instance by instance (same order per image) the masks agree
    by_file = {im["id"]: im["file_name"] for im in back["images"]}
    src_by_file = {im["file_name"]: [a for a in anns if a["image_id"] == im["id"] and not a["iscrowd"]] for im in images}
    for fname in ("a.png", "b.png"):
        ours = [a for a in back["annotations"] if by_file[a["image_id"]] == fname]
        for a, b in zip(src_by_file[fname], ours, strict=True):
            m1 = decode_segmentation(a["segmentation"], h, w).astype(bool)
            m2 = decode_segmentation(b["segmentation"], h, w).astype(bool)
            assert _mask_iou(m1, m2) > 0.95, (fname, a["id"])
    # and the result is a valid data set for the loader
    assert check_dataset(back_file, images_dir).ok


def test_yolo_seg_to_coco_details(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    (images / "sub").mkdir(parents=True)
    labels.joinpath("sub").mkdir(parents=True)
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(images / "sub" / "x.jpg")
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(images / "y.png")  # no label file: no instances
    (labels / "sub" / "x.txt").write_text("1 0.1 0.2 0.5 0.2 0.5 0.8\n0 0.5 0.5 0.2 0.4\n0 0.1 0.1\n")
    coco, report = yolo_seg_to_coco(images, labels, ["cat", "dog"])
    assert [im["file_name"] for im in coco["images"]] == ["sub/x.jpg", "y.png"]
    a, b = coco["annotations"]
    assert a["category_id"] == 2 and a["segmentation"] == [[10.0, 10.0, 50.0, 10.0, 50.0, 40.0]]
    assert b["category_id"] == 1 and b["bbox"] == pytest.approx([40.0, 15.0, 20.0, 20.0])  # a detection box line
    assert sum(report.skipped.values()) == 1  # the 2-number line
    (labels / "sub" / "x.txt").write_text("7 0.1 0.2 0.5 0.2 0.5 0.8\n")
    from instseg.data.formats import FormatError

    with pytest.raises(FormatError, match="class 7"):
        yolo_seg_to_coco(images, labels, ["cat", "dog"])


def test_labelme_to_coco(tmp_path):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "p.png")
    shapes = [
        {"label": "leaf", "points": [[5, 5], [25, 5], [25, 20], [5, 20]], "shape_type": "polygon", "group_id": None},
        {"label": "leaf", "points": [[30, 5], [40, 15]], "shape_type": "rectangle", "group_id": 1},
        {"label": "leaf", "points": [[45, 5], [55, 15]], "shape_type": "rectangle", "group_id": 1},  # same instance
        {"label": "bug", "points": [[20, 30], [25, 30]], "shape_type": "circle", "group_id": None},
        {"label": "bug", "points": [[1, 1]], "shape_type": "point", "group_id": None},
    ]
    (tmp_path / "p.json").write_text(json.dumps({"imagePath": "p.png", "imageHeight": 40, "imageWidth": 60, "shapes": shapes}))
    out = tmp_path / "ann.json"
    assert cli_main(["data", "convert", "--from", "labelme", "--labelme-dir", str(tmp_path), "--images", str(tmp_path),
                     "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["bug", "leaf"]
    assert coco["images"] == [{"id": 1, "file_name": "p.png", "width": 60, "height": 40}]
    by_cat = sorted((a["category_id"], len(a["segmentation"])) for a in coco["annotations"])
    assert by_cat == [(1, 1), (2, 1), (2, 2)]  # circle; polygon; two rectangles as one instance
    circle = next(a for a in coco["annotations"] if a["category_id"] == 1)
    assert circle["area"] == pytest.approx(np.pi * 25, rel=0.15)
    assert check_dataset(out, tmp_path).ok
    _, report = labelme_to_coco(tmp_path)  # ann.json is in the folder now: not a LabelMe file, skipped
    assert sorted(report.skipped.values()) == [1, 1]  # the point, and ann.json


def test_mask_to_polygons_keeps_holes_and_parts():
    from pycocotools import mask as mask_utils

    m = np.zeros((40, 50), bool)
    m[5:30, 5:30] = True
    m[12:20, 12:20] = False  # a hole
    m[33:38, 40:48] = True  # a second part
    polys = mask_to_polygons(m)
    assert len(polys) == 2
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 40, 50))).astype(bool)
    np.testing.assert_array_equal(back, m)
