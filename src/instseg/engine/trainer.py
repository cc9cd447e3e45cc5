"""The training loop: SGD with warmup + step schedule, AMP, periodic COCO eval, exact resume.

A run lives in ``runs/NAME/`` (``cfg.train.output_dir / cfg.name`` unless ``run_dir`` is given)::

    config.yaml            the fully resolved config
    metrics.jsonl          one JSON object per logged step ("mode": "train"), per evaluation
                           ("mode": "val") and one at the end ("mode": "stop", with the "reason")
    metrics.csv            the same records as a table (one column per key)
    tensorboard/           TensorBoard events (``train.tensorboard=true``; needs the ``tensorboard`` extra)
    checkpoints/last.pt    every ``checkpoint_interval`` epochs, at the end, and on the time budget
    checkpoints/best.pt    whenever val segm_AP (bbox_AP for box-only models) improves
    eval/                  results.json, metrics.json, summary.txt, per-class / PR / confusion reports
                           of the latest evaluation
    plots/                 loss / AP curves

A new run never overwrites an earlier one: when the folder already holds a run (``config.yaml``,
``metrics.jsonl`` or ``checkpoints/``) and ``resume`` is off, the run goes to ``NAME_1`` (``NAME_2``,
...) and says so; the folder actually used is ``result['run_dir']``.

Resume (``resume=True``) restores model, optimizer, AMP scaler, iteration, epoch, position in the
epoch (the data loader skips the batches already done), the RNG states, the EMA weights and the
early-stopping counter, so a run that is stopped and resumed ends with the same weights as one that
was never stopped.

Options (``train.*``):

- ``patience`` > 0: early stopping.  After each evaluation, if the primary metric (segm_AP, else
  bbox_AP) did not beat the best so far, a counter goes up (else it is reset); when it reaches
  ``patience`` training stops, with the reason in ``result['stopped']`` and in the ``stop`` record.
- ``ema``: an exponential moving average of the weights (``instseg.engine.ema``); evaluations run
  on it, ``best.pt`` holds it as its ``model``, and ``last.pt`` keeps both (``model`` for resuming,
  ``ema`` for inference, which ``load_model_from_checkpoint`` prefers).
- ``skip_nonfinite``: an iteration whose loss is NaN/inf skips its optimizer step (no update,
  gradients cleared) with a warning naming the loss terms; the count is ``skipped_steps`` in the
  train records.  Off (default): such a loss stops training with ``NonFiniteLossError``.
- ``tensorboard``: also log every record to ``RUN/tensorboard``.
- ``init_from``: a new run (not ``--resume``) starts from the weights of another checkpoint
  (names and shapes that fit; the rest is reported), e.g. RDSNet's second, MBRM-only stage.
- ``amp``: ``fp16`` (with a grad scaler) or ``bf16`` autocast on CUDA (bf16 also on CPU);
  losses, box decoding and NMS run in float32 (see ``instseg.engine.amp``).

Distributed (started by ``torchrun``, see ``instseg.engine.distributed``): every process trains on
its ``data.batch_size`` images of each total batch (``GroupedBatchSampler``) in a
``DistributedDataParallel`` model (NCCL on CUDA, one GPU per process; gloo on CPU), so one step
with N processes is one step of the total batch ``N * data.batch_size``.  ``train.sync_bn``
converts BatchNorm to SyncBatchNorm (CUDA); ``train.auto_scale_lr`` scales ``train.lr`` by
``N * data.batch_size / train.base_batch_size``.  Only rank 0 writes the run folder (config,
metrics, plots, checkpoints) and prints; the logged losses are the means over the ranks.  Every
rank saves its RNG state in ``last.pt`` (``rng_per_rank``), so a resumed distributed run (same
number of processes) continues exactly.  Evaluation shards the images over the ranks and computes
the COCO metrics once (``instseg.engine.inference.run_evaluation``).
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from instseg.config.load import ConfigError, dump_yaml, to_dict
from instseg.config.schema import Config, TrainConfig
from instseg.engine import distributed as dist_utils
from instseg.engine.amp import amp_dtype, autocast
from instseg.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from instseg.engine.ema import ModelEMA
from instseg.engine.inference import format_metrics, primary_metric, run_evaluation
from instseg.engine.logging import MetricsLogger, RunningMeans, require_tensorboard
from instseg.engine.logging import console as _console_all_ranks
from instseg.engine.schedule import lr_at, steps_to_iters


def console(msg: str) -> None:
    """Prints on rank 0 only (every process of a distributed run would print the same line)."""
    if dist_utils.is_main():
        _console_all_ranks(msg)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


def resolve_device(name: str) -> torch.device:
    """``'auto'`` = CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _semantic_args(cfg: Config) -> dict:
    if cfg.model.semantic and cfg.model.semantic_targets == "derive":
        return {"semantic": "derive", "num_semantic_classes": None}  # num_classes + 1, see _setup
    if cfg.model.semantic and cfg.model.semantic_targets != "none":
        return {"semantic": cfg.model.semantic_targets, "num_semantic_classes": cfg.model.semantic_classes}
    return {"semantic": "none", "num_semantic_classes": None}


