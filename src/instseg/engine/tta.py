"""Test-time augmentation (several scales x horizontal flip) for the two-stage models, merged as
mmdetection v2's ``aug_test`` merges them (HTC / Cascade / Mask R-CNN):

1. proposals: each view's RPN proposals are mapped back to the original image (un-flipped in the
   view's frame as ``x -> w - x``, then divided by the view's scale), concatenated, NMSed at the
   RPN's IoU and the best ``post_nms`` kept (``merge_aug_proposals``);
2. boxes: the merged proposals are mapped into every view, the cascade runs on them, and each
   view's decoded boxes (mapped back) and class probabilities are averaged element-wise
   (``merge_aug_bboxes``), then one ``multiclass_nms``;
3. masks: the final boxes are mapped into every view, each view's mask probabilities (the mean
   over cascade stages) are un-flipped and averaged over the views (``merge_aug_masks``), then
   pasted once in the original frame.

The flip is the exact mirror ``x -> w - x`` with no rounding and no ``- 1`` (the COCO 2018 slides
note that a flip off by a rounding costs AP); ``tests/unit/test_tta.py`` checks that a
mirror-symmetric image gives the same detections with and without the flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from instseg.data.collate import collate
from instseg.data.transforms import Normalize, Resize, flip_sample
from instseg.ops.boxes import flip_boxes, rescale_boxes
from instseg.ops.nms import batched_nms, multiclass_nms
from instseg.structures.instances import Detections, ImageBatch
from instseg.structures.masks import paste_masks

# the five test scales of the COCO 2018 entry's slides, as mmdetection (long, short) targets
CHALLENGE_SCALES = ((1333, 600), (1333, 800), (1333, 1000), (1600, 1200), (1600, 1400))


@dataclass
class TTASettings:
    """``scales``: keep-ratio ``(long, short)`` targets; ``flip``: add the mirrored view of each."""

    scales: Sequence[tuple[int, int]] = ((1333, 800),)
    flip: bool = True
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisor: int = 32
    views: list[tuple[tuple[int, int], bool]] = field(init=False)

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("TTA needs at least one scale")
        self.views = [(tuple(s), f) for s in self.scales for f in ((False, True) if self.flip else (False,))]


def parse_tta(spec: str, data_cfg) -> TTASettings:
    """``--tta`` values: ``flip`` (the config's scale + its mirror), ``ms`` (the five challenge
    scales), ``ms-flip`` (both), or explicit ``LONGxSHORT,...[+flip]`` such as ``1333x800,1600x1000+flip``."""
    base = dict(mean=tuple(data_cfg.mean), std=tuple(data_cfg.std), size_divisor=int(data_cfg.size_divisor))
    spec = spec.strip()
    if spec == "flip":
        return TTASettings(scales=(tuple(data_cfg.scale),), flip=True, **base)
    if spec in ("ms", "ms-flip"):
        return TTASettings(scales=CHALLENGE_SCALES, flip=spec == "ms-flip", **base)
    flip = spec.endswith("+flip")
    body = spec[: -len("+flip")] if flip else spec
    try:
        scales = tuple(tuple(int(v) for v in part.lower().split("x")) for part in body.split(",") if part)
    except ValueError:
        scales = ()
    if not scales or any(len(s) != 2 for s in scales):
        raise ValueError(f"--tta: expected flip, ms, ms-flip or LONGxSHORT[,LONGxSHORT...][+flip], got {spec!r}")
    return TTASettings(scales=scales, flip=flip, **base)


class TestTimeAugmentation:
    __test__ = False  # not a pytest class
    """Wraps a two-stage detector; ``predict(samples)`` takes un-resized samples (image as read,
    0..255 float) and returns Detections in their original frames."""

    def __init__(self, model, settings: TTASettings) -> None:
        if not hasattr(model, "roi_head"):
            raise ValueError("test-time augmentation is implemented for the two-stage models (Mask R-CNN, Cascade, HTC)")
        self.model = model
        self.settings = settings
        self.normalize = Normalize(settings.mean, settings.std)

    def _view(self, samples, scale: tuple[int, int], flip: bool) -> ImageBatch:
        out = []
        for s in samples:
            v = Resize(scale)(s)
            if flip:
                v = flip_sample(v)
            out.append(self.normalize(v))
        batch, _, _ = collate(out, size_divisor=self.settings.size_divisor)
        return batch

    @staticmethod
    def _to_original(boxes: Tensor, batch: ImageBatch, i: int, flipped: bool) -> Tensor:
        if flipped:
            boxes = flip_boxes(boxes, batch.image_sizes[i][1])
        return rescale_boxes(boxes, batch.scale_factors[i])

    @staticmethod
    def _to_view(boxes: Tensor, batch: ImageBatch, i: int, flipped: bool) -> Tensor:
        boxes = boxes * batch.scale_factors[i].to(boxes).repeat(2)[None]
        return flip_boxes(boxes, batch.image_sizes[i][1]) if flipped else boxes

    @torch.no_grad()
    def predict(self, samples, *, with_masks: bool = True) -> list[Detections]:
        model = self.model
        device = next(model.parameters()).device
        rpn, roi = model.rpn_head, model.roi_head
        views = []
        for scale, flip in self.settings.views:
            batch = self._view(samples, scale, flip).to(device)
            feats, logits, deltas = model._dense_forward(batch.images)
            sem = roi.semantic_head(feats)[1] if roi.semantic_head is not None else None
            props, scores = rpn.proposals(logits, deltas, batch.image_sizes, rpn.test_proposals)
            views.append((batch, flip, feats, sem, props, scores))
        results = []
        for i, s in enumerate(samples):
            # 1. proposals merged in the original frame
            boxes = torch.cat([self._to_original(v[4][i], v[0], i, v[1]) for v in views])
            scores = torch.cat([v[5][i] for v in views])
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), rpn.test_proposals.nms_iou)
            merged = boxes[keep[: rpn.test_proposals.post_nms]]
            # 2. boxes and scores averaged over views
            aug_boxes, aug_scores = [], []
            for batch, flip, feats, sem, _, _ in views:
                one = [self._to_view(merged, batch, i, flip)]
                cand = roi.box_candidates(_select(feats, i), one, [batch.image_sizes[i]], _select_one(sem, i))
                b = cand.boxes[0]
                k = b.shape[1] // 4
                b = self._to_original(b.reshape(-1, 4), batch, i, flip).reshape(-1, 4 * k)
                aug_boxes.append(b)
                aug_scores.append(cand.scores)
            det_boxes, det_scores, det_labels, _ = multiclass_nms(
                torch.stack(aug_boxes).mean(0), torch.stack(aug_scores).mean(0), score_thr=roi.score_thr,
                iou_threshold=roi.nms_iou, max_num=roi.max_per_img, **roi.nms,
            )
            masks = None
            if with_masks and roi.with_mask:
                masks = self._merged_masks(views, i, det_boxes, det_labels, s)
            results.append(Detections(boxes=det_boxes, scores=det_scores, labels=det_labels, masks=masks))
        return results

    def _merged_masks(self, views, i: int, boxes: Tensor, labels: Tensor, sample) -> Tensor:
        from instseg.modeling.roi_heads.cascade import RoIPredictions

        roi = self.model.roi_head
        probs = []
        for batch, flip, feats, sem, _, _ in views:
            pred = RoIPredictions(self._to_view(boxes, batch, i, flip), boxes.new_zeros(len(boxes)), labels, None)
            roi._predict_masks(_select(feats, i), _select_one(sem, i), [pred])
            p = pred.mask_probs
            probs.append(p.flip(-1) if flip else p)
        merged = torch.stack(probs).mean(0)
        return paste_masks(merged, boxes, tuple(sample.meta.original_size), roi.mask_thr)


def _select(feats: list[Tensor], i: int) -> list[Tensor]:
    return [f[i : i + 1] for f in feats]


def _select_one(x: Tensor | None, i: int) -> Tensor | None:
    return None if x is None else x[i : i + 1]


class TTAModel(torch.nn.Module):
    """Presents :class:`TestTimeAugmentation` with a model's ``predict(batch)`` interface, for the
    evaluation / prediction loops: the batch must hold the images AS READ (not resized, not
    normalised; zero padding is fine), e.g. from a dataset whose transforms were replaced by
    :func:`raw_transforms`."""

    def __init__(self, model, settings: TTASettings) -> None:
        super().__init__()
        self.model = model
        self.tta = TestTimeAugmentation(model, settings)

    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, with_masks: bool = True) -> list[Detections]:
        from instseg.data.coco import ImageMeta, Sample
        from instseg.structures.instances import ImageTargets

        samples = []
        for i, (h, w) in enumerate(batch.image_sizes):
            image = batch.images[i, :, :h, :w].float().cpu()
            empty = ImageTargets(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64))
            samples.append(Sample(image=image, targets=empty, meta=ImageMeta(-1, "", (h, w), (h, w))))
        return self.tta.predict(samples, with_masks=with_masks)


def raw_transforms():
    """No resize, no normalisation: what :class:`TTAModel` expects from the data set."""
    from instseg.data.transforms import Compose

    return Compose([])


def tta_model(model, spec: str, data_cfg):
    """``model`` unchanged when ``spec`` is empty; else wrapped in :class:`TTAModel`, which must be
    fed images through :func:`raw_transforms` instead of the test transforms.  A bad ``spec``, or
    a model without an RoI head, is a ``ValueError``."""
    if not spec:
        return model
    return TTAModel(model, parse_tta(spec, data_cfg))


def wrap_for_tta(model, dataset, spec: str, data_cfg):
    """``(model, dataset)`` unchanged when ``spec`` is empty; else the model wrapped in
    :class:`TTAModel` and the data set's transforms replaced by :func:`raw_transforms`."""
    wrapped = tta_model(model, spec, data_cfg)
    if wrapped is not model:
        dataset.transforms = raw_transforms()
    return wrapped, dataset
