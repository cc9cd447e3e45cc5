"""Two-stage detectors (Mask R-CNN, Cascade Mask R-CNN, HTC): backbone -> FPN -> RPN -> RoI head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from instseg.modeling.dense_heads.rpn import RPNHead
from instseg.modeling.detectors.base import Detector, total_loss
from instseg.modeling.roi_heads.cascade import CascadeRoIHead, RoIPredictions
from instseg.ops.boxes import rescale_boxes
from instseg.structures.instances import Detections, ImageBatch, ImageTargets
from instseg.structures.masks import paste_masks


@dataclass
class Intermediates:
    """What ``predict_raw`` exposes for parity checks against mmdetection."""

    fpn: list[Tensor]
    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    semantic_logits: Tensor | None
    semantic_feat: Tensor | None
    roi: list[RoIPredictions]


class TwoStageDetector(Detector):
    """``forward(batch, targets)`` returns the loss dict; ``predict(batch)`` returns Detections.

    The loss dict holds every named term, metrics such as ``acc`` (not summed) and ``loss``,
    the sum of all entries whose name contains ``loss`` (what mmdetection's ``parse_losses``
    back-propagates).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        rpn_head: RPNHead | nn.Module,
        roi_head: CascadeRoIHead,
        pad_masks_to_input: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head
        # mmdet's Mask R-CNN pads GT masks to the padded input (pad_mask=True); HTC does not.
        # It only changes mask targets of RoIs that cross the bottom/right image border.
        self.pad_masks_to_input = pad_masks_to_input

    def _dense_forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """FPN features (NCHW-contiguous, for the RoI heads) and the proposal head's two outputs.

        Any proposal head fits (``model.rpn``): ``forward(feats) -> (logits, rest)``,
        ``loss(logits, rest, image_sizes, gt_boxes)``, ``proposals(logits, rest, image_sizes,
        settings)`` and ``train_proposals`` / ``test_proposals`` -- ``RPNHead`` (``rest`` = deltas)
        and ``GARPNHead`` (``rest`` = ``GAOutputs``).
        """
        feats = self.extract_feats(images)
        logits, deltas = self.rpn_head(feats)
        if self._channels_last:
            # one layout conversion per level here instead of one inside every roi_align call
            feats = [f.contiguous() for f in feats]
        return feats, logits, deltas

    def loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        device = batch.images.device
        targets = [t.to(device) for t in targets]
        if self.pad_masks_to_input:
            targets = [
                ImageTargets(t.boxes, t.labels, t.masks.pad(batch.padded_size) if t.masks is not None else None, t.semantic)
                for t in targets
            ]
        feats, logits, deltas = self._dense_forward(batch.images)
        losses = self.rpn_head.loss(logits, deltas, batch.image_sizes, [t.boxes for t in targets])
        proposals, _ = self.rpn_head.proposals(logits, deltas, batch.image_sizes, self.rpn_head.train_proposals)
        losses.update(self.roi_head.loss(feats, proposals, targets, batch.image_sizes))
        return total_loss(losses)

    @torch.no_grad()
    def predict_raw(self, batch: ImageBatch, *, with_masks: bool = True) -> Intermediates:
        """Detections in the network-input frame plus the intermediate tensors."""
        feats, logits, deltas = self._dense_forward(batch.images)
        proposals, scores = self.rpn_head.proposals(logits, deltas, batch.image_sizes, self.rpn_head.test_proposals)
        sem_logits = sem_feat = None
        if self.roi_head.semantic_head is not None:
            sem_logits, sem_feat = self.roi_head.semantic_head(feats)
        roi = self.roi_head.predict(
            feats, proposals, batch.image_sizes, with_masks=with_masks, keep_intermediates=True, semantic_feat=sem_feat
        )
        return Intermediates(feats, proposals, scores, sem_logits, sem_feat, roi)

    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, with_masks: bool = True) -> list[Detections]:
        """Detections in each image's ORIGINAL frame, masks pasted at full resolution."""
        feats, logits, deltas = self._dense_forward(batch.images)
        proposals, _ = self.rpn_head.proposals(logits, deltas, batch.image_sizes, self.rpn_head.test_proposals)
        roi = self.roi_head.predict(feats, proposals, batch.image_sizes, with_masks=with_masks)
        return [self._to_original_frame(r, batch, i, with_masks) for i, r in enumerate(roi)]

    def _to_original_frame(self, r: RoIPredictions, batch: ImageBatch, i: int, with_masks: bool) -> Detections:
        boxes = rescale_boxes(r.boxes, batch.scale_factors[i])
        masks = None
        if with_masks and r.mask_probs is not None:
            masks = paste_masks(r.mask_probs, boxes, batch.original_sizes[i], self.roi_head.mask_thr)
        return Detections(boxes=boxes, scores=r.scores, labels=r.labels, masks=masks)


class RPNDetector(Detector):
    """The proposal-only detector (``model.arch=rpn``, mmdet's ``RPN``): backbone -> FPN -> proposal head.

    ``predict`` returns each image's proposals as Detections in the original frame (label 0, the
    objectness as score, no masks), so they can be scored for recall (``instseg eval`` reports AR).
    The head is ``bbox_head`` as in mmdet's ``RPN`` (so checkpoints keep their key names);
    ``rpn_head`` is an alias.
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module, bbox_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.bbox_head = bbox_head

    @property
    def rpn_head(self) -> nn.Module:
        return self.bbox_head

    def loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        device = batch.images.device
        outs = self.bbox_head(self.extract_feats(batch.images))
        losses = self.bbox_head.loss(*outs, batch.image_sizes, [t.boxes.to(device) for t in targets])
        return total_loss(losses)

    @torch.no_grad()
    def predict_proposals(self, batch: ImageBatch) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals and scores per image in the network-input frame (test settings)."""
        outs = self.bbox_head(self.extract_feats(batch.images))
        return self.bbox_head.proposals(*outs, batch.image_sizes, self.bbox_head.test_proposals)

    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, with_masks: bool = True) -> list[Detections]:
        boxes, scores = self.predict_proposals(batch)
        out = []
        for i, (b, s) in enumerate(zip(boxes, scores)):
            labels = torch.zeros(s.shape[0], dtype=torch.int64, device=s.device)
            out.append(Detections(boxes=rescale_boxes(b, batch.scale_factors[i]), scores=s, labels=labels, masks=None))
        return out
