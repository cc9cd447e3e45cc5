"""Aspect-ratio grouped batch sampling, deterministic per (seed, epoch) and resumable mid-epoch."""

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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    def batches_per_epoch(self) -> int:
        n = len(self.groups)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch (ignoring ``start_batch``)."""
        n = len(self.groups)
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
            if len(b) == self.batch_size:
                batches.append(b[:])
                b.clear()
        left = buckets[0] + buckets[1]
        for s in range(0, len(left), self.batch_size):
            chunk = left[s : s + self.batch_size]
            if len(chunk) == self.batch_size or not self.drop_last:
                batches.append(chunk)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches()[self.start_batch :]
