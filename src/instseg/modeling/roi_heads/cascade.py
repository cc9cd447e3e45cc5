"""Cascade RoI heads: Mask R-CNN (one stage), Cascade Mask R-CNN and Hybrid Task Cascade.

One class covers the whole family, so the HTC paper's ablation ladder is a set of switches:

- ``stages``: one :class:`CascadeStage` is Mask R-CNN's ``StandardRoIHead``; three with
  IoU 0.5/0.6/0.7 and weights 1/0.5/0.25 are Cascade Mask R-CNN.
- ``interleaved``: stage t's mask branch trains on boxes re-sampled *after* stage t's box
  refinement, instead of on the box branch's own sample.
- ``mask_info_flow``: stage t's mask head also receives the 4th-conv feature of stage t-1's
  mask head (itself fed by t-2, ...), re-run on the same RoIs and not detached.
- ``semantic_head``: a semantic segmentation branch whose RoI-pooled feature is added to the
  box features (pooled 14 -> 7) and mask features of every stage.

Test time follows mmdetection v2's ``simple_test``: class scores are the softmax of the mean
of the stages' logits, boxes come from the last stage, and masks are the mean of all stages'
sigmoid probabilities (``mask_merge="last"`` reproduces mmdetection 3.3.0, which keeps only the
last stage's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg.modeling.roi_heads.box_head import Shared2FCBoxHead
from instseg.modeling.roi_heads.mask_head import FCNMaskHead
from instseg.modeling.roi_heads.semantic_head import FusedSemanticHead, empty_like_labels
from instseg.ops.assigner import MaxIoUAssigner
from instseg.ops.box_coder import DeltaXYWHCoder
from instseg.ops.losses import accuracy, box_regression_loss, mask_bce
from instseg.ops.nms import multiclass_nms
from instseg.ops.roi_align import MultiLevelRoIAlign, boxes_to_rois
from instseg.ops.sampler import RandomSampler, SamplingResult
from instseg.structures.instances import ImageTargets


class CascadeStage(nn.Module):
    """Everything one cascade stage owns: heads, target assignment and its loss weight."""

    def __init__(
        self,
        *,
        box_head: Shared2FCBoxHead,
        mask_head: FCNMaskHead | None,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        coder: DeltaXYWHCoder,
        loss_weight: float = 1.0,
        loss_bbox: str = "smooth_l1",
        mask_size: int = 28,
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.mask_head = mask_head
        self.assigner = assigner
        self.sampler = sampler
        self.coder = coder
        self.loss_weight = loss_weight
        self.loss_bbox = loss_bbox
        self.mask_size = mask_size

    @property
    def num_classes(self) -> int:
        return self.box_head.num_classes

    def sample(self, proposals: list[Tensor], targets: Sequence[ImageTargets]) -> list[SamplingResult]:
        """Assigns and samples each image's proposals against its ground truth."""
        out = []
        for boxes, tgt in zip(proposals, targets):
            assign = self.assigner.assign(boxes, tgt.boxes, tgt.labels)
            out.append(self.sampler.sample(assign, boxes, tgt.boxes, tgt.labels))
        return out

    def select_deltas(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """The ``(N, 4)`` deltas of each row's class (class-specific) or the shared ones."""
        if self.box_head.class_agnostic:
            return deltas
        rows = torch.arange(deltas.shape[0], device=deltas.device)
        return deltas.view(deltas.shape[0], -1, 4)[rows, labels]


@dataclass
class StageOutput:
    """Box-branch output of one training stage."""

    samples: list[SamplingResult]
    cls_logits: Tensor
    deltas: Tensor
    labels: Tensor  # target label of every sampled row (num_classes = background)


@dataclass
class RoIPredictions:
    """Per-image detections in the network-input frame, before mask pasting."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_probs: Tensor | None  # (n, 28, 28) merged over stages
    stage_mask_probs: list[Tensor] | None = None  # per stage (n, 28, 28), for inspection
    stage_logits: list[Tensor] | None = None  # (N, C+1) raw logits of every stage, for inspection
    stage_rois: list[Tensor] | None = None


@dataclass
class BoxCandidates:
    """Pre-NMS cascade outputs: per image decoded boxes ``(N_i, 4 or 4C)``, the batch's class
    probabilities ``(sum N_i, C + 1)`` (rows of image ``i`` at ``slices[i]``), and per stage the
    raw logits and RoIs."""

    boxes: list[Tensor]
    scores: Tensor
    slices: list[slice]
    stage_logits: list[Tensor]
    stage_rois: list[Tensor]


class CascadeRoIHead(nn.Module):
    def __init__(
        self,
        *,
        stages: Sequence[CascadeStage],
        box_roi_align: MultiLevelRoIAlign,
        mask_roi_align: MultiLevelRoIAlign | None,
        semantic_head: FusedSemanticHead | None = None,
        semantic_roi_align: MultiLevelRoIAlign | None = None,
        semantic_fusion: Sequence[str] = ("bbox", "mask"),
        interleaved: bool = False,
        mask_info_flow: bool = False,
        score_thr: float = 0.05,
        nms_iou: float = 0.5,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
        mask_merge: str = "mean",
        nms: str = "hard",
        nms_top_k: int = 200,
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 1e-3,
    ) -> None:
        super().__init__()
        if mask_merge not in ("mean", "last"):
            raise ValueError(f"mask_merge must be 'mean' or 'last', got {mask_merge!r}")
        self.stages = nn.ModuleList(stages)
        self.box_roi_align = box_roi_align
        self.mask_roi_align = mask_roi_align
        self.semantic_head = semantic_head
        self.semantic_roi_align = semantic_roi_align
        self.semantic_fusion = tuple(semantic_fusion) if semantic_head is not None else ()
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow
        self.score_thr = score_thr
        self.nms_iou = nms_iou
        # the test-time NMS of ops/nms.py (model.nms): hard, fast, fast_cross_class, soft_*
        self.nms = dict(method=nms, top_k=nms_top_k, sigma=soft_nms_sigma, min_score=soft_nms_min_score)
        self.max_per_img = max_per_img
        self.mask_thr = mask_thr
        self.mask_merge = mask_merge

    @property
    def with_mask(self) -> bool:
        return self.mask_roi_align is not None and self.stages[0].mask_head is not None

    @property
    def num_classes(self) -> int:
        return self.stages[0].num_classes

    # ------------------------------------------------------------------ features
    def _semantic_roi_feats(self, sem_feat: Tensor | None, rois: Tensor, size: int, path: str) -> Tensor | None:
        if sem_feat is None or path not in self.semantic_fusion:
            return None
        feats = self.semantic_roi_align([sem_feat], rois)
        if feats.shape[-1] != size:
            feats = F.adaptive_avg_pool2d(feats, size)
        return feats

    def box_forward(self, t: int, feats: list[Tensor], rois: Tensor, sem_feat: Tensor | None) -> tuple[Tensor, Tensor]:
        """Stage ``t``'s class logits and deltas for ``(K, 5)`` rois."""
        x = self.box_roi_align(feats, rois)
        sem = self._semantic_roi_feats(sem_feat, rois, x.shape[-1], "bbox")
        if sem is not None:
            x = x + sem
        return self.stages[t].box_head(x)

    def mask_feats(self, feats: list[Tensor], rois: Tensor, sem_feat: Tensor | None) -> Tensor:
        x = self.mask_roi_align(feats, rois)
        sem = self._semantic_roi_feats(sem_feat, rois, x.shape[-1], "mask")
        return x if sem is None else x + sem

    def mask_logits_chain(self, mask_feats: Tensor, upto: int, all_stages: bool) -> list[Tensor]:
        """Mask logits of stage ``upto`` (or of every stage 0..upto when ``all_stages``).

        With mask information flow, heads 0..upto-1 are run first on the same RoI features and
        each passes its 4th-conv feature to the next head (no detach: the later stages' losses
        train the earlier heads' convs too).
        """
        logits: list[Tensor] = []
        prev: Tensor | None = None
        for t in range(upto + 1):
            if not self.mask_info_flow and t < upto and not all_stages:
                continue
            head = self.stages[t].mask_head
            feat = head.features(mask_feats, prev if self.mask_info_flow else None)
            if all_stages or t == upto:
                logits.append(head.logits(feat))
            prev = feat
        return logits

    # ------------------------------------------------------------------ training
    def loss(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        targets: Sequence[ImageTargets],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        sem_feat = None
        if self.semantic_head is not None:
            sem_logits, sem_feat = self.semantic_head(feats)
            losses["loss_semantic_seg"] = self.semantic_head.loss(sem_logits, self._semantic_labels(targets, feats))
        for t, stage in enumerate(self.stages):
            # mmdet names cascade terms "s{t}.loss_cls"; a single stage (Mask R-CNN) uses "loss_cls"
            prefix = f"s{t}." if len(self.stages) > 1 else ""
            w = stage.loss_weight
            out = self._box_stage(t, feats, proposals, targets, sem_feat)
            for k, v in self._box_losses(stage, out, targets).items():
                losses[prefix + k] = v * w if k.startswith("loss") else v
            last = t == len(self.stages) - 1
            refined: list[Tensor] | None = None
            if not last or (self.interleaved and self.with_mask):
                with torch.no_grad():
                    refined = self._refine(stage, out, image_sizes)
            if self.with_mask:
                samples = out.samples
                if self.interleaved:
                    with torch.no_grad():
                        samples = stage.sample(refined, targets)
                losses[prefix + "loss_mask"] = w * self._mask_loss(t, feats, samples, targets, sem_feat)
            if refined is not None:
                proposals = refined
        return losses

    def _semantic_labels(self, targets: Sequence[ImageTargets], feats: list[Tensor]) -> Tensor:
        hp = feats[0].shape[-2] * 4
        wp = feats[0].shape[-1] * 4
        labels = empty_like_labels(len(targets), hp, wp, feats[0].device)
        for i, tgt in enumerate(targets):
            if tgt.semantic is not None:
                h, w = tgt.semantic.shape[-2:]
                labels[i, : min(h, hp), : min(w, wp)] = tgt.semantic[: min(h, hp), : min(w, wp)].to(labels)
        return labels

    def _box_stage(
        self,
        t: int,
        feats: list[Tensor],
        proposals: list[Tensor],
        targets: Sequence[ImageTargets],
        sem_feat: Tensor | None,
    ) -> StageOutput:
        stage = self.stages[t]
        with torch.no_grad():
            samples = stage.sample(proposals, targets)
        rois = boxes_to_rois([s.sampled_boxes for s in samples])
        cls_logits, deltas = self.box_forward(t, feats, rois, sem_feat)
        labels = torch.cat(
            [
                torch.cat([s.pos_labels, s.pos_labels.new_full((s.neg_inds.numel(),), stage.num_classes)])
                for s in samples
            ]
        )
        return StageOutput(samples, cls_logits, deltas, labels)

    def _box_losses(self, stage: CascadeStage, out: StageOutput, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        n = out.cls_logits.shape[0]
        if n == 0:
            zero = out.cls_logits.sum() + out.deltas.sum()
            return {"loss_cls": zero, "loss_bbox": zero, "acc": zero.detach()}
        loss_cls = F.cross_entropy(out.cls_logits.float(), out.labels, reduction="mean")
        pos_rows, pos_targets = [], []
        offset = 0
        for s, tgt in zip(out.samples, targets):
            npos = s.pos_inds.numel()
            pos_rows.append(torch.arange(offset, offset + npos, device=out.deltas.device))
            if npos:
                pos_targets.append(stage.coder.encode(s.pos_boxes, tgt.boxes[s.pos_gt_inds]))
            offset += s.num_sampled
        rows = torch.cat(pos_rows)
        if rows.numel():
            pred = stage.select_deltas(out.deltas[rows], out.labels[rows])
            reg = box_regression_loss(pred.float(), torch.cat(pos_targets), stage.loss_bbox).sum() / n
        else:
            reg = out.deltas.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_bbox": reg, "acc": accuracy(out.cls_logits.detach(), out.labels)}

    def _refine(self, stage: CascadeStage, out: StageOutput, image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """mmdet's ``refine_bboxes``: decode every sampled RoI with its own stage, drop GT rows."""
        labels = out.labels.clone()
        bg = labels == stage.num_classes
        if bg.any():
            labels[bg] = out.cls_logits[bg, : stage.num_classes].argmax(dim=1)
        deltas = stage.select_deltas(out.deltas.detach(), labels)
        refined = []
        offset = 0
        for s, size in zip(out.samples, image_sizes):
            k = s.num_sampled
            boxes = stage.coder.decode(s.sampled_boxes, deltas[offset : offset + k], max_shape=size)
            keep = torch.ones(k, dtype=torch.bool, device=boxes.device)
            keep[: s.pos_is_gt.numel()] = ~s.pos_is_gt
            refined.append(boxes[keep].detach())
            offset += k
        return refined

    def _mask_loss(
        self,
        t: int,
        feats: list[Tensor],
        samples: list[SamplingResult],
        targets: Sequence[ImageTargets],
        sem_feat: Tensor | None,
    ) -> Tensor:
        stage = self.stages[t]
        pos_boxes = [s.pos_boxes for s in samples]
        rois = boxes_to_rois(pos_boxes)
        if rois.shape[0] == 0:
            # keep every mask parameter in the graph (DDP-friendly) with a zero loss
            return sum(p.sum() for p in stage.mask_head.parameters()) * 0.0
        mask_targets = torch.cat(
            [
                tgt.masks.roi_targets(s.pos_boxes, s.pos_gt_inds, stage.mask_size)
                for s, tgt in zip(samples, targets)
            ]
        ).to(rois.device)
        labels = torch.cat([s.pos_labels for s in samples])
        logits = self.mask_logits_chain(self.mask_feats(feats, rois, sem_feat), t, all_stages=False)[-1]
        return mask_bce(logits.float(), mask_targets, labels)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(
        self,
        feats: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        *,
        with_masks: bool = True,
        keep_intermediates: bool = False,
        semantic_feat: Tensor | None = None,
    ) -> list[RoIPredictions]:
        """Cascade inference; ``semantic_feat`` may be passed when the caller already ran the semantic head."""
        sem_feat = semantic_feat
        if sem_feat is None and self.semantic_head is not None:
            sem_feat = self.semantic_head(feats)[1]
        cand = self.box_candidates(feats, proposals, image_sizes, sem_feat)
        results: list[RoIPredictions] = []
        for i, sl in enumerate(cand.slices):
            b, s, lab, _ = multiclass_nms(
                cand.boxes[i], cand.scores[sl], score_thr=self.score_thr, iou_threshold=self.nms_iou,
                max_num=self.max_per_img, **self.nms,
            )
            pred = RoIPredictions(b, s, lab, None)
            if keep_intermediates:
                pred.stage_logits = [lg[sl] for lg in cand.stage_logits]
                pred.stage_rois = [r[sl] for r in cand.stage_rois]
            results.append(pred)
        if with_masks and self.with_mask:
            self._predict_masks(feats, sem_feat, results)
        return results

    @torch.no_grad()
    def box_candidates(
        self, feats: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]], sem_feat: Tensor | None
    ) -> "BoxCandidates":
        """The cascade up to NMS: every stage refines the previous one's boxes (by the argmax
        class); class probabilities are the softmax of the mean of the stages' logits and boxes
        the last stage's decoding (mmdetection v2's ``simple_test`` / ``aug_test``)."""
        counts = [p.shape[0] for p in proposals]
        rois_per_image = list(proposals)
        all_logits: list[Tensor] = []
        stage_rois: list[Tensor] = []
        deltas = None
        for t, stage in enumerate(self.stages):
            rois = boxes_to_rois(rois_per_image)
            stage_rois.append(rois[:, 1:])
            cls_logits, deltas = self.box_forward(t, feats, rois, sem_feat)
            all_logits.append(cls_logits)
            if t < len(self.stages) - 1:
                labels = cls_logits[:, : stage.num_classes].argmax(dim=1)
                d = stage.select_deltas(deltas, labels).split(counts)
                rois_per_image = [
                    stage.coder.decode(r, di, max_shape=size) for r, di, size in zip(rois_per_image, d, image_sizes)
                ]
        scores = torch.stack(all_logits).mean(dim=0).softmax(dim=1)
        last = self.stages[-1]
        slices = _image_slices(counts)
        boxes = [last.coder.decode(rois_per_image[i], deltas[sl], max_shape=image_sizes[i]) for i, sl in enumerate(slices)]
        return BoxCandidates(boxes, scores, slices, all_logits, stage_rois)

    def _predict_masks(self, feats: list[Tensor], sem_feat: Tensor | None, results: list[RoIPredictions]) -> None:
        rois = boxes_to_rois([r.boxes for r in results])
        size = self.stages[0].mask_size
        if rois.shape[0] == 0:
            for r in results:
                r.mask_probs = rois.new_zeros((0, size, size))
                r.stage_mask_probs = [r.mask_probs] * len(self.stages)
            return
        mask_feats = self.mask_feats(feats, rois, sem_feat)
        logits = self.mask_logits_chain(mask_feats, len(self.stages) - 1, all_stages=True)
        labels = torch.cat([r.labels for r in results])
        rows = torch.arange(labels.numel(), device=labels.device)
        probs = [(lg[rows, labels] if lg.shape[1] > 1 else lg[:, 0]).sigmoid() for lg in logits]
        merged = torch.stack(probs).mean(dim=0) if self.mask_merge == "mean" else probs[-1]
        counts = [r.boxes.shape[0] for r in results]
        for r, sl in zip(results, _image_slices(counts)):
            r.mask_probs = merged[sl]
            r.stage_mask_probs = [p[sl] for p in probs]


def _image_slices(counts: Sequence[int]) -> list[slice]:
    """Row ranges of each image in a tensor that concatenates ``counts[i]`` rows per image."""
    out, start = [], 0
    for n in counts:
        out.append(slice(start, start + n))
        start += n
    return out
