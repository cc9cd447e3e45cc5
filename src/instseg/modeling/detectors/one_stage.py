"""One-stage detectors: backbone -> FPN -> dense head (-> mask branch).

``OneStageDetector`` holds mmdetection's attribute names (``backbone``, ``neck``, ``bbox_head``
and, for instance segmentation, ``mask_head``) so converted checkpoints keep their keys; the
family-specific logic that joins the heads (targets, losses, decoding) lives in ``logic``, a
parameter-free module:

- RetinaNet: ``bbox_head`` is a :class:`RetinaHead`, which is its own logic;
- YOLACT: ``bbox_head`` is the prediction head, ``mask_head`` the protonet (+ semantic branch),
  ``logic`` a :class:`YolactHead`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from instseg.modeling.dense_heads.dense import drop_degenerate
from instseg.modeling.dense_heads.retinanet import RetinaHead
from instseg.modeling.dense_heads.yolact import YolactHead, YolactProtonet
from instseg.modeling.detectors.base import Detector, total_loss
from instseg.structures.instances import Detections, ImageBatch, ImageTargets


class OneStageDetector(Detector):
    """RetinaNet (boxes only) or YOLACT (boxes + prototype masks)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        bbox_head: nn.Module,
        mask_head: YolactProtonet | None = None,
        logic: YolactHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.bbox_head = bbox_head
        self.mask_head = mask_head
        self.logic = logic
        if (mask_head is None) != (logic is None):
            raise ValueError("a mask head needs the logic that joins it to the box head, and vice versa")

    def loss(self, batch: ImageBatch, targets: Sequence[ImageTargets]) -> dict[str, Tensor]:
        device = batch.images.device
        targets = [drop_degenerate(t.to(device)) for t in targets]
        feats = self.extract_feats(batch.images)
        out = self.bbox_head(feats)
        if self.logic is None:
            return total_loss(self.bbox_head.loss(out, batch, targets))
        protos = self.mask_head(feats[0])
        seg = self.mask_head.segm_branch(feats[0]) if self.mask_head.segm_branch is not None else None
        return total_loss(self.logic.loss(out, protos, seg, batch, targets))

    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, with_masks: bool = True) -> list[Detections]:
        """Detections in each image's ORIGINAL frame (YOLACT: masks at full resolution)."""
        feats = self.extract_feats(batch.images)
        out = self.bbox_head(feats)
        if self.logic is None:
            head: RetinaHead = self.bbox_head
            return [Detections(boxes=b, scores=s, labels=l) for b, s, l in head.predict_boxes(out, batch)]
        dets = self.logic.predict_boxes(out, batch)
        protos = self.mask_head(feats[0]) if with_masks else None
        results = []
        for i, d in enumerate(dets):
            masks = None
            if protos is not None:
                masks = self.logic.predict_masks(protos[i], d, batch.original_sizes[i])
            results.append(Detections(boxes=d.boxes, scores=d.scores, labels=d.labels, masks=masks))
        return results
