"""Parity with the official YOLACT code (``../shared/golden/official``, README there).

Weights are generated from the official parameter names by the fixture's documented rule, saved
as an official-layout checkpoint, converted with ``instseg convert yolact`` and run on the exact
network inputs the official code saw.  Checked: the generated weights (checksums), FPN P3-P7,
prototypes, head outputs, priors, Detect (Fast NMS, cross-class Fast NMS, greedy) on the rebuilt
exact input, and postprocess (integer boxes, RLE masks, mask probabilities).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from instseg.config.presets import get_preset
from instseg.convert.yolact import convert_checkpoint, preset_from_filename, rename_key
from instseg.modeling.dense_heads.yolact import official_output_boxes
from instseg.modeling.zoo import build_model
from instseg.structures import ImageBatch

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "official"
requires_official = pytest.mark.skipif(
    not OFFICIAL.is_dir(), reason="../shared/golden/official is not present (beside the repo on dev machines and CI)"
)
MODELS = {"yolact_base": 4.0, "yolact_resnet50": 7.0}  # preset -> conf_layer weight multiplier (README)
RECORDS = [("yolact_base", "000040"), ("yolact_resnet50", "100002"), ("yolact_base", "100002"), ("yolact_resnet50", "000040")]


def generated_weight(name: str, shape: list[int], conf_m: float) -> torch.Tensor:
    """The fixture's rule: a CPU generator seeded with crc32(name), kind from suffix / ndim."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(name.encode("utf-8")))
    if name.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.int64)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if name.endswith("running_var"):
        return 1.0 + torch.rand(shape, generator=g)
    if name.endswith("weight") and len(shape) >= 2:
        m = conf_m if name == "prediction_layers.0.conf_layer.weight" else 1.0
        return torch.randn(shape, generator=g) * (m / math.sqrt(math.prod(shape[1:])))
    if name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        b = 0.1 * torch.randn(shape, generator=g)
        if name == "prediction_layers.0.conf_layer.bias":
            b[0::81] += 12.0
        return b
    raise AssertionError(f"no rule for {name}")


@pytest.fixture(scope="module")
def official_checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for model, conf_m in MODELS.items():
        keys = json.loads((OFFICIAL / f"keys_{model}.json").read_text())["keys"]
        state = {k["name"]: generated_weight(k["name"], k["shape"], conf_m) for k in keys}
        path = tmp_path_factory.mktemp(model) / f"{model}_54_800000.pth"
        torch.save(state, path)
        out[model] = path
    return out


@pytest.fixture(scope="module")
def models(official_checkpoints) -> dict[str, torch.nn.Module]:
    out = {}
    for model, path in official_checkpoints.items():
        cfg = get_preset(preset_from_filename(path))
        ckpt = convert_checkpoint(path, cfg)
        net = build_model(cfg.model)
        net.load_state_dict(ckpt["model"])
        out[model] = net.eval()
    return out


def _record(model: str, image: str) -> dict:
    return torch.load(OFFICIAL / f"{model}_{image}.pt", weights_only=True)


def _batch(image: str) -> ImageBatch:
    inp = torch.load(OFFICIAL / f"yolact_input_{image}.pt", weights_only=True)
    h, w = inp["orig_hw"]
    return ImageBatch(
        images=inp["input"],
        image_sizes=[(550, 550)],
        original_sizes=[(h, w)],
        scale_factors=torch.tensor([[550 / w, 550 / h]]),
        image_ids=[0],
    )


