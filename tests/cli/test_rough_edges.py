"""The rough edges a new user hit (issue 11, item 4): each one's fix, tested on what failed before."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from instseg.cli import main as cli_main
from instseg.config.load import dump_yaml, to_dict
from instseg.data.coco import CocoDataset, DataError
from instseg.engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from instseg.engine.trainer import train
from instseg.structures import Detections
from instseg.visualize import class_color
from tests.cli.test_engine import builder, tiny_cfg, write_tiny_coco

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _one_line_error(err: str, command: str) -> None:
    lines = [x for x in err.strip().splitlines() if x]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"instseg {command}: error:"), err


# ------------------------------------------------------------------ convert: one-line errors, exit 2


def test_convert_unknown_preset(tmp_path, capsys):
    assert cli_main(["convert", "mmdet", str(tmp_path / "x.pth"), "--config", "no_such_preset", "--out", "o.pt"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "convert")
    assert "no_such_preset" in err and "instseg presets" in err


def test_convert_mmdet_config_file(tmp_path, capsys):
    # a .py config without a preset of that name: says a preset name is expected
    assert cli_main(["convert", "mmdet", str(tmp_path / "x.pth"), "--config",
                     "configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", "--out", "o.pt"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "convert")
    assert "expected an instseg preset name" in err and "instseg presets" in err
    # a well-known mmdetection config name maps to the preset of the same stem (then: no checkpoint)
    assert cli_main(["convert", "mmdet", str(tmp_path / "x.pth"), "--config",
                     "configs/htc/htc_r50_fpn_1x_coco.py", "--out", "o.pt"]) == 2
    cap = capsys.readouterr()
    assert "using the instseg preset htc_r50_fpn_1x_coco" in cap.out
    _one_line_error(cap.err, "convert")
    assert "checkpoint not found" in cap.err


def test_convert_missing_unreadable_or_misfit_checkpoint(tmp_path, capsys):
    preset = "mask_rcnn_r18_fpn_c64_shapes"
    assert cli_main(["convert", "mmdet", str(tmp_path / "missing.pth"), "--config", preset, "--out", "o.pt"]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "convert")
    assert "missing.pth" in err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert cli_main(["convert", "mmdet", str(garbage), "--config", preset, "--out", "o.pt"]) == 2
    _one_line_error(capsys.readouterr().err, "convert")
    misfit = tmp_path / "misfit.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(3)}}, misfit)
    assert cli_main(["convert", "mmdet", str(misfit), "--config", preset, "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "convert")
    assert "does not fit preset" in err and "backbone.conv1.weight" in err
    assert not (tmp_path / "o.pt").exists()


def test_convert_dispatches_by_name(monkeypatch, capsys):
    from instseg import cli
    from instseg.convert.mmdet import ConversionError

    calls = []

    def fake_main(argv):
        calls.append(argv)
        raise ConversionError("fake converter says no")

    mod = types.ModuleType("instseg.convert.fakeconv")
    mod.main = fake_main
    monkeypatch.setitem(sys.modules, "instseg.convert.fakeconv", mod)
    monkeypatch.setitem(cli.CONVERTERS, "fakeconv", "a test double")
    assert cli_main(["convert", "fakeconv", "a.pth", "--out", "b.pt"]) == 2
    assert calls == [["a.pth", "--out", "b.pt"]]
    _one_line_error(capsys.readouterr().err, "convert")
    monkeypatch.setitem(cli.CONVERTERS, "notbuilt", "no module yet")
    assert cli_main(["convert", "notbuilt", "x"]) == 2
    assert "not part of this installation" in capsys.readouterr().err
    assert cli_main(["convert", "detectron", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown converter 'detectron'" in err and "mmdet" in err and "yolact" in err
    assert cli_main(["convert", "mmdet", "-h"]) == 0  # argparse's own exit is a return code
    assert "PRESET" in capsys.readouterr().out


# ------------------------------------------------------- evaluation sees the loader's cleaned ground truth


@pytest.fixture
def tiny_with(tmp_path):
    def make(extra_anns=(), name="data"):
        ann, images = write_tiny_coco(tmp_path / name)
        data = json.loads(ann.read_text())
        next_id = max(a["id"] for a in data["annotations"]) + 1
        for k, a in enumerate(extra_anns):
            data["annotations"].append({"id": next_id + k, **a})
        ann.write_text(json.dumps(data))
        return ann, images
    return make


@pytest.mark.filterwarnings("ignore:.*instance skipped")
def test_two_point_polygon_does_not_crash_the_evaluation(tiny_with, tmp_path):
    bad = {"image_id": 1, "category_id": 10, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0, "segmentation": [[1, 1, 5, 5]]}
    ann, images = tiny_with([bad, {**bad, "segmentation": [[1, 1]]}, {k: v for k, v in bad.items() if k != "area"} | {
        "segmentation": [[2, 2, 12, 2, 12, 10]]}])  # the last one is fine but has no 'area'
    with pytest.warns(UserWarning, match="at least 3 points"):
        ds = CocoDataset(ann, images)
    ids = {a["id"] for a in ds.coco.dataset["annotations"]}
    raw = json.loads(ann.read_text())["annotations"]
    assert len(ids) == len(raw) - 2  # the two bad polygons are not in the evaluation's ground truth
    assert all("area" in a and "iscrowd" in a for a in ds.coco.dataset["annotations"])
    cfg = tiny_cfg(ann, images, max_iters=2, eval_interval=0)
    res = train(cfg, run_dir=tmp_path / "run", model_builder=builder)
    assert "segm_AP" in res["metrics"] and res["stopped"] in ("max_iters", "completed")


def test_truncated_image_is_left_out_of_evaluation_and_recorded(tiny_with, tmp_path):
    ann, images = tiny_with()
    data = (images / "im3.png").read_bytes()
    (images / "im3.png").write_bytes(data[: len(data) // 2])
    cfg = tiny_cfg(ann, images, max_iters=4, eval_interval=0)
    with pytest.warns(UserWarning, match="im3.png"):
        res = train(cfg, run_dir=tmp_path / "run", model_builder=builder)
    assert "segm_AP" in res["metrics"]
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["mode"] == "val"]
    assert val[-1]["images_left_out"] == ["im3.png"]
    written = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert [x["file_name"] for x in written["images_left_out"]] == ["im3.png"]
    assert written["images_evaluated"] == 6
    assert "truncated" in written["images_left_out"][0]["reason"] or "decode" in written["images_left_out"][0]["reason"]


def test_duplicate_annotation_ids_are_refused(tiny_with):
    ann, images = tiny_with([{"id": 0, "image_id": 1, "category_id": 10, "bbox": [1, 1, 8, 8], "iscrowd": 0,
                              "segmentation": [[1, 1, 9, 1, 9, 9]]}])
    data = json.loads(ann.read_text())
    data["annotations"][-1]["id"] = 3  # the id of an existing annotation
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"'id' = 3 is duplicated") as e:
        CocoDataset(ann, images)
    assert str(ann) in str(e.value)


def test_out_of_range_stuff_label_is_an_error_before_training(tiny_with, tmp_path):
    ann, images = tiny_with()
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    for k in range(7):
        m = np.zeros((40, 48), np.uint8)
        if k == 5:
            m[10, 10] = 200
        Image.fromarray(m).save(stuff / f"im{k}.png")
    cfg = tiny_cfg(ann, images)
    cfg.model.semantic, cfg.model.semantic_targets, cfg.model.semantic_classes = True, "stuff", 3
    cfg.data.train_stuff = str(stuff)
    built = []
    with pytest.raises(DataError, match="label 200 out of range") as e:
        train(cfg, run_dir=tmp_path / "run", model_builder=lambda m: built.append(m) or builder(m))
    assert "im5.png" in str(e.value)
    assert built == []  # before training: no model was even built


# ------------------------------------------------------------------------------ semantic_classes


def test_semantic_classes_derived_for_derive_targets(tiny_with, tmp_path, capsys):
    ann, images = tiny_with()
    cfg = tiny_cfg(ann, images, max_iters=1)
    cfg.data.val_ann = ""
    cfg.model.semantic, cfg.model.semantic_targets = True, "derive"
    assert cfg.model.semantic_classes == 183
    seen = []
    res = train(cfg, run_dir=tmp_path / "run", model_builder=lambda m: seen.append(m.semantic_classes) or builder(m))
    assert seen == [3]  # two categories + background
    assert load_checkpoint(Path(res["run_dir"]) / "checkpoints" / "last.pt")["config"]["model"]["semantic_classes"] == 3
    assert "semantic_classes=3" in capsys.readouterr().out


def test_explicitly_wrong_semantic_classes_is_refused(tiny_with, tmp_path, monkeypatch, capsys):
    ann, images = tiny_with()
    mod = types.ModuleType("instseg.modeling.zoo")
    mod.build_model = builder
    monkeypatch.setitem(sys.modules, "instseg.modeling.zoo", mod)
    cfg = tiny_cfg(ann, images, max_iters=1)
    cfg.train.output_dir = str(tmp_path / "runs")
    path = tmp_path / "c.yaml"
    dump_yaml(cfg, path)
    rc = cli_main(["train", "--config", str(path), "--set", "model.semantic=true", "model.semantic_targets=derive",
                   "model.semantic_classes=5"])
    assert rc == 2
    err = capsys.readouterr().err
    _one_line_error(err, "train")
    assert "model.semantic_classes=5" in err and "num_classes + 1 = 3" in err
    assert cli_main(["train", "--config", str(path), "--set", "model.semantic=true", "model.semantic_targets=derive",
                     "model.semantic_classes=3", "data.val_ann="]) == 0


# ------------------------------------------------------------------------------------- predict


class ScriptedDetector(nn.Module):
    """Returns fixed detections: ``n`` small squares on a grid, scores from 0.99 down, labels
    1, 0, 1, 0, ... (so the best detection is of class 1)."""

    n = 6

    def __init__(self, num_classes):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def optimize_for_inference(self):
        return self.eval()

    def predict(self, batch):
        out = []
        for oh, ow in batch.original_sizes:
            n = self.n
            boxes, masks = [], torch.zeros((n, oh, ow), dtype=torch.bool)
            for k in range(n):
                x, y = 4 + (k % 10) * 12, 4 + (k // 10) * 12
                boxes.append([x, y, x + 8, y + 8])
                masks[k, y + 2 : y + 6, x + 2 : x + 6] = True  # inside its box, so a box outline shows
            scores = torch.linspace(0.99, 0.05, n)
            labels = torch.tensor([(k + 1) % 2 for k in range(n)])
            out.append(Detections(torch.tensor(boxes, dtype=torch.float32), scores, labels, masks))
        return out


@pytest.fixture
def scripted_checkpoint(tmp_path, monkeypatch):
    mod = types.ModuleType("instseg.modeling.zoo")
    mod.build_model = lambda m: ScriptedDetector(m.num_classes)
    monkeypatch.setitem(sys.modules, "instseg.modeling.zoo", mod)
    cfg = tiny_cfg("a.json", "imgs")
    cfg.model.num_classes = 2
    ckpt = tmp_path / "scripted.pt"
    save_checkpoint(ckpt, {"format": FORMAT, "model": ScriptedDetector(2).state_dict(), "config": to_dict(cfg),
                           "classes": {"cat_ids": [10, 20], "class_names": ["red", "green"]}})
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.fromarray(np.zeros((60, 130, 3), np.uint8)).save(img_dir / "black.png")
    return ckpt, img_dir


def _predict(ckpt, img_dir, out, *extra):
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--images", str(img_dir), "--out", str(out), *extra]) == 0
    return json.loads((out / "predictions.json").read_text()), np.asarray(Image.open(out / "black.png"))


def test_predict_score_thr_filters_predictions_json(scripted_checkpoint, tmp_path, capsys):
    ckpt, img_dir = scripted_checkpoint
    preds, _ = _predict(ckpt, img_dir, tmp_path / "p", "--score-thr", "0.5")
    scores = torch.linspace(0.99, 0.05, ScriptedDetector.n)
    assert len(preds) == int((scores >= 0.5).sum()) == 3
    assert all(p["score"] >= 0.5 for p in preds)
    assert "3 detections with score >= 0.5" in capsys.readouterr().out
    all_preds, _ = _predict(ckpt, img_dir, tmp_path / "p0", "--score-thr", "0")
    assert len(all_preds) == ScriptedDetector.n


def test_predict_overlays_are_coloured_by_class(scripted_checkpoint, tmp_path):
    ckpt, img_dir = scripted_checkpoint
    _, img = _predict(ckpt, img_dir, tmp_path / "p", "--score-thr", "0", "--no-boxes", "--no-labels")
    # black image, alpha 0.5: a mask's inside is half its color.  Detection k sits at x = 4 + 12 k.
    centre = [img[8, 8 + 12 * k].astype(int) for k in range(4)]
    labels = [(k + 1) % 2 for k in range(4)]  # 1, 0, 1, 0 by falling score
    seen: dict[int, int] = {}
    for k in range(4):
        expected = np.array(class_color(labels[k], seen.get(labels[k], 0))) * 0.5
        seen[labels[k]] = seen.get(labels[k], 0) + 1
        assert np.abs(centre[k] - expected).max() <= 1, k
    # the same class keeps its hue: shades of one color, not the next color of a palette
    a, b = np.array(class_color(1, 0), float), np.array(class_color(1, 1), float)
    assert np.allclose(b - 255 * 0.35, a * 0.65, atol=2) or np.allclose(b, a * 0.65, atol=2)


def test_predict_boxes_and_labels_can_be_forced_on_crowded_images(scripted_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(ScriptedDetector, "n", 50)  # more than 40 shown: boxes and labels off by default
    ckpt, img_dir = scripted_checkpoint
    _, plain = _predict(ckpt, img_dir, tmp_path / "a", "--score-thr", "0")
    _, forced = _predict(ckpt, img_dir, tmp_path / "b", "--score-thr", "0", "--boxes", "--labels")
    _, boxes_only = _predict(ckpt, img_dir, tmp_path / "c", "--score-thr", "0", "--boxes")
    assert (forced != plain).any(axis=2).sum() > 200
    assert 0 < (boxes_only != plain).any(axis=2).sum() < (forced != plain).any(axis=2).sum()


# ----------------------------------------------------------------------------- help and README


def _help(argv, capsys) -> str:
    assert cli_main(argv) == 0
    return capsys.readouterr().out


def test_help_texts_describe_each_command(capsys):
    ev = _help(["eval", "-h"], capsys)
    assert "per_class_{bbox,segm}.csv" in ev and "confusion" in ev
    pr = _help(["predict", "-h"], capsys)
    assert "train.lr" not in pr and "predictions.json" in pr and "--boxes" in pr
    for text in (ev, pr):  # --checkpoint has a help text
        assert re.search(r"--checkpoint PT\s+instseg checkpoint", text)
    tr = _help(["train", "-h"], capsys)
    assert "TRAIN_STUFF" not in tr and "VAL_STUFF" not in tr and "--stuff-dir DIR" in tr
    assert "NAME_1" in tr  # what happens to an existing run folder
    conv = _help(["convert", "-h"], capsys)
    assert "mmdet" in conv and "yolact" in conv and "instseg presets" in conv
    data = _help(["data", "-h"], capsys)
    for name in ("check", "browse", "convert", "synth"):
        assert re.search(rf"^\s+{name}\s+\S", data, re.M), name
    for name in ("check", "browse", "convert"):
        assert _help(["data", name, "-h"], capsys).startswith(f"usage: instseg data {name}")


def test_presets_are_described_and_fixtures_marked(capsys):
    out = _help(["presets"], capsys)
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("Train", " "))}
    assert "mask_rcnn_r50_fpn_1x_coco" in lines and "htc_synth_cpu" in lines
    for name, line in lines.items():
        assert len(line.split(None, 1)) == 2, name  # a description after every name
        assert ("[test fixture]" in line) == name.endswith("_shapes"), name
    assert "random init unless model.backbone_weights" in lines["mask_rcnn_r50_fpn_1x_coco"]
    assert "ImageNet" in lines["htc_synth_cpu"]
    assert _help(["presets", "--names-only"], capsys).split() == sorted(lines)


def test_readme_set_examples_work_in_zsh():
    """An unquoted ``key=[a,b]`` is a glob in zsh ("no matches found"): every such example is quoted."""
    text = (ROOT / "README.md").read_text()
    set_lines = [line for line in text.splitlines() if "--set" in line]
    assert set_lines
    for line in set_lines:
        assert not re.search(r"(^|\s)[\w.]+=\[", line), line
    # the bracket-free spelling the README shows parses to the same tuple
    from instseg.config.load import apply_overrides
    from instseg.config.schema import Config

    assert apply_overrides(Config(), [], ["data.scale=800,600"]).data.scale == (800, 600)
    assert apply_overrides(Config(), [], ["data.scale=[800,600]"]).data.scale == (800, 600)


def test_readme_says_resnet_presets_start_from_random_weights():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "start from random weights unless `model.backbone_weights` names a file" in text
