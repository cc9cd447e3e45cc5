"""``instseg predict`` on a video: a losslessly encoded clip of synthetic frames gives, frame by
frame, the detections of image mode on the same frames, and the annotated video keeps the frame
count and rate."""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest

from instseg.api import Predictor
from instseg.cli import main
from tests.predict_utils import synthetic_image, tiny_checkpoint

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")

N_FRAMES, FPS = 6, Fraction(12)


def _write_lossless_clip(path, frames: list[np.ndarray], rotation: int = 0) -> None:
    """H.264 in RGB (libx264rgb) at crf 0: lossless, so decoded frames equal ``frames``."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264rgb", rate=FPS)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode(None))


def _decode(path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in c.decode(stream)], stream.average_rate


def test_video_frames_equal_image_mode(tmp_path):
    ckpt = tiny_checkpoint("mask_rcnn", tmp_path / "m.pt")
    frames = [np.roll(synthetic_image(1), 7 * k, axis=1) for k in range(N_FRAMES)]
    clip = tmp_path / "clip.mkv"
    _write_lossless_clip(clip, frames)
    decoded, _ = _decode(clip)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, frames)) and len(decoded) == N_FRAMES  # lossless

    out = tmp_path / "out"
    assert main(["predict", str(clip), "--checkpoint", str(ckpt), "--out", str(out), "--score-thr", "0.05",
                 "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in (out / "clip.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(N_FRAMES))
    assert [x["time"] for x in lines] == pytest.approx([k / 12 for k in range(N_FRAMES)], abs=1e-3)
    predictor = Predictor(ckpt, device="cpu")
    for k, frame in enumerate(frames):
        image_mode = predictor(frame)
        expected = json.loads(json.dumps(image_mode.to_coco(image_id=k, score_thr=0.05)))
        assert len(expected) > 0
        got = lines[k]["detections"]
        assert [d.pop("class_name") for d in got] == image_mode.filter(0.05).class_names
        assert got == expected  # equal, RLE masks included
    annotated, rate = _decode(out / "clip.mp4")
    assert len(annotated) == N_FRAMES and rate == FPS
    assert annotated[0].shape == frames[0].shape


def test_video_batches_equal_image_mode_batches(tmp_path):
    """Frames batched 3 at a time give what the same 3 images give in one image-mode call."""
    ckpt = tiny_checkpoint("yolact", tmp_path / "y.pt")
    frames = [synthetic_image(k) for k in range(3)]
    _write_lossless_clip(tmp_path / "c.mkv", frames)
    predictor = Predictor(ckpt, device="cpu")
    result = predictor.predict_video(tmp_path / "c.mkv", tmp_path / "o", score_thr=0.0, batch_size=3)
    assert result.frames == 3 and result.video == tmp_path / "o" / "c.mp4" and result.fps == 12
    lines = [json.loads(x) for x in result.jsonl.read_text().splitlines()]
    for k, pred in enumerate(predictor(frames, batch_size=3)):
        got = [{key: v for key, v in d.items() if key != "class_name"} for d in lines[k]["detections"]]
        assert got == json.loads(json.dumps(pred.to_coco(image_id=k)))


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path, rotation):
    """A phone video (landscape pixels + a display rotation) is read as players show it: PyAV's
    rotation is counterclockwise, as np.rot90's."""
    from instseg.video import read_frames

    frames = [synthetic_image(k, 48, 64) for k in range(2)]
    _write_lossless_clip(tmp_path / "r.mp4", frames, rotation)
    got = [f for _, _, f in read_frames(tmp_path / "r.mp4")]
    assert len(got) == 2 and all(np.array_equal(g, np.rot90(f, rotation // 90)) for g, f in zip(got, frames))


def test_camera_and_bad_video_errors(tmp_path, capsys):
    ckpt = tiny_checkpoint("retinanet", tmp_path / "r.pt")
    if not os.path.exists("/dev/video7"):
        assert main(["predict", "--camera", "7", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
        assert "/dev/video7 does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    assert main(["predict", str(bad), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "cannot open as a video" in capsys.readouterr().err
