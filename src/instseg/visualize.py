"""Overlays of detections on images, and training curves.

``draw_detections`` needs only Pillow and numpy. ``plot_metrics`` imports matplotlib lazily and
draws on an Agg canvas without pyplot, so it never touches the user's global backend.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from instseg.structures.instances import Detections

__all__ = ["class_color", "draw_detections", "instance_color", "plot_metrics", "save_overlay"]


def instance_color(i: int) -> tuple[int, int, int]:
    """The ``i``-th color of a deterministic palette: hues spaced by the golden ratio."""
    hue = (0.07 + i * 0.618033988749895) % 1.0
    sat = 0.85 if i % 2 == 0 else 0.65
    val = 1.0 if (i // 2) % 2 == 0 else 0.85
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


_SHADES = (0.0, 0.35, -0.35, 0.6, -0.55)


def class_color(label: int, k: int = 0) -> tuple[int, int, int]:
    """The color of class ``label`` (``instance_color(label)``); ``k`` > 0 gives the k-th instance of
    that class a lighter or darker shade of it, so neighbouring instances of one class stay apart."""
    base = instance_color(int(label))
    t = _SHADES[k % len(_SHADES)]
    target = 255.0 if t > 0 else 0.0
    return tuple(int(round(c * (1 - abs(t)) + target * abs(t))) for c in base)  # type: ignore[return-value]


CROWDED = 40  # above this many shown detections, boxes and labels are left out by default


def draw_detections(
    image: np.ndarray,
    dets: Detections,
    class_names: Sequence[str],
    *,
    score_thr: float = 0.3,
    alpha: float = 0.5,
    show_boxes: bool | None = None,
    show_labels: bool | None = None,
    show_scores: bool = True,
    color_by: str = "class",
) -> Image.Image:
    """Draws detections (translucent masks, box outlines, ``'name 0.87'`` labels) on an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (``(H, W)`` grey is accepted too), in the frame of ``dets``.
        dets: detections in the same frame; ``masks`` (if any) must be ``(n, H, W)``.
        class_names: name of each contiguous label (labels beyond the list print as numbers).
        score_thr: detections scoring below this are not drawn.
        alpha: mask opacity.
        show_boxes, show_labels: draw boxes / labels; ``None`` (default) draws them only while
            at most ``CROWDED`` detections are shown, so hundreds of nuclei stay readable
            (``instseg predict --boxes --labels`` forces them on).
        show_scores: labels read ``'name 0.87'`` (else just ``'name'``, e.g. for ground truth).
        color_by: ``'class'`` (default): each class has its color (:func:`class_color`), its
            instances shades of it by score rank; ``'instance'``: every instance its own color
            by score rank (:func:`instance_color`).

    Returns:
        A new RGB ``PIL.Image``; the input is not modified. The same detections always get the
        same colors; higher scores are drawn on top.
    """
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    scores = dets.scores.detach().float().cpu()
    keep = torch.nonzero(scores >= score_thr, as_tuple=True)[0]
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)].tolist()
    crowded = len(keep) > CROWDED
    show_boxes = not crowded if show_boxes is None else show_boxes
    show_labels = not crowded if show_labels is None else show_labels
    if dets.masks is not None and len(dets) and tuple(dets.masks.shape[-2:]) != (h, w):
        raise ValueError(f"masks are {tuple(dets.masks.shape[-2:])} but the image is {(h, w)}")
    if color_by not in ("class", "instance"):
        raise ValueError(f"color_by must be 'class' or 'instance', got {color_by!r}")
    all_labels = dets.labels.detach().cpu().tolist()
    if color_by == "instance":
        colors = {i: instance_color(rank) for rank, i in enumerate(keep)}
    else:
        seen: dict[int, int] = {}
        colors = {}
        for i in keep:
            lab = int(all_labels[i])
            colors[i] = class_color(lab, seen.get(lab, 0))
            seen[lab] = seen.get(lab, 0) + 1
    order = keep[::-1]  # lowest score first, so the best ends up on top

    out = img.astype(np.float32)
    if dets.masks is not None:
        for i in order:
            _blend_mask(out, dets.masks[i].detach().cpu().numpy().astype(bool), colors[i], alpha)
    pil = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if not order or not (show_boxes or show_labels):
        return pil

    draw = ImageDraw.Draw(pil)
    line = max(1, round(min(h, w) / 320))
    font = _font(max(10, min(24, round(min(h, w) / 40))))
    boxes = dets.boxes.detach().float().cpu().tolist()
    labels = dets.labels.detach().cpu().tolist()
    if show_boxes:
        for i in order:
            x1, y1, x2, y2 = boxes[i]
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colors[i], width=line)
    if show_labels:
        for i in order:
            x1, y1, _, _ = boxes[i]
            label = int(labels[i])
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            text = f"{name} {float(scores[i]):.2f}" if show_scores else name
            l, t, r, b = draw.textbbox((0, 0), text, font=font)
            tw, th = r - l + 4, b - t + 2
            tx = min(max(0.0, x1), max(0.0, w - tw))
            ty = y1 - th if y1 - th >= 0 else max(0.0, y1)  # above the box, else just inside
            draw.rectangle([tx, ty, tx + tw, ty + th], fill=colors[i])
            draw.text((tx + 2 - l, ty + 1 - t), text, fill=_text_color(colors[i]), font=font)
    return pil


def save_overlay(
    path: str | os.PathLike, image: np.ndarray, dets: Detections, class_names: Sequence[str], **kw: Any
) -> None:
    """``draw_detections(image, dets, class_names, **kw)`` saved to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(image, dets, class_names, **kw).save(path)


