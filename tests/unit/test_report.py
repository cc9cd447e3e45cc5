"""Evaluation reports: per-class AP from COCOeval's own arrays, PR curves, confusion matrix."""

from __future__ import annotations

import csv
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.evaluation import evaluate_coco
from tests.unit.test_evaluation import _quiet, _results, _synthetic_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _noisy_results(gt):
    results = _results(gt, [3, 7], shift=1.5)
    rng = np.random.default_rng(1)
    for r in results:
        r["score"] = float(rng.uniform(0.1, 1.0))
    results += [{"image_id": i, "category_id": 3, "bbox": [1.0, 1.0, 30.0, 30.0], "score": 0.95} for i in (11, 12, 13)]
    return results


def test_per_class_ap_equals_cocoeval_per_class_precision_means(tmp_path):
    gt = _synthetic_coco(tmp_path)
    results = _noisy_results(gt)
    out = tmp_path / "eval"
    m = evaluate_coco(gt, results, iou_types=("bbox",), out_dir=out, verbose=False)
    rows = {int(r["category_id"]): r for r in csv.DictReader(open(out / "per_class_bbox.csv"))}
    assert set(rows) == {3, 7} and rows[3]["class"] == "three"

    ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class = []
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        assert float(rows[cat]["AP"]) == pytest.approx(np.mean(p[p > -1]), abs=1e-6)
        assert float(rows[cat]["AP50"]) == pytest.approx(np.mean(p[0][p[0] > -1]), abs=1e-6)
        assert float(rows[cat]["AP75"]) == pytest.approx(np.mean(p[5][p[5] > -1]), abs=1e-6)
        per_class.append(float(rows[cat]["AP"]))
        # and each equals what COCOeval reports for that class alone
        alone = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        alone.params.catIds = [cat]
        _quiet(alone.evaluate)
        _quiet(alone.accumulate)
        _quiet(alone.summarize)
        assert float(rows[cat]["AP"]) == pytest.approx(alone.stats[0], abs=1e-6)
        n_gt = len([a for a in gt.loadAnns(gt.getAnnIds(catIds=[cat])) if not a["iscrowd"]])
        assert int(rows[cat]["gt_count"]) == n_gt
    # the overall AP is the mean of the per-class APs
    assert m["bbox_AP"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert 0 < min(per_class) < 1


def test_ground_truth_as_predictions_gives_ap_1_for_every_class(tmp_path, capsys):
    gt = _synthetic_coco(tmp_path)
    out = tmp_path / "eval"
    evaluate_coco(gt, _results(gt, [3, 7]), out_dir=out)
    printed = capsys.readouterr().out
    for t in ("bbox", "segm"):
        rows = list(csv.DictReader(open(out / f"per_class_{t}.csv")))
        assert [r["class"] for r in rows] == ["three", "seven"]
        for r in rows:
            assert float(r["AP"]) == pytest.approx(1.0) and float(r["AP50"]) == pytest.approx(1.0)
            assert int(r["gt_count"]) == int(r["detections"]) == 6
        assert (out / f"pr_{t}.png").stat().st_size > 1000
        assert (out / f"confusion_{t}.png").stat().st_size > 1000
        cm = _read_csv(out / f"confusion_{t}.csv")
        assert cm[0] == ["true \\ predicted", "three", "seven", "background"]
        assert [row[1:] for row in cm[1:]] == [["6", "0", "0"], ["0", "6", "0"], ["0", "0", "0"]]
        # the per-class table is in the printed summary and in summary.txt
        assert f"[{t}] per class" in printed
    summary = (out / "summary.txt").read_text()
    assert "[segm] per class" in summary and "three" in summary and "seven" in summary


def _box_mask(box, h=100, w=100):
    x, y, bw, bh = box
    m = np.zeros((h, w), np.uint8)
    m[y : y + bh, x : x + bw] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _three_image_fixture(tmp_path):
    """Hand-counted: see the expected matrix in the test."""
    A, B = 1, 2
    gts = {
        1: [(A, [10, 10, 30, 30], 0), (B, [60, 60, 30, 30], 0)],
        2: [(A, [0, 0, 40, 40], 0), (A, [50, 50, 40, 40], 0)],
        3: [(B, [20, 20, 50, 50], 0), (A, [0, 70, 100, 30], 1)],  # the second is a crowd region
    }
    dets = {
        1: [(A, [10, 10, 30, 30], 0.9),  # A -> A
            (A, [60, 60, 30, 30], 0.8),  # B taken for A
            (B, [10, 60, 20, 20], 0.7)],  # B on nothing: background row
        2: [(A, [0, 0, 40, 40], 0.95),  # A -> A
            (B, [70, 70, 30, 30], 0.6),  # IoU 0.19 with the second A: background row; that A is missed
            (A, [50, 50, 40, 40], 0.1)],  # below the score threshold: not counted
        3: [(B, [20, 20, 50, 50], 0.6),  # B -> B
            (A, [10, 75, 20, 20], 0.9),  # inside the crowd region: ignored
            (B, [20, 20, 50, 50], 0.5)],  # duplicate: its B is taken, background row
    }
    images = [{"id": i, "file_name": f"{i}.png", "height": 100, "width": 100} for i in gts]
    anns = [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": float(b[2] * b[3]), "iscrowd": crowd,
             "segmentation": _box_mask(b) if crowd else [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
            for k, (i, (c, b, crowd)) in enumerate(((i, g) for i in gts for g in gts[i]), start=1)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": A, "name": "A"}, {"id": B, "name": "B"}]}))
    gt = _quiet(COCO, str(path))
    results = [{"image_id": i, "category_id": c, "bbox": [float(v) for v in b], "score": s, "segmentation": _box_mask(b)}
               for i in dets for c, b, s in dets[i]]
    return gt, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_confusion_matrix_hand_counted(tmp_path, iou_type):
    gt, results = _three_image_fixture(tmp_path)
    out = tmp_path / "eval"
    evaluate_coco(gt, results, iou_types=(iou_type,), out_dir=out, verbose=False, confusion_score_thr=0.3)
    cm = _read_csv(out / f"confusion_{iou_type}.csv")
    assert cm[0] == ["true \\ predicted", "A", "B", "background"]
    assert [row[0] for row in cm[1:]] == ["A", "B", "background"]
    #            pred A  B   bg
    expected = [[2, 0, 1],  # true A: two found, one missed
                 [1, 1, 0],  # true B: one taken for A, one found
                 [0, 3, 0]]  # background: three B detections on nothing (the A in the crowd is ignored)
    assert [[int(v) for v in row[1:]] for row in cm[1:]] == expected
    # a threshold of 0 lets the 0.1-score A find the A it missed in image 2
    evaluate_coco(gt, results, iou_types=(iou_type,), out_dir=out, verbose=False, confusion_score_thr=0.0, plots=False)
    cm0 = [[int(v) for v in row[1:]] for row in _read_csv(out / f"confusion_{iou_type}.csv")[1:]]
    assert cm0 == [[3, 0, 0], [1, 1, 0], [0, 3, 0]]
