"""Prediction on videos and cameras, decoded and encoded with PyAV (the ``video`` extra).

``predict_video(predictor, "clip.mp4", "out/")`` writes ``out/clip.mp4`` (the overlays, H.264,
one output frame per decoded frame at the input's frame rate) and ``out/clip.jsonl`` (one JSON
object per frame: ``frame`` index, ``time`` in seconds, ``detections`` as COCO results with RLE
masks and class names).  A camera is the source ``camera:N`` (Linux ``/dev/videoN`` through
FFmpeg's v4l2 input); it runs until ``max_frames`` or Ctrl-C, and the files written so far are
closed properly either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["VideoError", "VideoResult", "camera_device", "predict_video", "read_frames"]


class VideoError(ValueError):
    """A video or camera that cannot be opened, or PyAV missing (one-line message)."""


@dataclass
class VideoResult:
    """What :func:`predict_video` wrote: frame count, frame rate and the two files."""

    frames: int
    fps: float
    video: Path
    jsonl: Path


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("video input needs PyAV: pip install 'instseg[video]' (or: pip install av)") from None
    return av


def camera_device(source: str | int) -> str | None:
    """``/dev/videoN`` for a camera source (``N``, ``'camera:N'``), else ``None``."""
    text = str(source)
    if isinstance(source, int) or text.isdigit():
        return f"/dev/video{int(text)}"
    if text.startswith("camera:") and text[7:].isdigit():
        return f"/dev/video{int(text[7:])}"
    return None


def _open(source: str | int):
    av = _av()
    dev = camera_device(source)
    try:
        if dev is not None:
            if not os.path.exists(dev):
                raise VideoError(f"camera {source}: {dev} does not exist (no such camera on this machine)")
            return av.open(dev, format="v4l2")
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        return av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoError(f"{source}: cannot open as a video ({e})") from None


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(25)


def read_frames(source: str | int, max_frames: int | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(index, time in seconds, (H, W, 3) uint8 RGB)`` for each decoded frame of a video file
    or camera (see :func:`camera_device`), in decoding order, turned as players show it when the
    stream carries a display rotation (phone videos shot upright)."""
    container = _open(source)
    try:
        stream = container.streams.video[0]
        rate = _rate(stream)
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i >= max_frames:
                break
            t = float(frame.time) if frame.time is not None else i / float(rate)
            yield i, t, _as_displayed(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
    finally:
        container.close()


def _as_displayed(rgb: np.ndarray, rotation: float | None) -> np.ndarray:
    """The frame turned by its display matrix's rotation (PyAV: degrees counterclockwise, a
    multiple of 90 in practice; mirroring in the matrix is not applied)."""
    k = int(round((rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


class _Writer:
    """H.264 encoder for the overlay frames: yuv420p (plays everywhere) when both sides are even,
    else yuv444p (4:2:0 needs even sides)."""

    def __init__(self, path: Path, rate: Fraction) -> None:
        self.av = _av()
        self.path = path
        self.rate = rate
        self.container = self.av.open(str(path), mode="w")
        self.stream = None
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        if self.stream is None:
            h, w = rgb.shape[:2]
            self.stream = self.container.add_stream("libx264", rate=self.rate)
            self.stream.width, self.stream.height = w, h
            self.stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        if self.stream is not None:
            self.container.mux(self.stream.encode(None))  # flush the frames the encoder holds back
        self.container.close()


def predict_video(
    predictor,
    source: str | int,
    out_dir: str | os.PathLike,
    *,
    score_thr: float = 0.3,
    batch_size: int = 1,
    max_frames: int | None = None,
    name: str | None = None,
    **draw_kw: Any,
) -> VideoResult:
    """Runs ``predictor`` (an ``instseg.Predictor``) on every frame of ``source``; writes
    ``OUT/NAME.mp4`` (overlays drawn as ``instseg predict`` draws images, detections with score
    >= ``score_thr``) and ``OUT/NAME.jsonl`` (those detections, one line per frame).  ``NAME`` is
    the file's stem, or ``cameraN``."""
    if int(batch_size) < 1:
        raise VideoError(f"batch_size must be >= 1, got {batch_size}")
    dev = camera_device(source)
    name = name or (f"camera{dev[len('/dev/video'):]}" if dev else Path(source).stem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    container = _open(source)
    rate = _rate(container.streams.video[0])
    container.close()
    video_path, jsonl_path = out / f"{name}.mp4", out / f"{name}.jsonl"
    writer = _Writer(video_path, rate)
    frames = 0
    try:
        with open(jsonl_path, "w") as lines:
            batch: list[tuple[int, float, np.ndarray]] = []

            def flush() -> None:
                preds = predictor.predict_arrays([f for _, _, f in batch], [f"{source}#frame={i}" for i, _, _ in batch],
                                                 first_index=batch[0][0])
                for (i, t, _), pred in zip(batch, preds):
                    dets = pred.to_coco(image_id=i, score_thr=score_thr)
                    names = pred.filter(score_thr).class_names
                    for d, n in zip(dets, names):
                        d["class_name"] = n
                    lines.write(json.dumps({"frame": i, "time": round(t, 6), "detections": dets}) + "\n")
                    writer.write(np.asarray(pred.draw(score_thr=score_thr, **draw_kw)))
                batch.clear()

            for item in read_frames(source, max_frames):
                batch.append(item)
                frames += 1
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
    finally:
        writer.close()
    return VideoResult(frames, float(rate), video_path, jsonl_path)
