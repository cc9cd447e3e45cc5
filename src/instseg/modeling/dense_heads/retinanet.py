"""RetinaNet's head, as mmdetection's ``RetinaHead`` (``retinanet_r50_fpn_1x_coco``).

Two towers of ``stacked_convs`` x [3x3 conv + ReLU] on every level (shared across levels), then a
3x3 conv to ``A * C`` sigmoid class logits and one to ``A * 4`` deltas.  Init: normal(std 0.01),
class bias ``-log((1 - 0.01) / 0.01)`` so every anchor starts at probability 0.01.

Training: ``MaxIoUAssigner(0.5, 0.4, min_pos_iou 0)`` on all anchors, no sampling; sigmoid focal
loss (``torchvision.ops.sigmoid_focal_loss``, alpha 0.25, gamma 2) over every non-ignored anchor
and L1 on the positives' deltas, both divided by the batch's positives.  Test: per level the top
``nms_pre`` (anchor, class) pairs above ``score_thr``, decoded and clipped, mapped to the original
frame, boxes of zero size dropped, NMS (``model.nms``), ``max_per_img`` kept.

Parameter names equal mmdetection's ``bbox_head.*``: ``cls_convs.{i}.conv``, ``reg_convs.{i}.conv``,
``retina_cls``, ``retina_reg``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import (
    DenseTestSettings,
    assign_anchors,
    focal_cls_loss,
    class_nms,
    flatten_levels,
    level_sizes,
    loss_normaliser,
    topk_per_level,
)
from instseg.modeling.necks.fpn import ConvWrapper
from instseg.ops.anchors import AnchorGenerator
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.boxes import larger_than, rescale_boxes
from instseg.ops.losses import box_regression_loss
from instseg.structures.instances import ImageBatch, ImageTargets


@dataclass
class DenseOutputs:
    """A dense head's outputs, flattened over levels: ``cls (B, N, C)``, ``reg (B, N, 4)``."""

    cls: Tensor
    reg: Tensor
    sizes: list[tuple[int, int]]

    @property
    def counts(self) -> list[int]:
        a = self.cls.shape[1] // max(sum(h * w for h, w in self.sizes), 1)
        return [h * w * a for h, w in self.sizes]


ANCHOR_CACHE_SIZE = 8  # anchor sets a dense head keeps (one per input size in use)


def conv_tower(in_channels: int, feat_channels: int, depth: int) -> nn.ModuleList:
    """``depth`` 3x3 convs (ReLU applied by the caller), mmcv ``ConvModule`` names (``.conv``)."""
    return nn.ModuleList(ConvWrapper(in_channels if i == 0 else feat_channels, feat_channels, 3) for i in range(depth))


def run_tower(tower: nn.ModuleList, x: Tensor) -> Tensor:
    for conv in tower:
        # in place on the fresh conv output: same values, one full-size temporary less per conv
        x = F.relu(conv(x), inplace=True)
    return x


class RetinaHead(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        anchor_generator: AnchorGenerator,
        assigner: MaxIoUAssigner,
        coder: DeltaXYWHCoder | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loss_bbox: str = "l1",
        test: DenseTestSettings = DenseTestSettings(),
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        a = anchor_generator.num_base_anchors
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs)
        self.reg_convs = conv_tower(in_channels, feat_channels, stacked_convs)
        self.retina_cls = nn.Conv2d(feat_channels, a * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, a * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        self.assigner = assigner
        self.coder = coder or DeltaXYWHCoder()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loss_bbox = loss_bbox
        self.test = test
        self._anchor_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def forward(self, feats: Sequence[Tensor]) -> DenseOutputs:
        cls, reg = [], []
        for f in feats:
            cls.append(self.retina_cls(run_tower(self.cls_convs, f)))
            reg.append(self.retina_reg(run_tower(self.reg_convs, f)))
        return DenseOutputs(flatten_levels(cls, self.num_classes), flatten_levels(reg, 4), level_sizes(cls))

    def anchors(self, out: DenseOutputs, padded_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """All anchors ``(N, 4)`` and whether each lies in the padded input (mmdet's valid flags).

        Cached per (level sizes, padded size, device): a batch of the usual input size reuses
        them (callers only index them, never write).  The cache keeps the last
        ``ANCHOR_CACHE_SIZE`` keys, so multi-scale inputs cannot grow it without bound."""
        device = out.cls.device
        key = (tuple(out.sizes), tuple(int(v) for v in padded_size), str(device))
        hit = self._anchor_cache.get(key)
        if hit is not None:
            return hit
        anchors = torch.cat(self.anchor_generator.grid_anchors(out.sizes, device))
        valid = torch.cat(self.anchor_generator.valid_flags(out.sizes, padded_size, device))
        if len(self._anchor_cache) >= ANCHOR_CACHE_SIZE:
            self._anchor_cache.pop(next(iter(self._anchor_cache)))
        self._anchor_cache[key] = (anchors, valid)
        return anchors, valid

    def loss(self, out: DenseOutputs, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        anchors, valid = self.anchors(out, batch.padded_size)
        assigned = [
            assign_anchors(self.assigner, anchors, t.boxes, t.labels, self.num_classes, valid=valid) for t in targets
        ]
        avg = loss_normaliser(assigned)
        cls_terms, box_terms = [], []
        for i, (t, a) in enumerate(zip(targets, assigned)):
            cls_terms.append(
                focal_cls_loss(out.cls[i], a, self.num_classes, alpha=self.focal_alpha, gamma=self.focal_gamma)
            )
            pos = a.pos
            if pos.numel():
                target = self.coder.encode(anchors[pos], t.boxes[a.gt_inds[pos]])
                box_terms.append(box_regression_loss(out.reg[i][pos].float(), target, self.loss_bbox).sum())
            else:
                box_terms.append(out.reg[i].sum() * 0.0)
        return {"loss_cls": torch.stack(cls_terms).sum() / avg, "loss_bbox": torch.stack(box_terms).sum() / avg}

    @torch.no_grad()
    def predict_boxes(self, out: DenseOutputs, batch: ImageBatch) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image ``(boxes in the ORIGINAL frame, scores, labels)``, best first."""
        ts = self.test
        anchors, _ = self.anchors(out, batch.padded_size)
        results = []
        for i, size in enumerate(batch.image_sizes):
            scores = out.cls[i].detach().float().sigmoid()
            rows, labels, vals = topk_per_level(scores, out.counts, ts.nms_pre, score_thr=ts.score_thr)
            boxes = self.coder.decode(anchors[rows], out.reg[i][rows].detach().float(), max_shape=size)
            # like mmdet, NMS runs on the boxes mapped back to the original image
            boxes = rescale_boxes(boxes, batch.scale_factors[i])
            ok = larger_than(boxes, ts.min_bbox_size)
            boxes, vals, labels = boxes[ok], vals[ok], labels[ok]
            keep, kept_scores = class_nms(boxes, vals, labels, ts)
            results.append((boxes[keep], kept_scores, labels[keep]))
        return results
