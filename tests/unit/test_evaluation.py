"""COCO evaluation: result conversion and COCOeval metrics, on synthetic and real data."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg.evaluation import METRIC_NAMES, detections_to_coco, evaluate_coco, write_results_json
from instseg.structures import Detections

# pycocotools' mask.decode warns under numpy 2 on every call (its own code, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

_shared = Path(__file__).resolve().parents[2].parent / "shared"
_data = _shared / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="module")
def coco128_gt() -> COCO:
    ann = _need(_data / "coco128" / "annotations" / "instances_train2017.json")
    return _quiet(COCO, str(ann))


@pytest.fixture(scope="module")
def nuclei_val_gt() -> COCO:
    ann = _need(_data / "nuclei" / "annotations" / "instances_val.json")
    return _quiet(COCO, str(ann))


def _quiet(fn, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def _synthetic_coco(tmp_path: Path) -> COCO:
    """Three images, two categories with non-contiguous ids (3, 7); small/medium/large objects.

    Masks are RLE for one image and polygons for the others, as real data mixes both.
    """
    rng = np.random.default_rng(0)
    images, anns = [], []
    aid = 1
    for img_id, (h, w) in zip((11, 12, 13), ((120, 160), (240, 200), (300, 320)), strict=True):
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": h, "width": w})
        for k in range(4):
            # sizes 5 px (small), 12 px ... up to well above 96 px (large) on the bigger images
            side = [5, 12, 40, 110][k]
            if side >= min(h, w) - 4:
                side = min(h, w) // 2
            x0 = int(rng.integers(0, w - side))
            y0 = int(rng.integers(0, h - side))
            cat = (3, 7)[k % 2]
            if img_id == 12:  # ellipse as RLE
                yy, xx = np.mgrid[:h, :w]
                cy, cx, r = y0 + side / 2, x0 + side / 2, side / 2
                m = ((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r).astype(np.uint8)
                rle = mask_utils.encode(np.asfortranarray(m))
                bbox = [float(v) for v in mask_utils.toBbox(rle)]
                area = float(mask_utils.area(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                seg = rle
            else:  # triangle-ish polygon
                x1, y1 = x0 + side, y0 + side
                seg = [[x0, y0, x1, y0, x1, y1, x0 + side / 3, y1]]
                bbox = [float(x0), float(y0), float(side), float(side)]
                area = float(side * side) * (1 - 1 / 6)
            anns.append({"id": aid, "image_id": img_id, "category_id": cat, "segmentation": seg,
                         "area": area, "bbox": bbox, "iscrowd": 0})
            aid += 1
    cats = [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return _quiet(COCO, str(path))


def _perfect_detections(gt: COCO, image_id: int, cat_ids: list[int], shift: float = 0.0) -> Detections:
    """Detections equal to the ground truth of one image (boxes optionally shifted right)."""
    info = gt.loadImgs(image_id)[0]
    anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
    if not anns:
        return Detections.empty((info["height"], info["width"]))
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, [0, 2]] += shift
    masks = torch.from_numpy(np.stack([gt.annToMask(a) for a in anns])).bool()
    # distinct scores so the ranking is well defined
    scores = torch.linspace(0.99, 0.5, len(anns))
    labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
    return Detections(boxes.float(), scores, labels, masks)


def _results(gt: COCO, cat_ids: list[int], image_ids=None, shift: float = 0.0) -> list[dict]:
    out: list[dict] = []
    for i in image_ids if image_ids is not None else gt.getImgIds():
        out += detections_to_coco(_perfect_detections(gt, i, cat_ids, shift), i, cat_ids)
    return out


# --- detections_to_coco ------------------------------------------------------------------------


def test_detections_to_coco_format_and_roundtrip():
    masks = torch.zeros((2, 30, 40), dtype=torch.bool)
    masks[0, 5:10, 2:12] = True
    masks[1, 20:29, 30:40] = True
    dets = Detections(
        boxes=torch.tensor([[2.0, 5.0, 12.0, 10.0], [30.123, 20.0, 40.0, 29.0]]),
        scores=torch.tensor([0.9, 0.4]),
        labels=torch.tensor([1, 0]),
        masks=masks,
    )
    res = detections_to_coco(dets, 42, [5, 17])
    assert [r["category_id"] for r in res] == [17, 5]
    assert [r["image_id"] for r in res] == [42, 42]
    assert res[0]["bbox"] == [2.0, 5.0, 10.0, 5.0]
    assert res[1]["bbox"] == pytest.approx([30.12, 20.0, 9.88, 9.0], abs=1e-6)
    assert res[0]["score"] == pytest.approx(0.9)
    for r, m in zip(res, masks, strict=True):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [30, 40]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]).astype(bool), m.numpy())
    json.dumps(res)  # JSON-ready as is

    no_masks = detections_to_coco(Detections(dets.boxes, dets.scores, dets.labels), 1, [5, 17])
    assert all("segmentation" not in r for r in no_masks)
    assert detections_to_coco(Detections.empty((30, 40)), 1, [5, 17]) == []
    with pytest.raises(ValueError):
        detections_to_coco(dets, 1, [5])  # label 1 has no category


def test_write_results_json(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 4), dtype=np.uint8)))  # counts: bytes
    res = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "score": np.float32(0.5), "segmentation": rle}]
    path = tmp_path / "sub" / "r.json"
    write_results_json(res, path)
    back = json.loads(path.read_text())
    assert back[0]["segmentation"]["counts"] == rle["counts"].decode()
    assert back[0]["score"] == 0.5


# --- evaluate_coco on synthetic data -----------------------------------------------------------


def test_perfect_predictions_synthetic(tmp_path):
    gt = _synthetic_coco(tmp_path)
    cat_ids = [3, 7]
    results = _results(gt, cat_ids)
    before = json.dumps(results)
    m = evaluate_coco(gt, results, verbose=False)
    assert json.dumps(results) == before, "evaluate_coco must not modify the results"
    assert set(m) == {f"{t}_{k}" for t in ("bbox", "segm") for k in METRIC_NAMES}
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR"):
            assert m[f"{t}_{k}"] == pytest.approx(1.0), (t, k)


def test_shifted_boxes_lower_ap(tmp_path):
    gt = _synthetic_coco(tmp_path)
    aps = [evaluate_coco(gt, _results(gt, [3, 7], shift=s), iou_types=("bbox",), verbose=False)["bbox_AP"]
           for s in (0.0, 1.0, 3.0)]
    assert aps[0] == pytest.approx(1.0)
    assert aps[0] > aps[1] > aps[2]
    assert aps[2] > 0.0


def test_wrong_category_scores_zero(tmp_path):
    gt = _synthetic_coco(tmp_path)
    # the contiguous labels are right but mapped back with the categories swapped
    results = []
    for i in gt.getImgIds():
        results += detections_to_coco(_perfect_detections(gt, i, [3, 7]), i, [7, 3])
    assert results
    m = evaluate_coco(gt, results, verbose=False)
    assert m["bbox_AP"] == 0.0 and m["segm_AP"] == 0.0


def test_empty_results(tmp_path):
    gt = _synthetic_coco(tmp_path)
    m = evaluate_coco(gt, [], out_dir=tmp_path / "eval", verbose=False)
    assert set(m) == {f"{t}_{k}" for t in ("bbox", "segm") for k in METRIC_NAMES}
    assert all(v == 0.0 for v in m.values())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == m


def test_boxes_only_results_give_zero_segm(tmp_path):
    gt = _synthetic_coco(tmp_path)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in _results(gt, [3, 7])]
    m = evaluate_coco(gt, results, verbose=False)
    assert m["bbox_AP"] == pytest.approx(1.0)
    assert m["segm_AP"] == 0.0


def test_image_ids_restrict_evaluation(tmp_path):
    gt = _synthetic_coco(tmp_path)
    results = _results(gt, [3, 7], image_ids=[11])  # predictions only for image 11
    full = evaluate_coco(gt, results, iou_types=("bbox",), verbose=False)
    only = evaluate_coco(gt, results, iou_types=("bbox",), image_ids=[11], verbose=False)
    assert full["bbox_AP"] < 0.9
    assert only["bbox_AP"] == pytest.approx(1.0)
    # results for images outside image_ids are ignored, not an error
    assert evaluate_coco(gt, _results(gt, [3, 7]), iou_types=("bbox",), image_ids=[12], verbose=False)["bbox_AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluate_coco(gt, results, image_ids=[999], verbose=False)


def test_matches_pycocotools_summarize_at_100(tmp_path):
    """At maxDets=100 our numbers equal the official summarize() stats."""
    gt = _synthetic_coco(tmp_path)
    results = _results(gt, [3, 7], shift=1.5)
    rng = np.random.default_rng(1)
    for r in results:  # perturb scores and add a false positive per image
        r["score"] = float(rng.uniform(0.1, 1.0))
    results += [{"image_id": i, "category_id": 3, "bbox": [1.0, 1.0, 30.0, 30.0], "score": 0.95} for i in (11, 12, 13)]
    m = evaluate_coco(gt, results, iou_types=("bbox",), verbose=False)

    def official():
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev.stats

    stats = _quiet(official)
    ours = [m[f"bbox_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR", "ARs", "ARm", "ARl")]
    np.testing.assert_allclose(ours, stats, atol=1e-12)
    assert 0.0 < m["bbox_AP"] < 1.0


def test_out_dir_files(tmp_path):
    gt = _synthetic_coco(tmp_path)
    results = _results(gt, [3, 7])
    out = tmp_path / "eval"
    m = evaluate_coco(gt, results, out_dir=out, verbose=False)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert len(json.loads((out / "results.json").read_text())) == len(results)
    summary = (out / "summary.txt").read_text()
    assert "maxDets= 100" in summary and "[segm]" in summary
    # the written results evaluate the same
    again = evaluate_coco(gt, json.loads((out / "results.json").read_text()), verbose=False)
    assert again == m


# --- real data --------------------------------------------------------------------------------


def test_perfect_predictions_coco128(coco128_gt):
    gt = coco128_gt
    cat_ids = sorted(gt.getCatIds())
    assert cat_ids != list(range(1, len(cat_ids) + 1)), "coco128 keeps the real, gappy COCO ids"
    m = evaluate_coco(gt, _results(gt, cat_ids), verbose=False)
    assert m["bbox_AP"] == pytest.approx(1.0)
    assert m["segm_AP"] == pytest.approx(1.0)
    assert m["bbox_AR"] == pytest.approx(1.0)
    assert m["segm_AR"] == pytest.approx(1.0)


def test_nuclei_needs_max_dets_400(nuclei_val_gt, capsys):
    """Perfect predictions on crowded images: AP 1.0 at maxDets=400, < 0.9 at COCO's default 100."""
    gt = nuclei_val_gt
    # val images with 100 to 150 nuclei (six of them); COCOeval's matching is quadratic in the
    # instances per image, so the few most crowded ones (up to 206) would make this slow
    crowded = [i for i in gt.getImgIds() if 100 < len(gt.getAnnIds(imgIds=i)) <= 150]
    assert len(crowded) >= 3
    results = _results(gt, [1], image_ids=crowded)
    m400 = evaluate_coco(gt, results, iou_types=("segm",), max_dets=400, image_ids=crowded)
    printed = capsys.readouterr().out
    assert "maxDets= 400 ] = 1.000" in printed  # the printed summary uses the right maxDets too
    m100 = evaluate_coco(gt, results, iou_types=("segm",), max_dets=100, image_ids=crowded, verbose=False)
    assert m400["segm_AP"] == pytest.approx(1.0)
    assert m400["segm_AR"] == pytest.approx(1.0)
    assert m100["segm_AP"] < 0.9
    assert set(m400) == {f"segm_{k}" for k in METRIC_NAMES}


