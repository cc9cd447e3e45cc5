"""Instance masks stored as per-instance crops.

Crowded images (the nuclei data has up to 375 instances) make full-resolution
``(N, H, W)`` mask stacks expensive: each instance only needs the pixels of its
own box.  ``CroppedMasks`` keeps, for every instance, a binary crop of the
frame plus its top-left offset.  Every crop covers the instance's bounding box
plus a zero margin of ``MARGIN`` pixels (clamped to the frame), so bilinear
RoIAlign on a crop gives exactly what it gives on the full bitmap: outside a
crop the full bitmap is zero, and at frame borders both clamp the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

MARGIN = 2


@dataclass
class CroppedMasks:
    """Binary instance masks of one image, each stored as a crop of the frame.

    Attributes:
        crops: one ``uint8`` tensor ``(h_i, w_i)`` of 0/1 per instance.
        offsets: ``(N, 2)`` int64 tensor of the crops' top-left ``(x0, y0)`` in the frame.
        frame: ``(height, width)`` of the image frame the masks live in.
    """

    crops: list[Tensor]
    offsets: Tensor
    frame: tuple[int, int]

    def __len__(self) -> int:
        return len(self.crops)

    @staticmethod
    def empty(frame: tuple[int, int]) -> CroppedMasks:
        return CroppedMasks([], torch.zeros((0, 2), dtype=torch.int64), (int(frame[0]), int(frame[1])))

    @staticmethod
    def from_full(masks: Tensor | np.ndarray) -> CroppedMasks:
        """Crops a full ``(N, H, W)`` stack of binary masks to each mask's box plus margin."""
        masks_t = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks)
        frame = (int(masks_t.shape[-2]), int(masks_t.shape[-1]))
        return CroppedMasks.from_iter((m for m in masks_t), frame)

    @staticmethod
    def from_iter(masks, frame: tuple[int, int]) -> CroppedMasks:
        """Builds crops from an iterable of full-frame 2-D masks (arrays or tensors), one at a time.

        Only one full-resolution mask is alive at a time, which keeps memory flat for
        images with hundreds of instances.
        """
        crops: list[Tensor] = []
        offsets: list[tuple[int, int]] = []
        for mask in masks:
            m = torch.as_tensor(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask
            crop, x0, y0 = _crop_one(m.to(torch.uint8) != 0, frame)
            crops.append(crop)
            offsets.append((x0, y0))
        off = torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2)
        return CroppedMasks(crops, off, (int(frame[0]), int(frame[1])))

    def to_full(self, indices: Tensor | None = None) -> Tensor:
        """Returns a dense ``(N, H, W)`` uint8 stack (for small N: tests, visualisation)."""
        idx = range(len(self)) if indices is None else [int(i) for i in indices]
        h, w = self.frame
        out = torch.zeros((len(idx), h, w), dtype=torch.uint8)
        for k, i in enumerate(idx):
            crop = self.crops[i]
            x0, y0 = (int(v) for v in self.offsets[i])
            out[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return out

    def areas(self) -> Tensor:
        return torch.tensor([int(c.sum()) for c in self.crops], dtype=torch.float32)

    def boxes(self) -> Tensor:
        """Tight XYXY boxes of the mask pixels (pixel-edge convention: x2 = last column + 1)."""
        out = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, crop in enumerate(self.crops):
            ys, xs = torch.nonzero(crop, as_tuple=True)
            if len(xs) == 0:
                continue
            x0, y0 = (int(v) for v in self.offsets[i])
            out[i] = torch.tensor([xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1])
        return out

    def select(self, keep: Tensor | list[int]) -> CroppedMasks:
        idx = [int(i) for i in (keep.tolist() if isinstance(keep, Tensor) else keep)]
        return CroppedMasks([self.crops[i] for i in idx], self.offsets[idx].reshape(-1, 2), self.frame)

    def flip_horizontal(self) -> CroppedMasks:
        w = self.frame[1]
        crops = [c.flip(-1) for c in self.crops]
        widths = torch.tensor([c.shape[1] for c in self.crops], dtype=torch.int64)
        offsets = self.offsets.clone()
        if len(self):
            offsets[:, 0] = w - (self.offsets[:, 0] + widths)
        return CroppedMasks(crops, offsets, self.frame)

    def flip_vertical(self) -> CroppedMasks:
        """Mirrors every mask top-to-bottom (``y -> H - 1 - y``); crops keep their clamped margins."""
        h = self.frame[0]
        crops = [c.flip(-2) for c in self.crops]
        heights = torch.tensor([c.shape[0] for c in self.crops], dtype=torch.int64)
        offsets = self.offsets.clone()
        if len(self):
            offsets[:, 1] = h - (self.offsets[:, 1] + heights)
        return CroppedMasks(crops, offsets, self.frame)

    def rot90(self, k: int = 1) -> CroppedMasks:
        """Rotates every mask by ``k`` quarter turns counter-clockwise, as ``torch.rot90(full, k,
        dims=(-2, -1))`` rotates the full bitmap: pixel ``(x, y)`` of a ``H x W`` frame goes to
        ``(y, W - 1 - x)`` of the ``W x H`` frame for one turn."""
        out = self
        for _ in range(int(k) % 4):
            h, w = out.frame
            crops = [torch.rot90(c, 1, dims=(-2, -1)) for c in out.crops]
            widths = torch.tensor([c.shape[1] for c in out.crops], dtype=torch.int64)
            offsets = out.offsets.clone()
            if len(out):
                offsets[:, 0] = out.offsets[:, 1]
                offsets[:, 1] = w - (out.offsets[:, 0] + widths)
            out = CroppedMasks(crops, offsets, (w, h))
        return out

    def occlude(self, cover: Tensor) -> CroppedMasks:
        """Removes the pixels where the full-frame bool/0-1 map ``cover`` is set (copy-paste: the
        pasted objects hide what is under them).  Crops keep their place and size."""
        if tuple(cover.shape[-2:]) != self.frame:
            raise ValueError(f"cover map {tuple(cover.shape)} does not match the mask frame {self.frame}")
        keep = (cover == 0).to(torch.uint8)
        crops = []
        for crop, off in zip(self.crops, self.offsets):
            x0, y0 = int(off[0]), int(off[1])
            crops.append(crop * keep[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]])
        return CroppedMasks(crops, self.offsets.clone(), self.frame)

    def concat(self, other: CroppedMasks) -> CroppedMasks:
        """The masks of ``self`` followed by those of ``other`` (same frame)."""
        if other.frame != self.frame:
            raise ValueError(f"cannot concatenate masks of frames {self.frame} and {other.frame}")
        return CroppedMasks(self.crops + other.crops, torch.cat([self.offsets, other.offsets]).reshape(-1, 2), self.frame)

    def resize(self, new_frame: tuple[int, int]) -> CroppedMasks:
        """Nearest-neighbour resize of every mask to a new frame size (as mmdet resizes bitmaps).

        A crop is resized with the frame's own scale, so pixel (i, j) of the new frame takes
        the value of pixel (floor(i * H / H'), floor(j * W / W')) of the old one, exactly as a
        nearest resize of the full bitmap would.
        """
        h, w = self.frame
        nh, nw = int(new_frame[0]), int(new_frame[1])
        sy, sx = h / nh, w / nw
        masks = []
        for i, crop in enumerate(self.crops):
            x0, y0 = (int(v) for v in self.offsets[i])
            ch, cw = crop.shape
            # new pixel rows whose source row falls inside [y0, y0 + ch)
            ny0 = int(np.ceil(y0 / sy))
            ny1 = min(nh, int(np.ceil((y0 + ch) / sy)))
            nx0 = int(np.ceil(x0 / sx))
            nx1 = min(nw, int(np.ceil((x0 + cw) / sx)))
            if ny1 <= ny0 or nx1 <= nx0:
                masks.append((torch.zeros((1, 1), dtype=torch.uint8), nx0 if nx0 < nw else nw - 1, ny0 if ny0 < nh else nh - 1))
                continue
            src_y = (torch.arange(ny0, ny1, dtype=torch.float64) * sy).floor().long().clamp(max=h - 1) - y0
            src_x = (torch.arange(nx0, nx1, dtype=torch.float64) * sx).floor().long().clamp(max=w - 1) - x0
            src_y = src_y.clamp(0, ch - 1)
            src_x = src_x.clamp(0, cw - 1)
            masks.append((crop[src_y][:, src_x], nx0, ny0))
        return _recrop(masks, (nh, nw))

    def pad(self, new_frame: tuple[int, int]) -> CroppedMasks:
        """Enlarges the frame at the bottom/right (padding is empty background).

        A crop that reached the old bottom/right edge had its zero margin clamped away there;
        it gets it back, else RoIAlign on the crop would clamp to the last mask row/column where
        the padded full bitmap interpolates towards the zero padding.
        """
        nh, nw = int(new_frame[0]), int(new_frame[1])
        if (nh, nw) == self.frame:
            return CroppedMasks(self.crops, self.offsets, self.frame)
        return _recrop([(c, int(o[0]), int(o[1])) for c, o in zip(self.crops, self.offsets)], (nh, nw))

    def nonempty(self) -> Tensor:
        """``(N,)`` bool: whether each mask has at least one pixel."""
        return torch.tensor([bool(c.any()) for c in self.crops], dtype=torch.bool)

    def translate(self, dx: int, dy: int, new_frame: tuple[int, int] | None = None) -> CroppedMasks:
        """Moves every mask by whole pixels ``(dx, dy)`` into a frame of size ``new_frame``
        (``(h, w)``, default: the current one).

        Pixel ``(x, y)`` goes to ``(x + dx, y + dy)``; pixels that land outside the new frame are
        dropped (a mask that loses all its pixels becomes the usual 1x1 empty crop at (0, 0)).
        Crops are re-tightened with their ``MARGIN``, which matters when the frame grows: a crop
        whose margin had been clamped at the old border gets it back (see ``pad``).  Used by
        expand (positive shifts into a larger canvas) and ``crop``.
        """
        frame = self.frame if new_frame is None else (int(new_frame[0]), int(new_frame[1]))
        if frame[0] <= 0 or frame[1] <= 0:
            raise ValueError(f"new_frame must be positive (h, w), got {frame}")
        dx, dy = int(dx), int(dy)
        h, w = frame
        pieces: list[tuple[Tensor, int, int]] = []
        for crop, off in zip(self.crops, self.offsets):
            x0, y0 = int(off[0]) + dx, int(off[1]) + dy
            ch, cw = crop.shape
            # visible part of the moved crop, in the crop's own coordinates
            cx0, cy0 = max(0, -x0), max(0, -y0)
            cx1, cy1 = min(cw, w - x0), min(ch, h - y0)
            if cx1 <= cx0 or cy1 <= cy0:
                pieces.append((torch.zeros((1, 1), dtype=torch.uint8), 0, 0))
                continue
            pieces.append((crop[cy0:cy1, cx0:cx1], x0 + cx0, y0 + cy0))
        return _recrop(pieces, frame)

    def crop(self, x0: int, y0: int, x1: int, y1: int) -> CroppedMasks:
        """The masks inside the integer window ``[x0, x1) x [y0, y1)``, in the window's own frame
        ``(y1 - y0, x1 - x0)`` (as mmdet's ``BitmapMasks.crop``).  Masks with no pixel inside
        become empty (check ``nonempty()``); they are kept so indices stay aligned with boxes."""
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"crop window must have x1 > x0 and y1 > y0, got {(x0, y0, x1, y1)}")
        return self.translate(-x0, -y0, (y1 - y0, x1 - x0))

    def roi_targets(self, boxes: Tensor, gt_indices: Tensor, size: int) -> Tensor:
        """Mask-RCNN targets: RoIAligns mask ``gt_indices[k]`` inside ``boxes[k]`` to ``size x size``.

        Matches mmdet's ``mask_target``: aligned RoIAlign (sampling_ratio 0, average) of the
        full-frame bitmap, binarised at >= 0.5.  Returns a float tensor ``(K, size, size)``.
        """
        k = boxes.shape[0]
        out = torch.zeros((k, size, size), dtype=torch.float32, device=boxes.device)
        if k == 0:
            return out
        boxes_cpu = boxes.detach().float().cpu()
        gt_cpu = gt_indices.cpu().tolist()
        for j, gi in enumerate(gt_cpu):
            crop = self.crops[gi].float()[None, None]
            x0, y0 = (float(v) for v in self.offsets[gi])
            roi = boxes_cpu[j : j + 1] - torch.tensor([x0, y0, x0, y0])
            rois = torch.cat([torch.zeros((1, 1)), roi], dim=1)
            out[j] = roi_align(crop, rois, (size, size), 1.0, 0, True)[0, 0].to(out.device)
        return (out >= 0.5).float()


