"""RDSNet (Wang et al., AAAI 2020): an object stream (RetinaNet with a third tower that emits a
``2 d`` representation per anchor), a pixel stream (``d``-dim representation per stride-4
pixel), the correlation + cropping modules that turn the two into instance masks, and MBRM
(``instseg.modeling.refiners.mbrm``) that refines the boxes from the masks.

Follows the official code (``wangsr126/RDSNet``, mmdetection v1.0; ``specs/yolact_rdsnet.md``
section 2):

Object stream (``RDSNetHead``, ``bbox_head.*``): three towers (cls, reg, rep) of ``stacked_convs``
x [3x3 conv (no bias) + GN(32) + ReLU], then 3x3 convs to ``A C`` sigmoid logits, ``A 4``
deltas and ``A 2 d`` representations (d = 32).  Init normal(0.01), class bias -log(99).
Sigmoid focal loss (alpha 0.25, gamma 2) and smooth-L1 (beta 0.11) on deltas with stds 1, both
divided by mmdet v1's ``num_total_pos`` (the sum over images of max(#positives, 1)).

mmdet v1 box geometry ("+1" legacy).  v1 boxes are inclusive (``x2`` = last pixel, width
``x2 - x1 + 1``): anchors ``round(c -+ (w - 1) / 2)`` around ``c = (stride - 1) / 2``, deltas,
IoU and NMS with ``+1`` widths, decoded boxes clamped to ``[0, W - 1]``, COCO width ``x2 - x1 + 1``.
Adding 1 to ``x2, y2`` of every v1 box gives instseg's exclusive boxes, and under that map the v1
formulas ARE the plain ones: ``IoU_v1(a, b) = IoU(a + 1, b + 1)``, ``bbox2delta_v1(a, g) =
encode(a + 1, g + 1)`` and ``delta2bbox_v1(a, d) = decode(a + 1, d) - 1``.  So here anchors are
v1 anchors + 1 (:class:`V1AnchorGenerator`: ``AnchorGenerator`` with centre ``stride / 2`` and
the v1 rounding), assignment / coding / NMS run on exclusive boxes with the ordinary code, and
only the clamp, the rescale to the original image (v1 divides the INCLUSIVE box) and the two
crops are written in v1 coordinates.  Valid anchors: cells inside each image padded to 32.

Pixel stream (``RDSNetPixelHead``, ``mask_head.*``): P3 -> conv; P4 -> conv, up; P5 -> conv, up,
conv, up (3x3 conv no bias + GN + ReLU, bilinear x2 with align_corners=True), summed at stride 8,
``num_final_convs`` x [conv, up] to stride 4, 1x1 conv to ``d`` (no activation).  Xavier init,
``conv_reps`` normal(0.01).

Correlation (:func:`correlate`): each object's ``2 d`` vector is two ``d``-dim 1x1 kernels
(background, foreground): ``(H W, d) @ (d, 2 n)`` per image, softmax over the two channels.

Training (:class:`RDSNetMaskLogic`): every positive anchor whose gt mask has more than 100 pixels
(input resolution), at most 100 per image at random; the gt masks bilinearly resized to stride 4
and binarised at > 0.5; the matched gt box (v1, clamped) at stride 4 expanded by
``0.25 (w + 1)`` per side (at least 1 px; 1.5x) and truncated: pixels outside are IGNORED (not
background); 2-class CE; OHEM keeps the ``1 x #fg`` hardest background pixels of each object;
per object ``sum / (#kept + 1)``, total ``sum / (#objects + 1)``.

Test (official ``simple_test`` order): top 1000 anchors per level by max score, decode, clamp,
rescale, per-class NMS 0.5 / score > 0.05 / 100 per image with the reps carried along;
correlation for the kept detections; the logits bilinearly upsampled to the image padded to 32
(align_corners=False), cut to the image, resized to the original size (align_corners=True);
softmax; fg probability times the predicted (pre-MBRM) box expanded by ``0.1 (w + 1)`` per side
(1.2x); MBRM (refine presets) replaces the boxes; masks binarised at > 0.4.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import (
    AnchorTargets,
    DenseTestSettings,
    assign_anchors,
    focal_cls_loss,
    class_nms,
    flatten_levels,
    level_sizes,
    topk_per_level,
)
from instseg.modeling.dense_heads.retinanet import DenseOutputs
from instseg.modeling.dense_heads.yolact import resample_masks
from instseg.ops.anchors import AnchorGenerator
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.losses import smooth_l1
from instseg.structures.instances import ImageBatch, ImageTargets

PAD_DIVISOR = 32  # the official pipelines' Pad(size_divisor=32): per-image "pad_shape"
# dense elements (detections x 2 x padded pixels) resampled at once at test time
PROB_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------- geometry
class V1AnchorGenerator(AnchorGenerator):
    """mmdet v1 anchors, returned as exclusive boxes (v1 box + 1 on ``x2, y2``).

    v1: base size ``b`` (= stride), centre ``c = (b - 1) / 2``, for ratio ``r = h / w`` and scale
    ``s``: ``w = b s / sqrt(r)``, ``h = b s sqrt(r)``, box ``round(c - (w - 1) / 2), ...,
    round(c + (w - 1) / 2)`` (float32, round half to even), ratio-major order; shifts
    ``i * stride``.  Before rounding the exclusive box is ``stride / 2 -+ w / 2``, i.e. the
    plain generator with ``centers = stride / 2``; the rounding is what needs this subclass.
    """

    def _base_anchors(self, base_size: float, center: tuple[float, float]) -> Tensor:
        del center  # v1 centres at (base - 1) / 2
        b = torch.tensor(base_size, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.tensor(self.ratios, dtype=torch.float32))
        w_ratios = 1.0 / h_ratios
        scales = torch.tensor(self.scales, dtype=torch.float32)
        ws = (b * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (b * h_ratios[:, None] * scales[None, :]).reshape(-1)
        c = 0.5 * (b - 1)
        v1 = torch.stack([c - 0.5 * (ws - 1), c - 0.5 * (hs - 1), c + 0.5 * (ws - 1), c + 0.5 * (hs - 1)], dim=1).round()
        return v1 + torch.tensor([0.0, 0.0, 1.0, 1.0])


def to_v1(boxes: Tensor) -> Tensor:
    """Exclusive XYXY -> mmdet v1 inclusive XYXY (``x2 - 1``, ``y2 - 1``)."""
    return boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def from_v1(boxes: Tensor) -> Tensor:
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def clamp_v1(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """v1 ``delta2bbox(max_shape)``: every coordinate into ``[0, W - 1] x [0, H - 1]``."""
    h, w = size
    return torch.stack(
        [boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1), boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)],
        dim=1,
    )


def expanded_box_mask(boxes_v1: Tensor, size: tuple[int, int], ratio: float) -> Tensor:
    """The official crop: ``(n, h, w)`` bool, True inside each v1 box expanded by
    ``max(ratio (x2 - x1 + 1), 1)`` per side, clamped to ``[0, w]``, truncated to integers;
    column ``c`` is inside when ``x1 <= c < x2`` (``sanitize_coordinates(cast=True)``)."""
    h, w = size
    n = boxes_v1.shape[0]
    if n == 0:
        return torch.zeros((0, h, w), dtype=torch.bool, device=boxes_v1.device)
    b = boxes_v1.float()

    def side(lo: Tensor, hi: Tensor, limit: int) -> tuple[Tensor, Tensor]:
        a, z = torch.min(lo, hi), torch.max(lo, hi)
        if ratio != 0:
            pad = torch.clamp(ratio * (z - a + 1), min=1) if 0 < ratio < 1 else torch.full_like(a, float(ratio))
            a = torch.clamp(a - pad, min=0)
            z = torch.clamp(z + pad, max=limit)
        return a.long(), z.long()

    x1, x2 = side(b[:, 0], b[:, 2], w)
    y1, y2 = side(b[:, 1], b[:, 3], h)
    cols = torch.arange(w, device=b.device)[None, None, :]
    rows = torch.arange(h, device=b.device)[None, :, None]
    inside_x = (cols >= x1[:, None, None]) & (cols < x2[:, None, None])
    inside_y = (rows >= y1[:, None, None]) & (rows < y2[:, None, None])
    return inside_x & inside_y


def pad_shape(image_size: tuple[int, int], padded_size: tuple[int, int]) -> tuple[int, int]:
    """The image's own ``pad_shape``: padded to a multiple of 32, within the batch padding."""
    return tuple(min(int(math.ceil(s / PAD_DIVISOR)) * PAD_DIVISOR, p) for s, p in zip(image_size, padded_size))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- layers
