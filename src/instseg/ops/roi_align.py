"""Multi-level RoIAlign as mmdetection's ``SingleRoIExtractor`` does it.

Each RoI is pooled from one pyramid level chosen by its scale:
``level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the available levels
(``finest_scale = 56``: scale < 112 -> P2, < 224 -> P3, < 448 -> P4, else P5).  Pooling is
torchvision's ``roi_align`` with ``aligned=True`` and ``sampling_ratio=0`` (adaptive), which
is the same algorithm as mmcv's ``RoIAlign`` defaults.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align

# torchvision's CPU roi_align kernel is single-threaded but releases the GIL, so splitting the
# RoIs over Python threads uses the cores torch was given (torch.get_num_threads()).  Each RoI's
# output depends only on that RoI, so the result is bit-identical to one call.
_MIN_ROIS_PER_THREAD = 16
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _thread_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="instseg-roi-align")
            _pool_size = size
        return _pool


def _map_chunks(fn, chunks: Sequence[Tensor], threads: int) -> list[Tensor]:
    return list(_thread_pool(threads).map(fn, chunks))


class _ThreadedRoIAlign(torch.autograd.Function):
    """Aligned RoIAlign whose forward AND backward split the RoIs over CPU threads.

    The backward scatters each chunk's gradient into its own feature-sized buffer (threads must
    not add into one buffer concurrently) and sums the buffers, so the feature gradient equals
    the single-threaded one up to float summation order.
    """

    @staticmethod
    def forward(
        ctx, feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, threads: int
    ) -> Tensor:
        def run(chunk: Tensor) -> Tensor:
            return roi_align(feat, chunk, output_size, spatial_scale, sampling_ratio, True)

        out = torch.cat(_map_chunks(run, rois.chunk(threads), threads))
        ctx.save_for_backward(rois)
        ctx.meta = (output_size, spatial_scale, sampling_ratio, threads, tuple(feat.shape))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, threads, (b, c, h, w) = ctx.meta
        sizes = [len(r) for r in rois.chunk(threads)]
        pairs = list(zip(grad_out.split(sizes), rois.split(sizes)))

        def run(pair: tuple[Tensor, Tensor]) -> Tensor:
            g, r = pair
            return torch.ops.torchvision._roi_align_backward(
                g.contiguous(), r, spatial_scale, output_size, output_size, b, c, h, w, sampling_ratio, True
            )

        parts = list(_thread_pool(threads).map(run, pairs))
        grad_feat = parts[0]
        for part in parts[1:]:
            grad_feat.add_(part)
        return grad_feat, None, None, None, None, None


def roi_align_cpu_parallel(
    feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0
) -> Tensor:
    """``roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, True)``, on CPU split over threads.

    Falls back to one plain call on other devices, with one thread, or for few RoIs.
    """
    threads = torch.get_num_threads()
    k = rois.shape[0]
    if feat.device.type != "cpu" or threads < 2 or k < 2 * _MIN_ROIS_PER_THREAD or rois.requires_grad:
        return roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, True)
    threads = min(threads, k // _MIN_ROIS_PER_THREAD)
    if torch.is_grad_enabled() and feat.requires_grad:
        return _ThreadedRoIAlign.apply(feat, rois, output_size, spatial_scale, sampling_ratio, threads)
    chunks = rois.chunk(threads)
    return torch.cat(
        _map_chunks(lambda c: roi_align(feat, c, output_size, spatial_scale, sampling_ratio, True), chunks, threads)
    )


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenates per-image boxes into ``(K, 5)`` rois ``(batch_index, x1, y1, x2, y2)``."""
    parts = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1) for i, b in enumerate(boxes)]
    if not parts:
        return torch.zeros((0, 5))
    return torch.cat(parts, dim=0)


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class MultiLevelRoIAlign:
    """Pools fixed-size features for rois from a list of feature maps of increasing stride."""

    def __init__(
        self, *, output_size: int, strides: Sequence[int], finest_scale: float = 56.0, sampling_ratio: int = 0
    ) -> None:
        self.output_size = output_size
        # 0 = adaptive ceil(roi_bin_size) samples per bin (mmcv's default, needed for parity);
        # a small fixed value (e.g. 2) is much cheaper for large RoIs on CPU
        self.sampling_ratio = sampling_ratio
        self.strides = list(strides)
        self.finest_scale = finest_scale

    def __call__(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        feats = list(feats)[: len(self.strides)]
        k = rois.shape[0]
        channels = feats[0].shape[1]
        out = feats[0].new_zeros((k, channels, self.output_size, self.output_size))
        if k == 0:
            return out
        rois = rois.to(feats[0].dtype)
        if len(feats) == 1:
            return roi_align_cpu_parallel(feats[0], rois, self.output_size, 1.0 / self.strides[0], self.sampling_ratio)
        levels = map_roi_levels(rois, len(feats), self.finest_scale)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            inds = torch.nonzero(levels == lvl).flatten()
            if inds.numel() == 0:
                continue
            out[inds] = roi_align_cpu_parallel(feat, rois[inds], self.output_size, 1.0 / stride, self.sampling_ratio).to(
                out.dtype
            )
        return out
