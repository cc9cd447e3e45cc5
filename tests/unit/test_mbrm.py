"""MBRM (RDSNet's mask-based boundary refinement) pinned on synthetic masks with known edges:
the official inference weights, edge recovery, the prior window, the kernel flip for
right / bottom, and the paper's training (cross-entropy over positions) reducing the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instseg.modeling.refiners.mbrm import MBRM, OFFICIAL_BIAS, OFFICIAL_WEIGHT, train_mbrm

H, W = 60, 80


def box_mask(box, frame=(H, W)) -> torch.Tensor:
    """Binary mask filling the exclusive box ``[x1, y1, x2, y2)``."""
    m = torch.zeros(frame)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = 1.0
    return m


def ideal(kernel_size: int = 9, k: float = 8.0) -> MBRM:
    """A sharp asymmetric edge detector: ``z[i] = k (in[i] - in[i - 1]) - k / 2`` -- peaks exactly
    on the first foreground pixel (left / top); flipped, on the last one (right / bottom)."""
    m = MBRM(kernel_size=kernel_size, official_init=False)
    s = kernel_size // 2
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, 0, s] = k
        m.weight[0, 0, s - 1] = -k
        m.bias.fill_(-k / 2)
    return m


def test_official_inference_settings():
    m = MBRM()
    assert (m.kernel_size, m.gamma, m.cutoff, m.min_sigma) == (9, 0.05, 0.0044, 1.0)
    torch.testing.assert_close(m.weight.detach().view(-1), torch.tensor(OFFICIAL_WEIGHT))
    torch.testing.assert_close(m.bias.detach(), torch.tensor([OFFICIAL_BIAS]))
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]  # the official names (mbrm.*)


def test_recovers_a_known_edge():
    truth = torch.tensor([[20.0, 10.0, 50.0, 40.0], [5.0, 30.0, 75.0, 58.0]])
    probs = torch.stack([box_mask(b) for b in truth]).bool()  # binary masks of any model work too
    noisy = truth + torch.tensor([[-3.0, 2.0, 3.0, -2.0], [2.0, -3.0, -2.0, 2.0]])
    # an ideal edge detector recovers the edges exactly from boxes a few pixels off
    assert torch.equal(ideal().refine(probs.float(), noisy), truth)
    # the official learned kernel puts them within one pixel (it fires on the pixel just outside a
    # sharp edge) -- on masks with a bool dtype as well
    out = MBRM().refine(probs, noisy)
    assert (out - truth).abs().max() <= 1.0
    assert (noisy - truth).abs().max() == 3.0
    assert torch.equal(out, out.round())  # integer coordinates, as the official code returns


def test_posteriors_are_normalised_distributions():
    probs = box_mask([20, 10, 50, 40])[None]
    post = MBRM()(probs, torch.tensor([[22.0, 12.0, 48.0, 38.0]]))
    assert [tuple(p.shape) for p in post] == [(1, W), (1, H), (1, W), (1, H)]
    for p in post:
        torch.testing.assert_close(p.sum(dim=1), torch.ones(1))
        assert (p >= 0).all()


def test_prior_window_cuts_at_0_0044():
    m = MBRM()
    centres, sigma = torch.tensor([40.0, 40.0]), torch.tensor([1.0, 4.0])
    prior = m.prior(W, centres, sigma)
    d = torch.arange(W).float()
    for row, s in zip(prior, sigma):
        g = torch.exp(-(d - 40) ** 2 / (2 * s**2))
        torch.testing.assert_close(row, torch.where(g > 0.0044, g, torch.zeros_like(g)))
        inside = torch.nonzero(row > 0).flatten()
        half = s * math.sqrt(-2 * math.log(0.0044))  # about 3.29 sigma
        assert inside.min() >= 40 - half and inside.max() <= 40 + half
        assert (row[(d - 40).abs() > half] == 0).all()
    # sigma = gamma * width, at least 1 px: a 19-px box gets sigma 1 -> positions 37..43 only
    box = torch.tensor([[40.0, 10.0, 60.0, 40.0]])
    probs = box_mask([30, 10, 60, 40])[None]  # the mask's real left edge (30) is outside that window
    out = ideal().refine(probs, box)
    assert 37 <= float(out[0, 0]) <= 43
    # a wide box (sigma 0.05 * 59 = 2.95 px, window +-9.7 px) reaches the edge at 30
    wide = ideal().refine(box_mask([30, 10, 90, 40], (H, 100))[None], torch.tensor([[38.0, 10.0, 98.0, 40.0]]))
    assert float(wide[0, 0]) == 30.0


def test_kernel_is_flipped_for_right_and_bottom():
    m = MBRM()
    g = torch.Generator().manual_seed(0)
    profile = torch.rand(3, W, generator=g)
    # right / bottom see the profile from the other side: mirror the profile, use the kernel as is
    torch.testing.assert_close(m.likelihood_logits(profile, flip=True), m.likelihood_logits(profile.flip(1), flip=False).flip(1))
    # the asymmetric ideal kernel finds the LAST foreground pixel on the right only thanks to the flip
    truth = torch.tensor([[20.0, 10.0, 50.0, 40.0]])
    probs = box_mask(truth[0])[None]
    det = ideal()
    assert torch.equal(det.refine(probs, truth + torch.tensor([[1.0, 1.0, -1.0, -1.0]])), truth)
    unflipped = det.likelihood_logits(probs.max(dim=1).values, flip=False)[0]
    assert int(unflipped[45:55].argmax()) + 45 != 49  # unflipped it is a left-edge detector
    # mirror symmetry of the official refinement on soft masks
    small = (torch.rand(2, 1, 15, 20, generator=g) > 0.5).float()
    soft = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    boxes = torch.tensor([[12.0, 8.0, 60.0, 50.0], [30.0, 4.0, 71.0, 33.0]])
    mirrored = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
    a = m.refine(soft, boxes)
    b = m.refine(soft.flip(-1), mirrored)
    torch.testing.assert_close(b, torch.stack([W - a[:, 2], a[:, 1], W - a[:, 0], a[:, 3]], dim=1))


def _synthetic_samples(n_images: int = 6, seed: int = 0):
    """Soft masks as a stride-4 mask head gives them (blocks upsampled bilinearly), their exact
    extents as gt boxes (threshold 0.5) and detection boxes a few pixels off."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_images):
        small = torch.zeros(4, 1, 15, 20)
        for k in range(4):
            x0, y0 = int(torch.randint(1, 10, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
            small[k, 0, y0 : y0 + 5 + k, x0 : x0 + 6 + k] = 1.0
        soft = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        gt = []
        for s in soft:
            ys, xs = torch.nonzero(s > 0.5, as_tuple=True)
            gt.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        gt = torch.tensor(gt, dtype=torch.float32)
        boxes = gt + torch.randint(-3, 4, gt.shape, generator=g).float()
        samples.append((soft, boxes, gt))
    return samples


def test_training_the_kernel_reduces_the_cross_entropy():
    samples = _synthetic_samples()
    m = MBRM(official_init=False)

    def mean_ce() -> float:
        with torch.no_grad():
            return sum(float(m.loss(*s)) for s in samples) / len(samples)

    before = mean_ce()
    start = (m.weight.detach().clone(), m.bias.detach().clone())
    history = train_mbrm(m, samples, iters=40, lr=0.05)
    after = mean_ce()
    assert len(history) == 40 and all(math.isfinite(h) for h in history)
    assert after < 0.85 * before
    assert not torch.equal(m.weight.detach(), start[0])
    # refinement with the trained kernel moves the noisy boxes towards the gt
    err_in = sum(float((b - gt).abs().mean()) for _, b, gt in samples)
    err_out = sum(float((m.refine(p, b) - gt).abs().mean()) for p, b, gt in samples)
    assert err_out < err_in


def test_loss_ignores_gt_sides_outside_the_prior_window():
    m = MBRM()
    probs = box_mask([20, 10, 50, 40])[None]
    horiz, vert = MBRM.profiles(probs)
    box = torch.tensor([[20.0, 10.0, 50.0, 40.0]])
    far = torch.tensor([[0.0, 10.0, 50.0, 40.0]])  # left gt side 20 px away: outside +-3.3 sigma
    total, count = m.loss_terms(horiz, vert, box, far)
    assert count == 3 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(m.weight.grad).all()
    with pytest.raises(ValueError, match="prior window"):
        train_mbrm(MBRM(), [(probs, box, torch.tensor([[0.0, 0.0, 80.0, 60.0]]))], iters=1)  # every side too far