def _crop_one(mask: Tensor, frame: tuple[int, int]) -> tuple[Tensor, int, int]:
    """Crops one full-frame boolean mask to its box plus ``MARGIN`` zero pixels."""
    h, w = frame
    rows = torch.nonzero(mask.any(dim=1), as_tuple=True)[0]
    cols = torch.nonzero(mask.any(dim=0), as_tuple=True)[0]
    if len(rows) == 0:
        return torch.zeros((1, 1), dtype=torch.uint8), 0, 0
    y0 = max(int(rows[0]) - MARGIN, 0)
    y1 = min(int(rows[-1]) + 1 + MARGIN, h)
    x0 = max(int(cols[0]) - MARGIN, 0)
    x1 = min(int(cols[-1]) + 1 + MARGIN, w)
    return mask[y0:y1, x0:x1].to(torch.uint8).contiguous(), x0, y0


def _recrop(pieces: list[tuple[Tensor, int, int]], frame: tuple[int, int]) -> CroppedMasks:
    """Re-tightens crops (plus margin) after a transform that may have changed their extent."""
    crops, offsets = [], []
    h, w = frame
    for crop, x0, y0 in pieces:
        ch, cw = crop.shape
        # place the piece into a slightly larger canvas so the margin can be re-established
        y_lo, x_lo = max(y0 - MARGIN, 0), max(x0 - MARGIN, 0)
        y_hi, x_hi = min(y0 + ch + MARGIN, h), min(x0 + cw + MARGIN, w)
        canvas = torch.zeros((y_hi - y_lo, x_hi - x_lo), dtype=torch.uint8)
        canvas[y0 - y_lo : y0 - y_lo + ch, x0 - x_lo : x0 - x_lo + cw] = crop[: y_hi - y0, : x_hi - x0]
        c, cx, cy = _crop_one(canvas != 0, (y_hi - y_lo, x_hi - x_lo))
        # _crop_one clamps the margin to the canvas, which itself is clamped to the frame
        crops.append(c)
        offsets.append((cx + x_lo, cy + y_lo))
    off = torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2)
    return CroppedMasks(crops, off, (h, w))


