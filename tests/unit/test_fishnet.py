"""FishNet-99 / 150 / 201: parity with the official code (``../shared/golden/official``, README
there), the official key layout, loading, freezing, input sizes and BN folding.

The parity weights are generated from the official parameter names by the fixture's documented rule
(CPU generator seeded with crc32(name)), saved in the official checkpoint layout
(``{'state_dict': {'module.' + key: ...}}``) and loaded by name; the logits, every stage output
(fingerprints) and the float16 detector maps are then compared on the fixture's inputs.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from instseg.modeling.backbones.fishnet import FishNet, fishnet_valid_size

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "golden" / "official"
requires_official = pytest.mark.skipif(
    not OFFICIAL.is_dir(), reason="../shared/golden/official is not present (beside the repo on dev machines and CI)"
)
PARAMS = {99: 16_628_904, 150: 24_959_400}  # README / upstream README (16.62 M, 24.96 M)
TAGS = {99: ("x224", "x256x320"), 150: ("x224",)}  # FishNet-150 at 224 only, to stay fast
STAGE_NAMES = ["stem"] + [f"stage{i}" for i in range(10)]  # = forward_features() order


def generated_weight(name: str, shape: list[int]) -> torch.Tensor:
    """The fixture's rule: kind from the name's suffix and the number of dimensions."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(name.encode("utf-8")))
    if name.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.int64)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if name.endswith("running_var"):
        return 1.0 + torch.rand(shape, generator=g)
    if name.endswith("weight") and len(shape) >= 2:
        return torch.randn(shape, generator=g) * (1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    raise AssertionError(f"no rule for {name}")


def _keys(depth: int) -> list[dict]:
    return json.loads((OFFICIAL / f"keys_fishnet{depth}.json").read_text())["keys"]


@pytest.fixture(scope="module")
def official_state() -> dict[int, dict[str, torch.Tensor]]:
    """Generated weights under the official keys (no prefix), per depth."""
    return {d: {k["name"]: generated_weight(k["name"], k["shape"]) for k in _keys(d)} for d in PARAMS}


@pytest.fixture(scope="module")
def official_runs(official_state) -> dict[int, tuple[FishNet, dict]]:
    """Per depth: the model loaded from an official-layout checkpoint, and its outputs
    (``forward_features``, score features, logits) on the fixture inputs. One forward per input."""
    inputs = torch.load(OFFICIAL / "fishnet_inputs.pt", weights_only=True)
    out = {}
    for depth, state in official_state.items():
        ckpt = {"epoch": 100, "arch": f"fishnet{depth}", "best_prec1": 0.0,
                "state_dict": {"module." + k: v for k, v in state.items()}}
        model = FishNet(depth=depth, with_classifier=True, weights=ckpt).eval()
        res = {}
        with torch.no_grad():
            for tag in TAGS[depth]:
                feats = model.forward_features(inputs[f"inputs_{tag}"])
                score = model.score_features(feats[-1])
                res[tag] = {"feats": feats, "score_feat": score, "logits": model.fish.fish[9][4](score).flatten(1)}
        out[depth] = (model, res)
    return out


def _reference(depth: int) -> dict:
    return torch.load(OFFICIAL / f"fishnet{depth}.pt", weights_only=True)


# ---------------------------------------------------------------------------------- structure
@requires_official
@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_key_layout_and_parameter_count_are_official(official_runs, depth):
    model, _ = official_runs[depth]  # FishNet(depth, with_classifier=True)
    keys = _keys(depth)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k["name"], k["shape"]) for k in keys]
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[depth] == json.loads((OFFICIAL / f"keys_fishnet{depth}.json").read_text())["num_params"]
    # the detection backbone has no score / fc layers: exactly their keys are absent
    det = set(FishNet(depth=depth).state_dict())
    assert set(model.state_dict()) - det == {k["name"] for k in keys if k["name"].startswith(("fish.fish.9.3.", "fish.fish.9.4."))}


