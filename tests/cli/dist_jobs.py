"""What the worker processes of ``test_distributed.py`` run: a list of jobs in one gloo process group.

One group for all the jobs (instead of one ``torchrun`` per job) because starting a process that
imports torch and torchvision costs 10-15 s on the 2-core test machines.  The workers get the
same environment variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so the trainer and evaluation take the code path they take
under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for the rendezvous of one test module."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, world_size: int, port: int, jobs: list[dict[str, Any]]) -> None:
    """Entry point of process ``rank``: joins the group, runs ``jobs`` in order, leaves."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from instseg.config.load import from_dict
    from instseg.engine import distributed as dist_utils
    from instseg.engine.trainer import train

    dist_utils.init_from_env("cpu")  # joined here, so the trainer leaves the group open between jobs
    try:
        for job in jobs:
            if job["kind"] == "train":
                train(from_dict(job["config"]), run_dir=job["run_dir"], resume=job.get("resume", False))
            elif job["kind"] == "eval":
                _evaluate(job)
            else:
                raise ValueError(f"unknown job kind {job['kind']!r}")
    finally:
        dist_utils.destroy()


def _evaluate(job: dict[str, Any]) -> None:
    """Evaluates a checkpoint on ``job['ann']``; rank 0 writes the metrics to ``job['out']``."""
    from instseg.data import build_dataset
    from instseg.engine import distributed as dist_utils
    from instseg.engine.checkpoint import load_model_from_checkpoint
    from instseg.engine.inference import run_evaluation

    model, cfg, classes = load_model_from_checkpoint(job["checkpoint"], "cpu")
    dataset = build_dataset(cfg.data, "val")
    outcome = run_evaluation(model, dataset, cfg, None, cat_ids=classes["cat_ids"], verbose=False)
    every_rank = dist_utils.all_gather_object(outcome.metrics)
    if dist_utils.is_main():
        Path(job["out"]).write_text(json.dumps({"metrics": outcome.metrics, "every_rank": every_rank}))


def run_world(jobs: list[dict[str, Any]], world_size: int = 2, timeout_s: float = 600.0) -> None:
    """Runs ``jobs`` in ``world_size`` spawned processes; raises when one fails or all hang past
    ``timeout_s`` (a hang is how a DDP mistake shows up; it must fail the test, not stall it)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        worker, args=(world_size, free_port(), jobs), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):  # join() raises ProcessRaisedException when a worker fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout_s:.0f} s")