def paste_masks(probs: Tensor, boxes: Tensor, frame: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Pastes ``(N, M, M)`` mask probabilities into boxes of an image of size ``frame``.

    Matches mmdet's ``_do_paste_mask``: the probability map is sampled with bilinear
    ``grid_sample(align_corners=False)`` at the pixel centres that fall into the box, and
    thresholded at ``>= threshold``.  Each mask is only evaluated within its integer-bounded
    box region, so memory is O(box area), not O(N * H * W) per mask, until the final stack.

    Returns a ``bool`` tensor ``(N, H, W)``.
    """
    h, w = frame
    n = probs.shape[0]
    out = torch.zeros((n, h, w), dtype=torch.bool, device=probs.device)
    if n == 0:
        return out
    boxes = boxes.to(probs.dtype)
    x0s = boxes[:, 0].floor().clamp(min=0).long() - 1
    y0s = boxes[:, 1].floor().clamp(min=0).long() - 1
    x1s = boxes[:, 2].ceil().clamp(max=w).long() + 1
    y1s = boxes[:, 3].ceil().clamp(max=h).long() + 1
    x0s = x0s.clamp(min=0)
    y0s = y0s.clamp(min=0)
    x1s = x1s.clamp(max=w)
    y1s = y1s.clamp(max=h)
    for i in range(n):
        ix0, iy0, ix1, iy1 = int(x0s[i]), int(y0s[i]), int(x1s[i]), int(y1s[i])
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        bx0, by0, bx1, by1 = boxes[i]
        img_y = torch.arange(iy0, iy1, device=probs.device, dtype=probs.dtype) + 0.5
        img_x = torch.arange(ix0, ix1, device=probs.device, dtype=probs.dtype) + 0.5
        img_y = (img_y - by0) / (by1 - by0) * 2 - 1
        img_x = (img_x - bx0) / (bx1 - bx0) * 2 - 1
        gy = img_y[:, None].expand(len(img_y), len(img_x))
        gx = img_x[None, :].expand(len(img_y), len(img_x))
        grid = torch.stack([gx, gy], dim=2)[None]
        sampled = F.grid_sample(probs[i][None, None], grid, align_corners=False)[0, 0]
        out[i, iy0:iy1, ix0:ix1] = sampled >= threshold
    return out