@requires_official
def test_generated_weights_match_checksums(official_state):
    for depth, state in official_state.items():
        keys = _keys(depth)
        sample = keys[:: max(1, len(keys) // 50)] + keys[-6:]  # every kind, incl. the fc conv and bias
        for k in sample:
            t = state[k["name"]].double()
            tol = 1e-10 * max(1.0, k["abs_sum"])  # float64 sums vs the exactly rounded (fsum) ones
            assert float(t.sum()) == pytest.approx(k["sum"], rel=0, abs=tol), k["name"]
            assert float(t.abs().sum()) == pytest.approx(k["abs_sum"], rel=0, abs=tol), k["name"]
            if t.numel():
                assert float(t.flatten()[0]) == k["first"], k["name"]


def test_fishnet201_structure():
    model = FishNet(depth=201, with_classifier=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == 44_584_552 and round(n / 1e6, 1) == 44.6  # spec: 44.6 M
    assert len(model.fish.fish[9][0]) == 10 and len(model.fish.fish[9][1]) == 9  # 201: 10 res, 9 transfer blocks
    assert len(model.fish.fish[2][0]) == 12
    assert model.out_channels == [320, 832, 1600, 2112] and model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 32, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 320, 8, 16), (1, 832, 4, 8), (1, 1600, 2, 4), (1, 2112, 1, 2)]
    # the classifier (not built for detection): BN(2112), 2112->1056 conv, BN(1056), 1056->1000 fc
    cls_params = sum(p.numel() for s in (3, 4) for p in model.fish.fish[9][s].parameters())
    assert cls_params == 2 * 2112 + 2112 * 1056 + 2 * 1056 + 1056 * 1000 + 1000


def test_dilation_squeeze_and_transfer_wiring():
    m = FishNet(depth=150)
    for s, dil, k in ((4, 1, 1), (5, 2, 2), (6, 4, 2)):
        trunk = m.fish.fish[s][0]
        assert trunk[0].up and trunk[0].k == k and trunk[0].shortcut is None
        assert all(b.conv2.dilation == (dil, dil) for b in trunk)
        assert all(b.conv2.dilation == (1, 1) for b in m.fish.fish[s][1])  # transfer blocks
    # transfer inputs: stage 6 <- stem (64 ch), stage 9 <- bridge (512 ch)
    assert m.fish.fish[6][1][0].bn1.num_features == 64 and m.fish.fish[9][1][0].bn1.num_features == 512
    assert m.stage_channels == [128, 256, 512, 512, 768, 512, 320, 832, 1600, 2112]


# ---------------------------------------------------------------------------------- parity
@requires_official
@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_logits_match_official(official_runs, depth):
    ref = _reference(depth)
    _, res = official_runs[depth]
    for tag in TAGS[depth]:
        torch.testing.assert_close(res[tag]["logits"], ref[f"{tag}_logits"], atol=1e-4, rtol=0)


@requires_official
@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_every_stage_fingerprint_matches_official(official_runs, depth):
    ref = _reference(depth)
    _, res = official_runs[depth]
    for tag in TAGS[depth]:
        maps = list(zip(STAGE_NAMES, res[tag]["feats"])) + [("score_feat", res[tag]["score_feat"])]
        for name, x in maps:
            p = f"{tag}_{name}"
            assert tuple(x.shape) == tuple(ref[f"{p}_shape"]), p
            torch.testing.assert_close(x.double().mean((0, 2, 3)).float(), ref[f"{p}_ch_mean"], atol=1e-4, rtol=1e-4, msg=p)
            torch.testing.assert_close(x.double().mean((0, 1)).float(), ref[f"{p}_sp_mean"], atol=1e-4, rtol=1e-4, msg=p)
            torch.testing.assert_close(x[0, ref[f"{p}_ch_sample_idx"]], ref[f"{p}_ch_sample"], atol=1e-4, rtol=1e-4, msg=p)


@requires_official
@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_float16_detector_maps_match_official(official_runs, depth):
    """The stored maps were rounded once to float16: within one float16 step (rtol 1e-3), plus a
    small atol for values near 0, where float32 noise is many float16 steps."""
    ref = _reference(depth)
    model, res = official_runs[depth]
    feats = res["x224"]["feats"]
    stages = (6, 7, 8, 9) if depth == 99 else (7, 8, 9)
    for s in stages:
        r = ref[f"x224_stage{s}"]
        assert r.dtype == torch.float16
        x = feats[s + 1]
        torch.testing.assert_close(x, r.float(), rtol=1e-3, atol=1e-5, msg=f"stage {s}")
        assert (x.half() != r).float().mean() < 0.01  # rounded to the same float16 almost everywhere
    # forward() returns exactly these maps, in this order
    assert model.out_indices == [6, 7, 8, 9] and model.out_channels == [320, 832, 1600, 2112]


# ---------------------------------------------------------------------------------- loading
@requires_official
def test_official_checkpoint_file_loads_into_detection_backbone(official_state, tmp_path):
    """An official-layout file (``module.`` prefix, extra entries) into ``with_classifier=False``:
    the classifier keys are dropped, every other one is used."""
    state = official_state[99]
    path = tmp_path / "fishnet99_ckpt.tar"
    torch.save({"epoch": 100, "arch": "fishnet99", "best_prec1": torch.tensor(77.41),
                "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
               path, _use_new_zipfile_serialization=False)  # the 2018 files predate the zip format
    model = FishNet(depth=99, weights=path)
    own = model.state_dict()
    dropped = set(state) - set(own)
    assert dropped == {k for k in state if k.startswith(("fish.fish.9.3.", "fish.fish.9.4."))}
    assert len(dropped) == 5 + 1 + 5 + 2  # BN(2112), 1x1 conv, BN(1056); fc conv weight + bias
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_strict_loading_names_the_offending_keys():
    full = FishNet(depth=99, with_classifier=True)
    det = FishNet(depth=99)
    src = full.state_dict()
    bad = dict(src)
    del bad["fish.fish.4.0.0.conv2.weight"]
    bad["fish.fish.4.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"fish\.fish\.4\.0\.0\.conv2\.weight[\s\S]*fish\.fish\.4\.0\.0\.extra\.weight"):
        det.load_weights({"state_dict": bad})
    short = {k: v for k, v in src.items() if not k.startswith("fish.fish.9.4.")}
    with pytest.raises(RuntimeError, match=r"missing keys \(2\): fish\.fish\.9\.4\.1\.bias, fish\.fish\.9\.4\.1\.weight"):
        full.load_weights(short)
    det.load_weights(short)  # no classifier wanted: fine
    wrong = dict(src)
    wrong["conv1.0.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"conv1\.0\.weight: checkpoint \(32, 3, 5, 5\)"):
        det.load_weights(wrong)
    with pytest.raises(RuntimeError, match="with_classifier=False"):
        det.forward_classifier(torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------------------- sizes
@requires_official
def test_size_rule_matches_the_official_probe():
    probe = json.loads((OFFICIAL / "fishnet_size_probe.json").read_text())
    for hw, verdict in probe.items():
        h, w = (int(v) for v in hw.split("x"))
        assert (fishnet_valid_size(h) and fishnet_valid_size(w)) == (verdict == "ok"), hw


def test_input_padding():
    torch.manual_seed(0)
    m = FishNet(depth=99).eval()
    x = torch.randn(1, 3, 28, 60)  # ceil(28/4) = 7, ceil(60/4) = 15: not accepted as is
    with torch.no_grad():
        outs = m(x)
        padded = m(torch.nn.functional.pad(x, (0, 4, 0, 4)))  # -> 32 x 64
        odd = m(torch.randn(1, 3, 61, 29))  # 61, 29 are accepted unpadded (32m-3 .. 32m)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 16), (4, 8), (2, 4), (1, 2)]
    for a, b in zip(outs, padded):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [tuple(o.shape[-2:]) for o in odd] == [(16, 8), (8, 4), (4, 2), (2, 1)]
    m.pad_input = False
    with pytest.raises(ValueError, match="multiples of 8"):
        m(x)


# ---------------------------------------------------------------------------------- modes
def test_frozen_stages_and_norm_eval():
    m = FishNet(depth=99, frozen_stages=2, norm_eval=True)
    m.train()
    frozen = ("conv1.", "conv2.", "conv3.", "fish.fish.0.", "fish.fish.1.")
    for name, p in m.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    assert all(not b.training for b in m.modules() if isinstance(b, _BatchNorm))
    assert m.fish.fish[2].training and not m.fish.fish[1].training
    m2 = FishNet(depth=99, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in m2.parameters())
    assert all(b.training for b in m2.modules() if isinstance(b, _BatchNorm))
    with pytest.raises(ValueError):
        FishNet(depth=188)


@requires_official
def test_fuse_bn_for_inference_is_exact(official_runs):
    model, _ = official_runs[99]
    fused = copy.deepcopy(model).fuse_bn_for_inference()
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    n_left = sum(isinstance(m, _BatchNorm) for m in fused.modules())
    blocks = sum(type(m).__name__ == "FishBottleneck" for m in model.modules())
    assert n_bn - n_left == 2 * blocks + 3 + 2  # bn2/bn3 per block, 3 stem BNs, bridge + score BN
    assert fused.fuse_bn_for_inference() is fused  # idempotent
    x = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in zip(model.forward_features(x), fused.forward_features(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.forward_classifier(x), fused.forward_classifier(x), atol=1e-4, rtol=1e-4)
