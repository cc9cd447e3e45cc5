"""``instseg.Predictor`` on tiny random models of every family (no ../shared needed): the result
type, agreement with ``instseg predict``, input checks, EXIF orientation, device "auto"."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instseg.api import Prediction, Predictor, PredictorError, write_coco_json
from instseg.cli import main
from tests.predict_utils import ARCHS, CAT_IDS, CLASS_NAMES, synthetic_image, tiny_checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_predicts_and_matches_the_cli(arch, tmp_path):
    """Each zoo family: boxes / scores / labels / class names / masks in the original frame, and
    the API's COCO JSON equals ``instseg predict``'s for the same image file."""
    ckpt = tiny_checkpoint(arch, tmp_path / f"{arch}.pt")
    image = synthetic_image(1)
    path = tmp_path / "im.png"
    Image.fromarray(image).save(path)
    predictor = Predictor(ckpt)  # device "auto"
    pred = predictor(path)
    assert isinstance(pred, Prediction) and pred.image_size == (90, 120) and pred.source == str(path)
    n = len(pred)
    assert 0 < n <= 20
    assert pred.boxes.shape == (n, 4) and pred.boxes.dtype == np.float32
    assert pred.scores.shape == (n,) and np.all(np.diff(pred.scores) <= 1e-6)
    # original frame (120x90), not the 160x120 network input; RDSNet's refined boxes may pass the edge by < 1 px
    assert pred.boxes[:, 2].max() <= 121 and pred.boxes[:, 3].max() <= 91
    assert pred.class_names == [CLASS_NAMES[k] for k in pred.labels]
    assert pred.category_ids == [CAT_IDS[k] for k in pred.labels]
    if arch == "retinanet":
        assert pred.masks is None
    else:
        assert pred.masks.shape == (n, 90, 120) and pred.masks.dtype == bool
    overlay = pred.draw(score_thr=0.0)
    assert overlay.size == (120, 90) and np.asarray(overlay).any()

    out = tmp_path / "cli"
    assert main(["predict", str(path), "--checkpoint", str(ckpt), "--out", str(out), "--score-thr", "0"]) == 0
    write_coco_json([pred], tmp_path / "api.json", images_path=tmp_path / "api_images.json")
    assert json.loads((tmp_path / "api.json").read_text()) == json.loads((out / "predictions.json").read_text())
    assert json.loads((tmp_path / "api_images.json").read_text()) == json.loads((out / "images.json").read_text())


def test_inputs_lists_folders_and_checks(tmp_path):
    ckpt = tiny_checkpoint("mask_rcnn", tmp_path / "m.pt")
    predictor = Predictor(ckpt, device="cpu")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(synthetic_image(k)).save(folder / f"b{k}.png")
    preds = predictor([folder, synthetic_image(7)], batch_size=2)
    assert [p.source for p in preds] == [str(folder / f"b{k}.png") for k in range(3)] + ["<array 1>"]
    assert [p.index for p in preds] == [0, 1, 2, 3]
    assert isinstance(predictor(folder), list)
    assert predictor.arch == "mask_rcnn" and predictor.classes == tuple(CLASS_NAMES)
    # a CUDA-trained checkpoint (train.device=cuda in its config) loads on this machine with "auto"
    cuda_ckpt = tiny_checkpoint("mask_rcnn", tmp_path / "c.pt", train_device="cuda")
    p = Predictor(cuda_ckpt)(synthetic_image(7))
    np.testing.assert_allclose(p.boxes, preds[3].boxes, atol=1e-3)  # preds[3] ran in a batch of 2
    for bad, match in [
        (synthetic_image().astype(np.float32), r"\(H, W, 3\) uint8 RGB array, got shape \(90, 120, 3\), dtype float32"),
        (synthetic_image()[:, :, 0], r"got shape \(90, 120\)"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (42, "got int"),
    ]:
        with pytest.raises(PredictorError, match=match):
            predictor(bad)
    with pytest.raises(PredictorError, match="batch_size"):
        predictor(synthetic_image(), batch_size=0)
    with pytest.raises(FileNotFoundError):
        predictor(tmp_path / "missing.jpg")
    with pytest.raises(PredictorError, match="two-stage"):
        Predictor(tiny_checkpoint("retinanet", tmp_path / "r.pt"), tta="flip")
    # the CLI turns the same mistakes into one-line errors (exit 2)
    assert main(["predict", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert main(["predict", str(tmp_path / "nope.mp4"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2


def _jpeg_with_orientation(path, image: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    Image.fromarray(image).save(path, quality=100, exif=exif)


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG stored 90x120 with orientation 6 (rotate 90 clockwise to display) is predicted on
    as the 120x90 image it displays as, whether given as a path or as the opened PIL image."""
    from instseg.data.coco import load_rgb

    path = tmp_path / "phone.jpg"
    _jpeg_with_orientation(path, synthetic_image(3), 6)
    stored = load_rgb(path, exif=False)
    shown = load_rgb(path)
    assert stored.shape == (90, 120, 3) and shown.shape == (120, 90, 3)
    assert np.array_equal(shown, np.rot90(stored, k=-1))  # 6 = the stored image turned clockwise
    predictor = Predictor(tiny_checkpoint("mask_rcnn", tmp_path / "m.pt"), device="cpu")
    a, b, c = predictor(path), predictor(Image.open(path)), predictor(shown)
    assert a.image_size == (120, 90) and a.masks.shape[1:] == (120, 90)
    for other in (b, c):
        assert np.array_equal(a.boxes, other.boxes) and np.array_equal(a.masks, other.masks)


def test_coco_dataset_exif_rule(tmp_path):
    """The COCO reader applies the orientation tag, unless the JSON's size is the stored one."""
    from instseg.data.coco import CocoDataset

    _jpeg_with_orientation(tmp_path / "a.jpg", synthetic_image(3), 6)
    ann = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    for i, (h, w) in enumerate([(120, 90), (90, 120)], 1):
        ann["images"].append({"id": i, "file_name": "a.jpg", "height": h, "width": w})
        ann["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100,
                                   "iscrowd": 0, "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path, filter_empty=False)
    assert tuple(ds[0].image.shape) == (3, 120, 90)  # as displayed
    assert tuple(ds[1].image.shape) == (3, 90, 120)  # annotated on the stored pixels


def test_yolo_conversion_uses_the_displayed_size(tmp_path):
    """YOLO-seg labels are normalised to the displayed (EXIF-turned) image, as the loader reads it."""
    from instseg.data.coco import CocoDataset
    from instseg.data.formats import yolo_seg_to_coco

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _jpeg_with_orientation(tmp_path / "images" / "a.jpg", synthetic_image(3), 6)  # stored 90x120, shown 120x90
    (tmp_path / "labels" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n")
    coco, _ = yolo_seg_to_coco(tmp_path / "images", tmp_path / "labels", ["x"])
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (120, 90)
    assert coco["annotations"][0]["bbox"] == pytest.approx([9, 12, 36, 48])
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    assert tuple(CocoDataset(tmp_path / "ann.json", tmp_path / "images")[0].image.shape) == (3, 120, 90)


def test_import_instseg_stays_cheap():
    code = "import sys, instseg; assert 'torch' not in sys.modules; instseg.Predictor; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
