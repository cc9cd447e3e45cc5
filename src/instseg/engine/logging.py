"""Run logging: ``metrics.jsonl`` (one JSON object per line), running means, console output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch


def console(msg: str) -> None:
    """Prints a line without breaking an active tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(msg, flush=True)
    sys.stdout.flush()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class MetricsLogger:
    """Appends records to a JSON-lines file, flushing after each line."""

    def __init__(self, path: str | Path, *, fresh: bool = True, keep_until_iter: int | None = None):
        """Opens ``path``.

        Args:
            fresh: start an empty file (a new run).
            keep_until_iter: when resuming, drop the lines logged after this iteration (they were
                written after the checkpoint and will be logged again).
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        elif keep_until_iter is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if int(rec.get("iter", 0)) <= keep_until_iter:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


class RunningMeans:
    """Means of scalar values (loss terms, metrics) over the iterations since the last ``pop``."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = v.detach().float()
            elif not isinstance(v, (int, float)):
                continue
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: float(s) / self._counts[k] for k, s in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return out
