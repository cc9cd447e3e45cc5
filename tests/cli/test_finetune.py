"""Fine-tuning (``train.init_from``) from the 5-class golden mmdetection HTC into a 3-class model:
exactly the class-dependent tensors keep their fresh init, the rest is loaded, the skipped keys are
written into the run folder, and ``train.init_strict`` turns the mismatch into a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from instseg.cli import main
from instseg.config.presets import get_preset
from instseg.engine.checkpoint import CheckpointError, load_checkpoint
from instseg.engine.trainer import train
from tests.golden_utils import GOLDEN, requires_golden

pytestmark = [requires_golden]

HTC_MMDET = GOLDEN / "htc_r18_fpn_c64_shapes.pth"

# every tensor whose shape depends on the class count: the classifier of each stage (6 -> 4 rows,
# background last), the mask logits of each stage (5 -> 3 channels) and the semantic logits
# (9 stuff+thing classes in the golden model -> 4 derived classes: background + 3 things).
# HTC's box regression is class-agnostic (4 outputs), so fc_reg loads.
CLASS_DEPENDENT = sorted(
    [f"roi_head.stages.{t}.box_head.fc_cls.{p}" for t in range(3) for p in ("weight", "bias")]
    + [f"roi_head.stages.{t}.mask_head.conv_logits.{p}" for t in range(3) for p in ("weight", "bias")]
    + [f"roi_head.semantic_head.conv_logits.{p}" for p in ("weight", "bias")]
)


def _fruit_cfg(shared_data, **train):
    cfg = get_preset("htc_r18_fpn_c64_shapes")
    fruit = shared_data / "fruit"
    cfg.data.train_ann, cfg.data.train_images = str(fruit / "annotations" / "instances.json"), str(fruit / "images")
    cfg.model.semantic_targets = "derive"  # fruit has no stuff maps
    cfg.model.semantic_classes = 4
    cfg.model.backbone_weights = ""
    cfg.train.device = "cpu"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_mmdet_htc_into_3_classes_skips_exactly_the_class_dependent_tensors(shared_data, tmp_path):
    # one iteration at lr 0: the run's checkpoint holds exactly the initial weights
    cfg = _fruit_cfg(shared_data, init_from=str(HTC_MMDET), max_iters=1, lr=0.0, eval_interval=0)
    cfg.data.batch_size = 1
    train(cfg, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "init_skipped.json").read_text())
    assert report["source"] == "mmdetection"
    assert [r["key"] for r in report["kept_init"]] == CLASS_DEPENDENT
    assert [r["key"] for r in report["unused"]] == CLASS_DEPENDENT
    shapes = {r["key"]: (r["checkpoint_shape"], r["model_shape"]) for r in report["kept_init"]}
    assert shapes["roi_head.stages.0.box_head.fc_cls.weight"] == ([6, 256], [4, 256])
    assert shapes["roi_head.stages.2.mask_head.conv_logits.weight"] == ([5, 64, 1, 1], [3, 64, 1, 1])
    assert report["loaded"] == report["model_tensors"] - len(CLASS_DEPENDENT)

    own = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    raw = torch.load(HTC_MMDET, map_location="cpu", weights_only=False)["state_dict"]
    # a loaded tensor equals the checkpoint's; a skipped one has the head's own init (zero bias,
    # small-std classifier) rather than anything copied from the checkpoint
    torch.testing.assert_close(own["roi_head.stages.1.box_head.fc_reg.weight"],
                               raw["roi_head.bbox_head.1.fc_reg.weight"].float())
    torch.testing.assert_close(own["roi_head.semantic_head.lateral_convs.0.conv.weight"],
                               raw["roi_head.semantic_head.lateral_convs.0.conv.weight"].float())
    for t in range(3):
        assert torch.count_nonzero(own[f"roi_head.stages.{t}.box_head.fc_cls.bias"]) == 0
        assert 0.005 < float(own[f"roi_head.stages.{t}.box_head.fc_cls.weight"].std()) < 0.02


def test_init_strict_makes_the_mismatch_a_one_line_error(shared_data, tmp_path, capsys):
    fruit = shared_data / "fruit"
    code = main([
        "train", "--config", "htc_r18_fpn_c64_shapes",
        "--set", f"data.train_ann={fruit / 'annotations' / 'instances.json'}",
        "--set", f"data.train_images={fruit / 'images'}",
        "--set", "model.semantic_targets=derive", "--set", "model.semantic_classes=4",
        "--set", "model.backbone_weights=", "--set", "train.device=cpu",
        "--set", f"train.output_dir={tmp_path}",
        "--set", f"train.init_from={HTC_MMDET}", "--set", "train.init_strict=true",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.init_strict" in err and "conv_logits" in err and "Traceback" not in err


def test_instseg_checkpoint_into_a_new_class_count_is_strict_error(shared_data, tmp_path):
    """An instseg checkpoint (the converted golden HTC) goes through the same rules: with the same
    9-class semantic head only the 12 box/mask class tensors differ, and strict mode names them."""
    converted = tmp_path / "htc.pt"
    assert main(["convert", "mmdet", str(HTC_MMDET), "--config", "htc_r18_fpn_c64_shapes", "--out", str(converted)]) == 0
    ann, images = shared_data / "fruit" / "annotations" / "instances.json", shared_data / "fruit" / "images"
    cfg = get_preset("htc_r18_fpn_c64_shapes")
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    cfg.model.backbone_weights, cfg.train.device = "", "cpu"
    cfg.model.semantic_targets = "none"  # the same 9-class semantic head, unused here
    cfg.train.init_from, cfg.train.init_strict = str(converted), True
    cfg.train.max_iters, cfg.train.lr, cfg.train.eval_interval, cfg.data.batch_size = 1, 0.0, 0, 1
    # the data has 3 classes, so the trainer builds a 3-class model and strict loading must fail
    with pytest.raises(CheckpointError, match=r"train.init_strict: 12 model tensors and 12 tensors of .*fc_cls"):
        train(cfg, run_dir=tmp_path / "strict")
