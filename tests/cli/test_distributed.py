"""Distributed data-parallel training and evaluation: 2 processes with gloo on CPU.

All distributed runs of this module happen in one 2-process group (``dist_jobs.run_world``; the
workers see the variables ``torchrun`` sets), the single-process references in the test process;
``test_torchrun_cli_eval`` launches ``torchrun -m instseg eval`` itself.

Why 2 x 1 image can be compared with 1 x 2 images, and how closely
-------------------------------------------------------------------
DDP averages the two ranks' gradients, i.e. it trains on ``(L(image a) + L(image b)) / 2``.  One
process with both images trains on the batch loss, which equals that mean for every term
normalised per image with the same count on each image: the RPN losses (``avg_factor`` = sampled
anchors, the same on both images), the RoI classification and box losses (divided by the number of
sampled RoIs, the same on both) and HTC's semantic loss (divided by the pixels of the feature map,
the same for images of one size).  What the test configuration arranges:

- no random draws in the model: the RPN and RoI samplers are asked for more candidates than exist,
  so every candidate is taken (otherwise each rank would draw from its own random stream and the
  single process from one stream for both images);
- the RPN's NMS is off (IoU threshold 1), so every image gets exactly ``rpn_train_post_nms``
  proposals and the RoI counts agree (NMS would keep a different number per image);
- both images of a batch have the same size and the same gt box layout (different pixels and
  classes), so the sampled-anchor counts, RoI counts and semantic pixel counts agree;
- no flips (the flip draw is per image and would be the same, but this keeps the layouts equal).

One term remains normalised over the whole batch, as in mmdetection: the mask loss is the mean over
the positive RoIs of *all* images, so with ``P_a != P_b`` positives the single process weighs each
RoI ``1 / (P_a + P_b)`` and DDP ``1 / (2 P_i)``.  That, plus float summation order, is the whole
difference (the tensors that differ most are the mask heads'); measured after 3 iterations it is
0.3 % (Mask R-CNN) and 0.45 % (HTC) of the largest weight change (``REL_TOL`` is 2 %), while a
process that trained alone on its own images, without DDP's gradient averaging, is 14 % (Mask
R-CNN) and 33 % (HTC) off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)

from instseg.config.load import to_dict  # noqa: E402
from instseg.config.schema import Config  # noqa: E402
from instseg.engine.checkpoint import load_checkpoint, load_model_from_checkpoint  # noqa: E402
from instseg.engine.trainer import train  # noqa: E402
from tests.cli.dist_jobs import run_world  # noqa: E402
from tests.models.tiny import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 6  # total batch 2 -> 3 iterations per epoch
BOXES = [(4, 6, 18, 14), (26, 20, 16, 14)]  # (x, y, w, h): the same layout on every image
REL_TOL = 0.02  # max |w_ddp - w_single| <= 2 % of max |w_single - w_init| (measured 0.3 %; module docstring)


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
    """A tiny ``arch`` (``tests/models/tiny.py``) on the same-layout data; ``take_all``: the samplers
    take every candidate (no random draws, see the module docstring)."""
    cfg = Config(name=f"{arch}_dist")
    cfg.model = tiny_config(arch)
    m = cfg.model
    m.num_classes = 2
    if take_all:
        m.rpn_batch_per_image = m.rcnn_batch_per_image = 4096
        m.rpn_nms_iou = 1.0
        m.rpn_train_pre_nms, m.rpn_train_post_nms = 100, 64  # fewer RoIs: a faster test
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
    jobs = [
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
    ]
    run_world(jobs, world_size=2, timeout_s=900)
    return {"root": root, "ann": ann, "images": images, "runs": runs}


def _max_abs_diff(a: dict, b: dict, keys: list[str]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


@pytest.mark.parametrize("arch", ["mask_rcnn", "htc"])
def test_two_processes_batch_1_equal_one_process_batch_2(world, arch, tmp_path):
    """After 3 iterations the DDP weights equal one process's with batch 2, within ``REL_TOL`` of
    the weight change (the mask-loss normalisation is the one difference, module docstring)."""
    torch.set_num_threads(1)
    init = train(make_cfg(arch, world["ann"], world["images"], batch_size=2, max_iters=0),
                 run_dir=tmp_path / "init")
    single = train(make_cfg(arch, world["ann"], world["images"], batch_size=2), run_dir=tmp_path / "single")
    assert single["iter"] == 3
    w0 = load_checkpoint(Path(init["run_dir"]) / "checkpoints" / "last.pt")["model"]
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
    read = lambda run: [json.loads(x) for x in (world["runs"] / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    train_a = [r for r in read("straight") if r["mode"] == "train"]
    train_b = [r for r in read("split") if r["mode"] == "train"]
    assert [r["iter"] for r in train_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in train_a] == [r["loss"] for r in train_b]


def test_torchrun_cli_eval(world, tmp_path):
    """``torchrun --nproc-per-node 2 -m instseg eval``: the README's command, end to end."""
    ckpt = world["runs"] / "mask_rcnn" / "checkpoints" / "last.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "instseg", "eval", "--checkpoint", str(ckpt), "--ann", str(world["ann"]),
           "--images", str(world["images"]), "--out", str(tmp_path / "eval"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("written to") == 1, "rank 0 alone reports"
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = json.loads((world["root"] / "dist_eval.json").read_text())["metrics"]
    assert {k: written[k] for k in expected} == expected
    assert written["images_evaluated"] == N_IMAGES