class ConvGN(nn.Module):
    """mmcv ``ConvModule(norm_cfg=GN)``: 3x3 conv without bias (``bias='auto'``), GroupNorm,
    ReLU; parameter names ``conv`` and ``gn``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class UpsampleBilinear2x(nn.Module):
    """``nn.UpsamplingBilinear2d(scale_factor=2)`` (align_corners=True), without its warning."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


@dataclass
class RDSNetOutputs(DenseOutputs):
    """Dense outputs plus the ``(B, N, 2 d)`` object representations."""

    reps: Tensor = None  # type: ignore[assignment]


@dataclass
class RDSNetDetections:
    """One image's detections before masks: boxes (ORIGINAL frame, exclusive), scores, labels and
    the ``(n, 2 d)`` representations of the anchors they came from."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    reps: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, idx: Tensor) -> "RDSNetDetections":
        return RDSNetDetections(self.boxes[idx], self.scores[idx], self.labels[idx], self.reps[idx])


# ----------------------------------------------------------------------------------- object stream
class RDSNetHead(nn.Module):
    """The object stream (``RdsRetinaHead``): box / class / representation outputs, the box
    losses and the box inference.  Names: ``{cls,reg,rep}_convs.{i}.{conv,gn}``,
    ``retina_{cls,reg,rep}``."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        rep_channels: int = 32,
        norm_groups: int = 32,
        anchor_generator: AnchorGenerator,
        assigner: MaxIoUAssigner,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        smooth_l1_beta: float = 0.11,
        test: DenseTestSettings = DenseTestSettings(),
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rep_channels = rep_channels
        self.anchor_generator = anchor_generator
        a = anchor_generator.num_base_anchors

        def tower() -> nn.ModuleList:
            return nn.ModuleList(
                ConvGN(in_channels if i == 0 else feat_channels, feat_channels, norm_groups) for i in range(stacked_convs)
            )

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.rep_convs = tower()
        self.retina_cls = nn.Conv2d(feat_channels, a * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, a * 4, 3, padding=1)
        self.retina_rep = nn.Conv2d(feat_channels, a * 2 * rep_channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        self.assigner = assigner
        self.coder = DeltaXYWHCoder()  # on exclusive boxes = v1's +1 coder (module docstring)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.beta = smooth_l1_beta
        self.test = test

    def forward(self, feats: Sequence[Tensor]) -> RDSNetOutputs:
        cls, reg, rep = [], [], []
        for f in feats:
            c, r, p = f, f, f
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            for conv in self.rep_convs:
                p = conv(p)
            cls.append(self.retina_cls(c))
            reg.append(self.retina_reg(r))
            rep.append(self.retina_rep(p))
        return RDSNetOutputs(
            cls=flatten_levels(cls, self.num_classes),
            reg=flatten_levels(reg, 4),
            sizes=level_sizes(cls),
            reps=flatten_levels(rep, 2 * self.rep_channels),
        )

    def anchors(self, out: RDSNetOutputs) -> Tensor:
        """All anchors ``(N, 4)``: v1 anchors as exclusive boxes."""
        return torch.cat(self.anchor_generator.grid_anchors(out.sizes, out.cls.device))

    def assign(self, out: RDSNetOutputs, batch: ImageBatch, targets: Sequence[ImageTargets]) -> tuple[Tensor, list[AnchorTargets]]:
        """MaxIoU (0.5 / 0.4, every gt also takes its best anchors) on each image's valid anchors."""
        anchors = self.anchors(out)
        assigned = []
        for i, t in enumerate(targets):
            pad = pad_shape(batch.image_sizes[i], batch.padded_size)
            valid = torch.cat(self.anchor_generator.valid_flags(out.sizes, pad, anchors.device))
            assigned.append(assign_anchors(self.assigner, anchors, t.boxes, t.labels, self.num_classes, valid=valid))
        return anchors, assigned

    def loss(
        self, out: RDSNetOutputs, anchors: Tensor, assigned: list[AnchorTargets], targets: Sequence[ImageTargets]
    ) -> dict[str, Tensor]:
        avg = float(sum(max(a.num_pos, 1) for a in assigned))  # mmdet v1's num_total_pos
        cls_terms, box_terms = [], []
        for i, (t, a) in enumerate(zip(targets, assigned)):
            cls_terms.append(
                focal_cls_loss(out.cls[i], a, self.num_classes, alpha=self.focal_alpha, gamma=self.focal_gamma)
            )
            pos = a.pos
            if pos.numel():
                target = self.coder.encode(anchors[pos], t.boxes[a.gt_inds[pos]])
                box_terms.append(smooth_l1(out.reg[i][pos].float(), target, self.beta).sum())
            else:
                box_terms.append(out.reg[i].sum() * 0.0)
        return {"loss_cls": torch.stack(cls_terms).sum() / avg, "loss_bbox": torch.stack(box_terms).sum() / avg}

    def decode_v1(self, anchors: Tensor, deltas: Tensor, size: tuple[int, int]) -> Tensor:
        """v1 ``delta2bbox`` with ``max_shape``: inclusive boxes clamped to the image."""
        return clamp_v1(to_v1(self.coder.decode(anchors, deltas)), size)

    @torch.no_grad()
    def predict_boxes(self, out: RDSNetOutputs, batch: ImageBatch) -> list[RDSNetDetections]:
        """Per image: detections in the ORIGINAL frame (exclusive boxes), best first, with reps."""
        ts = self.test
        anchors = self.anchors(out)
        results = []
        for i, size in enumerate(batch.image_sizes):
            scores = out.cls[i].detach().float().sigmoid()
            rows, labels, vals = topk_per_level(scores, out.counts, ts.nms_pre)
            ok = vals > ts.score_thr
            rows, labels, vals = rows[ok], labels[ok], vals[ok]
            v1 = self.decode_v1(anchors[rows], out.reg[i][rows].detach().float(), size)
            sf = batch.scale_factors[i].to(v1)
            boxes = from_v1(v1 / sf.repeat(2)[None])  # v1 rescales the inclusive box
            keep, kept = class_nms(boxes, vals, labels, ts)
            results.append(RDSNetDetections(boxes[keep], kept, labels[keep], out.reps[i][rows[keep]].detach().float()))
        return results


# ----------------------------------------------------------------------------------- pixel stream
class RDSNetPixelHead(nn.Module):
    """The pixel stream (``RdsMaskHead``): P3..P(2+num_levels) fused at stride 8, then
    ``num_final_convs`` x [conv, up] and a 1x1 conv to ``rep_channels``.  Names:
    ``lateral_convs.{level}.{j}.{conv,gn}`` (odd ``j`` are the parameter-free upsamplers),
    ``final_convs.{k}.0.{conv,gn}``, ``conv_reps``."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int = 256,
        rep_channels: int = 32,
        num_levels: int = 3,
        num_final_convs: int = 1,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.lateral_convs = nn.ModuleList([nn.ModuleList([ConvGN(in_channels, channels, norm_groups)])])
        for level in range(1, num_levels):
            path = nn.ModuleList()
            c = in_channels
            for _ in range(level):
                path.append(ConvGN(c, channels, norm_groups))
                path.append(UpsampleBilinear2x())
                c = channels
            self.lateral_convs.append(path)
        self.final_convs = nn.ModuleList(
            nn.ModuleList([ConvGN(channels, channels, norm_groups), UpsampleBilinear2x()]) for _ in range(num_final_convs)
        )
        self.conv_reps = nn.Conv2d(channels, rep_channels, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_reps.weight, std=0.01)
        nn.init.zeros_(self.conv_reps.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Pixel representations ``(B, d, H / 4, W / 4)`` from the FPN levels (P3 first)."""
        x = feats[0]
        for m in self.lateral_convs[0]:
            x = m(x)
        for path, feat in zip(self.lateral_convs[1:], feats[1 : self.num_levels]):
            for m in path:
                feat = m(feat)
            if feat.shape[-2:] != x.shape[-2:]:  # inputs not a multiple of 32 (the official code assumes they are)
                feat = F.interpolate(feat, size=x.shape[-2:], mode="bilinear", align_corners=True)
            x = x + feat
        for block in self.final_convs:
            for m in block:
                x = m(x)
        return self.conv_reps(x)


# ----------------------------------------------------------------------------------- correlation
def correlate(pixel_reps: Tensor, obj_reps: Tensor) -> Tensor:
    """The correlation module for one image: ``(d, h, w)`` pixel reps and ``(n, 2 d)`` object
    reps -> ``(n, 2, h, w)`` logits (channel 0 background, 1 foreground); one matmul
    ``(h w, d) @ (d, 2 n)``, equal to a 1x1 convolution with each object's two kernels."""
    d, h, w = pixel_reps.shape
    n = obj_reps.shape[0]
    kernels = obj_reps.reshape(2 * n, d)
    logits = pixel_reps.reshape(d, h * w).t() @ kernels.t().to(pixel_reps.dtype)
    return logits.t().reshape(n, 2, h, w)


def ohem_mask_loss(logits: Tensor, target: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Per-object mask loss ``(n,)`` and the kept-pixel mask ``(n, h, w)``.

    ``target`` holds 1 (fg), 0 (bg) and -1 (ignored, outside the crop).  2-class CE; with
    ``ratio > 0`` only the ``floor(ratio * #fg)`` background pixels of highest loss are kept (all
    of them when there are fewer); loss = sum over kept pixels / (#kept + 1).
    """
    n, _, h, w = logits.shape
    ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none").reshape(n, -1)
    t = target.reshape(n, -1)
    fg, bg = t == 1, t == 0
    if ratio > 0 and n:
        k = torch.clamp((ratio * fg.sum(dim=1)).floor().long(), max=h * w - 1)
        ranked = torch.where(bg, ce.detach(), torch.full_like(ce, -math.inf))
        order = ranked.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
        kept_bg = bg & (rank < k[:, None])
    else:
        kept_bg = bg
    kept = fg | kept_bg
    loss = (ce * kept).sum(dim=1) / (kept.sum(dim=1).float() + 1)
    return loss, kept.reshape(n, h, w)


@dataclass
class RDSNetSettings:
    """Mask settings (defaults: the official train_cfg / test_cfg)."""

    masks_to_train: int = 100
    min_mask_area: float = 100.0
    train_crop: float = 0.25  # per side, relative to (w + 1): 1.5x
    test_crop: float = 0.1  # 1.2x
    ohem_ratio: float = 1.0  # kept background : foreground pixels; 0 = keep every background pixel in the crop
    mask_loss_weight: float = 1.0
    mask_thr: float = 0.4


class RDSNetMaskLogic(nn.Module):
    """Correlation + cropping: the mask loss and mask inference (parameter-free; the
    ``OneStageDetector``'s ``logic``)."""

    def __init__(self, settings: RDSNetSettings) -> None:
        super().__init__()
        self.settings = settings

    @staticmethod
    def _map_size(pixel: Tensor, pad: tuple[int, int], padded: tuple[int, int]) -> tuple[int, int]:
        """Rows / columns of the stride-4 map that belong to an image padded to ``pad``."""
        stride = padded[0] / pixel.shape[-2]
        return min(int(math.ceil(pad[0] / stride)), pixel.shape[-2]), min(int(math.ceil(pad[1] / stride)), pixel.shape[-1])

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        out: RDSNetOutputs,
        pixel_reps: Tensor,
        batch: ImageBatch,
        targets: Sequence[ImageTargets],
        assigned: list[AnchorTargets],
    ) -> Tensor:
        st = self.settings
        terms: list[Tensor] = []
        num_objects = 0
        for i, (t, a) in enumerate(zip(targets, assigned)):
            pos = a.pos
            if pos.numel() == 0 or t.masks is None or len(t) == 0:
                continue
            gt_idx = a.gt_inds[pos]
            areas = t.masks.areas().to(pos.device)
            keep = areas[gt_idx] > st.min_mask_area
            pos, gt_idx = pos[keep], gt_idx[keep]
            if pos.numel() > st.masks_to_train:
                pick = torch.randperm(pos.numel(), device=pos.device)[: st.masks_to_train]
                pos, gt_idx = pos[pick], gt_idx[pick]
            if pos.numel() == 0:
                continue
            pad = pad_shape(batch.image_sizes[i], batch.padded_size)
            pad = (max(pad[0], t.masks.frame[0]), max(pad[1], t.masks.frame[1]))
            hm, wm = self._map_size(pixel_reps[i], pad, batch.padded_size)
            logits = correlate(pixel_reps[i, :, :hm, :wm], out.reps[i][pos])
            uniq, inv = torch.unique(gt_idx, return_inverse=True)
            small = resample_masks(t.masks.select(uniq.cpu()).pad(pad), pad, (hm, wm), logits.device)[inv]
            gt_v1 = clamp_v1(to_v1(t.boxes[gt_idx].float()), batch.image_sizes[i])
            scale = gt_v1.new_tensor([wm / pad[1], hm / pad[0]]).repeat(2)[None]
            crop = expanded_box_mask(gt_v1 * scale, (hm, wm), st.train_crop)
            target = torch.where(crop, small.long(), torch.full_like(small, -1, dtype=torch.long))
            loss, _ = ohem_mask_loss(logits, target, st.ohem_ratio)
            terms.append(loss.sum())
            num_objects += int(pos.numel())
        if not terms:
            return (pixel_reps.sum() + out.reps.sum()) * 0.0
        return st.mask_loss_weight * torch.stack(terms).sum() / (num_objects + 1)

    # ------------------------------------------------------------------ inference
    def iter_probs(
        self, pixel: Tensor, dets: RDSNetDetections, batch: ImageBatch, i: int
    ) -> Iterator[tuple[slice, Tensor]]:
        """Cropped fg probabilities in the ORIGINAL frame, chunk by chunk: ``(slice, (c, H, W))``."""
        n = len(dets)
        h, w = batch.image_sizes[i]
        frame = batch.original_sizes[i]
        pad = pad_shape((h, w), batch.padded_size)
        hm, wm = self._map_size(pixel, pad, batch.padded_size)
        pix = pixel[:, :hm, :wm].float()
        v1 = to_v1(dets.boxes)
        step = max(1, PROB_CHUNK_ELEMENTS // max(2 * pad[0] * pad[1], 2 * frame[0] * frame[1], 1))
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            logits = correlate(pix, dets.reps[sl])
            # softmax over (bg, fg) = sigmoid(fg - bg), and bilinear resizing is linear: resizing the
            # difference once equals the official resize-both-then-softmax at half the cost
            diff = logits[:, 1:] - logits[:, :1]
            up = F.interpolate(diff, size=pad, mode="bilinear", align_corners=False)[:, :, :h, :w]
            up = F.interpolate(up, size=frame, mode="bilinear", align_corners=True)
            probs = torch.sigmoid(up[:, 0])
            probs = probs * expanded_box_mask(v1[sl], frame, self.settings.test_crop).to(probs.dtype)
            yield sl, probs

    @torch.no_grad()
    def predict_masks(
        self, pixel: Tensor, dets: RDSNetDetections, batch: ImageBatch, i: int, mbrm=None
    ) -> tuple[Tensor, Tensor]:
        """``(n, H, W)`` bool masks (> ``mask_thr``) in the original frame and the boxes
        (refined by ``mbrm`` when given, from the masks' probabilities before binarising)."""
        frame = batch.original_sizes[i]
        masks = torch.zeros((len(dets), *frame), dtype=torch.bool, device=pixel.device)
        boxes = dets.boxes.clone()
        for sl, probs in self.iter_probs(pixel, dets, batch, i):
            if mbrm is not None:
                boxes[sl] = mbrm.refine(probs, dets.boxes[sl]).to(boxes.dtype)
            masks[sl] = probs > self.settings.mask_thr
        return masks, boxes

    @torch.no_grad()
    def mask_profiles(self, pixel: Tensor, dets: RDSNetDetections, batch: ImageBatch, i: int) -> tuple[Tensor, Tensor]:
        """MBRM's profiles (max over rows ``(n, W)``, over columns ``(n, H)``) of the cropped
        probabilities, without holding all full-frame maps at once."""
        from instseg.modeling.refiners.mbrm import MBRM

        h0, w0 = batch.original_sizes[i]
        horiz = pixel.new_zeros((len(dets), w0), dtype=torch.float32)
        vert = pixel.new_zeros((len(dets), h0), dtype=torch.float32)
        for sl, probs in self.iter_probs(pixel, dets, batch, i):
            horiz[sl], vert[sl] = MBRM.profiles(probs)
        return horiz, vert
