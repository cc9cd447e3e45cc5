"""YOLACT (Bolya et al., ICCV 2019): a shared prediction head with mask coefficients, and a
protonet whose prototypes the coefficients combine into instance masks.

One implementation, two sources (``YolactSettings.flavor``), because the official code and
mmdetection's port differ in ways that change outputs (``specs/yolact_rdsnet.md`` 1.7):

============================  ===================================  ===============================
                              ``official`` (dbolya/yolact)          ``mmdet`` (mmdetection 3.3.0)
============================  ===================================  ===============================
anchors                       square ``s*sqrt(ar)``, order 1,1/2,2  ``AnchorGenerator``, 0.5,1,2
background column             first                                 last
box coding                    SSD variances, relative coords        ``DeltaXYWH`` stds .1/.2, clipped
matching                      "less greedy" force-match + crowds    ``MaxIoUAssigner`` (one best/gt)
candidates at test            max fg score > ``score_thr``          top ``nms_pre`` per level
Fast NMS 2nd threshold        no                                    score > ``score_thr``
loss after the 100-mask cut   rescaled by old/new                   not rescaled
output boxes                  truncated to integers                 float
============================  ===================================  ===============================

The FPN differences (ReLU on P3-P5, P6 from P5 vs from C5) are FPN options set by ``zoo.py``.

Losses (both): OHEM softmax CE (3 negatives per positive, mined by background loss), smooth-L1
(beta 1) x 1.5 on the positives' deltas, mask BCE x ``mask_alpha`` on ``sigmoid(P C^T)`` cropped
with the matched gt box and normalised by that box's area in prototype pixels, a semantic BCE on
P3 (x 1 / (h w) / batch); C, B and M are divided by the batch's positives.

Parameter names follow mmdetection: ``bbox_head.{head_convs.0.conv, conv_cls, conv_reg, conv_coeff}``,
``mask_head.{protonet.{0,2,4,8,10}, segm_branch.segm_conv}`` (``convert/yolact.py`` maps the official
names onto them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import (
    AnchorTargets,
    DenseTestSettings,
    assign_anchors,
    class_nms,
    flatten_levels,
    level_sizes,
    loss_normaliser,
    topk_anchors_per_level,
)
from instseg.ops.nms import fast_nms_dense
from instseg.modeling.dense_heads.retinanet import DenseOutputs, run_tower
from instseg.modeling.necks.fpn import ConvWrapper
from instseg.ops.anchors import AnchorGenerator, YolactPriorGenerator
from instseg.ops.box_coder import DeltaXYWHCoder, SSDCoder
from instseg.ops.boxes import rescale_boxes
from instseg.ops.losses import smooth_l1
from instseg.structures.instances import ImageBatch, ImageTargets
from instseg.structures.masks import CroppedMasks

FLAVORS = ("official", "mmdet")


@dataclass
class YolactSettings:
    """Training and test settings of YOLACT (defaults: the official ``yolact_base_config``)."""

    flavor: str = "official"
    neg_pos_ratio: int = 3
    box_weight: float = 1.5
    mask_alpha: float = 6.125
    semantic_weight: float = 1.0
    masks_to_train: int = 100
    mask_thr: float = 0.5


@dataclass
class YolactOutputs(DenseOutputs):
    """Dense outputs plus the ``(B, N, k)`` tanh mask coefficients."""

    coeffs: Tensor = None  # type: ignore[assignment]


@dataclass
class DenseDetections:
    """One image's detections before masks: final boxes (original frame), scores, labels, and
    what the mask branch needs: the boxes to crop with (relative to the network input) and the
    mask coefficients."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    crop_boxes: Tensor
    coeffs: Tensor


@dataclass
class Candidates:
    """The candidate anchors of one image before NMS, with every class's score (YOLACT scores
    each (anchor, class) pair, but boxes are per anchor, so they are decoded once per anchor).

    ``anchors``: index of each candidate in the image's anchors; ``scores (K, C)`` foreground
    probabilities; ``nms_boxes (K, 4)`` what NMS compares (official: relative; mmdet: input
    pixels); ``rel_boxes`` the same relative to the input (for the mask crop); ``pair_thr``: pairs
    at or below it are dropped before a greedy / soft NMS (the official "traditional" path);
    ``second_thr``: threshold applied after NMS (mmdet's Fast NMS), or ``None``.
    """

    anchors: Tensor
    scores: Tensor
    nms_boxes: Tensor
    rel_boxes: Tensor
    pair_thr: float | None
    second_thr: float | None


