"""Trainer quality of life: metrics.csv, TensorBoard, early stopping, EMA, run folders, skipping
non-finite steps (with the tiny test-double detector of test_engine)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

import instseg.engine.trainer as trainer_mod
from instseg.cli import main as cli_main
from instseg.config.load import dump_yaml
from instseg.engine.checkpoint import load_checkpoint, load_model_from_checkpoint
from instseg.engine.ema import ModelEMA
from instseg.engine.inference import EvalOutcome
from instseg.engine.trainer import train
from tests.cli.test_engine import TinyDetector, builder, tiny_cfg, write_tiny_coco

IPE = 4  # 7 images, batch 2 -> 4 iterations per epoch


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("tinycoco_qol"))


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scripted_eval(values, seen=None):
    """A stand-in for run_evaluation: the metric of the evaluation at iteration i is values[i // IPE - 1]."""

    def fake(model, dataset, cfg, out_dir, *, cat_ids=None, verbose=True, **kw):
        it = fake.trainer_iter()
        if seen is not None:
            seen.append((it, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        v = values[it // IPE - 1]
        return EvalOutcome({"segm_AP": v, "bbox_AP": v}, [], len(dataset))

    return fake


@pytest.fixture
def scripted(monkeypatch):
    """Patches the trainer's evaluation with a scripted metric sequence; returns a setter."""
    current = {}

    orig_run = trainer_mod.Trainer.run

    def run(self):
        current["trainer"] = self
        return orig_run(self)

    monkeypatch.setattr(trainer_mod.Trainer, "run", run)

    def use(values, seen=None):
        fake = _scripted_eval(values, seen)
        fake.trainer_iter = lambda: current["trainer"].iter
        monkeypatch.setattr(trainer_mod, "run_evaluation", fake)

    return use


# ------------------------------------------------------------------------------- early stopping

SEQ = [0.1, 0.3, 0.2, 0.25, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9]  # best 0.3 at eval 2; evals 3, 4, 5 do not beat it


def test_early_stopping_stops_at_the_expected_evaluation(tiny_data, tmp_path, scripted):
    scripted(SEQ)
    res = train(tiny_cfg(*tiny_data, max_iters=40, patience=3), run_dir=tmp_path / "es", model_builder=builder)
    assert res["iter"] == 5 * IPE  # stopped right after the 5th evaluation
    assert res["stopped"].startswith("early stopping: segm_AP did not improve for 3 evaluations")
    assert res["best"]["value"] == 0.3 and res["best"]["iter"] == 2 * IPE
    recs = _records(tmp_path / "es")
    assert [r["evals_without_improvement"] for r in recs if r["mode"] == "val"] == [0, 0, 1, 2, 3]
    stop = [r for r in recs if r["mode"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == res["stopped"] and stop[0]["iter"] == 20


def test_early_stopping_survives_resume(tiny_data, tmp_path, scripted):
    scripted(SEQ)
    run = tmp_path / "es_resume"
    first = train(tiny_cfg(*tiny_data, max_iters=3 * IPE, patience=3), run_dir=run, model_builder=builder)
    assert first["stopped"] in ("max_iters", "completed")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["early_stop"] == {"bad_evals": 1}
    res = train(tiny_cfg(*tiny_data, max_iters=40, patience=3), run_dir=run, resume=True, model_builder=builder)
    assert res["iter"] == 5 * IPE and res["stopped"].startswith("early stopping")
    # resuming a run that stopped early does nothing more
    again = train(tiny_cfg(*tiny_data, max_iters=40, patience=3), run_dir=run, resume=True, model_builder=builder)
    assert again["iter"] == 5 * IPE and again["stopped"].startswith("early stopping")


# ------------------------------------------------------------------------------------------ EMA


def test_ema_update_rule():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.5, tau=0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.0))
    ramp = ModelEMA(model, decay=0.9, tau=10)
    ramp.updates = 10
    assert ramp.current_decay() == pytest.approx(0.9 * (1 - torch.exp(torch.tensor(-1.0)).item()))


def test_ema_weights_are_evaluated_and_in_best_pt(tiny_data, tmp_path, scripted):
    seen = []
    scripted([0.1, 0.2, 0.3, 0.4], seen)
    run = tmp_path / "ema"
    cfg = tiny_cfg(*tiny_data, max_iters=2 * IPE, ema=True, ema_decay=0.6, ema_tau=0)
    train(cfg, run_dir=run, model_builder=builder)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert last["ema"]["updates"] == 2 * IPE
    ema_w, raw_w = last["ema"]["model"], last["model"]
    assert not torch.equal(ema_w["conv.weight"], raw_w["conv.weight"])
    for k in ema_w:  # best.pt (the last evaluation was the best) holds the EMA weights
        assert torch.equal(best["model"][k], ema_w[k]), k
    assert seen[-1][0] == 2 * IPE
    for k, v in seen[-1][1].items():  # and the evaluation ran on them
        assert torch.equal(v, ema_w[k]), k
    # inference from last.pt uses the EMA weights too
    model, _, _ = load_model_from_checkpoint(run / "checkpoints" / "last.pt", model_builder=builder)
    assert torch.equal(model.state_dict()["conv.weight"], ema_w["conv.weight"])


def test_ema_resume_is_exact(tiny_data, tmp_path, scripted):
    scripted([0.1] * 10)
    straight, split = tmp_path / "a", tmp_path / "b"
    cfg = dict(ema=True, ema_decay=0.7, ema_tau=3)
    train(tiny_cfg(*tiny_data, max_iters=6, **cfg), run_dir=straight, model_builder=builder)
    train(tiny_cfg(*tiny_data, max_iters=3, **cfg), run_dir=split, model_builder=builder)
    train(tiny_cfg(*tiny_data, max_iters=6, **cfg), run_dir=split, resume=True, model_builder=builder)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["ema"]
    b = load_checkpoint(split / "checkpoints" / "last.pt")["ema"]
    assert a["updates"] == b["updates"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ------------------------------------------------------------------------------ logs and folders


def test_metrics_csv_beside_jsonl(tiny_data, tmp_path, scripted):
    scripted([0.1, 0.2])
    run = tmp_path / "csv"
    train(tiny_cfg(*tiny_data), run_dir=run, model_builder=builder)
    recs = _records(run)
    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    assert len(rows) == len(recs)
    assert {"mode", "iter", "loss", "lr", "segm_AP", "reason"} <= set(rows[0])
    assert [r["mode"] for r in rows] == [r["mode"] for r in recs]
    train_rows = [r for r in rows if r["mode"] == "train"]
    assert [float(r["loss"]) for r in train_rows] == pytest.approx([r["loss"] for r in recs if r["mode"] == "train"])


def test_a_new_run_never_overwrites_an_earlier_one(tiny_data, tmp_path, capsys, scripted):
    scripted([0.1, 0.2])
    run = tmp_path / "runs" / "same"
    first = train(tiny_cfg(*tiny_data, max_iters=2), run_dir=run, model_builder=builder)
    log_before = (run / "metrics.jsonl").read_text()
    best_before = (run / "checkpoints" / "best.pt").read_bytes()
    second = train(tiny_cfg(*tiny_data, max_iters=1), run_dir=run, model_builder=builder)
    assert first["run_dir"] == str(run) and second["run_dir"] == str(run.with_name("same_1"))
    assert "already holds a run" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == log_before
    assert (run / "checkpoints" / "best.pt").read_bytes() == best_before
    assert load_checkpoint(run.with_name("same_1") / "checkpoints" / "last.pt")["iter"] == 1
    third = train(tiny_cfg(*tiny_data, max_iters=1), run_dir=run, model_builder=builder)
    assert third["run_dir"] == str(run.with_name("same_2"))


def test_tensorboard_logs_when_installed(tiny_data, tmp_path, scripted):
    pytest.importorskip("tensorboard")
    scripted([0.1, 0.2])
    run = tmp_path / "tb"
    train(tiny_cfg(*tiny_data, max_iters=2, tensorboard=True), run_dir=run, model_builder=builder)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "val/segm_AP"} <= set(acc.Tags()["scalars"])


def test_tensorboard_missing_is_a_one_line_error(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    cfg = tiny_cfg(*tiny_data, max_iters=1, tensorboard=True)
    cfg.train.output_dir = str(tmp_path / "runs")
    path = tmp_path / "c.yaml"
    dump_yaml(cfg, path)
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'instseg[tensorboard]'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing started


# --------------------------------------------------------------------------------- skip_nonfinite


class NanOnce(TinyDetector):
    """NaN loss on the second call only; records the weights it sees at each call."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.weights = []

    def forward(self, batch, targets):
        self.weights.append(self.conv.weight.detach().clone())
        out = super().forward(batch, targets)
        if self.calls == 2:
            out = {**out, "loss": out["loss"] * float("nan"), "loss_bbox": out["loss_bbox"] * float("nan")}
        return out


def test_skip_nonfinite_skips_the_step_and_goes_on(tiny_data, tmp_path, capsys):
    made = []

    def build(model_cfg):
        made.append(NanOnce(model_cfg.num_classes))
        return made[-1]

    run = tmp_path / "skip"
    cfg = tiny_cfg(*tiny_data, skip_nonfinite=True)
    cfg.data.val_ann = ""  # no evaluation needed here
    res = train(cfg, run_dir=run, model_builder=build)
    assert res["iter"] == 6 and res["stopped"] == "max_iters"
    w = made[0].weights
    assert torch.equal(w[1], w[2])  # the NaN iteration (call 2) did not update the weights
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[2], w[3])  # the others did
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert state["skipped_steps"] == 1
    assert "loss_bbox=nan" in capsys.readouterr().out
    recs = _records(run)
    train_recs = [r for r in recs if r["mode"] == "train"]
    assert [r["skipped_steps"] for r in train_recs] == [0, 1, 1, 1, 1, 1]
    assert all(isinstance(r["loss"], float) for r in train_recs if r["iter"] != 2)
    assert [r["skipped_steps"] for r in recs if r["mode"] == "stop"] == [1]
