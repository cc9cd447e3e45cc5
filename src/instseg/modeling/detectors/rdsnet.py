"""RDSNet: ``OneStageDetector`` with the object stream as ``bbox_head``, the pixel stream as
``mask_head``, correlation + cropping as ``logic`` and MBRM as ``mbrm`` (the official module
names, so official checkpoints keep their keys).

Two training stages (the paper's): the usual one trains everything but MBRM (its kernel keeps the
official values and gets no gradient); with ``mbrm_train`` the model is frozen (every submodule
in eval mode, no parameter but ``mbrm.weight`` / ``mbrm.bias`` requires grad) and ``loss`` is
MBRM's boundary cross-entropy on the frozen model's own test-time detections matched to the gt
boxes (IoU >= ``mbrm_train_iou``, best first, at most ``mbrm_train_max_dets`` per image), in the
original frame, exactly the probabilities MBRM sees at test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import drop_degenerate
from instseg.modeling.dense_heads.rdsnet import RDSNetHead, RDSNetMaskLogic, RDSNetPixelHead
from instseg.modeling.detectors.base import total_loss
from instseg.modeling.detectors.one_stage import OneStageDetector
from instseg.modeling.refiners.mbrm import MBRM
from instseg.ops.boxes import box_iou
from instseg.structures.instances import Detections, ImageBatch, ImageTargets


class RDSNetDetector(OneStageDetector):
    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        bbox_head: RDSNetHead,
        mask_head: RDSNetPixelHead,
        logic: RDSNetMaskLogic,
        mbrm: MBRM,
        refine: bool = False,
        mbrm_train: bool = False,
        mbrm_train_iou: float = 0.5,
        mbrm_train_max_dets: int = 100,
    ) -> None:
        super().__init__(backbone=backbone, neck=neck, bbox_head=bbox_head, mask_head=mask_head, logic=logic)  # type: ignore[arg-type]
        self.mbrm = mbrm
        self.refine = refine or mbrm_train
        self.mbrm_train = mbrm_train
        self.mbrm_train_iou = mbrm_train_iou
        self.mbrm_train_max_dets = mbrm_train_max_dets
        self.set_stage(mbrm_train)

    def set_stage(self, mbrm_train: bool) -> None:
        """Stage 1: everything but MBRM trains.  Stage 2 (``mbrm_train``): only MBRM trains."""
        self.mbrm_train = mbrm_train
        self.refine = self.refine or mbrm_train
        for name, p in self.named_parameters():
            if name.startswith("mbrm."):
                p.requires_grad_(mbrm_train)
            elif mbrm_train:
                p.requires_grad_(False)
        if mbrm_train:
            self.train(self.training)

    def train(self, mode: bool = True) -> "RDSNetDetector":
        super().train(mode)
        if mode and getattr(self, "mbrm_train", False):  # the frozen model runs as at test time
            for name, child in self.named_children():
                if name != "mbrm":
                    child.eval()
        return self

    # ------------------------------------------------------------------ training
    def loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        device = batch.images.device
        targets = [drop_degenerate(t.to(device)) for t in targets]
        if self.mbrm_train:
            return total_loss({"loss_mbrm": self.mbrm_loss(batch, targets)})
        feats = self.extract_feats(batch.images)
        out = self.bbox_head(feats)
        anchors, assigned = self.bbox_head.assign(out, batch, targets)
        losses = self.bbox_head.loss(out, anchors, assigned, targets)
        pixel = self.mask_head(feats)
        losses["loss_mask"] = self.logic.loss(out, pixel, batch, targets, assigned)
        return total_loss(losses)

    def mbrm_samples(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> list[tuple[tuple[Tensor, Tensor], Tensor, Tensor]]:
        """Per image: (MBRM profiles, detected boxes, matched gt boxes), original frame, no grad."""
        with torch.no_grad():
            feats = self.extract_feats(batch.images)
            out = self.bbox_head(feats)
            dets = self.bbox_head.predict_boxes(out, batch)
            pixel = self.mask_head(feats)
            samples = []
            for i, (d, t) in enumerate(zip(dets, targets)):
                if len(d) == 0 or len(t) == 0:
                    continue
                gt = t.boxes.float() / batch.scale_factors[i].to(t.boxes.device).float().repeat(2)[None]
                best, idx = box_iou(d.boxes, gt).max(dim=1)
                sel = torch.nonzero(best >= self.mbrm_train_iou).flatten()[: self.mbrm_train_max_dets]
                if sel.numel() == 0:
                    continue
                chosen = d.select(sel)
                profiles = self.logic.mask_profiles(pixel[i], chosen, batch, i)
                samples.append((profiles, chosen.boxes, gt[idx[sel]]))
        return samples

    def mbrm_loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> Tensor:
        total = self.mbrm.weight.sum() * 0.0 + self.mbrm.bias.sum() * 0.0
        count = 0
        for (horiz, vert), boxes, gt in self.mbrm_samples(batch, targets):
            s, c = self.mbrm.loss_terms(horiz, vert, boxes, gt)
            total = total + s
            count += c
        return total / max(count, 1)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, with_masks: bool = True) -> list[Detections]:
        """Detections in each image's ORIGINAL frame; boxes refined by MBRM when ``refine``."""
        feats = self.extract_feats(batch.images)
        out = self.bbox_head(feats)
        dets = self.bbox_head.predict_boxes(out, batch)
        need_pixels = with_masks or self.refine
        pixel = self.mask_head(feats) if need_pixels else None
        results = []
        for i, d in enumerate(dets):
            masks, boxes = None, d.boxes
            if pixel is not None:
                masks, boxes = self.logic.predict_masks(pixel[i], d, batch, i, self.mbrm if self.refine else None)
            results.append(Detections(boxes=boxes, scores=d.scores, labels=d.labels, masks=masks if with_masks else None))
        return results