def plot_metrics(metrics_jsonl: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Plots training losses and evaluation AP from a run's ``metrics.jsonl``.

    Lines with ``iter`` and ``loss*`` keys give ``loss.png`` (every loss vs iteration, plus the
    learning rate when logged); lines with AP keys (``bbox_AP``, ``segm_AP50``, ...) give
    ``ap.png`` (vs ``iter`` when every eval line has it, else vs ``epoch``). A plot with no data
    is skipped. Unparseable lines (e.g. a half-written last line) are ignored.

    Returns the paths written.
    """
    train: list[dict] = []
    evals: list[dict] = []
    with open(metrics_jsonl) as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if "iter" in rec and any(_is_loss(k) and _num(v) for k, v in rec.items()):
                train.append(rec)
            if any(_is_ap_key(k) and _num(v) for k, v in rec.items()):
                evals.append(rec)

    out = Path(out_dir)
    written: list[Path] = []
    if train or evals:
        out.mkdir(parents=True, exist_ok=True)
    if train:
        written.append(_plot_losses(train, out / "loss.png"))
    if evals:
        written.append(_plot_ap(evals, out / "ap.png"))
    return written


# --- helpers ----------------------------------------------------------------------------------


def _as_rgb_uint8(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(img.max()) <= 1.0:
            img = img * 255.0
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def _blend_mask(out: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float) -> None:
    """Tints ``mask`` pixels of ``out`` in place and draws the mask's outline in solid color.

    Works on the mask's bounding crop, so hundreds of small masks stay cheap.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    m = mask[y0:y1, x0:x1]
    region = out[y0:y1, x0:x1]
    c = np.asarray(color, dtype=np.float32)
    region[m] = region[m] * (1.0 - alpha) + c * alpha
    # outline: mask pixels with a 4-neighbour outside the mask
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    region[m & ~inner] = c


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


_FONTS: dict[int, Any] = {}


def _font(size: int):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed-size bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ap_key(k: str) -> bool:
    name = k.rsplit("_", 1)[-1]
    return name in ("AP", "AP50", "AP75")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _is_loss(key: str) -> bool:
    """Loss terms: ``loss``, ``loss_mask``, and cascade stage terms such as ``s1.loss_cls``."""
    return key.startswith("loss") or ".loss" in key


def _plot_losses(train: list[dict], path: Path) -> Path:
    keys = sorted({k for r in train for k, v in r.items() if _is_loss(k) and _num(v)})
    # the total loss first, drawn thicker
    keys.sort(key=lambda k: (k != "loss", k))
    has_lr = any(_num(r.get("lr")) for r in train)
    fig = _figure(8, 6 if has_lr else 4.5)
    if has_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    for k in keys:
        xs = [r["iter"] for r in train if _num(r.get(k))]
        ys = [r[k] for r in train if _num(r.get(k))]
        ax.plot(xs, ys, label=k, linewidth=2.0 if k == "loss" else 1.0)
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if ax_lr is not None:
        xs = [r["iter"] for r in train if _num(r.get("lr"))]
        ax_lr.plot(xs, [r["lr"] for r in train if _num(r.get("lr"))], color="black", linewidth=1.0)
        ax_lr.set_ylabel("lr")
        ax_lr.grid(True, alpha=0.3)
        ax_lr.set_xlabel("iter")
    else:
        ax.set_xlabel("iter")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_ap(evals: list[dict], path: Path) -> Path:
    x_key = "iter" if all(_num(r.get("iter")) for r in evals) else "epoch"
    if not all(_num(r.get(x_key)) for r in evals):
        x_key = ""
    keys = sorted({k for r in evals for k, v in r.items() if _is_ap_key(k) and _num(v)})
    fig = _figure(8, 4.5)
    ax = fig.subplots(1, 1)
    # one color per IoU type (bbox, segm, ...), one line style per metric (AP, AP50, AP75)
    styles = {"AP": "-", "AP50": "--", "AP75": ":"}
    prefixes = sorted({k.rsplit("_", 1)[0] if "_" in k else "" for k in keys})
    for k in keys:
        prefix, metric = k.rsplit("_", 1) if "_" in k else ("", k)
        rows = [(n, r) for n, r in enumerate(evals) if _num(r.get(k))]
        xs = [r[x_key] if x_key else n for n, r in rows]
        color = f"C{prefixes.index(prefix) % 10}"
        ax.plot(xs, [r[k] for _, r in rows], styles[metric], color=color, marker="o", markersize=3, label=k)
    ax.set_xlabel(x_key or "evaluation")
    ax.set_ylabel("AP")
    ax.set_title("COCO AP")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path
