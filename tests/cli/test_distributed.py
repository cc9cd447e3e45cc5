"""Distributed data-parallel training and evaluation: 2 processes with gloo on CPU.

All distributed runs of this module happen in one ``torchrun --nproc-per-node 2`` launch
(``dist_jobs.run_world``: trainings, an evaluation and ``instseg eval`` through the CLI), the
single-process references in the test process.

Why 2 x 1 image can be compared with 1 x 2 images, and how closely
-------------------------------------------------------------------
DDP averages the two ranks' gradients, i.e. it trains on ``(L(image a) + L(image b)) / 2``.  One
process with both images trains on the batch loss, which equals that mean for every term
normalised per image with the same count on each image: the RPN losses (``avg_factor`` = sampled
anchors), the RoI classification and box losses (divided by the number of sampled RoIs), the mask
loss (mean over the positive RoIs of the whole batch, as in mmdetection) and HTC's semantic loss
(divided by the pixels of the feature map).  The test configuration makes those counts equal:

- no random draws in the model: the RPN sampler is asked for more anchors than exist, so it takes
  every one (otherwise each rank would draw from its own random stream and the single process
  from one stream for both images);
- both images of a batch have the same size and the same gt box layout (different pixels and
  classes), so the anchor labels and counts agree; no flips;
- the RoI heads train on the gt boxes alone (``rpn_train_post_nms=0``; the RPN still trains), so
  every image has the same number of RoIs and of positive RoIs.  With proposals, images with
  different numbers of positive RoIs ``P_a != P_b`` are weighted differently by the mask loss
  (``1 / (P_a + P_b)`` per RoI in one process, ``1 / (2 P_i)`` under DDP), as in mmdetection;
  with 5 and 3 positives that made a 4 % difference in 3 iterations.

What remains is float rounding (summation order): the logged losses agree to 1e-6 at every
iteration, and after 3 iterations the largest weight difference is 0.06 % (Mask R-CNN) and
0.0001 % (HTC) of the largest weight change.  ``REL_TOL`` is 0.5 %.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)

from instseg.config.load import dump_yaml, to_dict  # noqa: E402
from instseg.config.schema import Config  # noqa: E402
from instseg.engine.checkpoint import load_checkpoint, load_model_from_checkpoint  # noqa: E402
from instseg.engine.trainer import train  # noqa: E402
from instseg.modeling.zoo import build_model  # noqa: E402
from tests.cli.dist_jobs import run_world  # noqa: E402
from tests.models.tiny import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow

N_IMAGES = 6  # total batch 2 -> 3 iterations per epoch
BOXES = [(4, 6, 18, 14), (26, 20, 16, 14)]  # (x, y, w, h): the same layout on every image
REL_TOL = 0.005  # max |w_ddp - w_single| <= 0.5 % of max |w_single - w_init| (measured <= 0.06 %; module docstring)


def write_same_layout_coco(root: Path) -> tuple[Path, Path]:
    """``N_IMAGES`` 40x48 images with two boxes at the same places; pixels and classes differ."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(N_IMAGES):
        h, w = 40, 48
        arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        for k, (x0, y0, bw, bh) in enumerate(BOXES):
            cat = 1 + (i + k) % 2
            arr[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(120, 255, 3) if cat == 1 else rng.integers(0, 120, 3)
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 10 * cat, "bbox": [x0, y0, bw, bh],
                         "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})
        Image.fromarray(arr).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": h, "width": w})
    cats = [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann, root / "images"


def make_cfg(arch: str, ann: Path, images: Path, *, batch_size: int, max_iters: int = 3,
             take_all: bool = True, val: bool = False) -> Config:
    """A tiny ``arch`` (``tests/models/tiny.py``) on the same-layout data.  ``take_all``: the RPN
    sampler takes every anchor and the RoI heads train on the gt boxes (equal counts on every
    image, no random draws; module docstring); else the tiny model's random sampling."""
    cfg = Config(name=f"{arch}_dist")
    cfg.model = tiny_config(arch)
    m = cfg.model
    m.num_classes = 2
    if take_all:
        m.rpn_batch_per_image = m.rcnn_batch_per_image = 4096
        m.rpn_train_post_nms = 0  # the RoI heads train on the gt boxes (see the module docstring)
    if arch == "htc":
        m.semantic_targets, m.semantic_classes = "derive", 3
    d = cfg.data
    d.train_ann, d.train_images = str(ann), str(images)
    if val:
        d.val_ann, d.val_images = str(ann), str(images)
    d.scale, d.batch_size, d.flip_prob = (64, 48), batch_size, 0.0
    t = cfg.train
    t.device, t.threads, t.lr, t.warmup_iters, t.log_interval = "cpu", 1, 0.002, 0, 1
    t.max_iters, t.lr_steps = max_iters, (100,)
    return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs every distributed job once (2 processes, 1 image each); returns the folders."""
    root = tmp_path_factory.mktemp("dist")
    ann, images = write_same_layout_coco(root / "data")
    runs = root / "runs"
    cli_cfg = make_cfg("mask_rcnn", ann, images, batch_size=1, max_iters=1)
    cli_cfg.train.output_dir = str(runs)
    dump_yaml(cli_cfg, root / "cli_train.yaml")
    jobs = [
        # the README's `torchrun ... -m instseg train`, through the CLI
        {"kind": "cli", "stdout": str(root / "cli_train"),
         "args": ["train", "--config", str(root / "cli_train.yaml"), "--name", "cli_train"]},
        {"kind": "train", "run_dir": str(runs / "mask_rcnn"),
         "config": to_dict(make_cfg("mask_rcnn", ann, images, batch_size=1, val=True))},
        {"kind": "train", "run_dir": str(runs / "htc"), "config": to_dict(make_cfg("htc", ann, images, batch_size=1))},
        # resume: random sampling (each rank's own random stream must continue), across an epoch end
        {"kind": "train", "run_dir": str(runs / "straight"),
         "config": to_dict(make_cfg("mask_rcnn", ann, images, batch_size=1, max_iters=4, take_all=False))},
        {"kind": "train", "run_dir": str(runs / "split"),
         "config": to_dict(make_cfg("mask_rcnn", ann, images, batch_size=1, max_iters=2, take_all=False))},
        {"kind": "train", "run_dir": str(runs / "split"), "resume": True,
         "config": to_dict(make_cfg("mask_rcnn", ann, images, batch_size=1, max_iters=4, take_all=False))},
        {"kind": "eval", "checkpoint": str(runs / "mask_rcnn" / "checkpoints" / "last.pt"),
         "out": str(root / "dist_eval.json")},
        # the README's `torchrun ... -m instseg eval`, through the CLI (last: it is a user command)
        {"kind": "cli", "stdout": str(root / "cli_eval"),
         "args": ["eval", "--checkpoint", str(runs / "mask_rcnn" / "checkpoints" / "last.pt"), "--ann", str(ann),
                  "--images", str(images), "--out", str(root / "cli_eval"), "--device", "cpu"]},
        {"kind": "cli", "stdout": str(root / "cli_predict"),
         "args": ["predict", "--checkpoint", str(runs / "mask_rcnn" / "checkpoints" / "last.pt"),
                  "--images", str(images), "--out", str(root / "cli_predict"), "--device", "cpu",
                  "--score-thr", "0.0"]},
    ]
    run_world(jobs, root, nproc=2, timeout_s=900)
    return {"root": root, "ann": ann, "images": images, "runs": runs}


def _max_abs_diff(a: dict, b: dict, keys: list[str]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


@pytest.mark.parametrize("arch", ["mask_rcnn", "htc"])
def test_two_processes_batch_1_equal_one_process_batch_2(world, arch, tmp_path):
    """After 3 iterations the DDP weights equal one process's with batch 2, within ``REL_TOL`` of
    the weight change (float rounding, module docstring), and so do the logged losses."""
    torch.set_num_threads(1)
    initial: dict = {}

    def build_and_keep_initial_weights(model_cfg):
        model = build_model(model_cfg)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    single = train(make_cfg(arch, world["ann"], world["images"], batch_size=2), run_dir=tmp_path / "single",
                   model_builder=build_and_keep_initial_weights)
    assert single["iter"] == 3
    w0 = initial
    ws = load_checkpoint(Path(single["run_dir"]) / "checkpoints" / "last.pt")["model"]
    dist_state = load_checkpoint(world["runs"] / arch / "checkpoints" / "last.pt")
    wd = dist_state["model"]
    assert dist_state["iter"] == 3 and len(dist_state["rng_per_rank"]) == 2
    assert wd.keys() == ws.keys() and not any(k.startswith("module.") for k in wd), "unwrapped names"
    changed = [k for k in ws if ws[k].is_floating_point() and not torch.equal(ws[k], w0[k])]
    assert len(changed) > 50, "training moved the weights"
    step = _max_abs_diff(ws, w0, changed)
    diff = _max_abs_diff(wd, ws, changed)
    assert diff <= REL_TOL * step, f"max |w_ddp - w_single| = {diff:.3g} vs weight change {step:.3g}"
    def train_records(run: Path) -> list[dict]:
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["mode"] == "train"]

    for rd, rs in zip(train_records(world["runs"] / arch), train_records(Path(single["run_dir"])), strict=True):
        for k in (k for k in rs if k.startswith("loss")):
            assert rd[k] == pytest.approx(rs[k], rel=1e-5, abs=1e-6), (rd["iter"], k)
    for k in ws:  # buffers and frozen weights: identical
        if k not in changed and ws[k].is_floating_point():
            assert torch.allclose(wd[k], ws[k], rtol=0, atol=1e-6), k


def test_rank_zero_alone_writes_the_run(world):
    run = world["runs"] / "mask_rcnn"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if r["mode"] == "train"] == [1, 2, 3]  # once, not once per rank
    assert [r["mode"] for r in lines].count("val") == 1
    assert (run / "config.yaml").is_file() and (run / "plots").is_dir()
    assert not (world["runs"] / "mask_rcnn_1").exists(), "rank 1 did not start a run folder of its own"


def test_distributed_evaluation_equals_single_process(world):
    """Sharded evaluation (in the trainer at the end of the epoch, and standalone) gives exactly the
    metrics of one process evaluating the same weights."""
    from instseg.data import build_dataset
    from instseg.engine.inference import run_evaluation

    torch.set_num_threads(1)
    model, cfg, classes = load_model_from_checkpoint(world["runs"] / "mask_rcnn" / "checkpoints" / "last.pt", "cpu")
    single = run_evaluation(model, build_dataset(cfg.data, "val"), cfg, None, cat_ids=classes["cat_ids"],
                            verbose=False).metrics
    assert single["bbox_AP"] >= 0 and "segm_AP" in single
    got = json.loads((world["root"] / "dist_eval.json").read_text())
    assert got["metrics"] == single
    assert got["every_rank"] == [single, single], "every rank returns the metrics"
    lines = [json.loads(x) for x in (world["runs"] / "mask_rcnn" / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in lines if r["mode"] == "val")
    assert {k: val[k] for k in single} == single


def test_distributed_resume_continues_exactly(world):
    """2 + 2 iterations with a resume in between (mid-epoch, random sampling on each rank) end with
    the weights, optimizer state and losses of 4 uninterrupted iterations."""
    a = load_checkpoint(world["runs"] / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(world["runs"] / "split" / "checkpoints" / "last.pt")
    assert a["iter"] == b["iter"] == 4 and (b["epoch"], b["batch_in_epoch"]) == (1, 1)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    def train_records(run: str) -> list[dict]:
        lines = (world["runs"] / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["mode"] == "train"]

    train_a, train_b = train_records("straight"), train_records("split")
    assert [r["iter"] for r in train_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in train_a] == [r["loss"] for r in train_b]


def test_torchrun_cli_train(world):
    """``torchrun --nproc-per-node 2 -m instseg train``: one run folder, rank 0 alone reports."""
    root, runs = world["root"], world["runs"]
    assert "run: " in (root / "cli_train.rank0").read_text()
    assert (root / "cli_train.rank1").read_text() == "", "rank 1 prints nothing"
    assert load_checkpoint(runs / "cli_train" / "checkpoints" / "last.pt")["iter"] == 1
    assert not (runs / "cli_train_1").exists()


def test_torchrun_cli_eval(world):
    """``torchrun --nproc-per-node 2 -m instseg eval``, the README's command: rank 0 alone reports
    and writes, with the metrics of the other evaluations."""
    root = world["root"]
    assert "written to" in (root / "cli_eval.rank0").read_text()
    assert (root / "cli_eval.rank1").read_text() == "", "rank 1 prints nothing"
    written = json.loads((root / "cli_eval" / "metrics.json").read_text())
    expected = json.loads((root / "dist_eval.json").read_text())["metrics"]
    assert {k: written[k] for k in expected} == expected
    assert written["images_evaluated"] == N_IMAGES


def test_torchrun_cli_predict_equals_single_process(world, tmp_path):
    """``torchrun --nproc-per-node 2 -m instseg predict``: each rank draws its images, rank 0 writes
    the JSON files, and they equal one process's (same image ids, order and detections)."""
    from instseg.cli import main as cli_main

    root = world["root"]
    ckpt = world["runs"] / "mask_rcnn" / "checkpoints" / "last.pt"
    assert cli_main(["predict", "--checkpoint", str(ckpt), "--images", str(world["images"]), "--out",
                     str(tmp_path), "--device", "cpu", "--score-thr", "0.0"]) == 0
    for name in ("predictions.json", "images.json"):
        assert json.loads((root / "cli_predict" / name).read_text()) == json.loads((tmp_path / name).read_text()), name
    assert sorted(p.name for p in (root / "cli_predict").glob("*.png")) == sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(json.loads((tmp_path / "images.json").read_text())["images"]) == N_IMAGES
    assert (root / "cli_predict.rank1").read_text() == ""

