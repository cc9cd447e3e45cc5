"""`instseg convert mmdet` + `instseg predict` on the reference image files gives mmdetection's
detections (IoU-matched sets).  The input goes through instseg's own decode and resize (PIL
decode, bilinear resize rounded to uint8, a close stand-in for cv2's INTER_LINEAR), so the
low-score tail may differ slightly; the confident detections must all match."""

from __future__ import annotations

import json

import pytest
import torch

from instseg.cli import main
from tests.golden_utils import GOLDEN, IMAGES, MODELS, match_detections, requires_golden

pytestmark = [requires_golden, pytest.mark.golden]


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_then_predict_matches_mmdet(name, tmp_path):
    preset, ckpt = MODELS[name]
    converted = tmp_path / f"{name}.pt"
    assert main(["convert", "mmdet", str(GOLDEN / ckpt), "--config", preset, "--out", str(converted)]) == 0
    out = tmp_path / "pred"
    files = [str(GOLDEN / f"{image}.jpg") for image in IMAGES]
    # --score-thr 0: predictions.json keeps only detections at or above the threshold; compare them all
    assert main(["predict", "--checkpoint", str(converted), "--images", *files, "--out", str(out), "--device", "cpu",
                 "--score-thr", "0"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    images = {img["id"]: img["file_name"] for img in json.loads((out / "images.json").read_text())["images"]}
    for image_id, file_name in images.items():
        ref = torch.load(GOLDEN / f"ref_{name}_{file_name.split('/')[-1][:-4]}.pt", weights_only=True)
        rows = [r for r in results if r["image_id"] == image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)])
        scores = torch.tensor([r["score"] for r in rows])
        labels = torch.tensor([r["category_id"] - 1 for r in rows])
        matched = match_detections(boxes, scores, labels, ref["det_boxes"], ref["det_scores"], ref["det_labels"],
                                   iou_thr=0.95, score_tol=5e-3)
        top = min(20, len(matched))
        assert all(i >= 0 for i in matched[:top]), f"{file_name}: a confident detection has no match"
        assert sum(i >= 0 for i in matched) >= 0.8 * len(matched)
        assert (out / f"{file_name.split('/')[-1][:-4]}.png").exists()
