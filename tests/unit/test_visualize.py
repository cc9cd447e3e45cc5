"""Overlays and metric plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instseg.structures import Detections
from instseg.visualize import class_color, draw_detections, plot_metrics, save_overlay

# pycocotools' mask.decode warns under numpy 2 on every call (its own code, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

_shared = Path(__file__).resolve().parents[2].parent / "shared"
_data = _shared / "data"


def _image(h: int = 200, w: int = 240) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8)


def _one_detection(h: int = 200, w: int = 240, score: float = 0.87) -> Detections:
    masks = torch.zeros((1, h, w), dtype=torch.bool)
    masks[0, 60:100, 50:110] = True
    return Detections(
        boxes=torch.tensor([[50.0, 60.0, 110.0, 100.0]]),
        scores=torch.tensor([score]),
        labels=torch.tensor([1]),
        masks=masks,
    )


def test_overlay_changes_mask_pixels_only():
    img = _image()
    before = img.copy()
    out = np.asarray(draw_detections(img, _one_detection(), ["a", "cat"]))
    np.testing.assert_array_equal(img, before)  # input untouched
    assert out.shape == img.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - img.astype(int)).sum(axis=2) > 0
    # every pixel inside the mask is tinted
    assert diff[60:100, 50:110].all()
    # far from the box and its label (which sits just above the box) nothing changes
    far = np.ones_like(diff)
    far[30:110, 40:200] = False
    assert not diff[far].any()
    # the tint is the color of the detection's class (label 1) blended at alpha 0.5 (away from the outline)
    color = np.array(class_color(1))
    expected = img[80, 80] * 0.5 + color * 0.5
    assert np.abs(out[80, 80].astype(float) - expected).max() <= 1.0


def test_label_is_drawn_above_box():
    img = np.full((200, 240, 3), 128, dtype=np.uint8)
    dets = _one_detection()
    dets.masks = None
    out = np.asarray(draw_detections(img, dets, ["a", "cat"]))
    changed = (out != 128).any(axis=2)
    assert changed[40:60, 50:110].sum() > 100  # the filled label background above the box
    assert changed[60, 50:110].all() and changed[99, 50:110].all()  # box outline (top, bottom)
    assert not changed[70:90, 60:100].any()  # no mask: the box interior is untouched


def test_empty_and_filtered_detections_leave_image_unchanged():
    img = _image()
    for dets in (Detections.empty((200, 240)), Detections.empty(), _one_detection(score=0.1)):
        out = draw_detections(img, dets, ["a", "cat"], score_thr=0.3)
        assert isinstance(out, Image.Image) and out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), img)


def test_distinct_deterministic_colors_and_options():
    h, w = 100, 100
    masks = torch.zeros((3, h, w), dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 10:30, 60:80] = True
    masks[2, 60:80, 10:30] = True
    dets = Detections(
        boxes=torch.tensor([[10.0, 10, 30, 30], [60, 10, 80, 30], [10, 60, 30, 80]]),
        scores=torch.tensor([0.5, 0.9, 0.7]),
        labels=torch.tensor([0, 0, 5]),  # label 5 has no name: printed as a number
        masks=masks,
    )
    img = np.zeros((h, w, 3), dtype=np.uint8)
    a = np.asarray(draw_detections(img, dets, ["x"], show_boxes=False, show_labels=False))
    b = np.asarray(draw_detections(img, dets, ["x"], show_boxes=False, show_labels=False))
    np.testing.assert_array_equal(a, b)
    centers = [tuple(a[20, 20]), tuple(a[20, 70]), tuple(a[70, 20])]
    assert len(set(centers)) == 3
    # grey input and float input in [0, 1] are accepted
    grey = draw_detections(np.zeros((h, w), dtype=np.uint8), dets, ["x"])
    flt = draw_detections(np.zeros((h, w, 3), dtype=np.float32), dets, ["x"])
    assert grey.size == flt.size == (w, h)
    with pytest.raises(ValueError):
        draw_detections(np.zeros((50, 50, 3), dtype=np.uint8), dets, ["x"])  # masks of another frame


def test_save_overlay(tmp_path):
    path = tmp_path / "a" / "b" / "overlay.png"
    save_overlay(path, _image(), _one_detection(), ["a", "cat"], alpha=0.3)
    with Image.open(path) as im:
        assert im.size == (240, 200)


def test_overlay_on_real_image(tmp_path):
    """Ground truth of a coco128 image drawn as detections (also a file to look at)."""
    ann = _data / "coco128" / "annotations" / "instances_train2017.json"
    if not ann.exists():
        pytest.skip(f"shared data not found: {ann}")
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    cat_ids = sorted(gt.getCatIds())
    names = [c["name"] for c in gt.loadCats(cat_ids)]
    img_id = max(gt.getImgIds(), key=lambda i: len(gt.getAnnIds(imgIds=i)) if len(gt.getAnnIds(imgIds=i)) < 12 else 0)
    info = gt.loadImgs(img_id)[0]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=img_id))
    image = np.asarray(Image.open(_data / "coco128" / "images" / info["file_name"]).convert("RGB"))
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    dets = Detections(
        boxes,
        torch.linspace(0.95, 0.4, len(anns)),
        torch.tensor([cat_ids.index(a["category_id"]) for a in anns]),
        torch.from_numpy(np.stack([gt.annToMask(a) for a in anns])).bool(),
    )
    path = tmp_path / "coco128_overlay.png"
    save_overlay(path, image, dets, names)
    out = np.asarray(Image.open(path))
    assert out.shape == image.shape
    union = dets.masks[dets.scores >= 0.3].any(0).numpy()
    assert (out[union] != image[union]).any(axis=1).mean() > 0.95


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_plot_metrics(tmp_path):
    rows = []
    for it in range(1, 41):
        rows.append({"epoch": 1 + it // 20, "iter": it, "lr": 0.02 * min(1, it / 10),
                     "loss": 3.0 / it ** 0.5, "loss_cls": 1.0 / it ** 0.5, "loss_bbox": 0.5, "time": 0.1})
        if it % 20 == 0:
            rows.append({"epoch": it // 20, "iter": it, "bbox_AP": 0.1 * it / 20, "bbox_AP50": 0.2 * it / 20,
                         "segm_AP": 0.08 * it / 20, "segm_APs": 0.01})
    rows.append('{"iter": 41, "loss": 1.')  # half-written last line after a crash
    metrics = tmp_path / "metrics.jsonl"
    _write_jsonl(metrics, rows)
    paths = plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "ap.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_plot_metrics_skips_missing_kinds(tmp_path):
    train_only = tmp_path / "train.jsonl"
    _write_jsonl(train_only, [{"iter": i, "loss": 1.0 / i} for i in range(1, 5)])
    assert [p.name for p in plot_metrics(train_only, tmp_path / "p1")] == ["loss.png"]

    eval_only = tmp_path / "eval.jsonl"
    _write_jsonl(eval_only, [{"epoch": e, "segm_AP": 0.1 * e} for e in range(1, 4)])
    assert [p.name for p in plot_metrics(eval_only, tmp_path / "p2")] == ["ap.png"]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_metrics(empty, tmp_path / "p3") == []
    assert not (tmp_path / "p3").exists()
