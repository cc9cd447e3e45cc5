"""Guided-Anchoring RPN head, as mmdetection 3.3.0's ``GARPNHead`` (Wang et al., CVPR 2019).

Per level, on ``f = relu(rpn_conv(x))``:

- ``conv_loc`` (1x1 -> 1): the logit that a location is an object centre;
- ``conv_shape`` (1x1 -> 2): ``(dw, dh)`` of the one anchor of the location;
- ``feature_adaption``: ``conv_offset`` (1x1, 2 -> 18 * deform_groups, no bias) on the *detached*
  shape prediction gives the offsets of ``conv_adaption``, a 3x3 :class:`DeformConv2d` (no bias),
  then ReLU: ``f'``;
- ``conv_cls`` (1x1 -> 1, sigmoid) and ``conv_reg`` (1x1 -> 4) on ``f'``.  At test time they are
  computed only where ``sigmoid(loc) >= loc_filter_thr`` (mmcv's ``MaskedConv2d``: zero elsewhere),
  and only those locations propose.

The guided anchor of a location is its square anchor (``square_generator``: ratio 1, scale
``octave_base_scale``) decoded with deltas ``(0, 0, dw, dh)`` by ``anchor_coder``
(``wh_ratio_clip=1e-6``, not clipped to the image).  Proposals decode ``conv_reg`` on the guided
anchors with ``bbox_coder`` (clipped to the image).

Training (:meth:`GARPNHead.loss`; loss names as mmdet's):

- ``loss_anchor_loc``: sigmoid focal loss on the location maps of
  :func:`~instseg.ops.ga_targets.ga_loc_targets`, normalised by (locations over levels and
  images) / 200.  ``loc_loss_mode="paper"`` (default) trains object centres towards 1.
  ``"mmdet"`` reproduces mmdetection 3.3.0, whose ``FocalLoss`` reads the 1-D target 1 as
  *background* (one-hot of ``num_classes + 1`` with the last column dropped), so it trains centres
  towards 0 and everything else towards 1 -- kept only for checkpoint / loss parity.
- ``loss_anchor_shape``: ``BoundedIoULoss(beta=0.2)`` between the predicted anchor (square centre,
  predicted size) and the ground truth, for the squares that :class:`ApproxMaxIoUAssigner`
  (best IoU over the ``A`` approx anchors) and ``ga_sampler`` make positive; normalised by the
  sampled count.
- ``loss_rpn_cls`` / ``loss_rpn_bbox``: the ordinary RPN losses (sigmoid CE, smooth L1 beta 1) on
  the guided anchors (from the detached shape prediction) with ``assigner`` and ``sampler``.

Contract shared with :class:`~instseg.modeling.dense_heads.rpn.RPNHead` (what the detectors use):
``forward(feats) -> (logits, rest)``, ``loss(logits, rest, image_sizes, gt_boxes)``,
``proposals(logits, rest, image_sizes, settings)``, ``train_proposals`` / ``test_proposals``.
Here ``rest`` is a :class:`GAOutputs`.  :class:`ProposalSettings` reads as mmdet's GA test config:
``pre_nms`` = ``nms_pre`` (per level), ``post_nms`` = ``max_per_img`` (after the levels are
merged); ``nms_post`` (per level, after NMS) is the head's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from instseg.modeling.dense_heads.dense import flatten_levels
from instseg.modeling.dense_heads.rpn import ProposalSettings
from instseg.ops.anchors import AnchorGenerator, inside_flags
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.boxes import larger_than
from instseg.ops.ga_targets import (
    AVG_EPS,
    ApproxMaxIoUAssigner,
    approx_overlaps_on_grid,
    bounded_iou_loss,
    focal_loss,
    ga_loc_targets,
)
from instseg.ops.losses import box_regression_loss
from instseg.ops.nms import batched_nms
from instseg.ops.sampler import RandomSampler

LOC_LOSS_MODES = ("paper", "mmdet")


class DeformConv2d(nn.Module):
    """mmcv's ``DeformConv2d`` (DCN v1, no bias): offsets come from outside.

    ``offset`` is ``(B, deform_groups * 2 * kh * kw, H', W')``; per deformable group (contiguous
    blocks of input channels), per kernel point ``k = i * kw + j`` in row-major order, channel
    ``2k`` is the y (row) and ``2k + 1`` the x (column) offset -- mmcv's layout, which is also
    ``torchvision.ops.deform_conv2d``'s.  Samples outside the image read 0 (bilinear, mmcv's rule).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1, padding: int = 0,
        dilation: int = 1, deform_groups: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """``torchvision.ops.deform_conv2d`` on accelerators; on CPU (stride 1) the same sampling via
        :meth:`forward_at` at every location: ``grid_sample`` + a matrix product.  Same values and
        gradients (tests/unit/test_ga_rpn.py); on 2 CPU cores its forward is ~2x and its backward
        ~6x faster than torchvision's CPU kernel (2 x 64 x 128 x 256 input)."""
        if x.device.type == "cpu" and self.stride == 1:
            b, _, h, w = x.shape
            ys, xs = torch.meshgrid(
                torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij"
            )
            ys, xs = ys.reshape(-1), xs.reshape(-1)
            outs = [
                self.forward_at(x[i], offset[i].reshape(offset.shape[1], h * w).t(), ys, xs).t().reshape(-1, h, w)
                for i in range(b)
            ]
            return torch.stack(outs)
        return deform_conv2d(
            x.contiguous(), offset.contiguous(), self.weight.contiguous(), None,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
        )

    def forward_at(self, x: Tensor, offset: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        """The output ``(M, out_channels)`` at the locations ``(ys[m], xs[m])`` of ONE image
        ``x`` ``(C, H, W)`` given the offsets there, ``(M, deform_groups * 2 * kh * kw)``.

        Same sampling as :meth:`forward` (stride 1), done with ``grid_sample`` (bilinear, zeros
        outside: mmcv's rule) on the requested locations only, then one matrix product.
        """
        if self.stride != 1:
            raise NotImplementedError("forward_at supports stride 1")
        c, h, w = x.shape
        kh, kw = self.kernel_size
        g = self.deform_groups
        k = kh * kw
        m = ys.shape[0]
        off = offset.view(m, g, k, 2).to(x.dtype)
        ky = (torch.arange(kh, device=x.device, dtype=x.dtype) * self.dilation - self.padding).repeat_interleave(kw)
        kx = (torch.arange(kw, device=x.device, dtype=x.dtype) * self.dilation - self.padding).repeat(kh)
        py = ys.to(x.dtype)[:, None, None] + ky[None, None] + off[..., 0]  # (M, G, K)
        px = xs.to(x.dtype)[:, None, None] + kx[None, None] + off[..., 1]
        # normalised for align_corners=False: grid_sample maps them back to (py, px) (up to rounding)
        grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)  # (M, G, K, 2)
        grid = grid.permute(1, 2, 0, 3)  # (G, K, M, 2)
        cols = F.grid_sample(
            x.reshape(g, c // g, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (G, C / G, K, M): rows in the weight's (c, ky, kx) order
        return cols.reshape(c * k, m).t() @ self.weight.reshape(self.out_channels, c * k).t()


class FeatureAdaption(nn.Module):
    """mmdet's ``FeatureAdaption``: offsets from a 1x1 conv on the (detached) shape prediction."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, deform_groups: int = 4) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(2, deform_groups * kernel_size * kernel_size * 2, 1, bias=False)
        self.conv_adaption = DeformConv2d(
            in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, deform_groups=deform_groups
        )
        nn.init.normal_(self.conv_offset.weight, std=0.1)
        nn.init.normal_(self.conv_adaption.weight, std=0.01)

    def forward(self, x: Tensor, shape: Tensor) -> Tensor:
        offset = self.conv_offset(shape.detach())
        return F.relu(self.conv_adaption(x, offset))

    def forward_masked(self, x: Tensor, shape: Tensor, mask: Tensor, chunk: int = 16384) -> Tensor:
        """:meth:`forward` at the locations where ``mask`` ``(B, H, W)`` is set only: ``(M, C)`` rows
        in ``mask.nonzero()`` order (what ``forward(x, shape).permute(0, 2, 3, 1)[mask]`` gives)."""
        w_off = self.conv_offset.weight.flatten(1)  # (G * 2K, 2): a 1x1 conv, evaluated where needed
        out = []
        for b in range(x.shape[0]):
            ys, xs = torch.nonzero(mask[b], as_tuple=True)
            for start in range(0, ys.shape[0], chunk):
                y, xx = ys[start : start + chunk], xs[start : start + chunk]
                offset = shape[b, :, y, xx].t().detach() @ w_off.t()
                out.append(self.conv_adaption.forward_at(x[b], offset, y, xx))
        if not out:
            return x.new_zeros(0, self.conv_adaption.out_channels)
        return F.relu(torch.cat(out))


@dataclass
class GAOutputs:
    """What the GA-RPN predicts besides the objectness logits (per level, ``(B, C, H, W)``).

    ``masks`` (test time only): ``(B, H, W)`` bool, where ``sigmoid(loc) >= loc_filter_thr``; the
    logits and deltas are computed there only and are 0 elsewhere (mmcv's ``MaskedConv2d``).
    """

    deltas: list[Tensor]
    shapes: list[Tensor]
    locs: list[Tensor]
    masks: list[Tensor] | None = None


class GARPNHead(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        feat_channels: int,
        approx_generator: AnchorGenerator,
        square_generator: AnchorGenerator,
        anchor_coder: DeltaXYWHCoder,
        bbox_coder: DeltaXYWHCoder,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        ga_assigner: ApproxMaxIoUAssigner,
        ga_sampler: RandomSampler,
        deform_groups: int = 4,
        loc_filter_thr: float = 0.01,
        center_ratio: float = 0.2,
        ignore_ratio: float = 0.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loc_loss_mode: str = "paper",
        shape_beta: float = 0.2,
        loss_bbox: str = "smooth_l1",
        allowed_border: float = -1.0,
        size_divisor: int = 32,
        nms_post: int = 1000,
        train_proposals: ProposalSettings = ProposalSettings(2000, 1000),
        test_proposals: ProposalSettings = ProposalSettings(2000, 1000),
    ) -> None:
        super().__init__()
        if loc_loss_mode not in LOC_LOSS_MODES:
            raise ValueError(f"loc_loss_mode: expected one of {LOC_LOSS_MODES}, got {loc_loss_mode!r}")
        if square_generator.num_base_anchors != 1:
            raise ValueError("the square anchor generator must have one anchor per location")
        if list(approx_generator.strides) != list(square_generator.strides):
            raise ValueError("approx and square anchor generators need the same strides")
        self.approx_generator = approx_generator
        self.square_generator = square_generator
        self.anchor_generator = square_generator  # the anchors proposals are made from
        self.approxs_per_octave = approx_generator.num_base_anchors
        self.anchor_scale = square_generator.scales[0]  # mmdet asserts == approx octave_base_scale
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.conv_loc = nn.Conv2d(feat_channels, 1, 1)
        self.conv_shape = nn.Conv2d(feat_channels, 2, 1)
        self.feature_adaption = FeatureAdaption(feat_channels, feat_channels, 3, deform_groups)
        self.conv_cls = nn.Conv2d(feat_channels, 1, 1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 1)
        for conv in (self.rpn_conv, self.conv_loc, self.conv_shape, self.conv_cls, self.conv_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.conv_loc.bias, -math.log((1 - 0.01) / 0.01))  # bias_prob 0.01
        self.anchor_coder = anchor_coder
        self.bbox_coder = bbox_coder
        self.assigner, self.sampler = assigner, sampler
        self.ga_assigner, self.ga_sampler = ga_assigner, ga_sampler
        self.loc_filter_thr = loc_filter_thr
        self.center_ratio, self.ignore_ratio = center_ratio, ignore_ratio
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loc_loss_mode = loc_loss_mode
        self.shape_beta = shape_beta
        self.loss_bbox = loss_bbox
        self.allowed_border = allowed_border
        self.size_divisor = size_divisor
        self.nms_post = nms_post
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals

    # ------------------------------------------------------------------ forward
    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], GAOutputs]:
        """Per level: objectness logits ``(B, 1, H, W)``; deltas, shapes, locations (and test masks)."""
        logits, deltas, shapes, locs = [], [], [], []
        masks: list[Tensor] | None = None if self.training else []
        for f in feats:
            t = F.relu(self.rpn_conv(f))
            loc = self.conv_loc(t)
            shape = self.conv_shape(t)
            if self.training:
                a = self.feature_adaption(t, shape)
                cls, reg = self.conv_cls(a), self.conv_reg(a)
            else:
                mask = loc[:, 0].sigmoid() >= self.loc_filter_thr
                cls, reg = self.masked_heads(t, shape, mask)
                masks.append(mask)
            logits.append(cls)
            deltas.append(reg)
            shapes.append(shape)
            locs.append(loc)
        return logits, GAOutputs(deltas, shapes, locs, masks)

    def masked_heads(self, t: Tensor, shape: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``conv_cls`` / ``conv_reg`` on the adapted features where ``mask`` ``(B, H, W)`` is set,
        0 elsewhere (mmcv's ``MaskedConv2d``); equal to the dense computation on the mask."""
        b, _, h, w = t.shape
        cls = t.new_zeros(b, 1, h, w)
        reg = t.new_zeros(b, 4, h, w)
        if not bool(mask.any()):
            return cls, reg
        picked = self.feature_adaption.forward_masked(t, shape, mask)  # (M, C): the adaption only where needed
        weight = torch.cat([self.conv_cls.weight, self.conv_reg.weight]).flatten(1)  # (5, C)
        bias = torch.cat([self.conv_cls.bias, self.conv_reg.bias])
        out = torch.addmm(bias, picked, weight.t())  # (M, 5)
        cls.permute(0, 2, 3, 1)[mask] = out[:, :1]
        reg.permute(0, 2, 3, 1)[mask] = out[:, 1:]
        return cls, reg

    # ------------------------------------------------------------------ anchors
    def guided_anchors(self, squares: Tensor, shape_deltas: Tensor) -> Tensor:
        """Squares ``(N, 4)`` reshaped by ``(dw, dh)`` ``(N, 2)``: ``anchor_coder.decode`` of
        ``(0, 0, dw, dh)``; centres stay, sizes ``exp(std * d)`` times the square's, not clipped."""
        d = torch.cat([shape_deltas.new_zeros(shape_deltas.shape[0], 2), shape_deltas], dim=1)
        return self.anchor_coder.decode(squares, d)

    def _inside(self, feat_sizes, image_size: tuple[int, int], device) -> Tensor:
        """Per location (all levels flat): some approx anchor is valid / inside (mmdet's
        ``get_sampled_approxs``); validity against this image's padded shape."""
        h, w = image_size
        d = self.size_divisor
        pad = (int(math.ceil(h / d)) * d, int(math.ceil(w / d)) * d)
        valid = torch.cat(self.approx_generator.valid_flags(feat_sizes, pad, device))
        if self.allowed_border < 0:
            return valid.view(-1, self.approxs_per_octave).any(dim=1)
        approxs = torch.cat(self.approx_generator.grid_anchors(feat_sizes, device))
        return inside_flags(approxs, valid, image_size, self.allowed_border).view(-1, self.approxs_per_octave).any(dim=1)

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def proposals(
        self,
        logits: list[Tensor],
        rest: GAOutputs,
        image_sizes: list[tuple[int, int]],
        settings: ProposalSettings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: proposals ``(N, 4)`` (input frame) and sigmoid scores, best first.

        Per level: the locations passing the location filter (at test time only, as mmdet's
        ``use_loc_filter=not self.training``), the best ``settings.pre_nms`` by score, decoded on the
        guided anchors and clipped, boxes of size <= ``settings.min_size`` dropped, NMS at
        ``settings.nms_iou``, the best ``nms_post`` kept; then the best ``settings.post_nms`` of all
        levels by score (no NMS across levels).
        """
        feat_sizes = [tuple(x.shape[-2:]) for x in logits]
        squares = self.square_generator.grid_anchors(feat_sizes, logits[0].device)
        use_filter = not self.training
        boxes_out, scores_out = [], []
        for i, size in enumerate(image_sizes):
            lvl_boxes, lvl_scores, lvl_ids = [], [], []
            for lvl in range(len(logits)):
                loc = rest.locs[lvl][i, 0].detach().reshape(-1).float()
                scores = logits[lvl][i, 0].detach().reshape(-1).float().sigmoid()
                shape = rest.shapes[lvl][i].detach().permute(1, 2, 0).reshape(-1, 2).float()
                d = rest.deltas[lvl][i].detach().permute(1, 2, 0).reshape(-1, 4).float()
                sq = squares[lvl]
                if use_filter:
                    keep = torch.nonzero(loc.sigmoid() >= self.loc_filter_thr).flatten()
                    if keep.numel() == 0:
                        continue
                    scores, shape, d, sq = scores[keep], shape[keep], d[keep], sq[keep]
                if scores.numel() > settings.pre_nms > 0:
                    scores, order = scores.topk(settings.pre_nms, sorted=True)
                    shape, d, sq = shape[order], d[order], sq[order]
                boxes = self.bbox_coder.decode(self.guided_anchors(sq, shape), d, max_shape=size)
                ok = larger_than(boxes, settings.min_size)
                lvl_boxes.append(boxes[ok])
                lvl_scores.append(scores[ok])
                lvl_ids.append(torch.full((int(ok.sum()),), lvl, dtype=torch.int64, device=scores.device))
            if not lvl_boxes:
                boxes_out.append(logits[0].new_zeros(0, 4).float())
                scores_out.append(logits[0].new_zeros(0).float())
                continue
            boxes, scores, ids = torch.cat(lvl_boxes), torch.cat(lvl_scores), torch.cat(lvl_ids)
            keep = batched_nms(boxes, scores, ids, settings.nms_iou)  # per level, by decreasing score
            if self.nms_post > 0:
                kid = ids[keep]
                onehot = F.one_hot(kid, len(logits))
                rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # rank within its level
                keep = keep[rank < self.nms_post]
            keep = keep[: settings.post_nms]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        logits: list[Tensor],
        rest: GAOutputs,
        image_sizes: list[tuple[int, int]],
        gt_boxes: list[Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        device = logits[0].device
        feat_sizes = [tuple(x.shape[-2:]) for x in logits]
        num_images = logits[0].shape[0]
        strides = self.square_generator.strides

        # location branch
        loc_t, loc_w, loc_avg = ga_loc_targets(
            gt_boxes, feat_sizes, strides, anchor_scale=self.anchor_scale,
            center_ratio=self.center_ratio, ignore_ratio=self.ignore_ratio,
        )
        loc_terms = []
        for lvl, loc in enumerate(rest.locs):
            target = loc_t[lvl].to(device)
            if self.loc_loss_mode == "mmdet":
                target = 1 - target
            fl = focal_loss(loc.float().reshape(-1), target.reshape(-1), self.focal_alpha, self.focal_gamma)
            loc_terms.append((fl * loc_w[lvl].to(device).reshape(-1)).sum())
        loss_loc = torch.stack(loc_terms).sum() / (loc_avg + AVG_EPS)

        squares = torch.cat(self.square_generator.grid_anchors(feat_sizes, device))
        approxs = torch.cat(self.approx_generator.grid_anchors(feat_sizes, device)).view(
            -1, self.approxs_per_octave, 4
        )
        flat_logits = flatten_levels(logits, 1)[..., 0]
        flat_deltas = flatten_levels(rest.deltas, 4)
        flat_shapes = flatten_levels(rest.shapes, 2)

        shape_terms, cls_terms, box_terms = [], [], []
        ga_avg = 0
        avg = 0
        for i in range(num_images):
            gts = gt_boxes[i].to(device).float()
            labels = torch.zeros(gts.shape[0], dtype=torch.int64, device=device)
            inside = self._inside(feat_sizes, image_sizes[i], device)
            idx = torch.nonzero(inside).flatten()
            # shape branch: approx-max-IoU assignment of the squares
            sq = squares[idx]
            if gts.shape[0] and idx.numel():  # == ga_assigner.assign_approx(sq, approxs[idx], gts, labels)
                overlaps = approx_overlaps_on_grid(gts, self.approx_generator, feat_sizes)[:, idx]
                assign = self.ga_assigner.assign_overlaps(overlaps, labels)
            else:
                assign = self.ga_assigner.assign_approx(sq, approxs[idx], gts, labels)
            sample = self.ga_sampler.sample(assign, sq, gts, labels, generator)
            ga_avg += sample.avg_factor
            if sample.pos_inds.numel():
                pos = idx[sample.pos_inds]
                pred = self.guided_anchors(squares[pos], flat_shapes[i][pos].float())
                shape_terms.append(bounded_iou_loss(pred, gts[sample.pos_gt_inds], self.shape_beta).sum())
            else:
                shape_terms.append(flat_shapes[i].sum() * 0.0)
            # objectness and regression on the guided anchors (from the detached shapes)
            with torch.no_grad():
                anchors = self.guided_anchors(squares, flat_shapes[i].detach().float())
            ok = inside_flags(anchors, inside, image_sizes[i], self.allowed_border)
            aidx = torch.nonzero(ok).flatten()
            anc = anchors[aidx]
            assign = self.assigner.assign(anc, gts, labels)
            sample = self.sampler.sample(assign, anc, gts, labels, generator)
            avg += sample.avg_factor
            pos, neg = aidx[sample.pos_inds], aidx[sample.neg_inds]
            lg = flat_logits[i].float()
            cls_terms.append(
                F.binary_cross_entropy_with_logits(lg[pos], torch.ones_like(lg[pos]), reduction="sum")
                + F.binary_cross_entropy_with_logits(lg[neg], torch.zeros_like(lg[neg]), reduction="sum")
            )
            if pos.numel():
                target = self.bbox_coder.encode(anc[sample.pos_inds], gts[sample.pos_gt_inds])
                box_terms.append(box_regression_loss(flat_deltas[i][pos].float(), target, self.loss_bbox).sum())
            else:
                box_terms.append(flat_deltas[i].sum() * 0.0)
        return {
            "loss_rpn_cls": torch.stack(cls_terms).sum() / (avg + AVG_EPS),
            "loss_rpn_bbox": torch.stack(box_terms).sum() / (avg + AVG_EPS),
            "loss_anchor_shape": torch.stack(shape_terms).sum() / (ga_avg + AVG_EPS),
            "loss_anchor_loc": loss_loc,
        }
