"""Trainer, checkpoints and CLI with a tiny test-double detector on a tiny COCO data set."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

pytest.importorskip("instseg.data")  # the trainer reads data through instseg.data

from instseg.cli import main as cli_main  # noqa: E402
from instseg.config.load import dump_yaml  # noqa: E402
from instseg.config.schema import Config  # noqa: E402
from instseg.engine.checkpoint import load_checkpoint  # noqa: E402
from instseg.engine.trainer import NonFiniteLossError, train  # noqa: E402
from instseg.structures import Detections  # noqa: E402

N_IMAGES = 7  # batch 2 -> 4 iterations per epoch


class TinyDetector(nn.Module):
    """Follows the Detector API; its loss uses dropout so the torch RNG matters for resume."""

    def __init__(self, num_classes: int, nan_at: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes + 4)
        self.nan_at = nan_at
        self.calls = 0

    def _features(self, images):
        f = self.bn(self.conv(images)).relu().mean(dim=(2, 3))
        return self.head(F.dropout(f, 0.3, training=self.training))

    def forward(self, batch, targets):
        self.calls += 1
        out = self._features(batch.images)
        labels = torch.stack([t.labels[0] for t in targets])
        h, w = batch.padded_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes = torch.stack([t.boxes[0] / scale for t in targets])
        loss_cls = F.cross_entropy(out[:, : self.num_classes], labels)
        loss_bbox = F.l1_loss(out[:, self.num_classes :].sigmoid(), boxes)
        if self.nan_at and self.calls >= self.nan_at:
            loss_bbox = loss_bbox * float("nan")
        acc = (out[:, : self.num_classes].argmax(1) == labels).float().mean()
        return {"loss": loss_cls + loss_bbox, "loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": acc}

    def optimize_for_inference(self):
        """Part of the Detector API (eval/predict call it); nothing to fold here."""
        return self.eval()

    def predict(self, batch):
        out = self._features(batch.images)
        dets = []
        for i, (oh, ow) in enumerate(batch.original_sizes):
            b = out[i, self.num_classes :].sigmoid() * torch.tensor([ow, oh, ow, oh], dtype=torch.float32)
            x1, x2 = torch.minimum(b[0], b[2]), torch.maximum(b[0], b[2]) + 1
            y1, y2 = torch.minimum(b[1], b[3]), torch.maximum(b[1], b[3]) + 1
            box = torch.stack([x1, y1, x2, y2]).clamp(min=0)[None]
            masks = torch.zeros((1, oh, ow), dtype=torch.bool)
            masks[0, int(y1) : int(y2), int(x1) : int(x2)] = True
            probs = out[i, : self.num_classes].softmax(0)
            dets.append(Detections(box, probs.max()[None], probs.argmax()[None], masks))
        return dets


def builder(model_cfg):
    return TinyDetector(model_cfg.num_classes)


def write_tiny_coco(root, n=N_IMAGES, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        h, w = 40, 48
        arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for k in range(1 + i % 2):
            cat = 1 + (i + k) % 2
            x0, y0 = int(rng.integers(0, 20)), int(rng.integers(0, 15))
            bw, bh = int(rng.integers(8, 24)), int(rng.integers(8, 20))
            arr[y0 : y0 + bh, x0 : x0 + bw] = (200, 40, 40) if cat == 1 else (40, 200, 40)
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 10 * cat, "bbox": [x0, y0, bw, bh],
                         "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})
        Image.fromarray(arr).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": h, "width": w})
    cats = [{"id": 10, "name": "red"}, {"id": 20, "name": "green"}]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann, root / "images"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("tinycoco"))


def tiny_cfg(ann, images, **train) -> Config:
    cfg = Config(name="tiny")
    cfg.model.num_classes = 2
    d = cfg.data
    d.train_ann = d.val_ann = str(ann)
    d.train_images = d.val_images = str(images)
    d.scale, d.batch_size, d.flip_prob = (64, 48), 2, 0.5
    t = cfg.train
    t.device, t.threads, t.lr, t.warmup_iters, t.log_interval = "cpu", 1, 0.05, 2, 1
    t.max_iters, t.lr_steps = 6, (4,)
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    result = train(tiny_cfg(*tiny_data), run_dir=run_dir, model_builder=builder)
    return run_dir, result


def test_resume_is_bitwise_exact(tiny_data, straight_run, tmp_path):
    run_a, res_a = straight_run
    assert res_a["iter"] == 6 and res_a["stopped"] == "max_iters"
    run_b = tmp_path / "split"
    res = train(tiny_cfg(*tiny_data, max_iters=3), run_dir=run_b, model_builder=builder)
    mid = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert (res["iter"], mid["iter"], mid["epoch"], mid["batch_in_epoch"]) == (3, 3, 0, 3)  # mid-epoch
    res_b = train(tiny_cfg(*tiny_data), run_dir=run_b, resume=True, model_builder=builder)
    assert res_b["iter"] == 6
    a = load_checkpoint(run_a / "checkpoints" / "last.pt")
    b = load_checkpoint(run_b / "checkpoints" / "last.pt")
    _same_state(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert (b["epoch"], b["batch_in_epoch"]) == (1, 2)
    # the resumed log continues the first one: every iteration logged exactly once
    lines = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if r["mode"] == "train"] == [1, 2, 3, 4, 5, 6]
    lines_a = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    loss_a = [r["loss"] for r in lines_a if r["mode"] == "train"]
    loss_b = [r["loss"] for r in lines if r["mode"] == "train"]
    assert loss_a == loss_b


def test_time_budget_stops_and_resumes_exactly(tiny_data, straight_run, tmp_path):
    run_dir = tmp_path / "budget"
    res = train(tiny_cfg(*tiny_data, max_minutes=1e-9), run_dir=run_dir, model_builder=builder)
    assert res["stopped"] == "time budget" and res["iter"] == 1
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iter"] == 1
    train(tiny_cfg(*tiny_data), run_dir=run_dir, resume=True, model_builder=builder)
    _same_state(
        load_checkpoint(straight_run[0] / "checkpoints" / "last.pt")["model"],
        load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"],
    )


def test_budget_lr_steps_follow_the_time_budget(tiny_data, tmp_path, monkeypatch):
    """``train.budget_lr_steps=(0.5,)``: lr drops once, when half the budget has passed (a fake
    clock that advances 1 s per reading), the iteration is recorded, the run ends at the budget."""
    import instseg.engine.trainer as trainer_module

    clock = {"t": 1000.0}

    def fake_time():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(trainer_module.time, "time", fake_time)
    run_dir = tmp_path / "budget_steps"
    cfg = tiny_cfg(*tiny_data, max_minutes=0.5, budget_lr_steps=(0.5,), max_iters=1000, eval_interval=0,
                   warmup_iters=0)
    res = train(cfg, run_dir=run_dir, model_builder=builder)
    assert res["stopped"] == "time budget" and 4 < res["iter"] < 1000
    lrs = [json.loads(x)["lr"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["mode"] == "train"]
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["lr_steps_taken"]
    assert len(step) == 1 and 0 < step[0] < res["iter"]
    assert lrs[: step[0]] == [pytest.approx(0.05)] * step[0]
    assert lrs[step[0]:] == [pytest.approx(0.005)] * (len(lrs) - step[0])
    with pytest.raises(Exception, match="max_minutes"):
        train(tiny_cfg(*tiny_data, budget_lr_steps=(0.5,)), run_dir=tmp_path / "bad", model_builder=builder)


def test_run_dir_contents(straight_run):
    run_dir, res = straight_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in lines if r["mode"] == "train"]
    val = [r for r in lines if r["mode"] == "val"]
    assert {"iter", "epoch", "lr", "loss", "loss_cls", "loss_bbox", "acc", "time"} <= tr[0].keys()
    assert tr[0]["lr"] == pytest.approx(0.05 * 0.001)  # warmup start
    assert tr[-1]["lr"] == pytest.approx(0.005)  # after the step at iteration 4
    assert [r["iter"] for r in val] == [4, 6]  # end of epoch 1, and the end of training
    assert "segm_AP" in val[0] and "segm_AP" in res["metrics"]
    assert res["best"]["metric"] == "segm_AP"
    assert (run_dir / "eval" / "metrics.json").is_file()
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ck["classes"] == {"cat_ids": [10, 20], "class_names": ["red", "green"]}
    assert ck["config"]["train"]["max_iters"] == 6


def test_non_finite_loss_is_an_error(tiny_data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 .*loss_bbox=nan"):
        train(tiny_cfg(*tiny_data), run_dir=tmp_path / "nan", model_builder=lambda m: TinyDetector(2, nan_at=2))


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def fake_zoo(monkeypatch):
    """Routes the CLI's ``zoo.build_model`` to the test double."""
    mod = types.ModuleType("instseg.modeling.zoo")
    mod.build_model = builder
    monkeypatch.setitem(sys.modules, "instseg.modeling.zoo", mod)
    import instseg.modeling

    monkeypatch.setattr(instseg.modeling, "zoo", mod, raising=False)
    return mod


