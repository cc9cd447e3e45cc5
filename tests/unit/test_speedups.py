"""The speed paths give the results of the plain paths.

- ``TwoStageDetector.optimize_for_inference`` (BN folding + channels-last) is idempotent and
  predicts what the unoptimised model predicts, up to float rounding;
- the threaded CPU RoIAlign equals one ``torchvision.ops.roi_align`` call, forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import roi_align

from instseg.config.presets import get_preset
from instseg.modeling.zoo import build_model
from instseg.ops.roi_align import roi_align_cpu_parallel
from instseg.structures.instances import ImageBatch


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _rois(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g, dtype=torch.float64) * 150
    wh = torch.rand((n, 2), generator=g, dtype=torch.float64) * 80 + 1
    idx = torch.randint(0, batch, (n, 1), generator=g).double()
    return torch.cat([idx, xy, xy + wh], dim=1)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_threaded_roi_align_matches_torchvision(two_threads, sampling_ratio):
    feat = torch.randn((2, 4, 50, 60), dtype=torch.float64, requires_grad=True)
    rois = _rois(100, 2, seed=0)
    ref = roi_align(feat, rois, 7, 0.25, sampling_ratio, True)
    out = roi_align_cpu_parallel(feat, rois, 7, 0.25, sampling_ratio)
    assert torch.equal(out, ref)  # each RoI is computed by the same kernel: bit-identical
    grad = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, feat, grad)
    (g_out,) = torch.autograd.grad(out, feat, grad)
    torch.testing.assert_close(g_out, g_ref, atol=1e-12, rtol=0)


def test_threaded_roi_align_gradcheck(two_threads):
    feat = torch.randn((1, 2, 12, 12), dtype=torch.float64, requires_grad=True)
    rois = _rois(40, 1, seed=1) / 4
    assert torch.autograd.gradcheck(lambda x: roi_align_cpu_parallel(x, rois, 3, 0.5), (feat,))


def test_threaded_roi_align_no_grad(two_threads):
    feat = torch.randn((1, 3, 40, 40))
    rois = _rois(64, 1, seed=2).float()
    with torch.no_grad():
        out = roi_align_cpu_parallel(feat, rois, 5, 0.25)
    assert out.grad_fn is None
    assert torch.equal(out, roi_align(feat, rois, 5, 0.25, 0, True))


def test_optimize_for_inference_matches_and_is_idempotent():
    torch.manual_seed(0)
    cfg = get_preset("mask_rcnn_r18_fpn_c64_shapes").model
    cfg.score_thr = 0.0
    model = build_model(cfg).eval()
    # non-trivial BN statistics, so folding actually changes the weights
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    fast = copy.deepcopy(model).optimize_for_inference()
    fast.optimize_for_inference()  # second call is a no-op
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.modules())
    images = torch.randn((1, 3, 128, 160))
    batch = ImageBatch(images, [(128, 160)], [(128, 160)], torch.ones((1, 2)))
    ref = model.predict_raw(batch)
    out = fast.predict_raw(batch)
    for a, b in zip(ref.fpn, out.fpn):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # NMS / size filtering may flip a borderline proposal, so compare the best ones only
    top = 200
    torch.testing.assert_close(out.proposal_scores[0][:top], ref.proposal_scores[0][:top], atol=1e-5, rtol=0)
