"""Region Proposal Network head, as mmdetection's ``RPNHead``.

A shared 3x3 conv + ReLU, then 1x1 convs for one sigmoid objectness logit and four deltas per
anchor.  Training assigns anchors with ``MaxIoUAssigner(0.7, 0.3, min_pos 0.3)``, samples 256 per
image (half positive) and normalises both losses by the number of sampled anchors.  Proposals
are taken per level (top ``pre_nms`` scores), decoded, clipped, filtered by size, NMSed at 0.7
separately per level, and the best ``post_nms`` kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import flatten_levels
from instseg.ops.anchors import AnchorGenerator, inside_flags
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.boxes import larger_than
from instseg.ops.losses import box_regression_loss
from instseg.ops.nms import batched_nms
from instseg.ops.sampler import RandomSampler


@dataclass
class ProposalSettings:
    """How many proposals survive each step (mmdet's ``rpn_proposal`` / ``rpn`` test config)."""

    pre_nms: int = 1000
    post_nms: int = 1000
    nms_iou: float = 0.7
    min_size: float = 0.0


class RPNHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        feat_channels: int,
        anchor_generator: AnchorGenerator,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        loss_bbox: str = "l1",
        allowed_border: float = -1.0,
        train_proposals: ProposalSettings = ProposalSettings(2000, 1000),
        test_proposals: ProposalSettings = ProposalSettings(1000, 1000),
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        num_anchors = anchor_generator.num_base_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.coder = DeltaXYWHCoder()
        self.assigner = assigner
        self.sampler = sampler
        self.loss_bbox = loss_bbox
        self.allowed_border = allowed_border
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits ``(B, A, H, W)`` and deltas ``(B, 4A, H, W)``."""
        logits, deltas = [], []
        for f in feats:
            t = F.relu(self.rpn_conv(f))
            logits.append(self.rpn_cls(t))
            deltas.append(self.rpn_reg(t))
        return logits, deltas

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def proposals(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        image_sizes: list[tuple[int, int]],
        settings: ProposalSettings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: proposal boxes ``(N, 4)`` (input frame) and their sigmoid scores, best first."""
        feat_sizes = [tuple(x.shape[-2:]) for x in logits]
        anchors = self.anchor_generator.grid_anchors(feat_sizes, logits[0].device)
        boxes_out, scores_out = [], []
        for i, size in enumerate(image_sizes):
            lvl_boxes, lvl_scores, lvl_ids = [], [], []
            for lvl, (lg, dt, anc) in enumerate(zip(logits, deltas, anchors)):
                scores = lg[i].detach().permute(1, 2, 0).reshape(-1).float().sigmoid()
                d = dt[i].detach().permute(1, 2, 0).reshape(-1, 4).float()
                if scores.numel() > settings.pre_nms:
                    # partial selection, not a full sort: P2 alone has ~180k anchors at 800x1216
                    scores, order = scores.topk(settings.pre_nms, sorted=True)
                    d, a = d[order], anc[order]
                else:
                    a = anc
                lvl_boxes.append(self.coder.decode(a, d, max_shape=size))
                lvl_scores.append(scores)
                lvl_ids.append(torch.full_like(scores, lvl, dtype=torch.int64))
            boxes = torch.cat(lvl_boxes)
            scores = torch.cat(lvl_scores)
            ids = torch.cat(lvl_ids)
            ok = larger_than(boxes, settings.min_size)
            boxes, scores, ids = boxes[ok], scores[ok], ids[ok]
            keep = batched_nms(boxes, scores, ids, settings.nms_iou)[: settings.post_nms]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        image_sizes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        device = logits[0].device
        feat_sizes = [tuple(x.shape[-2:]) for x in logits]
        anchors = torch.cat(self.anchor_generator.grid_anchors(feat_sizes, device))
        num_images = logits[0].shape[0]
        flat_logits = flatten_levels(logits, 1)[..., 0]
        flat_deltas = flatten_levels(deltas, 4)
        cls_terms, box_terms = [], []
        avg_factor = 0
        # like mmdet v3, anchor validity is judged against the padded batch shape ("pad_shape");
        # only allowed_border >= 0 restricts anchors to the un-padded image
        padded = (feat_sizes[0][0] * self.anchor_generator.strides[0], feat_sizes[0][1] * self.anchor_generator.strides[0])
        valid = torch.cat(self.anchor_generator.valid_flags(feat_sizes, padded, device))
        for i in range(num_images):
            inside = inside_flags(anchors, valid, image_sizes[i], self.allowed_border)
            idx = torch.nonzero(inside).flatten()
            anc = anchors[idx]
            gts = gt_boxes[i]
            labels = torch.zeros(gts.shape[0], dtype=torch.int64, device=device)
            assign = self.assigner.assign(anc, gts, labels)
            sample = self.sampler.sample(assign, anc, gts, labels, generator)
            avg_factor += sample.avg_factor
            pos, neg = idx[sample.pos_inds], idx[sample.neg_inds]
            lg = flat_logits[i]
            cls_terms.append(
                F.binary_cross_entropy_with_logits(lg[pos], torch.ones_like(lg[pos]), reduction="sum")
                + F.binary_cross_entropy_with_logits(lg[neg], torch.zeros_like(lg[neg]), reduction="sum")
            )
            if pos.numel():
                target = self.coder.encode(anc[sample.pos_inds], gts[sample.pos_gt_inds])
                box_terms.append(box_regression_loss(flat_deltas[i][pos], target, self.loss_bbox).sum())
            else:
                box_terms.append(flat_deltas[i].sum() * 0.0)
        avg = max(float(avg_factor), 1.0)
        return {
            "loss_rpn_cls": torch.stack(cls_terms).sum() / avg,
            "loss_rpn_bbox": torch.stack(box_terms).sum() / avg,
        }