def _yaml_cfg(tmp_path, tiny_data, **train) -> str:
    cfg = tiny_cfg(*tiny_data, **train)
    cfg.train.output_dir = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    dump_yaml(cfg, path)
    return str(path)


def test_cli_unknown_set_key_exits_2(tmp_path, tiny_data, capsys):
    cfg = _yaml_cfg(tmp_path, tiny_data)
    assert cli_main(["train", "--config", cfg, "--set", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "train.no_such_key" in err and "Traceback" not in err
    assert cli_main(["train", "--config", cfg, "--set", "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(tmp_path, tiny_data, capsys):
    cfg = _yaml_cfg(tmp_path, tiny_data)
    assert cli_main(["train", "--config", cfg, "--train-ann", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert cli_main(["train"]) == 2  # --config is required
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--ann", str(tiny_data[0]),
                     "--images", str(tiny_data[1])]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert cli_main(["train", "--config", cfg, "--train-ann", str(bad_json)]) == 2  # DataError
    assert "bad.json" in capsys.readouterr().err


def test_cli_train_eval_predict(tmp_path, tiny_data, fake_zoo, capsys):
    ann, images = tiny_data
    cfg = _yaml_cfg(tmp_path, tiny_data, max_iters=2)
    rc = cli_main(["train", "--config", cfg, "--name", "cli", "--train-ann", str(ann), "--train-images", str(images),
                   "--set", "train.eval_interval=0", "train.checkpoint_interval=0"])
    assert rc == 0
    ckpt = tmp_path / "runs" / "cli" / "checkpoints" / "last.pt"
    assert ckpt.is_file() and "segm" in capsys.readouterr().out

    # eval on a data set whose categories are a subset of the checkpoint's
    data = json.loads(ann.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] == 20]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 20]
    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(data))
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--ann", str(sub), "--images", str(images),
                   "--max-dets", "300", "--out", str(tmp_path / "ev")])
    assert rc == 0
    assert "bbox" in capsys.readouterr().out
    assert "segm_AP" in json.loads((tmp_path / "ev" / "metrics.json").read_text())

    data["categories"].append({"id": 99, "name": "unknown"})
    sub.write_text(json.dumps(data))
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--ann", str(sub), "--images", str(images)]) == 2
    assert "99" in capsys.readouterr().err

    pytest.importorskip("instseg.visualize")
    out = tmp_path / "pred"
    rc = cli_main(["predict", "--checkpoint", str(ckpt), "--images", str(images / "im0.png"), str(images),
                   "--out", str(out), "--score-thr", "0"])
    assert rc == 0
    preds = json.loads((out / "predictions.json").read_text())
    listing = json.loads((out / "images.json").read_text())
    assert len(listing["images"]) == N_IMAGES + 1
    assert {p["file_name"] for p in preds} == {im["file_name"] for im in listing["images"]}
    assert all(p["category_id"] in (10, 20) for p in preds)
    assert (out / "im0.png").is_file() and (out / "im0_1.png").is_file()
    w, h = Image.open(images / "im0.png").size
    assert all(p["bbox"][0] + p["bbox"][2] <= w + 1e-3 + 1 for p in preds)  # original image frame


