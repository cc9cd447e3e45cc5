"""torch.distributed for instseg: process group set-up under ``torchrun`` and the few collectives the
trainer and evaluation need.

A process started by ``torchrun`` finds ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (and the
rendezvous variables) in its environment; :func:`init_from_env` joins the process group with NCCL
on CUDA and gloo on CPU.  Without those variables every helper here answers as the only process of
a world of one (rank 0, ``is_main() is True``, collectives return their input), so single-process
code paths do not change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """The ranks ``torchrun`` put in the environment (a world of one when they are absent)."""
    try:
        return DistInfo(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:  # a hand-set variable that is not a number
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0, or the only process); before the
    process group is joined (or after it is left) the rank comes from torchrun's ``RANK``."""
    return get_rank() == 0 if is_initialized() else env_info().rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Joins the process group ``torchrun`` describes, once; returns this process's :class:`DistInfo`.

    ``device_type`` ``'cuda'`` uses NCCL and makes ``cuda:LOCAL_RANK`` the current device (one GPU
    per process); anything else uses gloo.  A world of one does nothing.
    """
    info = env_info()
    if not info.distributed or is_initialized():
        return info
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device_type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={info.local_rank} but this node has {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return info


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device``."""
    if device.type == "cuda" and env_info().distributed:
        return torch.device("cuda", env_info().local_rank)
    return device


def destroy() -> None:
    """Leaves the process group (if joined), so the process exits without NCCL/gloo warnings."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; for results and small state, not tensors
    on the hot path)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_finite(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank: a NaN loss on one rank must make every rank
    skip (or stop) together, or the ranks' next collectives would not match."""
    if get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def shard(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The indices ``0..n-1`` this rank evaluates: every ``world_size``-th, from ``rank``."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(range(rank, n, world_size))
