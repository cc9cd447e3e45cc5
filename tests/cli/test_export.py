"""Export: onnxruntime (and torch.export) against torch on the golden images, sharing instseg's
post-processing: same labels, boxes within 0.5 px, mask IoU > 0.98 -- for the golden Mask R-CNN
and HTC (converted from mmdetection) and a random-weight YOLACT."""

from __future__ import annotations

import builtins

import pytest
import torch

from instseg.cli import main
from instseg.config.presets import get_preset
from instseg.convert.mmdet import convert_checkpoint
from instseg.export import (
    ExportError, export_model, export_size, load_batches, require_onnx, runtime_model, verification_passed, verify,
)
from instseg.modeling.zoo import build_model
from tests.golden_utils import GOLDEN, IMAGES, MODELS, requires_golden

pytestmark = [requires_golden, pytest.mark.golden, pytest.mark.slow]  # ~45 s on 2 idle cores, 2-3x that on a loaded machine
FILES = [GOLDEN / f"{image}.jpg" for image in IMAGES]


def _golden(name: str):
    preset, ckpt = MODELS[name]
    cfg = get_preset(preset)
    model = build_model(cfg.model)
    model.load_state_dict(convert_checkpoint(GOLDEN / ckpt, cfg)["model"])
    return model.eval(), cfg


def _check(model, cfg, fmt, tmp_path, *, score_thr=0.05, min_dets=10):
    batches = load_batches(FILES, cfg, export_size(cfg))
    manifest = export_model(model, batches, tmp_path / fmt, fmt)
    rows = verify(model, runtime_model(model, tmp_path / fmt), batches, score_thr=score_thr)
    for row in rows:
        assert row["detections"] >= min_dets  # a comparison of empty outputs proves nothing
        assert row["unmatched"] == 0, row
        assert row["max_box_diff_px"] <= 0.5, row
        assert row["min_mask_iou"] > 0.98, row
    assert verification_passed(rows)
    return manifest


@pytest.mark.parametrize("name", ["mask_rcnn", "htc"])
def test_onnxruntime_matches_torch_on_golden_images(name, tmp_path):
    require_onnx()
    manifest = _check(*_golden(name), "onnx", tmp_path)
    names = [p["name"] for p in manifest["parts"]]
    stages = 3 if name == "htc" else 1
    assert names[:2] == ["features", "rpn"] and sum(n.endswith("_box") for n in names) == stages
    assert ("semantic" in names) == (name == "htc")


def _random_yolact():
    """A random-weight YOLACT (no trained YOLACT fixture exists): its untrained scores still spread
    to ~1, so the top detections are distinct and the comparison is meaningful at score >= 0.5."""
    cfg = get_preset("yolact_r18_c64_shapes")
    cfg.model.backbone_weights = ""
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


def test_yolact_onnxruntime_matches_torch(tmp_path):
    require_onnx()
    manifest = _check(*_random_yolact(), "onnx", tmp_path, score_thr=0.5)
    assert [p["name"] for p in manifest["parts"]] == ["features", "head", "mask"]


def test_cli_export_torch_export_with_verify(tmp_path, capsys):
    from instseg.convert.mmdet import package_checkpoint, write_checkpoint

    model, cfg = _random_yolact()
    ckpt = write_checkpoint(package_checkpoint(model.state_dict(), cfg, [1, 2, 3, 4, 5], list("abcde"), {}),
                            tmp_path / "yolact.pt")
    out = tmp_path / "exported"
    code = main(["export", "--checkpoint", str(ckpt), "--format", "torch_export", "--out", str(out),
                 "--verify", "--score-thr", "0.5", "--images", str(FILES[1])])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "verify: OK" in text and (out / "export.json").is_file()
    program = torch.export.load(str(out / "head.pt2"))
    assert isinstance(program, torch.export.ExportedProgram)


def test_missing_onnx_extra_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ExportError, match=r"'export' extra \(onnxruntime is missing\)"):
        require_onnx()
    code = main(["export", "--checkpoint", str(tmp_path / "x.pt"), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert code == 2 and "pip install 'instseg[export]'" in capsys.readouterr().err


def test_deformable_convolutions_are_refused_for_onnx(tmp_path):
    """onnxruntime computes torchvision's exported deform_conv2d differently (measured on GA-RPN's
    feature adaption): such models are refused instead of exported wrong."""
    cfg = get_preset("ga_rpn_r18_fpn_c64_shapes")
    cfg.model.backbone_weights = ""
    model = build_model(cfg.model).eval()
    batch = load_batches(FILES[:1], cfg, export_size(cfg))
    with pytest.raises(ExportError, match="deformable convolutions"):
        export_model(model, batch, tmp_path / "x", "onnx")