def test_demo_pipeline_with_test_double(tmp_path, fake_zoo, monkeypatch, capsys):
    pytest.importorskip("instseg.data.synthetic")
    pytest.importorskip("instseg.visualize")
    import instseg.config.presets as presets
    from instseg.demo import run_demo

    def fake_preset(name):
        assert name == "htc_synth_cpu"
        cfg = Config(name=name)
        cfg.data.scale, cfg.data.batch_size = (96, 64), 2
        cfg.train.device, cfg.train.threads, cfg.train.max_iters, cfg.train.warmup_iters = "cpu", 1, 2, 1
        return cfg

    monkeypatch.setattr(presets, "get_preset", fake_preset)
    res = run_demo(data_dir=tmp_path / "synth", runs_dir=tmp_path / "runs",
                   synth_kwargs=dict(num_train=4, num_val=2, min_size=64, max_size=80))
    out = capsys.readouterr().out
    assert "bbox AP" in out and "segm AP" in out
    assert res["iter"] == 2 and "segm_AP" in res["metrics"]
    assert len(list(res["overlays"].glob("*.png"))) == 2
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "last.pt").is_file()


def test_cli_passthrough_commands(tmp_path, capsys):
    assert cli_main(["convert"]) == 2
    assert cli_main(["convert", "detectron"]) == 2
    assert "detectron" in capsys.readouterr().err
    assert cli_main(["data", "unknown"]) == 2
    pytest.importorskip("instseg.data.synthetic")
    out = tmp_path / "synth"
    assert cli_main(["data", "synth", "--out", str(out), "--train", "1", "--val", "1",
                     "--min-size", "64", "--max-size", "64"]) == 0
    assert (out / "annotations" / "instances_val.json").is_file()
