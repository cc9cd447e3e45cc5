"""Train-time augmentations of YOLACT's two reference pipelines, as ``Sample -> Sample`` transforms.

- official YOLACT (``utils/augmentations.py``, ``SSDAugmentation``): PhotometricDistort, Expand,
  RandomSampleCrop, RandomMirror, Resize (550x550 squashed);
- mmdetection 3.3.0 (``configs/yolact``): FilterAnnotations(min_gt_bbox_wh=(4, 4)), Expand,
  MinIoURandomCrop, Resize(550x550, keep_ratio=False), RandomFlip, PhotoMetricDistortion.

``style="yolact" | "mmdet"`` picks which one a transform follows where they differ.  The references
draw from numpy's global generator; here every random number comes from ``sample.generator`` (the
per-(seed, epoch, index) generator ``CocoDataset`` attaches), else from the transform's own
generator (``seed``), else from torch's global one.  So the data of a resumed run is bit-exact; the
random *streams* differ from numpy's, the distributions and decision rules do not.

Images are ``(3, H, W)`` float RGB in 0..255 (what ``CocoDataset`` gives).  Geometric transforms move
image, boxes, crowd boxes (``targets.crowd_boxes``), masks (``CroppedMasks``) and the semantic map
together and update ``meta.image_size``; ``meta.scale_factor`` keeps describing only resizes (these
transforms are for training, where nothing is mapped back to the original image).  Instances are
dropped with their box, label and mask together; a sample may end up with zero instances (valid
empty targets: boxes ``(0, 4)``, labels ``(0,)``, ``CroppedMasks.empty(frame)``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from instseg.data.coco import Sample
from instseg.ops.boxes import EPS
from instseg.structures.instances import IGNORE_LABEL, ImageTargets

STYLES = ("yolact", "mmdet")
AUGMENTATIONS = (
    "photometric_yolact", "photometric_mmdet", "expand", "crop_yolact", "crop_mmdet", "filter_small",
    "vflip", "rot90", "lsj", "copy_paste", "grayscale", "invert",
)
FLT_EPSILON = 1.1920929e-07  # the epsilon of OpenCV's float RGB <-> HSV conversion


# ---------------------------------------------------------------------------------- randomness
class _RandomTransform:
    """Base of the random transforms: the generator to draw from, and the draws the references use."""

    def __init__(self, seed: int | None) -> None:
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def _gen(self, sample: Sample) -> torch.Generator | None:
        return sample.generator if sample.generator is not None else self.generator


class _SometimesTransform(_RandomTransform):
    """Applies ``apply(sample)`` with probability ``prob``: one ``U(0, 1)`` draw per sample decides."""

    def __init__(self, prob: float = 0.5, seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{type(self).__name__} prob must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prob={self.prob})"

    def __call__(self, sample: Sample) -> Sample:
        if _uniform(self._gen(sample), 0.0, 1.0) >= self.prob:
            return sample
        return self.apply(sample)

    def apply(self, sample: Sample) -> Sample:
        raise NotImplementedError


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    """``numpy.random.uniform(lo, hi)``: ``lo + (hi - lo) * u`` with ``u`` in [0, 1) (float64)."""
    return lo + (hi - lo) * float(torch.rand((), dtype=torch.float64, generator=g))


def _coin(g: torch.Generator | None) -> bool:
    """``numpy.random.randint(2)`` as a bool (probability 0.5)."""
    return bool(torch.randint(0, 2, (), generator=g))


def _choice(g: torch.Generator | None, n: int) -> int:
    return int(torch.randint(0, n, (), generator=g))


def _uniform_low_only(g: torch.Generator | None, low: float) -> float:
    """``numpy.random.uniform(low)``, i.e. with numpy's default ``high=1.0``.

    Both references draw the crop's left/top as ``random.uniform(w - new_w)`` (inherited from
    ssd.pytorch), which is uniform between ``w - new_w`` and 1, not between 0 and ``w - new_w``:
    the crop starts at x >= 1 whenever it is more than one pixel narrower than the image.
    """
    return _uniform(g, low, 1.0)


# ---------------------------------------------------------------------------------- helpers
def select_instances(targets: ImageTargets, keep: Tensor) -> ImageTargets:
    """Keeps the instances where the bool ``(N,)`` ``keep`` is true: box, label and mask together
    (semantic map and crowd boxes untouched)."""
    idx = torch.nonzero(keep, as_tuple=False).flatten()
    return replace(
        targets,
        boxes=targets.boxes[idx].reshape(-1, 4),
        labels=targets.labels[idx],
        masks=None if targets.masks is None else targets.masks.select(idx),
    )


def _crowd(targets: ImageTargets) -> Tensor:
    """The crowd boxes, ``(0, 4)`` when the targets carry none."""
    if targets.crowd_boxes is None:
        return targets.boxes.new_zeros((0, 4))
    return targets.crowd_boxes


def _iou_with_window(boxes: Tensor, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """IoU of each XYXY box with one window (mmdet's ``bbox_overlaps``: union clamped to ``EPS``).
    A dedicated one-window form: it runs up to 50 times per crop attempt."""
    iw = (boxes[:, 2].clamp(max=x1) - boxes[:, 0].clamp(min=x0)).clamp(min=0)
    ih = (boxes[:, 3].clamp(max=y1) - boxes[:, 1].clamp(min=y0)).clamp(min=0)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + float((x1 - x0) * (y1 - y0)) - inter).clamp(min=EPS)


def _clip_to_window(boxes: Tensor, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """Clips XYXY boxes to a window and expresses them in the window's frame."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(x0, x1) - x0
    out[:, 1::2] = out[:, 1::2].clamp(y0, y1) - y0
    return out


# ---------------------------------------------------------------------------------- colour
def rgb_to_hsv(image: Tensor) -> Tensor:
    """``(3, H, W)`` float RGB -> HSV with OpenCV's float formulas (``cv2.cvtColor`` on float32).

    ``V = max(R, G, B)``, ``S = (V - min) / (|V| + eps)``, ``H`` in degrees [0, 360).  Defined for
    any values (the references convert images already pushed outside 0..255 by brightness or
    contrast, so out-of-range input behaves exactly as OpenCV's would).
    """
    r, g, b = image.float().unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    s = diff / (v.abs() + FLT_EPSILON)
    k = 60.0 / (diff + FLT_EPSILON)
    # OpenCV tests V == R first, then V == G (ties resolve in that order)
    h = torch.where(v == r, (g - b) * k, torch.where(v == g, (b - r) * k + 120.0, (r - g) * k + 240.0))
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack([h, s, v])


# OpenCV's HSV -> RGB sector table: for sector 0..5, the ``tab`` index of (B, G, R)
_SECTOR_BGR = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv`` with OpenCV's float formulas (hue wraps modulo 360)."""
    h, s, v = hsv.float().unbind(0)
    hh = torch.remainder(h / 60.0, 6.0)
    sector = hh.floor()
    frac = hh - sector
    sector = sector.long()
    bad = sector >= 6  # float rounding right below 6: OpenCV falls back to sector 0
    sector = torch.where(bad, torch.zeros_like(sector), sector)
    frac = torch.where(bad, torch.zeros_like(frac), frac)
    tab = torch.stack([v, v * (1.0 - s), v * (1.0 - s * frac), v * (1.0 - s * (1.0 - frac))])
    idx = _SECTOR_BGR.to(sector.device)[sector]  # (H, W, 3) -> tab rows of B, G, R
    bgr = torch.gather(tab, 0, idx.permute(2, 0, 1))
    rgb = bgr.flip(0)
    return torch.where(s == 0, v.expand_as(rgb), rgb)


def _shift_hue(hsv: Tensor, delta: float) -> Tensor:
    """Adds ``delta`` degrees to the hue and wraps once, as both references do (> 360: -360; < 0: +360)."""
    h = hsv[0] + delta
    h = torch.where(h > 360.0, h - 360.0, h)
    h = torch.where(h < 0.0, h + 360.0, h)
    return torch.stack([h, hsv[1], hsv[2]])


class PhotometricDistort(_RandomTransform):
    """Random brightness, contrast, saturation and hue of the image (boxes and masks untouched).

    ``style="yolact"`` (official ``PhotometricDistort``):

    1. brightness ``+ U(-32, 32)`` with p 0.5;
    2. with p 0.5 contrast first ([contrast, to HSV, saturation, hue, to RGB]) else last
       ([to HSV, saturation, hue, to RGB, contrast]); contrast ``x U(0.5, 1.5)`` p 0.5, saturation
       ``x U(0.5, 1.5)`` p 0.5, hue ``+ U(-18, 18)`` degrees p 0.5 with wrap-around;
    3. no channel swap (``RandomLightingNoise`` is disabled in the official code).

    ``style="mmdet"`` (mmdetection 3.3.0 ``PhotoMetricDistortion``): all flags and values are drawn
    up front; brightness p 0.5; contrast p 0.5 placed first (mode 1) or last (mode 0), each mode p
    0.5; saturation p 0.5, clipped to [0, 1] when its factor is > 1 (mmdet >= 3.0, PR #9391);
    hue p 0.5 with wrap-around; then a random channel permutation with p 0.5 (mmdet permutes BGR
    channels; a uniform permutation of RGB channels has the same distribution).

    Both convert to HSV even when no colour step fires (so values pushed below 0 by brightness go
    through OpenCV's float HSV round trip, which is not the identity for negative values).

    Clamping: *neither reference clamps*; their float images leave 0..255 (e.g. contrast x 1.5 on
    bright pixels).  ``clamp=True`` (default) clamps the result to 0..255 because instseg images are
    uint8-valued (``Resize`` rounds and clamps to 0..255 anyway whenever it changes the size);
    ``clamp=False`` reproduces the references' unclamped values.
    """

    def __init__(
        self,
        style: str = "yolact",
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        clamp: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.style = style
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)
        self.clamp = bool(clamp)

    def __repr__(self) -> str:
        return (f"PhotometricDistort(style={self.style!r}, brightness_delta={self.brightness_delta}, "
                f"contrast_range={self.contrast_range}, saturation_range={self.saturation_range}, "
                f"hue_delta={self.hue_delta}, clamp={self.clamp})")

    def __call__(self, sample: Sample) -> Sample:
        g = self._gen(sample)
        image = sample.image.float()
        image = self._yolact(image, g) if self.style == "yolact" else self._mmdet(image, g)
        if self.clamp:
            image = image.clamp(0.0, 255.0)
        return replace(sample, image=image)

    def _yolact(self, img: Tensor, g: torch.Generator | None) -> Tensor:
        if _coin(g):
            img = img + _uniform(g, -self.brightness_delta, self.brightness_delta)
        contrast_first = _coin(g)
        if contrast_first:
            img = self._maybe_contrast(img, g)
        hsv = rgb_to_hsv(img)
        if _coin(g):
            f = _uniform(g, *self.saturation_range)
            hsv = torch.stack([hsv[0], hsv[1] * f, hsv[2]])
        if _coin(g):
            hsv = _shift_hue(hsv, _uniform(g, -self.hue_delta, self.hue_delta))
        img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = self._maybe_contrast(img, g)
        return img

    def _maybe_contrast(self, img: Tensor, g: torch.Generator | None) -> Tensor:
        if _coin(g):
            img = img * _uniform(g, *self.contrast_range)
        return img

    def _mmdet(self, img: Tensor, g: torch.Generator | None) -> Tensor:
        # mmdet's _random_flags: every draw happens whatever the flags say
        mode = _choice(g, 2)
        brightness, contrast, saturation, hue, swap = (_coin(g) for _ in range(5))
        delta = _uniform(g, -self.brightness_delta, self.brightness_delta)
        alpha = _uniform(g, *self.contrast_range)
        sat = _uniform(g, *self.saturation_range)
        hue_value = _uniform(g, -self.hue_delta, self.hue_delta)
        perm = torch.randperm(3, generator=g)
        if brightness:
            img = img + delta
        if mode == 1 and contrast:
            img = img * alpha
        hsv = rgb_to_hsv(img)
        if saturation:
            s = hsv[1] * sat
            if sat > 1:  # float HSV saturation is only meaningful in [0, 1]
                s = s.clamp(0.0, 1.0)
            hsv = torch.stack([hsv[0], s, hsv[2]])
        if hue:
            hsv = _shift_hue(hsv, hue_value)
        img = hsv_to_rgb(hsv)
        if mode == 0 and contrast:
            img = img * alpha
        if swap:
            img = img[perm]
        return img


# ---------------------------------------------------------------------------------- expand
class Expand(_RandomTransform):
    """Zoom out: with probability ``prob`` place the image on a canvas ``ratio`` times its size,
    ``ratio ~ U(ratio_range)``, filled with ``mean`` (RGB), at a random offset.

    Both references (official ``Expand``, mmdet ``Expand``) do the same: canvas
    ``(int(h * ratio), int(w * ratio))``, ``left = int(U(0, w * ratio - w))``,
    ``top = int(U(0, h * ratio - h))``.  The official one applies it with p 0.5 (``randint(2)``);
    mmdet skips when ``U(0, 1) > prob``.  Boxes and crowd boxes shift by ``(left, top)``, masks move
    into the larger frame (``CroppedMasks.translate``), the semantic map is padded with
    ``seg_ignore_label``.
    """

    def __init__(
        self,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        ratio_range: tuple[float, float] = (1.0, 4.0),
        prob: float = 0.5,
        seg_ignore_label: int = IGNORE_LABEL,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if not (1.0 <= ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"ratio_range must be (lo, hi) with 1 <= lo <= hi, got {ratio_range}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"expand prob must be in [0, 1], got {prob}")
        self.mean = tuple(float(v) for v in mean)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.prob = float(prob)
        self.seg_ignore_label = int(seg_ignore_label)

    def __repr__(self) -> str:
        return f"Expand(mean={self.mean}, ratio_range={self.ratio_range}, prob={self.prob})"

    def __call__(self, sample: Sample) -> Sample:
        g = self._gen(sample)
        if _uniform(g, 0.0, 1.0) > self.prob:
            return sample
        h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
        ratio = _uniform(g, *self.ratio_range)
        eh, ew = int(h * ratio), int(w * ratio)
        # min(): guard against float rounding pushing the image past the canvas edge
        left = min(int(_uniform(g, 0.0, w * ratio - w)), ew - w)
        top = min(int(_uniform(g, 0.0, h * ratio - h)), eh - h)
        return expand_sample(sample, left, top, (eh, ew), self.mean, self.seg_ignore_label)


def expand_sample(
    sample: Sample, left: int, top: int, size: tuple[int, int], fill: Sequence[float], seg_fill: int = IGNORE_LABEL
) -> Sample:
    """Deterministic expand: the image pasted at ``(left, top)`` of a ``size = (h, w)`` canvas filled
    with ``fill`` (per channel); targets move with it."""
    h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
    eh, ew = int(size[0]), int(size[1])
    if left < 0 or top < 0 or left + w > ew or top + h > eh:
        raise ValueError(f"image {h}x{w} at ({left}, {top}) does not fit a {eh}x{ew} canvas")
    image = sample.image
    canvas = torch.tensor([float(v) for v in fill], dtype=image.dtype).view(3, 1, 1).repeat(1, eh, ew)
    canvas[:, top : top + h, left : left + w] = image
    t = sample.targets
    shift = torch.tensor([left, top, left, top], dtype=t.boxes.dtype)
    semantic = t.semantic
    if semantic is not None:
        semantic = torch.full((eh, ew), int(seg_fill), dtype=t.semantic.dtype)
        semantic[top : top + h, left : left + w] = t.semantic
    targets = replace(
        t,
        boxes=t.boxes + shift,
        masks=None if t.masks is None else t.masks.translate(left, top, (eh, ew)),
        semantic=semantic,
        crowd_boxes=None if t.crowd_boxes is None else t.crowd_boxes + shift,
    )
    meta = replace(sample.meta, image_size=(eh, ew))
    return replace(sample, image=canvas, targets=targets, meta=meta)


# ---------------------------------------------------------------------------------- crop
_WHOLE = None  # sample mode "keep the whole image"


class RandomSampleCrop(_RandomTransform):
    """SSD-style random crop (official YOLACT ``RandomSampleCrop`` or mmdet ``MinIoURandomCrop``).

    Shared rules: pick a mode uniformly; the whole-image mode returns the sample unchanged; else up
    to ``max_trials`` tries of ``new_w ~ U(min_crop_size * w, w)``, ``new_h ~ U(min_crop_size * h,
    h)``, rejected unless ``0.5 <= new_h / new_w <= 2``; ``left = numpy uniform(w - new_w)``
    (between ``w - new_w`` and 1, see ``_uniform_low_only``), likewise ``top``; the window is
    ``(int(left), int(top), int(left + new_w), int(top + new_h))``.  Ground truths (instances *and*
    crowd boxes, as both references carry crowds in their box list) are kept when their centre lies
    strictly inside the window; kept boxes are clipped to it.  When all tries fail a new mode is
    drawn (the references' ``while True``).

    ``style="yolact"``: modes {whole, 0.1, 0.3, 0.7, 0.9, free} (``min_ious`` overrides the middle
    ones).  The min-IoU test is the official code's deliberately kept bug
    (``overlap.min() < min_iou and max_iou < overlap.max()`` with ``max_iou = inf`` is never true),
    so it never rejects a window: reproduced faithfully, every non-whole mode is a free crop.  A
    window is accepted only if it keeps at least one non-crowd instance; an image without non-crowd
    instances can therefore only leave the official loop through the whole-image mode, and is
    returned unchanged straight away.

    ``style="mmdet"`` (``MinIoURandomCrop(min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3,
    bbox_clip_border=True)``): modes {whole, *min_ious, 0}; a window is rejected when it is a line
    or a point, when the IoU of any ground truth with it is below the mode's threshold, or when no
    ground-truth centre is inside; with no ground truth at all the first valid window is taken.

    Masks are cropped to the window (``CroppedMasks.crop``); a kept instance whose mask has no pixel
    left in the window is dropped with its box and label (neither reference does; their targets
    would then carry an empty mask).  In yolact style a window that keeps no instance with a
    non-empty mask counts as a failed try, which matches the official rule "at least one non-crowd
    instance" for the masks YOLACT trains on.  A degenerate (line or point) window is a failed try
    in both styles.  Boxes are clipped, not re-fitted to the cropped mask
    (as in both references), so for non-rectangular masks a clipped box can be looser than its
    mask's box.
    """

    def __init__(
        self,
        style: str = "yolact",
        min_ious: Sequence[float] | None = None,
        min_crop_size: float = 0.3,
        max_trials: int = 50,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if not 0.0 < min_crop_size <= 1.0:
            raise ValueError(f"min_crop_size must be in (0, 1], got {min_crop_size}")
        self.style = style
        if min_ious is None:
            min_ious = (0.1, 0.3, 0.7, 0.9) if style == "yolact" else (0.1, 0.3, 0.5, 0.7, 0.9)
        self.min_ious = tuple(float(v) for v in min_ious)
        # the last mode: yolact's "free" (min IoU -inf), mmdet's 0
        last = float("-inf") if style == "yolact" else 0.0
        self.modes: tuple[float | None, ...] = (_WHOLE, *self.min_ious, last)
        self.min_crop_size = float(min_crop_size)
        self.max_trials = int(max_trials)

    def __repr__(self) -> str:
        return (f"RandomSampleCrop(style={self.style!r}, min_ious={self.min_ious}, "
                f"min_crop_size={self.min_crop_size}, max_trials={self.max_trials})")

    def __call__(self, sample: Sample) -> Sample:
        g = self._gen(sample)
        t = sample.targets
        n = len(t)
        if self.style == "yolact" and n == 0:
            return sample
        h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
        gts = torch.cat([t.boxes.float(), _crowd(t).float()])
        centres = (gts[:, :2] + gts[:, 2:]) / 2
        while True:
            mode = self.modes[_choice(g, len(self.modes))]
            if mode is _WHOLE:
                return sample
            for _ in range(self.max_trials):
                new_w = _uniform(g, self.min_crop_size * w, w)
                new_h = _uniform(g, self.min_crop_size * h, h)
                if new_h / new_w < 0.5 or new_h / new_w > 2:
                    continue
                left = _uniform_low_only(g, w - new_w)
                top = _uniform_low_only(g, h - new_h)
                x0, y0, x1, y1 = int(left), int(top), int(left + new_w), int(top + new_h)
                if x1 <= x0 or y1 <= y0:
                    continue
                if self.style == "mmdet" and len(gts) and float(_iou_with_window(gts, x0, y0, x1, y1).min()) < mode:
                    continue
                # (yolact: the official min-IoU test never rejects, see the class docstring)
                inside = (centres[:, 0] > x0) & (centres[:, 1] > y0) & (centres[:, 0] < x1) & (centres[:, 1] < y1)
                if self.style == "yolact" and not bool(inside[:n].any()):
                    continue
                if self.style == "mmdet" and len(gts) and not bool(inside.any()):
                    continue
                out = crop_sample(sample, (x0, y0, x1, y1), inside[:n], inside[n:])
                if self.style == "yolact" and len(out.targets) == 0:
                    continue
                return out


def crop_sample(
    sample: Sample, window: tuple[int, int, int, int], keep: Tensor | None = None, keep_crowd: Tensor | None = None
) -> Sample:
    """Deterministic crop to the integer ``window = (x0, y0, x1, y1)``.

    Instances where ``keep`` (default: all) and crowd boxes where ``keep_crowd`` (default: all) are
    kept, clipped to the window and moved into its frame; kept instances whose mask has no pixel
    inside the window are dropped (box, label and mask together).
    """
    x0, y0, x1, y1 = (int(v) for v in window)
    h, w = int(sample.image.shape[-2]), int(sample.image.shape[-1])
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop window {window} is not a non-empty window of the {h}x{w} image")
    t = sample.targets
    keep = torch.ones(len(t), dtype=torch.bool) if keep is None else keep.bool()
    t = select_instances(t, keep)
    boxes = _clip_to_window(t.boxes, x0, y0, x1, y1)
    masks = None if t.masks is None else t.masks.crop(x0, y0, x1, y1)
    crowd = t.crowd_boxes
    if crowd is not None:
        kc = torch.ones(len(crowd), dtype=torch.bool) if keep_crowd is None else keep_crowd.bool()
        crowd = _clip_to_window(crowd[kc].reshape(-1, 4), x0, y0, x1, y1)
    semantic = None if t.semantic is None else t.semantic[y0:y1, x0:x1].clone()
    targets = replace(t, boxes=boxes, masks=masks, semantic=semantic, crowd_boxes=crowd)
    if masks is not None:
        targets = select_instances(targets, masks.nonempty())
    meta = replace(sample.meta, image_size=(y1 - y0, x1 - x0))
    return replace(sample, image=sample.image[:, y0:y1, x0:x1].clone(), targets=targets, meta=meta)


# ---------------------------------------------------------------------------------- filter
class FilterSmallBoxes:
    """mmdet's ``FilterAnnotations(min_gt_bbox_wh=min_wh)`` (by box only): keeps ground truths with
    ``width > min_wh[0]`` and ``height > min_wh[1]`` (strict), dropping box, label and mask together.

    Crowd boxes are filtered by the same rule (mmdet carries them as ignore-flagged ground truths).
    Where mmdet returns ``None`` because nothing is left (``keep_empty=True``: the dataset then
    draws another image), this returns the sample with zero instances: a transform cannot resample.
    """

    def __init__(self, min_wh: tuple[float, float] = (4.0, 4.0)) -> None:
        self.min_wh = (float(min_wh[0]), float(min_wh[1]))

    def __repr__(self) -> str:
        return f"FilterSmallBoxes(min_wh={self.min_wh})"

    def _big(self, boxes: Tensor) -> Tensor:
        return ((boxes[:, 2] - boxes[:, 0]) > self.min_wh[0]) & ((boxes[:, 3] - boxes[:, 1]) > self.min_wh[1])

    def __call__(self, sample: Sample) -> Sample:
        t = sample.targets
        keep = self._big(t.boxes)
        crowd = t.crowd_boxes
        if crowd is not None:
            crowd = crowd[self._big(crowd)].reshape(-1, 4)
        return replace(sample, targets=replace(select_instances(t, keep), crowd_boxes=crowd))


# ---------------------------------------------------------------------------------- registry
def build_augmentation(
    name: str, mean: Sequence[float] = (123.675, 116.28, 103.53), scale: tuple[int, int] = (1333, 800)
) -> Callable[[Sample], Sample]:
    """The augmentation called ``name`` (one of ``AUGMENTATIONS``) with its reference settings;
    ``mean`` (RGB) fills the expand canvas; ``scale`` (``data.scale``) is large-scale jitter's
    reference size.  ``vflip``, ``rot90``, ``lsj`` live in ``instseg.data.geometric`` and
    ``copy_paste`` in ``instseg.data.copy_paste``, ``grayscale`` and ``invert`` in ``instseg.data.colour`` (imported here lazily: they build on this module)."""
    if name in ("vflip", "rot90", "lsj"):
        from instseg.data import geometric

        if name == "vflip":
            return geometric.RandomVerticalFlip()
        if name == "rot90":
            return geometric.RandomRot90()
        return geometric.LargeScaleJitter(scale)
    if name == "copy_paste":
        from instseg.data.copy_paste import CopyPaste

        return CopyPaste()
    if name in ("grayscale", "invert"):
        from instseg.data import colour

        return colour.RandomGrayscale() if name == "grayscale" else colour.RandomInvert()
    if name == "photometric_yolact":
        return PhotometricDistort("yolact")
    if name == "photometric_mmdet":
        return PhotometricDistort("mmdet")
    if name == "expand":
        return Expand(mean=mean)
    if name == "crop_yolact":
        return RandomSampleCrop("yolact")
    if name == "crop_mmdet":
        return RandomSampleCrop("mmdet")
    if name == "filter_small":
        return FilterSmallBoxes((4.0, 4.0))
    raise ValueError(f"unknown augmentation {name!r}; valid names: {', '.join(AUGMENTATIONS)}")
