"""Aspect-ratio grouped batch sampling, deterministic per (seed, epoch), resumable mid-epoch and
shardable over the processes of a distributed run."""

from __future__ import annotations

from typing import Iterator

import torch


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches whose images are all landscape (``w >= h``) or all portrait (``w < h``).

    Like mmdet's ``AspectRatioBatchSampler``: indices are visited in a (shuffled) order and dropped
    into one of two buckets; a bucket that reaches ``batch_size`` is yielded.  At the end the
    leftovers of both buckets are merged (landscape first) and yielded in chunks of ``batch_size``
    (the last chunk may be short unless ``drop_last``), so an epoch has ``ceil(n / batch_size)``
    batches (``floor`` with ``drop_last``).

    The order depends only on ``(seed, epoch)``: call ``set_epoch(e)`` before each epoch.
    ``start_batch = k`` skips the first ``k`` batches of the current epoch (exact resume);
    ``set_epoch`` resets it to 0 unless given.  ``len()`` is the number of batches still to yield
    (``batches_per_epoch - start_batch``); ``batches_per_epoch`` is the full count.

    Distributed (``world_size > 1``; ``batch_size`` is per process, mmdetection's
    ``samples_per_gpu``): the batches above are formed with the *total* batch size
    ``batch_size * world_size`` and rank ``r`` takes the slice ``[r * batch_size, (r + 1) * batch_size)``
    of each.  So step ``k`` of an epoch trains on the same images for every split of one total
    batch (2 processes x 1 image = 1 process x 2 images), and every rank has the same number of
    batches.  A short last total batch is filled up with the first indices of the epoch's order (as
    ``DistributedSampler`` pads), so every rank gets ``batch_size`` images at every step and no rank
    waits for another in DDP's gradient all-reduce; ``drop_last`` drops it instead.
    ``start_batch`` counts steps, which are the same on every rank.
    """

    def __init__(
        self,
        aspect_ratios: list[float],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.groups = [0 if float(r) >= 1.0 else 1 for r in aspect_ratios]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = int(start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    @property
    def total_batch_size(self) -> int:
        """Images per optimisation step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.groups), self.total_batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch (ignoring ``start_batch``)."""
        total = self.total_batches()
        if self.world_size == 1:
            return total
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [b[lo:hi] for b in total]

    def total_batches(self) -> list[list[int]]:
        """The epoch's batches of ``total_batch_size`` images (all ranks together), the last one
        filled up to the full size when distributed (see the class docstring)."""
        n, size = len(self.groups), self.total_batch_size
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & 0x7FFFFFFFFFFFFFFF)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        buckets: list[list[int]] = [[], []]
        batches: list[list[int]] = []
        for i in order:
            b = buckets[self.groups[i]]
            b.append(i)
            if len(b) == size:
                batches.append(b[:])
                b.clear()
        left = buckets[0] + buckets[1]
        for s in range(0, len(left), size):
            chunk = left[s : s + size]
            if len(chunk) == size or not self.drop_last:
                batches.append(chunk)
        if self.world_size > 1 and batches and len(batches[-1]) < size:
            flat = [i for b in batches for i in b]
            need = size - len(batches[-1])
            batches[-1] = batches[-1] + [flat[k % len(flat)] for k in range(need)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches()[self.start_batch :]