def _holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def fresh_run_dir(run_dir: Path) -> Path:
    """``run_dir`` when it holds no earlier run, else the first free ``run_dir_1``, ``run_dir_2``, ..."""
    if not _holds_a_run(run_dir):
        return run_dir
    k = 1
    while _holds_a_run(run_dir.with_name(f"{run_dir.name}_{k}")):
        k += 1
    return run_dir.with_name(f"{run_dir.name}_{k}")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys.extend(_config_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(params: list[nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: ``sgd`` (mmdetection's default: momentum, L2 weight decay) or ``adamw``
    (decoupled weight decay, torch's default betas; what the golden fixtures were trained with)."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {tc.optimizer!r}")


class Trainer:
    """Trains ``cfg`` (see module docstring). ``model_builder`` defaults to ``zoo.build_model``."""

    def __init__(
        self,
        cfg: Config,
        *,
        resume: bool = False,
        run_dir: str | Path | None = None,
        model_builder: Callable[[Any], nn.Module] | None = None,
        pinned: Any = (),
    ):
        """``pinned``: config keys the user set explicitly (``--set`` / ``--cfg-file``); a pinned
        ``model.semantic_classes`` that does not fit the data is an error instead of being derived."""
        self.cfg = copy.deepcopy(cfg)
        self.pinned = set(pinned)
        self.resume = resume
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.train.output_dir) / cfg.name
        if model_builder is None:
            from instseg.modeling.zoo import build_model as model_builder
        self.model_builder = model_builder

    # ------------------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        from instseg.data import DataError, build_dataset, build_train_loader

        cfg, tc = self.cfg, self.cfg.train
        # join the process group first: everything below may print, and only rank 0 prints
        self.device = resolve_device(tc.device)
        self._owns_group = not dist_utils.is_initialized()
        self.dist = dist_utils.init_from_env(self.device.type)
        self._owns_group = self._owns_group and dist_utils.is_initialized()
        self.device = dist_utils.local_device(self.device)
        self.is_main = self.dist.rank == 0
        self.amp_dtype = amp_dtype(tc.amp, self.device)
        if tc.tensorboard and self.is_main:  # fail before the (maybe long) data loading, not after
            require_tensorboard()
        if not self.resume:
            fresh = fresh_run_dir(self.run_dir) if self.is_main else self.run_dir
            fresh = dist_utils.broadcast_object(fresh)  # rank 0 decides; the others may see its new folder
            if fresh != self.run_dir:
                console(f"note: {self.run_dir} already holds a run; this new run goes to {fresh} "
                        "(use --resume to continue the old one, or --name to choose a name)")
                self.run_dir = fresh
        self.ckpt_dir = self.run_dir / "checkpoints"
        last = self.ckpt_dir / "last.pt"
        resume_state = None
        if self.resume:
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
            resume_state = load_checkpoint(last)
            self._check_resume_config(resume_state)

        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        seed_everything(tc.seed)  # the same seed on every rank: DDP starts from rank 0's weights anyway
        self.amp = self.amp_dtype == torch.float16  # the grad scaler is for float16 only

        self.train_ds = build_dataset(cfg.data, "train", **_semantic_args(cfg))
        self.cat_ids = [int(c) for c in self.train_ds.cat_ids]
        self.classes = {"cat_ids": self.cat_ids, "class_names": [str(n) for n in self.train_ds.class_names]}
        if cfg.model.num_classes != len(self.cat_ids):
            console(
                f"note: model.num_classes={cfg.model.num_classes} but the training data has "
                f"{len(self.cat_ids)} categories; using num_classes={len(self.cat_ids)}"
            )
            cfg.model.num_classes = len(self.cat_ids)
        self._fit_semantic_classes()
        if self.train_ds.stuff_dir is not None:  # out-of-range labels are an error now, not a skip later
            n = self.train_ds.check_stuff_maps(progress=True)
            console(f"checked {n} stuff maps in {self.train_ds.stuff_dir}")
        self.val_ds = None
        if cfg.data.val_ann or cfg.data.val_fraction > 0:
            self.val_ds = build_dataset(cfg.data, "val")
            unknown = sorted(set(int(c) for c in self.val_ds.cat_ids) - set(self.cat_ids))
            if unknown:
                raise DataError(
                    f"validation annotations {cfg.data.val_ann} have category ids {unknown} that the "
                    f"training data ({cfg.data.train_ann}) does not have"
                )

        self.build_train_loader = build_train_loader
        self.iters_per_epoch = len(self._loader(epoch=0))
        if self.iters_per_epoch == 0:
            raise DataError(f"no training batches from {cfg.data.train_ann}")
        ipe = self.iters_per_epoch
        if tc.max_iters > 0:
            self.total_iters = int(tc.max_iters)
            self.num_epochs = math.ceil(self.total_iters / ipe)
            self.steps = steps_to_iters(tc.lr_steps, ipe, by_epoch=False)
        else:
            self.total_iters = int(tc.epochs) * ipe
            self.num_epochs = int(tc.epochs)
            self.steps = steps_to_iters(tc.lr_steps, ipe, by_epoch=True)

        self.base_lr = self._scaled_lr()
        self.model = self.model_builder(cfg.model).to(self.device)
        if tc.init_from and resume_state is None:
            self._init_weights(tc.init_from)
        self._maybe_sync_bn()
        self.ema = ModelEMA(self.model, decay=tc.ema_decay, tau=tc.ema_tau) if tc.ema else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, tc)  # its lr is set every step (_step: self.base_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.iter, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.seconds_before = 0.0  # training time of earlier sessions of this run (resume)
        self._session_start = time.time()
        if tc.budget_lr_steps:
            if tc.max_minutes <= 0:
                raise ConfigError("train.budget_lr_steps are fractions of train.max_minutes: set train.max_minutes > 0")
            if any(not 0.0 < f < 1.0 for f in tc.budget_lr_steps):
                raise ConfigError(f"train.budget_lr_steps must be fractions in (0, 1), got {list(tc.budget_lr_steps)}")
            self.steps = []  # filled with the iteration at which each budget fraction is reached
        self.best: dict[str, Any] = {"metric": None, "value": None}
        self.early_stop: dict[str, Any] = {"bad_evals": 0}
        self.skipped_steps = 0
        if resume_state is not None:
            self._load_state(resume_state, last)
        # DDP after the weights are final: it broadcasts rank 0's parameters and buffers to all ranks
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                # None: the inputs are already on this process's device; DDP would otherwise rebuild
                # the ImageBatch / ImageTargets dataclasses to move them
                device_ids=None,
                find_unused_parameters=False,  # every parameter gets a gradient (Detector.forward)
            )

        self.logger = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            self.logger = MetricsLogger(
                self.run_dir / "metrics.jsonl",
                fresh=resume_state is None,
                keep_until_iter=self.iter if resume_state is not None else None,
                tensorboard_dir=self.run_dir / "tensorboard" if tc.tensorboard else None,
            )
        dist_utils.barrier()  # the run folder exists before any rank goes on
        # On resume the RNG states are restored once the first data iterator exists: building the
        # model draws random numbers, and so does creating a DataLoader iterator (its base seed).
        self._pending_rng = self._rank_rng(resume_state) if resume_state is not None else None
        if resume_state is not None:
            console(
                f"resumed {self.run_dir} at iteration {self.iter} "
                f"(epoch {self.epoch + 1}, batch {self.batch_in_epoch} of {ipe})"
            )

    def _loader(self, epoch: int, start_batch: int = 0):
        """This rank's training loader of ``epoch`` (see ``build_train_loader``)."""
        return self.build_train_loader(
            self.cfg.data, self.train_ds, seed=self.cfg.train.seed, epoch=epoch, start_batch=start_batch,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )

    def _scaled_lr(self) -> float:
        """``train.lr``, times ``total batch / train.base_batch_size`` with ``train.auto_scale_lr``
        (mmdetection's linear scaling rule; off by default, as there)."""
        tc = self.cfg.train
        total = self.dist.world_size * self.cfg.data.batch_size
        if not tc.auto_scale_lr:
            if self.dist.distributed:
                console(f"distributed: {self.dist.world_size} processes x {self.cfg.data.batch_size} images = "
                        f"total batch {total}; lr {tc.lr:g} as configured (train.auto_scale_lr=false)")
            return float(tc.lr)
        if tc.base_batch_size < 1:
            raise ConfigError(f"train.base_batch_size must be >= 1, got {tc.base_batch_size}")
        lr = float(tc.lr) * total / tc.base_batch_size
        console(f"train.auto_scale_lr: total batch {self.dist.world_size} x {self.cfg.data.batch_size} = {total}, "
                f"base batch {tc.base_batch_size}: lr {tc.lr:g} -> {lr:g}")
        return lr

    def _maybe_sync_bn(self) -> None:
        """``train.sync_bn``: BatchNorm -> SyncBatchNorm (statistics over all ranks' images).

        The converted layers keep their parameters (and ``requires_grad``), and backbones with
        ``norm_eval`` keep every ``_BatchNorm`` (SyncBatchNorm included) in eval mode, so frozen BN
        stays frozen.  PyTorch's SyncBatchNorm trains on CUDA only; on CPU the layers stay per process.
        """
        if not self.cfg.train.sync_bn:
            return
        if not self.dist.distributed:
            console("note: train.sync_bn has no effect in a single process")
            return
        if self.device.type != "cuda":
            console("note: train.sync_bn needs CUDA (SyncBatchNorm); BatchNorm stays per process on CPU")
            return
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def _rank_rng(self, state: dict) -> dict:
        """This rank's RNG state from a checkpoint: its own when the checkpoint was written by as
        many processes, else rank 0's (with a note: the run goes on, but not as the stopped one would
        have, since the total batch, hence the data order and the random draws, changed)."""
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        console(f"note: the checkpoint was written by {len(per_rank)} process(es), this run has "
                f"{self.dist.world_size}: training continues from its weights and position, but with a "
                "different total batch it does not repeat what the stopped run would have done")
        return state["rng"]

    def _init_weights(self, path: str) -> None:
        """``train.init_from``: a new run starts from another checkpoint's weights.

        The checkpoint is an instseg one (its EMA weights when it kept them) or an mmdetection one
        (converted on the fly).  Every tensor whose name and shape fit is loaded; the others keep the
        fresh init the model's constructors gave them (e.g. a new class count's ``fc_cls`` / mask
        logits / focal-loss prior bias).  ``RUN/init_skipped.json`` lists both sides of the mismatch;
        ``train.init_strict`` makes any mismatch an error.
        """
        import json  # (local: keeps this feature's edits inside this method)

        from instseg.engine.checkpoint import read_init_weights

        weights, source = read_init_weights(path, self.cfg.model.arch)
        own = self.model.state_dict()
        fit = {k: v for k, v in weights.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not fit:
            raise CheckpointError(f"train.init_from: no tensor of {path} fits the model built from this config")
        kept = sorted(set(own) - set(fit))
        unused = sorted(set(weights) - set(fit))
        report = {
            "init_from": str(path),
            "source": source,
            "loaded": len(fit),
            "model_tensors": len(own),
            # model tensors that keep their fresh init (absent from the checkpoint, or another shape)
            "kept_init": [{"key": k, "model_shape": list(own[k].shape),
                           "checkpoint_shape": list(weights[k].shape) if k in weights else None} for k in kept],
            # checkpoint tensors that were not loaded (no such model key, or another shape)
            "unused": [{"key": k, "checkpoint_shape": list(weights[k].shape),
                        "model_shape": list(own[k].shape) if k in own else None} for k in unused],
        }
        if self.cfg.train.init_strict and (kept or unused):
            first = report["kept_init"][0] if kept else report["unused"][0]
            raise CheckpointError(
                f"train.init_strict: {len(kept)} model tensors and {len(unused)} tensors of {path} do not fit "
                f"(e.g. {first['key']}: checkpoint {first['checkpoint_shape']} vs model {first['model_shape']}); "
                "set train.init_strict=false to load only what fits"
            )
        self.model.load_state_dict(fit, strict=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "init_skipped.json").write_text(json.dumps(report, indent=1) + "\n")
        console(f"initialised {len(fit)} of {len(own)} tensors from {path} ({source})"
                + (f"; {len(kept)} keep their init (e.g. {kept[:3]})" if kept else "")
                + (f"; {len(unused)} of the checkpoint's do not fit (e.g. {unused[:3]})" if unused else "")
                + f"; list in {self.run_dir / 'init_skipped.json'}")

    def _fit_semantic_classes(self) -> None:
        """``semantic_targets=derive`` maps have ``num_classes + 1`` classes (0 = background)."""
        m = self.cfg.model
        if not (m.semantic and m.semantic_targets == "derive"):
            return
        want = m.num_classes + 1
        if m.semantic_classes == want:
            return
        if "model.semantic_classes" in self.pinned:
            raise ConfigError(
                f"model.semantic_classes={m.semantic_classes} does not fit model.semantic_targets=derive: "
                f"derived maps have num_classes + 1 = {want} classes (0 = background, label + 1 = class); "
                f"set model.semantic_classes={want} or leave it out"
            )
        console(f"note: model.semantic_targets=derive: using model.semantic_classes={want} "
                f"(num_classes + 1) instead of {m.semantic_classes}")
        m.semantic_classes = want

    def _check_resume_config(self, state: dict) -> None:
        saved = state.get("config") or {}
        now = to_dict(self.cfg)
        diff = [k for k in _config_diff(saved, now) if k not in ("model.num_classes", "model.backbone_weights")]
        if diff:  # a model that no longer fits the weights fails in _load_state with a clear message
            console(f"note: resuming with config changes: {', '.join(diff)}")

    def _load_state(self, state: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from e
        if state.get("scaler") and self.amp:
            self.scaler.load_state_dict(state["scaler"])
        if [int(c) for c in (state.get("classes") or {}).get("cat_ids", self.cat_ids)] != self.cat_ids:
            raise CheckpointError(f"cannot resume from {path}: the training data's categories changed")
        self.iter = int(state["iter"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best = dict(state.get("best") or self.best)
        self.early_stop = dict(state.get("early_stop") or self.early_stop)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.seconds_before = float(state.get("train_seconds") or 0.0)
        if self.cfg.train.budget_lr_steps:
            self.steps = [int(v) for v in state.get("lr_steps_taken") or []]
        if self.ema is not None:
            if state.get("ema"):
                try:
                    self.ema.load_state_dict(state["ema"])
                except (KeyError, RuntimeError) as e:
                    raise CheckpointError(f"cannot resume the EMA weights from {path}: {e}") from e
            else:
                console(f"note: {path} has no EMA weights (train.ema was off); the EMA starts from the current weights")
                self.ema = ModelEMA(self.model, decay=self.cfg.train.ema_decay, tau=self.cfg.train.ema_tau)

    def state_dict(self) -> dict:
        """The resumable state (a collective when distributed: every rank must call it)."""
        rng = capture_rng_state()
        rng_per_rank = dist_utils.all_gather_object(rng)
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "config": to_dict(self.cfg),
            "classes": self.classes,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "epoch": self.epoch,
            "iter": self.iter,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng,
            "rng_per_rank": rng_per_rank,
            "best": dict(self.best),
            "early_stop": dict(self.early_stop),
            "skipped_steps": self.skipped_steps,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "train_seconds": self.train_seconds(),
            "lr_steps_taken": list(self.steps) if self.cfg.train.budget_lr_steps else None,
        }

    # ------------------------------------------------------------------------------ loop

    def _save_last(self) -> None:
        state = self.state_dict()  # on every rank: it gathers the RNG states
        if self.is_main:
            save_checkpoint(self.ckpt_dir / "last.pt", state)
        dist_utils.barrier()  # last.pt is complete before any rank goes on (or exits)
        self._saved_at = self.iter

    def eval_model(self) -> nn.Module:
        """The weights evaluations run on: the EMA copy when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def _evaluate(self) -> dict[str, float]:
        rng = capture_rng_state()  # evaluation must not change the training's random stream
        outcome = run_evaluation(
            self.eval_model(), self.val_ds, self.cfg, self.run_dir / "eval", cat_ids=self.cat_ids, verbose=False,
            amp=self.amp_dtype,
        )
        metrics = outcome.metrics
        restore_rng_state(rng)
        self.model.train()
        self._evaluated_at = self.iter
        record = {"mode": "val", "iter": self.iter, "epoch": self.epoch, **metrics}
        if outcome.left_out:
            record["images_left_out"] = [x.file_name for x in outcome.left_out]
            for x in outcome.left_out:
                console(f"warning: evaluation left out {x.file_name}: {x.reason}")
        where = self.cfg.data.val_ann or (
            f"{len(self.val_ds)} images held out of {self.cfg.data.train_ann} (data.val_fraction)")
        console(f"[iter {self.iter}] COCO evaluation on {where}:\n{format_metrics(metrics)}")
        key = primary_metric(metrics)
        if key is not None:
            value = float(metrics[key])
            if self.best.get("value") is None or self.best.get("metric") != key or value > self.best["value"]:
                self.best = {"metric": key, "value": value, "iter": self.iter}
                self.early_stop["bad_evals"] = 0
                state = self.state_dict()
                if self.ema is not None:  # best.pt is for inference: it holds the weights evaluated
                    state["model"] = self.ema.module.state_dict()
                if self.is_main:
                    save_checkpoint(self.ckpt_dir / "best.pt", state)
                console(f"new best {key}={value:.4f} -> {self.ckpt_dir / 'best.pt'}")
            else:
                self.early_stop["bad_evals"] = int(self.early_stop.get("bad_evals", 0)) + 1
            if self.cfg.train.patience > 0:
                record["evals_without_improvement"] = self.early_stop["bad_evals"]
        self._log(record)
        return metrics

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def _early_stop_reason(self) -> str | None:
        patience = self.cfg.train.patience
        bad = int(self.early_stop.get("bad_evals", 0))
        if patience <= 0 or bad < patience:
            return None
        return (f"early stopping: {self.best.get('metric')} did not improve for {bad} evaluations "
                f"(train.patience={patience}; best {self.best.get('value'):.4f} at iteration {self.best.get('iter')})")

    def train_seconds(self) -> float:
        """Wall-clock seconds this run has trained, over all its sessions (resume)."""
        return self.seconds_before + (time.time() - self._session_start)

    def _budget_lr_steps(self) -> None:
        """``train.budget_lr_steps``: records the current iteration as the next lr step once its
        fraction of the time budget has passed."""
        tc = self.cfg.train
        done = len(self.steps)
        # rank 0's clock decides for all ranks: ranks with different lr steps would drift apart
        if done < len(tc.budget_lr_steps) and dist_utils.broadcast_object(
            self.train_seconds() >= tc.budget_lr_steps[done] * tc.max_minutes * 60
        ):
            self.steps.append(self.iter)
            console(f"lr step at iteration {self.iter}: {tc.budget_lr_steps[done]:.0%} of the "
                    f"{tc.max_minutes} min budget used")

    def _step(self, batch, targets) -> dict:
        tc = self.cfg.train
        if tc.budget_lr_steps:
            self._budget_lr_steps()
        lr = lr_at(
            self.iter,
            base_lr=self.base_lr,
            warmup_iters=tc.warmup_iters,
            warmup_ratio=tc.warmup_ratio,
            steps_iters=self.steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device)
        targets = [t.to(self.device) for t in targets]
        with autocast(self.device, self.amp_dtype):
            out = self.train_model(batch, targets)
        if "loss" not in out:
            raise KeyError(f"the model's loss dict has no 'loss' entry (keys: {sorted(out)})")
        loss = out["loss"].float()
        # every rank takes the same branch: a rank that skipped its backward would leave the others
        # waiting in DDP's gradient all-reduce
        if not dist_utils.all_finite(bool(torch.isfinite(loss.detach()).all())):
            terms = ", ".join(
                f"{k}={float(v.detach().float()):.4g}"
                for k, v in out.items()
                if k.startswith("loss") and isinstance(v, torch.Tensor) and v.numel() == 1
            )
            if tc.skip_nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                console(
                    f"warning: non-finite loss at iteration {self.iter + 1} (epoch {self.epoch + 1}): {terms}; "
                    f"optimizer step skipped (train.skip_nonfinite; {self.skipped_steps} skipped so far)"
                )
                return {"lr": lr, "skipped": True}
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iter + 1} (epoch {self.epoch + 1}): {terms}. "
                "Try a lower train.lr, a longer train.warmup_iters or train.grad_clip > 0."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        out["lr"] = lr
        return out

    def run(self) -> dict:
        self._setup()
        cfg, tc = self.cfg, self.cfg.train
        self._saved_at = self.iter if self.resume else -1
        self._evaluated_at = -1
        metrics: dict[str, float] = {}
        means = RunningMeans()
        self._session_start = time.time()
        stop_reason = None
        ipe = self.iters_per_epoch
        console(
            f"training {cfg.name} on {self.device}: {len(self.train_ds)} images, {ipe} iterations/epoch, "
            f"{self.total_iters} iterations -> {self.run_dir}"
        )
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.iter, desc="train",
                   disable=not (sys.stderr.isatty() and self.is_main))
        self.model.train()
        stop_reason = self._early_stop_reason()  # a resumed run that had already stopped early
        if stop_reason is not None:
            console(f"{stop_reason}; nothing left to do (raise train.patience to train on)")
            self._evaluated_at = self.iter
        try:
            while self.epoch < self.num_epochs and self.iter < self.total_iters and stop_reason is None:
                loader = self._loader(self.epoch, start_batch=self.batch_in_epoch)
                batches = iter(loader)
                if self._pending_rng is not None:
                    restore_rng_state(self._pending_rng)
                    self._pending_rng = None
                t_prev = time.perf_counter()
                for batch, targets, _metas in batches:
                    t_data = time.perf_counter()
                    out = self._step(batch, targets)
                    self.iter += 1
                    self.batch_in_epoch += 1
                    t_now = time.perf_counter()
                    means.add({k: v for k, v in out.items() if k not in ("lr", "skipped")})
                    means.add({"time": t_now - t_prev, "data_time": t_data - t_prev})
                    t_prev = t_now
                    bar.update(1)
                    if self.iter % max(tc.log_interval, 1) == 0 or self.iter == self.total_iters:
                        rec = {"mode": "train", "iter": self.iter, "epoch": self.epoch + 1, "lr": out["lr"]}
                        rec.update(self._mean_over_ranks(means.pop()))
                        if tc.skip_nonfinite or self.skipped_steps:
                            rec["skipped_steps"] = self.skipped_steps
                        if self.device.type == "cuda":
                            rec["memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                        self._log(rec)
                        bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}", lr=f"{out['lr']:.2e}")
                        if bar.disable:  # no progress bar (not a terminal): print the log line
                            console(
                                f"iter {self.iter}/{self.total_iters} epoch {self.epoch + 1} lr {out['lr']:.3e} "
                                + f"loss {rec.get('loss', float('nan')):.4f} ("
                                + " ".join(f"{k} {v:.3f}" for k, v in rec.items() if "loss" in k and k != "loss")
                                + ")"
                            )
                    if self.iter >= self.total_iters:
                        stop_reason = "max_iters"
                    elif tc.max_minutes > 0 and dist_utils.broadcast_object(
                        self.train_seconds() > tc.max_minutes * 60  # rank 0's clock decides for all ranks
                    ):
                        stop_reason = "time budget"
                        console(f"stopping: time budget of {tc.max_minutes} min reached at iteration {self.iter}")
                    if stop_reason is not None:
                        break
                epoch_done = self.batch_in_epoch >= ipe or stop_reason is None
                if epoch_done:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if self.val_ds is not None and tc.eval_interval > 0 and self.epoch % tc.eval_interval == 0:
                        metrics = self._evaluate()
                        stop_reason = self._early_stop_reason()
                        if stop_reason is not None:
                            console(f"stopping: {stop_reason}")
                    if tc.checkpoint_interval > 0 and self.epoch % tc.checkpoint_interval == 0:
                        self._save_last()
        finally:
            bar.close()

        final_eval = self.val_ds is not None and self._evaluated_at != self.iter
        if final_eval:
            metrics = self._evaluate()
        if final_eval or self._saved_at != self.iter:  # last.pt also carries the latest 'best'
            self._save_last()
        stopped = stop_reason or "completed"
        self._log({"mode": "stop", "iter": self.iter, "epoch": self.epoch, "reason": stopped,
                   "skipped_steps": self.skipped_steps})
        if self.logger is not None:
            self.logger.close()
            self._plot()
        dist_utils.barrier()
        if self._owns_group:
            dist_utils.destroy()
        console(f"done: {self.iter} iterations ({stopped}); checkpoints in {self.ckpt_dir}")
        return {
            "run_dir": str(self.run_dir),
            "iter": self.iter,
            "epoch": self.epoch,
            "stopped": stopped,
            "metrics": metrics,
            "best": dict(self.best),
            "classes": self.classes,
        }

    @staticmethod
    def _mean_over_ranks(values: dict) -> dict:
        """The logged means of this rank's iterations, averaged over the ranks (rank 0 logs them).
        Gathered as objects: ranks may log different keys (e.g. a term only some batches have)."""
        values = {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        gathered = dist_utils.all_gather_object(values)
        if len(gathered) == 1:
            return gathered[0]
        keys = [k for k in gathered[0]] + sorted({k for g in gathered[1:] for k in g} - set(gathered[0]))
        out = {}
        for k in keys:
            vals = [g[k] for g in gathered if isinstance(g.get(k), (int, float))]
            out[k] = sum(vals) / len(vals) if vals else gathered[0].get(k)
        return out

    def _plot(self) -> None:
        try:
            from instseg.visualize import plot_metrics

            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        except Exception as e:  # plots are a convenience; a finished run must not fail on them
            console(f"warning: could not write plots: {type(e).__name__}: {e}")


def train(
    cfg: Config,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    model_builder: Callable[[Any], nn.Module] | None = None,
    pinned: Any = (),
) -> dict:
    """Trains ``cfg``; returns ``{'run_dir', 'iter', 'epoch', 'stopped', 'metrics', 'best', 'classes'}``."""
    return Trainer(cfg, resume=resume, run_dir=run_dir, model_builder=model_builder, pinned=pinned).run()