@requires_official
def test_generated_weights_match_checksums():
    for model, conf_m in MODELS.items():
        keys = json.loads((OFFICIAL / f"keys_{model}.json").read_text())["keys"]
        for k in keys[:: max(1, len(keys) // 60)] + [x for x in keys if "conf_layer" in x["name"]]:
            t = generated_weight(k["name"], k["shape"], conf_m)
            assert math.fsum(t.double().flatten().tolist()) == pytest.approx(k["sum"], rel=1e-12, abs=1e-9), k["name"]


@requires_official
def test_key_mapping_is_the_documented_one():
    assert rename_key("fpn.lat_layers.0.weight") == "neck.lateral_convs.2.conv.weight"  # C5 lateral
    assert rename_key("fpn.pred_layers.2.bias") == "neck.fpn_convs.0.conv.bias"  # P3 output conv
    assert rename_key("fpn.downsample_layers.1.weight") == "neck.fpn_convs.4.conv.weight"  # P7
    assert rename_key("fpn.downsample_layers.2.weight") is None  # dropped by load_weights
    assert rename_key("backbone.layers.3.2.conv2.weight") == "backbone.layer4.2.conv2.weight"
    assert rename_key("backbone.layer1.0.conv1.weight") is None
    assert rename_key("prediction_layers.0.conf_layer.weight") == "bbox_head.conv_cls.weight"


def _fingerprint_close(rec: dict, prefix: str, x: torch.Tensor, atol: float = 1e-4) -> None:
    x = x.double()
    torch.testing.assert_close(x.mean((0, 2, 3)).float(), rec[f"{prefix}_ch_mean"], atol=atol, rtol=1e-4)
    torch.testing.assert_close(x.mean((0, 1)).float(), rec[f"{prefix}_sp_mean"], atol=atol, rtol=1e-4)
    if f"{prefix}_ch_sample" in rec:
        idx = rec[f"{prefix}_ch_sample_idx"]
        torch.testing.assert_close(x[0, idx].float(), rec[f"{prefix}_ch_sample"], atol=atol, rtol=1e-4)


@requires_official
@pytest.mark.slow
@pytest.mark.parametrize("model,image", RECORDS)
def test_network_outputs(models, model, image):
    rec = _record(model, image)
    net = models[model]
    batch = _batch(image)
    with torch.no_grad():
        feats = net.extract_feats(batch.images)
        out = net.bbox_head(feats)
        protos = net.mask_head(feats[0])
    for lvl, name in enumerate(["fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6", "fpn_p7"]):
        _fingerprint_close(rec, name, feats[lvl])
        if name in rec:
            torch.testing.assert_close(feats[lvl], rec[name], atol=1e-4, rtol=1e-4)
    _fingerprint_close(rec, "proto", protos)
    assert out.cls.shape == (1, 19248, 81)
    assert rec["head_anchors_per_level"].tolist() == out.counts
    logits = out.cls[0]
    torch.testing.assert_close(logits.max(1).values, rec["head_conf_max"], atol=1e-3, rtol=0)
    torch.testing.assert_close(logits.logsumexp(1), rec["head_conf_logsumexp"], atol=1e-3, rtol=0)
    assert (logits.argmax(1).to(torch.uint8) != rec["head_conf_argmax"]).float().mean() < 1e-3
    torch.testing.assert_close(out.reg[0].abs().mean(1), rec["head_loc_absmean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.coeffs[0].mean(1), rec["head_mask_mean"], atol=1e-4, rtol=1e-4)
    if rec["kind"] == "full":
        torch.testing.assert_close(out.reg, rec["head_loc"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(protos.permute(0, 2, 3, 1), rec["proto"], atol=1e-4, rtol=1e-4)
        kept = rec["kept_anchor_idx"]
        torch.testing.assert_close(logits[kept], rec["kept_conf_logits"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out.coeffs[0][kept], rec["kept_mask_coeffs"], atol=1e-4, rtol=1e-4)
    fg = logits.softmax(-1)[:, 1:].max(1).values
    assert int((fg > 0.05).sum()) == pytest.approx(rec["num_anchors_max_fg_above_thresh"], abs=3)


@requires_official
def test_priors_match_make_priors(models):
    rec = _record("yolact_base", "000040")
    logic = models["yolact_base"].logic
    sizes = [(69, 69), (35, 35), (18, 18), (9, 9), (5, 5)]
    priors = torch.cat(logic.priors.priors(sizes, torch.device("cpu")))
    assert priors.shape == (19248, 4)
    assert torch.equal(priors, rec["priors"])
    # square anchors: w == h, and the P3 sides are 24 * sqrt(ar) px for ar = 1, 1/2, 2
    assert torch.equal(priors[:, 2], priors[:, 3])
    torch.testing.assert_close(priors[:3, 2] * 550, torch.tensor([24.0, 24 * 0.5**0.5, 24 * 2**0.5]))


VARIANTS = {"fast": ("fast", 100), "cc": ("fast_cross_class", 200), "trad": ("hard", 100)}


def _rebuilt_detect(rec: dict, logic, variant: str):
    """Detect on the README's rebuilt exact input (softmax rows of the kept anchors, background
    elsewhere), through the same candidate / selection code ``predict`` uses."""
    method, max_num = VARIANTS[variant]
    saved = (logic.test.nms, logic.test.max_per_img)
    logic.test.nms, logic.test.max_per_img = method, max_num
    try:
        n = rec["head_loc"].shape[1]
        probs = torch.zeros(n, 81)
        probs[:, 0] = 1
        probs[rec["kept_anchor_idx"]] = torch.softmax(rec["kept_conf_logits"], -1)
        coeffs = torch.zeros(n, 32)
        coeffs[rec["kept_anchor_idx"]] = rec["kept_mask_coeffs"]
        cand = logic.official_candidates(probs, rec["head_loc"][0], rec["priors"])
        sel = logic.select(cand)
    finally:
        logic.test.nms, logic.test.max_per_img = saved
    return cand, sel, coeffs


@requires_official
@pytest.mark.parametrize("variant", ["fast", "cc", "trad"])
@pytest.mark.parametrize("model,image", [("yolact_base", "000040"), ("yolact_resnet50", "100002")])
def test_detect_and_postprocess_on_rebuilt_input(models, model, image, variant):
    rec = _record(model, image)
    if "priors" not in rec:
        rec["priors"] = _record("yolact_base", "000040")["priors"]
    logic = models[model].logic
    cand, sel, coeffs = _rebuilt_detect(rec, logic, variant)
    scores = sel.scores
    assert sel.rows.numel() == rec[f"det_{variant}_num"]
    assert torch.equal(sel.labels, rec[f"det_{variant}_classes"])
    # softmax differs by 1 ulp between CPU kernels (AVX2 here vs the reference machine's); all
    # discrete results (which candidates, classes, coefficients, order) must still be identical
    torch.testing.assert_close(scores, rec[f"det_{variant}_scores"], atol=3e-7, rtol=0)
    assert torch.equal(coeffs[cand.anchors[sel.rows]], rec[f"det_{variant}_coeffs"])
    tol = 0 if variant != "trad" else 1e-7  # trad's boxes were multiplied by 550 and divided again
    torch.testing.assert_close(cand.rel_boxes[sel.rows], rec[f"det_{variant}_boxes"], atol=tol, rtol=0)

    # postprocess: integer boxes, cropped mask probabilities, binarised full-resolution masks
    h, w = rec["orig_hw"]
    rel = rec[f"det_{variant}_boxes"]
    assert torch.equal(official_output_boxes(rel, (h, w)).long(), rec[f"post_{variant}_boxes"])
    proto = rec["proto"][0].permute(2, 0, 1)
    if variant == "fast":
        probs = logic.mask_probs(proto, rec["det_fast_coeffs"][:2], rel[:2])
        torch.testing.assert_close(probs, rec["post_fast_mask_probs_proto_top2"], atol=1e-6, rtol=0)
    from instseg.modeling.dense_heads.yolact import DenseDetections

    dets = DenseDetections(rel, rec[f"det_{variant}_scores"], rec[f"det_{variant}_classes"], rel, rec[f"det_{variant}_coeffs"])
    masks = logic.predict_masks(proto, dets, (h, w)).numpy()
    areas = masks.reshape(masks.shape[0], -1).sum(1)
    assert np.array_equal(areas, rec[f"post_{variant}_masks_area"].numpy())
    for k in (0, 1, len(masks) - 1):
        rle = mask_util.encode(np.asfortranarray(masks[k].astype(np.uint8)))
        assert rle["counts"].decode("ascii") == rec[f"post_{variant}_masks_rle"][k]["counts"]


@requires_official
@pytest.mark.slow
@pytest.mark.parametrize("model,image", [("yolact_base", "000040"), ("yolact_resnet50", "100002")])
def test_end_to_end_predict(models, model, image):
    """``predict`` from the input tensor: the leading detections equal the official ones."""
    rec = _record(model, image)
    dets = models[model].predict(_batch(image))[0]
    n = 10  # neighbouring scores can swap beyond float noise of the logits (README: compare leading ones)
    assert len(dets) == rec["post_fast_num"]
    torch.testing.assert_close(dets.scores[:n], rec["post_fast_scores"][:n], atol=1e-4, rtol=0)
    assert torch.equal(dets.labels[:n], rec["post_fast_classes"][:n])
    assert (dets.boxes[:n].long() - rec["post_fast_boxes"][:n]).abs().max() <= 1
    gt = np.stack([mask_util.decode(r) for r in rec["post_fast_masks_rle"][:n]])
    ours = dets.masks[:n].numpy()
    inter = np.logical_and(gt, ours).sum((1, 2))
    union = np.logical_or(gt, ours).sum((1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    assert iou.min() > 0.99