@dataclass
class Selected:
    """Kept (candidate anchor, class) pairs: ``rows`` index ``Candidates.anchors``."""

    rows: Tensor
    labels: Tensor
    scores: Tensor


class YolactBoxHead(nn.Module):
    """The prediction head shared by P3-P7: ``num_head_convs`` x [3x3 conv + ReLU], then three
    3x3 convs: ``A (C + 1)`` class logits, ``A 4`` deltas and ``A k`` coefficients (tanh)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        feat_channels: int,
        num_anchors: int,
        num_protos: int = 32,
        num_head_convs: int = 1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_protos = num_protos
        self.head_convs = nn.ModuleList(
            ConvWrapper(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(num_head_convs)
        )
        self.conv_cls = nn.Conv2d(feat_channels, num_anchors * (num_classes + 1), 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, num_anchors * 4, 3, padding=1)
        self.conv_coeff = nn.Conv2d(feat_channels, num_anchors * num_protos, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> YolactOutputs:
        cls, reg, coeff = [], [], []
        for f in feats:
            x = run_tower(self.head_convs, f)
            cls.append(self.conv_cls(x))
            reg.append(self.conv_reg(x))
            coeff.append(self.conv_coeff(x).tanh())
        return YolactOutputs(
            cls=flatten_levels(cls, self.num_classes + 1),
            reg=flatten_levels(reg, 4),
            sizes=level_sizes(cls),
            coeffs=flatten_levels(coeff, self.num_protos),
        )


class SegmentationModule(nn.Module):
    """The training-only semantic branch: a 1x1 conv on P3 to one logit map per class."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.segm_conv = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.xavier_uniform_(self.segm_conv.weight)
        nn.init.zeros_(self.segm_conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.segm_conv(x)


class Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class YolactProtonet(nn.Module):
    """Prototypes from P3: 3 x [3x3 conv + ReLU], bilinear x2 (+ ReLU), [3x3 conv + ReLU], 1x1
    conv to ``k``, ReLU (``mask_proto_prototype_activation``).  Sequential indices 0, 2, 4, 8, 10
    hold the convs, as in both reference implementations."""

    def __init__(self, *, in_channels: int, channels: int, num_protos: int = 32, num_classes: int, semantic: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(3):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(inplace=True)]
            c = channels
        layers += [Upsample2x(), nn.ReLU(inplace=True), nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(channels, num_protos, 1), nn.ReLU(inplace=True)]
        self.protonet = nn.Sequential(*layers)
        for m in self.protonet:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.segm_branch = SegmentationModule(in_channels, num_classes) if semantic else None

    def forward(self, p3: Tensor) -> Tensor:
        """Prototypes ``(B, k, H, W)`` (stride 4)."""
        return self.protonet(p3)


def crop_masks(masks: Tensor, boxes: Tensor, padding: int = 1) -> Tensor:
    """Zeroes ``masks (n, h, w)`` outside ``boxes (n, 4)`` given RELATIVE to the mask frame.

    The official ``crop`` (``sanitize_coordinates`` with ``cast=False``): ``x1 = clamp(min(bx1,
    bx2) * w - padding, min=0)``, ``x2 = clamp(max(bx1, bx2) * w + padding, max=w)``; column ``c``
    is kept when ``x1 <= c < x2`` (likewise rows).
    """
    n, h, w = masks.shape
    bx1, bx2 = boxes[:, 0] * w, boxes[:, 2] * w
    by1, by2 = boxes[:, 1] * h, boxes[:, 3] * h
    x1 = torch.clamp(torch.min(bx1, bx2) - padding, min=0)
    x2 = torch.clamp(torch.max(bx1, bx2) + padding, max=w)
    y1 = torch.clamp(torch.min(by1, by2) - padding, min=0)
    y2 = torch.clamp(torch.max(by1, by2) + padding, max=h)
    cols = torch.arange(w, device=masks.device, dtype=x1.dtype)[None, None, :]
    rows = torch.arange(h, device=masks.device, dtype=x1.dtype)[None, :, None]
    col_ok = (cols >= x1[:, None, None]) & (cols < x2[:, None, None])  # (n, 1, w)
    row_ok = (rows >= y1[:, None, None]) & (rows < y2[:, None, None])  # (n, h, 1)
    # the 0/1 window as an outer product: one (n, h, w) temporary instead of three
    return masks * (row_ok.to(masks.dtype) * col_ok.to(masks.dtype))


MASK_CHUNK = 16  # instances resampled at once: bounds the dense temporaries for crowded images


def resample_masks(masks: CroppedMasks, frame: tuple[int, int], size: tuple[int, int], device) -> Tensor:
    """Bilinear (``align_corners=False``) resize of every mask, laid in a ``frame``-sized canvas,
    to ``size``, binarised at > 0.5 (what both references do to full-resolution gt masks).

    Works in chunks of ``MASK_CHUNK`` dense masks so hundreds of instances stay cheap."""
    n = len(masks)
    out = torch.zeros((n, *size), dtype=torch.float32, device=device)
    fh, fw = frame
    for start in range(0, n, MASK_CHUNK):
        idx = list(range(start, min(n, start + MASK_CHUNK)))
        canvas = torch.zeros((len(idx), fh, fw), dtype=torch.float32)
        for k, i in enumerate(idx):
            crop = masks.crops[i]
            x0, y0 = (int(v) for v in masks.offsets[i])
            ch, cw = min(crop.shape[0], fh - y0), min(crop.shape[1], fw - x0)
            if ch > 0 and cw > 0:
                canvas[k, y0 : y0 + ch, x0 : x0 + cw] = crop[:ch, :cw].float()
        small = F.interpolate(canvas[None], size=size, mode="bilinear", align_corners=False)[0]
        out[start : start + len(idx)] = small.gt(0.5).float().to(device)
    return out


class YolactHead(nn.Module):
    """YOLACT's dense part: box head + protonet, with the losses and inference of both flavours.

    ``bbox_head`` and ``mask_head`` are attributes (not this module's own names) of the
    :class:`~instseg.modeling.detectors.one_stage.OneStageDetector`; this class holds the logic
    that joins them.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        priors: AnchorGenerator | YolactPriorGenerator,
        settings: YolactSettings,
        test: DenseTestSettings,
        assigner,
    ) -> None:
        super().__init__()
        if settings.flavor not in FLAVORS:
            raise ValueError(f"model.yolact.flavor: expected one of {FLAVORS}, got {settings.flavor!r}")
        self.num_classes = num_classes
        self.priors = priors
        self.settings = settings
        self.test = test
        self.assigner = assigner
        self.official = settings.flavor == "official"
        self.ssd = SSDCoder()
        self.delta = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))

    # ------------------------------------------------------------------ geometry
    @property
    def bg(self) -> int:
        """Column of the background class in the class logits."""
        return 0 if self.official else self.num_classes

    def fg_scores(self, probs: Tensor) -> Tensor:
        return probs[:, 1:] if self.official else probs[:, :-1]

    def anchors(self, out: YolactOutputs, input_size: tuple[int, int]) -> Tensor:
        """All anchors ``(N, 4)`` XYXY in input pixels."""
        if self.official:
            return torch.cat(self.priors.grid_anchors(out.sizes, out.cls.device, input_size))
        return torch.cat(self.priors.grid_anchors(out.sizes, out.cls.device))

    def relative_priors(self, out: YolactOutputs) -> Tensor:
        return torch.cat(self.priors.priors(out.sizes, out.cls.device))

    def encode(self, anchors: Tensor, boxes: Tensor, input_size: tuple[int, int], rel_priors: Tensor | None) -> Tensor:
        """Regression targets: SSD coding in relative coordinates (official) or mmdet's deltas."""
        if self.official:
            h, w = input_size
            rel = boxes / boxes.new_tensor([w, h, w, h])
            return self.ssd.encode(rel_priors, rel)
        return self.delta.encode(anchors, boxes)

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        out: YolactOutputs,
        prototypes: Tensor,
        semantic_logits: Tensor | None,
        batch: ImageBatch,
        targets: Sequence[ImageTargets],
    ) -> dict[str, Tensor]:
        st = self.settings
        input_size = batch.padded_size
        anchors = self.anchors(out, input_size)
        rel_priors = self.relative_priors(out) if self.official else None
        assigned: list[AnchorTargets] = []
        for t in targets:
            labels = t.labels
            if self.official:
                crowd = getattr(t, "crowd_boxes", None)
                a = assign_anchors(self.assigner, anchors, t.boxes, labels, self.num_classes, crowd_boxes=crowd)
            else:
                a = assign_anchors(self.assigner, anchors, t.boxes, labels, self.num_classes)
            assigned.append(a)
        avg = loss_normaliser(assigned)
        cls_terms, box_terms, mask_terms, sem_terms = [], [], [], []
        proto_h, proto_w = prototypes.shape[-2:]
        for i, (t, a) in enumerate(zip(targets, assigned)):
            cls_terms.append(self._ohem_ce(out.cls[i].float(), a))
            pos = a.pos
            if pos.numel():
                target = self.encode(
                    anchors[pos], t.boxes[a.gt_inds[pos]], input_size, None if rel_priors is None else rel_priors[pos]
                )
                box_terms.append(smooth_l1(out.reg[i][pos].float(), target, 1.0).sum())
            else:
                box_terms.append(out.reg[i].sum() * 0.0)
            gt_small = None
            if t.masks is not None and len(t) and pos.numel():
                gt_small = resample_masks(t.masks.pad(input_size), input_size, (proto_h, proto_w), prototypes.device)
            mask_terms.append(self._mask_loss(prototypes[i], out.coeffs[i], a, t, gt_small, input_size))
            if semantic_logits is not None:
                sem_terms.append(self._semantic_loss(semantic_logits[i], t, input_size))
        losses = {
            "loss_cls": torch.stack(cls_terms).sum() / avg,
            "loss_bbox": st.box_weight * torch.stack(box_terms).sum() / avg,
            "loss_mask": st.mask_alpha * torch.stack(mask_terms).sum() / avg,
        }
        if semantic_logits is not None:
            losses["loss_segm"] = st.semantic_weight * torch.stack(sem_terms).sum() / len(targets)
        return losses

    def _ohem_ce(self, logits: Tensor, a: AnchorTargets) -> Tensor:
        """Softmax CE over the positives and the hardest ``neg_pos_ratio`` x as many negatives.

        Negatives are ranked by their background CE (``logsumexp - logit_bg``, the official
        mining score); with no positives the official code keeps no negative, mmdet keeps all.
        """
        labels = a.labels
        target = torch.where(labels == self.num_classes, torch.full_like(labels, self.bg), self._to_column(labels))
        pos = torch.nonzero((labels >= 0) & (labels < self.num_classes)).flatten()
        neg = torch.nonzero(labels == self.num_classes).flatten()
        if pos.numel() == 0 and self.official:
            return logits.sum() * 0.0
        num_neg = neg.numel() if pos.numel() == 0 else min(self.settings.neg_pos_ratio * pos.numel(), neg.numel())
        neg_loss = F.cross_entropy(logits[neg], target[neg], reduction="none")
        hard = neg_loss.topk(num_neg).values if num_neg < neg.numel() else neg_loss
        pos_loss = F.cross_entropy(logits[pos], target[pos], reduction="sum")
        return pos_loss + hard.sum()

    def _to_column(self, labels: Tensor) -> Tensor:
        """Contiguous foreground label -> its column in the class logits."""
        return labels.clamp(min=0) + 1 if self.official else labels.clamp(min=0)

    def _mask_loss(
        self, protos: Tensor, coeffs: Tensor, a: AnchorTargets, t: ImageTargets, gt_small: Tensor | None,
        input_size: tuple[int, int],
    ) -> Tensor:
        pos = a.pos
        if gt_small is None or pos.numel() == 0:
            return protos.sum() * 0.0 + coeffs.sum() * 0.0
        num_pos = pos.numel()
        scale = 1.0
        if num_pos > self.settings.masks_to_train:
            pos = pos[torch.randperm(num_pos, device=pos.device)[: self.settings.masks_to_train]]
            if self.official:
                scale = num_pos / pos.numel()
        gt_idx = a.gt_inds[pos]
        h, w = input_size
        boxes_rel = t.boxes[gt_idx] / t.boxes.new_tensor([w, h, w, h])
        pred = self.mask_probs(protos, coeffs[pos], boxes_rel)
        bce = F.binary_cross_entropy(pred.clamp(0, 1), gt_small[gt_idx], reduction="none").sum(dim=(1, 2))
        mh, mw = protos.shape[-2:]
        # area in prototype pixels; at least one pixel, so a degenerate box cannot blow the loss up
        area = ((boxes_rel[:, 2] - boxes_rel[:, 0]) * mw * (boxes_rel[:, 3] - boxes_rel[:, 1]) * mh).clamp(min=1.0)
        return (bce / area).sum() * scale

    def _semantic_loss(self, logits: Tensor, t: ImageTargets, input_size: tuple[int, int]) -> Tensor:
        c, h, w = logits.shape
        target = torch.zeros_like(logits)
        if t.masks is not None and len(t):
            small = resample_masks(t.masks.pad(input_size), input_size, (h, w), logits.device)
            for k in range(len(t)):
                lab = int(t.labels[k])
                target[lab] = torch.maximum(target[lab], small[k])
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / (h * w)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_boxes(self, out: YolactOutputs, batch: ImageBatch) -> list[DenseDetections]:
        # the batch shares one set of priors (official: relative; mmdet: input pixels)
        priors = self.relative_priors(out) if self.official else self.anchors(out, batch.padded_size)
        return [self._predict_one(out, i, batch, priors) for i in range(out.cls.shape[0])]

    def _predict_one(self, out: YolactOutputs, i: int, batch: ImageBatch, priors: Tensor) -> DenseDetections:
        probs = out.cls[i].detach().float().softmax(dim=-1)
        reg = out.reg[i].detach().float()
        if self.official:
            cand = self.official_candidates(probs, reg, priors)
        else:
            cand = self.mmdet_candidates(probs, reg, priors, out.counts, batch.image_sizes[i])
        sel = self.select(cand)
        rel = cand.rel_boxes[sel.rows]
        if self.official:
            boxes = official_output_boxes(rel, batch.original_sizes[i])
        else:
            boxes = rescale_boxes(cand.nms_boxes[sel.rows], batch.scale_factors[i])
        coeffs = out.coeffs[i][cand.anchors[sel.rows]].detach().float()
        return DenseDetections(boxes, sel.scores, sel.labels, rel, coeffs)

    def official_candidates(self, probs: Tensor, reg: Tensor, rel_priors: Tensor) -> Candidates:
        """The official ``Detect``: the anchors whose best foreground score passes ``score_thr``,
        with all their class scores; boxes decoded in coordinates relative to the input.  For
        the greedy and soft NMS (the official "traditional" path) each pair's score must also
        pass ``score_thr``; Fast NMS sees them all."""
        fg = self.fg_scores(probs)
        kept = torch.nonzero(fg.max(dim=1).values > self.test.score_thr).flatten()
        rel = self.ssd.decode(rel_priors[kept], reg[kept])
        return Candidates(kept, fg[kept], rel, rel, self.test.score_thr, None)

    def mmdet_candidates(
        self, probs: Tensor, reg: Tensor, anchors: Tensor, counts: list[int], image_size: tuple[int, int]
    ) -> Candidates:
        """mmdet's ``_predict_by_feat_single``: per level the ``nms_pre`` anchors of highest max
        foreground score, all classes; boxes decoded and clipped in input pixels; Fast NMS's
        second threshold at ``score_thr``."""
        fg = self.fg_scores(probs)
        rows = topk_anchors_per_level(fg.max(dim=1).values, counts, self.test.nms_pre)
        h, w = image_size
        boxes = self.delta.decode(anchors[rows], reg[rows], max_shape=(h, w))
        rel = boxes / boxes.new_tensor([w, h, w, h])
        return Candidates(rows, fg[rows], boxes, rel, None, self.test.score_thr)

    def select(self, cand: Candidates) -> Selected:
        """NMS of ``model.nms`` over the candidates, then the second threshold and the cap.

        ``fast``: per-class Fast NMS on the dense ``(K, C)`` scores (``fast_nms_dense``);
        ``fast_cross_class``: one candidate per anchor, its best class (the official
        ``--cross_class_nms``); otherwise the (anchor, class) pairs go to ``nms_by_method``.
        """
        ts = self.test
        scores, boxes = cand.scores, cand.nms_boxes
        if ts.nms == "fast":
            rows, labels, vals = fast_nms_dense(boxes, scores, iou_threshold=ts.nms_iou, top_k=ts.nms_top_k)
        elif ts.nms == "fast_cross_class":
            vals, labels = scores.max(dim=1) if scores.numel() else (scores.new_zeros(0), scores.new_zeros(0, dtype=torch.int64))
            rows, vals = class_nms(boxes, vals, labels, ts, max_num=0)
            labels = labels[rows]
        else:
            k, c = scores.shape
            rows = torch.arange(k, device=scores.device)[:, None].expand(k, c).reshape(-1)
            labels = torch.arange(c, device=scores.device).repeat(k)
            vals = scores.reshape(-1)
            if cand.pair_thr is not None:
                ok = vals > cand.pair_thr
                rows, labels, vals = rows[ok], labels[ok], vals[ok]
            keep, vals = class_nms(boxes[rows], vals, labels, ts, max_num=0)
            rows, labels = rows[keep], labels[keep]
        if cand.second_thr is not None:
            ok = vals > cand.second_thr
            rows, labels, vals = rows[ok], labels[ok], vals[ok]
        if ts.max_per_img > 0:
            rows, labels, vals = rows[: ts.max_per_img], labels[: ts.max_per_img], vals[: ts.max_per_img]
        return Selected(rows, labels, vals)

    @torch.no_grad()
    def predict_masks(self, prototypes: Tensor, dets: DenseDetections, frame: tuple[int, int]) -> Tensor:
        """``(n, H, W)`` bool masks in the original frame: ``sigmoid(P C^T)`` cropped at prototype
        resolution with ``dets.crop_boxes``, bilinearly upsampled, thresholded at > ``mask_thr``.

        As both references: the ``n`` masks are combined and cropped at once, made contiguous
        ``(n, h, w)`` (``permute(2, 0, 1).contiguous()``) and upsampled as ``(1, n, h, w)``; the
        upsampling runs ``MASK_CHUNK`` instances at a time (bilinear resampling is per instance, so
        chunks give the same values) and thresholds straight into the output."""
        n = dets.coeffs.shape[0]
        out = torch.empty((n, *frame), dtype=torch.bool, device=prototypes.device)
        if n == 0:
            return out
        # contiguous NCHW input: the plain per-plane kernel (a permuted input would go through the
        # channels-last kernel plus a layout copy of the full-resolution result, ~3x slower on CPU)
        probs = self.mask_probs(prototypes, dets.coeffs, dets.crop_boxes).contiguous()
        for start in range(0, n, MASK_CHUNK):
            sl = slice(start, min(n, start + MASK_CHUNK))
            up = F.interpolate(probs[None, sl], size=frame, mode="bilinear", align_corners=False)[0]
            torch.gt(up, self.settings.mask_thr, out=out[sl])
        return out

    @staticmethod
    def mask_probs(prototypes: Tensor, coeffs: Tensor, crop_boxes: Tensor) -> Tensor:
        """Cropped mask probabilities ``(n, h, w)`` at prototype resolution."""
        # (h, w, k) @ (k, n), as the official code multiplies, so results match it bit for bit
        probs = torch.sigmoid(prototypes.float().permute(1, 2, 0).contiguous() @ coeffs.t()).permute(2, 0, 1)
        return crop_masks(probs, crop_boxes)


def official_output_boxes(rel: Tensor, frame: tuple[int, int]) -> Tensor:
    """The official ``postprocess`` boxes: relative -> pixels of the original image, sorted and
    clamped to ``[0, w] x [0, h]``, truncated to integers (``.long()``); returned as float."""
    h, w = frame
    x1 = torch.clamp(torch.min(rel[:, 0], rel[:, 2]) * w, min=0)
    x2 = torch.clamp(torch.max(rel[:, 0], rel[:, 2]) * w, max=w)
    y1 = torch.clamp(torch.min(rel[:, 1], rel[:, 3]) * h, min=0)
    y2 = torch.clamp(torch.max(rel[:, 1], rel[:, 3]) * h, max=h)
    return torch.stack([x1, y1, x2, y2], dim=1).long().float()
