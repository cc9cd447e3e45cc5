"""A list of jobs run by every process of one ``torchrun`` launch (2 processes, gloo on CPU).

``test_distributed.py`` starts ``torchrun --standalone --nproc-per-node 2 tests/cli/dist_jobs.py
JOBS.json`` once for all of its distributed runs, because starting a process that imports torch
and torchvision costs 10-15 s on the 2-core test machines.  The workers join the process group
from the environment ``torchrun`` sets, as ``instseg train`` / ``instseg eval`` do; the trainer
and the CLI then find the group joined and leave it open for the next job.

Job kinds: ``train`` (``config``: a ``to_dict`` config, ``run_dir``, ``resume``), ``eval``
(``checkpoint``; rank 0 writes the metrics every rank got to ``out``) and ``cli`` (``args`` of
``instseg``; each rank's stdout goes to ``<stdout>.rank<r>``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_world(jobs: list[dict[str, Any]], folder: Path, *, nproc: int = 2, timeout_s: float = 900.0) -> None:
    """Runs ``jobs`` under ``torchrun`` with ``nproc`` processes; raises when one fails or when they
    hang past ``timeout_s`` (a hang is how a DDP mistake shows up: it must fail the test, not stall it)."""
    path = folder / "jobs.json"
    path.write_text(json.dumps(jobs))
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(jobs_file: str) -> int:
    import torch

    torch.set_num_threads(1)
    from instseg.engine import distributed as dist_utils

    info = dist_utils.init_from_env("cpu")
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            _run(job, info.rank)
    finally:
        dist_utils.destroy()
    return 0


def _run(job: dict[str, Any], rank: int) -> None:
    from instseg.config.load import from_dict
    from instseg.engine.trainer import train

    if job["kind"] == "train":
        train(from_dict(job["config"]), run_dir=job["run_dir"], resume=job.get("resume", False))
    elif job["kind"] == "eval":
        _evaluate(job)
    elif job["kind"] == "cli":
        from instseg.cli import main as cli_main

        with open(f"{job['stdout']}.rank{rank}", "w") as out, contextlib.redirect_stdout(out):
            rc = cli_main(job["args"])
        if rc != 0:
            raise SystemExit(f"instseg {' '.join(job['args'])} exited with {rc} on rank {rank}")
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")


def _evaluate(job: dict[str, Any]) -> None:
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