def test_segm_area_ranges_use_mask_area(tmp_path):
    """A false positive with a thin mask in a big box counts as small for segm, not medium."""
    h = w = 100
    sq_small = np.zeros((h, w), np.uint8)
    sq_small[5:15, 5:15] = 1  # area 100: small
    sq_medium = np.zeros((h, w), np.uint8)
    sq_medium[50:90, 50:90] = 1  # area 1600: medium
    thin = np.zeros((h, w), np.uint8)
    for k in range(40):  # diagonal stroke in (5..45)^2, far from both squares: area ~120
        thin[5 + k, max(5, 5 + k - 1) : 5 + k + 2] = 1
    thin[5:15, 5:15] = 0
    images = [{"id": 1, "height": h, "width": w, "file_name": "1.png"}]
    anns = []
    for aid, m in ((1, sq_small), (2, sq_medium)):
        rle = mask_utils.encode(np.asfortranarray(m))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": aid, "image_id": 1, "category_id": 1, "segmentation": rle,
                     "area": float(m.sum()), "bbox": bbox, "iscrowd": 0})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    gt = _quiet(COCO, str(path))
    masks = torch.from_numpy(np.stack([thin, sq_small, sq_medium])).bool()
    dets = Detections(
        boxes=torch.tensor([[5.0, 5, 46, 46], [5, 5, 15, 15], [50, 50, 90, 90]]),  # FP box area ~1681
        scores=torch.tensor([0.9, 0.8, 0.7]),
        labels=torch.zeros(3, dtype=torch.int64),
        masks=masks,
    )
    m = evaluate_coco(gt, detections_to_coco(dets, 1, [1]), verbose=False)
    assert m["segm_APm"] == pytest.approx(1.0)
    assert m["segm_APs"] < 1.0
    # for boxes the same detection is a medium false positive
    assert m["bbox_APm"] < 1.0
    assert m["bbox_APs"] == pytest.approx(1.0)
