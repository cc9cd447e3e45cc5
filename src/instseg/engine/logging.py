"""Run logging: ``metrics.jsonl`` (one JSON object per line) + ``metrics.csv`` + optional TensorBoard,
running means, console output."""

from __future__ import annotations

import csv
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


def _csv_cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


class TensorBoardMissing(ImportError):
    """``train.tensorboard=true`` but the ``tensorboard`` package is not installed."""


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or :class:`TensorBoardMissing` with a one-line
    install hint when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardMissing(
            "train.tensorboard=true needs the tensorboard package: pip install 'instseg[tensorboard]' "
            "(or pip install tensorboard), or set train.tensorboard=false"
        ) from e
    return SummaryWriter


def tensorboard_writer(log_dir: str | Path, purge_step: int | None = None):
    """A ``SummaryWriter`` writing to ``log_dir`` (see :func:`require_tensorboard`)."""
    return require_tensorboard()(str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (flushed after each line), keeps ``metrics.csv`` beside it
    (one row per record, one column per key ever logged; lists as JSON) and, optionally, logs the
    numbers to TensorBoard (``train/<key>`` / ``val/<key>`` by the record's ``mode``, step ``iter``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        fresh: bool = True,
        keep_until_iter: int | None = None,
        tensorboard_dir: str | Path | None = None,
    ):
        """Opens ``path``.

        Args:
            fresh: start an empty file (a new run).
            keep_until_iter: when resuming, drop the lines logged after this iteration (they were
                written after the checkpoint and will be logged again).
            tensorboard_dir: also write TensorBoard events there (``TensorBoardMissing`` when the
                ``tensorboard`` package is not installed).
        """
        self.path = Path(path)
        self.csv_path = self.path.with_suffix(".csv")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[dict] = []
        if fresh:
            self.path.write_text("")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if keep_until_iter is None or int(rec.get("iter", 0)) <= keep_until_iter:
                    kept.append(line)
                    self._records.append(rec)
            self.path.write_text("".join(line + "\n" for line in kept))
        self._fields: list[str] = []
        for rec in self._records:
            self._fields.extend(k for k in rec if k not in self._fields)
        self._rewrite_csv()
        self.tb = None
        if tensorboard_dir is not None:
            self.tb = tensorboard_writer(tensorboard_dir, purge_step=None if fresh else keep_until_iter)

    def _rewrite_csv(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            w.writeheader()
            for rec in self._records:
                w.writerow({k: _csv_cell(v) for k, v in rec.items()})

    def log(self, record: dict) -> None:
        rec = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._records.append(rec)
        new = [k for k in rec if k not in self._fields]
        if new:  # a new column: rewrite the whole CSV with the wider header
            self._fields.extend(new)
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._fields).writerow({k: _csv_cell(v) for k, v in rec.items()})
        if self.tb is not None:
            step = int(rec.get("iter", len(self._records)))
            prefix = str(rec.get("mode", "train"))
            for k, v in rec.items():
                if k in ("iter", "mode") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


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
