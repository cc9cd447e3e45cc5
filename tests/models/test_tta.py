"""Test-time augmentation: exact flips, original frame, one view == plain predict."""

from __future__ import annotations

import pytest
import torch

from instseg.data.coco import ImageMeta, Sample
from instseg.data.transforms import Normalize, Resize
from instseg.data.collate import collate
from instseg.engine.tta import CHALLENGE_SCALES, TestTimeAugmentation, TTASettings, parse_tta
from instseg.config.schema import DataConfig, ModelConfig
from instseg.modeling.zoo import build_model
from instseg.structures import ImageTargets

from .tiny import tiny_config


def _sample(image: torch.Tensor) -> Sample:
    h, w = image.shape[-2:]
    t = ImageTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    return Sample(image=image, targets=t, meta=ImageMeta(0, "x.png", (h, w), (h, w)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_config("cascade_mask_rcnn", score_thr=0.0, max_per_img=30)
    return build_model(cfg).eval()


def _image(seed: int = 0, h: int = 96, w: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).round()


def _same(a, b, atol=1e-4):
    assert len(a) == len(b)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    assert torch.equal(a.labels, b.labels)
    if a.masks is not None:
        assert (a.masks != b.masks).float().mean() < 1e-3


def _mirror(d, width):
    from instseg.ops.boxes import flip_boxes
    from instseg.structures import Detections

    return Detections(flip_boxes(d.boxes, width), d.scores, d.labels, None if d.masks is None else d.masks.flip(-1))


def test_single_view_equals_plain_predict(model):
    """With one view the merge steps are identities, except the proposal NMS that mmdetection
    runs again on the merged set; at IoU 1.0 that NMS keeps everything, so TTA == predict."""
    image = _image()
    tta = TestTimeAugmentation(model, TTASettings(scales=((160, 120),), flip=False))
    saved = model.rpn_head.test_proposals.nms_iou
    model.rpn_head.test_proposals.nms_iou = 1.0
    try:
        ours = tta.predict([_sample(image)])[0]
        s = Normalize()(Resize((160, 120))(_sample(image)))
        batch, _, _ = collate([s])
        ref = model.predict(batch)[0]
    finally:
        model.rpn_head.test_proposals.nms_iou = saved
    assert len(ref) > 0
    _same(ours, ref)


def test_flip_is_an_exact_mirror(model):
    """TTA(flip) of an image equals the mirror of TTA(flip) of the mirrored image: the two runs
    see the same two views, swapped, so any rounding in the flip mapping breaks the equality."""
    image = _image(1)  # 96 x 128 at scale (128, 96): no resampling, no padding, so views are exact mirrors
    tta = TestTimeAugmentation(model, TTASettings(scales=((128, 96),), flip=True))
    a = tta.predict([_sample(image)])[0]
    b = tta.predict([_sample(image.flip(-1))])[0]
    assert len(a) > 0
    _same(a, _mirror(b, image.shape[-1]))


def test_mirror_symmetric_image_gives_symmetric_detections(model):
    half = _image(2, 96, 64)
    image = torch.cat([half, half.flip(-1)], dim=-1)
    tta = TestTimeAugmentation(model, TTASettings(scales=((128, 96),), flip=True))
    d = tta.predict([_sample(image)])[0]
    assert len(d) > 10
    # a symmetric result holds each detection's mirror too, with the same score and label (the
    # cap at max_per_img may cut the last pair, so the leading 20 are checked)
    from instseg.ops.boxes import box_iou

    m = _mirror(d, image.shape[-1])
    checked = 0
    for k in range(20):
        if float(box_iou(d.boxes[k : k + 1], m.boxes[k : k + 1])) > model.roi_head.nms_iou:
            continue  # a box and its own mirror suppress each other in NMS: only one can remain
        checked += 1
        same = (
            (m.labels == d.labels[k])
            & ((m.scores - d.scores[k]).abs() < 1e-5)
            & ((m.boxes - d.boxes[k]).abs().max(dim=1).values < 1e-3)
        )
        j = torch.nonzero(same).flatten()
        assert j.numel() >= 1, f"detection {k} has no mirror image"
        assert (m.masks[j[0]] != d.masks[k]).float().mean() < 1e-3
    assert checked >= 10


def test_multi_scale_output_in_the_original_frame(model):
    image = _image(3, 90, 130)
    tta = TestTimeAugmentation(model, TTASettings(scales=((160, 120), (224, 160)), flip=True))
    d = tta.predict([_sample(image)])[0]
    assert d.masks.shape[1:] == (90, 130)
    assert d.boxes[:, 0::2].max() <= 130 + 1e-3 and d.boxes[:, 1::2].max() <= 90 + 1e-3
    assert (d.scores[:-1] >= d.scores[1:]).all()


def test_parse_tta():
    data = DataConfig(scale=(1333, 800))
    assert parse_tta("flip", data).views == [((1333, 800), False), ((1333, 800), True)]
    assert len(parse_tta("ms-flip", data).views) == 2 * len(CHALLENGE_SCALES) == 10
    assert parse_tta("1333x800,1600x1000+flip", data).scales == ((1333, 800), (1600, 1000))
    with pytest.raises(ValueError, match="--tta"):
        parse_tta("big", data)


def test_tta_model_reads_raw_padded_batches(model):
    """``TTAModel.predict`` (what ``instseg eval/predict --tta`` run) on a zero-padded batch of raw
    images equals the engine on the un-padded sample."""
    from instseg.engine.tta import TTAModel

    image = _image(4, 90, 120)
    settings = TTASettings(scales=((160, 120),), flip=True)
    batch, _, _ = collate([_sample(image)], size_divisor=32)
    assert batch.images.shape[-2:] == (96, 128)
    a = TTAModel(model, settings).predict(batch)[0]
    b = TestTimeAugmentation(model, settings).predict([_sample(image)])[0]
    _same(a, b, atol=0)


def test_cli_predict_with_tta(tmp_path):
    """``instseg predict --tta flip`` runs the wrapped model end to end on an image file; asking
    for TTA on a one-stage model is a one-line error (exit 2)."""
    import json

    from PIL import Image

    from instseg.cli import main
    from instseg.config.schema import Config
    from instseg.convert.mmdet import package_checkpoint, write_checkpoint
    from instseg.data.transforms import rescale_size

    from .tiny import tiny_config

    torch.manual_seed(0)
    cfg = Config()
    cfg.model = tiny_config("mask_rcnn", score_thr=0.0, max_per_img=20)
    cfg.data.scale = (160, 120)
    ckpt = write_checkpoint(
        package_checkpoint(build_model(cfg.model).state_dict(), cfg, [1, 2, 3, 4], list("abcd"), {}), tmp_path / "m.pt"
    )
    image = tmp_path / "x.png"
    Image.fromarray((_image(5, 90, 120).permute(1, 2, 0).numpy()).astype("uint8")).save(image)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(image), "--out", str(out),
                 "--tta", "flip", "--score-thr", "0", "--device", "cpu"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert 0 < len(results) <= 20
    assert all(r["bbox"][0] + r["bbox"][2] <= 120 + 1e-3 for r in results)  # original frame, not 160 px
    assert rescale_size(120, 90, (160, 120))[0] == (160, 120)  # the view really was resized
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(image), "--out", str(out), "--tta", "big"]) == 2

    yolact_cfg = Config()
    yolact_cfg.model = ModelConfig(arch="yolact", backbone="resnet18", num_classes=4, fpn_channels=32)
    yolact_cfg.model.yolact.head_channels = yolact_cfg.model.yolact.proto_channels = 32
    y = write_checkpoint(
        package_checkpoint(build_model(yolact_cfg.model).state_dict(), yolact_cfg, [1, 2, 3, 4], list("abcd"), {}),
        tmp_path / "y.pt",
    )
    assert main(["predict", "--checkpoint", str(y), "--images", str(image), "--out", str(out), "--tta", "flip"]) == 2
