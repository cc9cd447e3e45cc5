"""MBRM, RDSNet's mask-based boundary refinement (Wang et al., AAAI 2020), as a box refiner for
any model that gives per-detection mask probabilities.

Each box side is a discrete random variable over pixel positions; its posterior given the mask is
``P(X = i | M) ∝ P(M | X = i) P(X = i)``:

- ``M`` enters through a 1-D profile of the detection's probability map (in the frame of the
  boxes): the max over rows (length ``W``) for left / right, the max over columns (length ``H``)
  for top / bottom;
- the likelihood is ``sigmoid(conv1d(profile, kernel) + bias)`` with ONE learned kernel of size
  ``2 s + 1``, used as is for left / top and flipped for right / bottom (a rising edge seen from
  the other side);
- the prior is a discrete Gaussian centred on the box's own coordinate with ``sigma = gamma *``
  box width (left / right) or height (top / bottom), at least ``min_sigma`` pixels, set to zero
  where it is ``<= cutoff`` (0.0044, about +-3.3 sigma);
- the refined side is the argmax of the posterior.

Defaults and the kernel values are the official inference code's (``wangsr126/RDSNet``,
``mmdet/models/detectors/rdsnet.py``: kernel 9, i.e. ``s = 4``, gamma 0.05, hard-coded weights).

Coordinates.  Boxes are instseg's XYXY with exclusive ``x2`` (pixel ``i`` covers ``[i, i + 1)``).
Positions are pixel indices, so the prior of the left side is centred at ``x1`` and that of the
right side at the last pixel inside, ``x2 - 1`` (the official code's inclusive mmdet-v1 boxes);
``sigma`` uses that inclusive width ``x2 - 1 - x1``.  The refined box is ``[l, t, r + 1, b + 1]``
(integers, as the official code returns), so a model that keeps mmdet-v1 boxes internally gets
exactly the official result after its usual ``+1``.  A side whose prior window holds no positive
posterior (possible only for a box far outside the frame) keeps its coordinate.

Training (the paper's procedure, not in the official code): with the rest of the network frozen,
fit the kernel and bias with a cross-entropy over positions against the ground-truth coordinate
(one-hot at the gt side's pixel: ``round(x1)``, ``round(x2 - 1)``, ...), one term per side of
every detection matched to a gt box; a gt coordinate outside the prior window has probability
zero under the model and is left out.  :meth:`MBRM.loss` is that loss and :func:`train_mbrm` a
small loop over ``(probs, boxes, gt_boxes)`` samples from any model; RDSNet runs it as a second
training stage through the trainer (``model.rdsnet.mbrm_train=true``, see the README).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the official hard-coded kernel (a learned rising-edge detector) and bias
OFFICIAL_WEIGHT = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
OFFICIAL_BIAS = -1.9536

SIDES = ("left", "top", "right", "bottom")


class MBRM(nn.Module):
    """Mask-based boundary refinement.  Parameters ``weight (1, 1, k)`` and ``bias (1,)`` carry
    the official module's names (``mbrm.weight``, ``mbrm.bias`` inside RDSNet)."""

    def __init__(
        self,
        *,
        kernel_size: int = 9,
        gamma: float = 0.05,
        cutoff: float = 0.0044,
        min_sigma: float = 1.0,
        official_init: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MBRM kernel_size must be odd and positive (2 s + 1), got {kernel_size}")
        self.kernel_size = kernel_size
        self.gamma = float(gamma)
        self.cutoff = float(cutoff)
        self.min_sigma = float(min_sigma)
        self.weight = nn.Parameter(torch.zeros(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(1))
        self.reset_parameters(official=official_init)

    def reset_parameters(self, *, official: bool = True) -> None:
        """The official weights (kernel 9 only), else a centred difference ``in[i+1] - in[i-1]``
        scaled by 4 with bias -2 (a plain rising-edge detector to train from)."""
        with torch.no_grad():
            self.weight.zero_()
            if official and self.kernel_size == len(OFFICIAL_WEIGHT):
                self.weight.copy_(torch.tensor(OFFICIAL_WEIGHT).view(1, 1, -1))
                self.bias.fill_(OFFICIAL_BIAS)
            else:
                s = self.kernel_size // 2
                if s > 0:
                    self.weight[0, 0, s - 1] = -4.0
                    self.weight[0, 0, s + 1] = 4.0
                self.bias.fill_(-2.0)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def profiles(probs: Tensor) -> tuple[Tensor, Tensor]:
        """``(n, H, W)`` probabilities -> max over rows ``(n, W)`` and max over columns ``(n, H)``."""
        probs = probs.float()
        if probs.shape[0] == 0:
            return probs.new_zeros((0, probs.shape[2])), probs.new_zeros((0, probs.shape[1]))
        return probs.max(dim=1).values, probs.max(dim=2).values

    def likelihood_logits(self, profile: Tensor, flip: bool) -> Tensor:
        """``conv1d(profile, kernel [flipped]) + bias`` with zero padding ``s``: ``(n, L)``."""
        w = self.weight.flip(dims=(2,)) if flip else self.weight
        return F.conv1d(profile[:, None, :].to(w.dtype), w, self.bias, padding=self.kernel_size // 2)[:, 0]

    def prior(self, length: int, centres: Tensor, sigma: Tensor) -> Tensor:
        """The official discrete Gaussian ``exp(-(i - c)^2 / (2 sigma^2))``, zero where ``<= cutoff``."""
        grid = torch.arange(length, device=centres.device, dtype=torch.float32)[None]
        w = torch.exp(-(grid - centres[:, None].float()).pow(2) / (2 * sigma[:, None].float().pow(2)))
        return torch.where(w > self.cutoff, w, torch.zeros_like(w))

    def _geometry(self, boxes: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Prior centres (left, top, right, bottom) in pixel indices and the two sigmas."""
        b = boxes.float()
        centres = [b[:, 0], b[:, 1], b[:, 2] - 1, b[:, 3] - 1]
        sigma_h = ((centres[2] - centres[0]) * self.gamma).clamp(min=self.min_sigma)
        sigma_v = ((centres[3] - centres[1]) * self.gamma).clamp(min=self.min_sigma)
        return centres, sigma_h, sigma_v

    def _terms(self, horiz: Tensor, vert: Tensor, boxes: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per side (left, top, right, bottom): likelihood logits and prior, both ``(n, L)``."""
        centres, sigma_h, sigma_v = self._geometry(boxes)
        out = []
        for side, (profile, flip) in enumerate(((horiz, False), (vert, False), (horiz, True), (vert, True))):
            sigma = sigma_h if side % 2 == 0 else sigma_v
            out.append((self.likelihood_logits(profile, flip), self.prior(profile.shape[1], centres[side], sigma)))
        return out

    # ------------------------------------------------------------------ inference
    def forward(self, probs: Tensor, boxes: Tensor) -> list[Tensor]:
        """Posterior distributions ``[left (n, W), top (n, H), right (n, W), bottom (n, H)]``
        (the official ``MBRM.forward``): ``sigmoid(likelihood) * prior``, normalised per side."""
        horiz, vert = self.profiles(probs)
        out = []
        for z, p in self._terms(horiz, vert, boxes):
            post = torch.sigmoid(z) * p
            out.append(post / post.sum(dim=1, keepdim=True).clamp(min=torch.finfo(post.dtype).tiny))
        return out

    @torch.no_grad()
    def refine(self, probs: Tensor | None, boxes: Tensor, *, profiles: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Refined boxes ``(n, 4)`` (exclusive ``x2``, integer-valued) from probability maps
        ``(n, H, W)`` in the frame of ``boxes`` (or their precomputed :meth:`profiles`)."""
        if boxes.shape[0] == 0:
            return boxes.clone()
        horiz, vert = profiles if profiles is not None else self.profiles(probs)
        coords = []
        for side, (z, p) in enumerate(self._terms(horiz, vert, boxes)):
            post = torch.sigmoid(z) * p
            best = post.argmax(dim=1).to(boxes.dtype)
            empty = ~(post > 0).any(dim=1)
            original = boxes[:, side] - (1 if side >= 2 else 0)
            coords.append(torch.where(empty, original, best))
        l, t, r, b = coords
        return torch.stack([l, t, r + 1, b + 1], dim=1)

    # ------------------------------------------------------------------ training
    def log_posteriors(self, horiz: Tensor, vert: Tensor, boxes: Tensor) -> list[Tensor]:
        """Log posteriors per side (``-inf`` outside the prior window), differentiable in the kernel."""
        out = []
        for z, p in self._terms(horiz, vert, boxes):
            logp = torch.where(p > 0, F.logsigmoid(z) + torch.log(p.clamp(min=1e-30)), torch.full_like(z, -math.inf))
            norm = torch.logsumexp(logp, dim=1, keepdim=True)
            out.append(logp - torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm)))
        return out

    @staticmethod
    def target_positions(gt_boxes: Tensor, width: int, height: int) -> Tensor:
        """One-hot positions of the gt sides ``(n, 4)`` (left, top, right, bottom), int64: the
        first and last pixel inside the gt box, clamped to the frame."""
        g = gt_boxes.float()
        pos = torch.stack([g[:, 0], g[:, 1], g[:, 2] - 1, g[:, 3] - 1], dim=1).round().long()
        limits = pos.new_tensor([width - 1, height - 1, width - 1, height - 1])
        return torch.minimum(pos.clamp(min=0), limits)

    def loss_terms(self, horiz: Tensor, vert: Tensor, boxes: Tensor, gt_boxes: Tensor) -> tuple[Tensor, int]:
        """Sum of the cross-entropies ``-log P(X = gt)`` over the sides whose gt position lies in
        the prior window, and their number."""
        if boxes.shape[0] == 0:
            return self.weight.sum() * 0.0 + self.bias.sum() * 0.0, 0
        targets = self.target_positions(gt_boxes, horiz.shape[1], vert.shape[1])
        total = self.weight.sum() * 0.0 + self.bias.sum() * 0.0
        count = 0
        for side, logp in enumerate(self.log_posteriors(horiz, vert, boxes)):
            picked = logp.gather(1, targets[:, side : side + 1])[:, 0]
            ok = torch.isfinite(picked)
            total = total - picked[ok].sum()
            count += int(ok.sum())
        return total, count

    def loss(self, probs: Tensor, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Mean cross-entropy over positions against the gt coordinates (see :meth:`loss_terms`)."""
        horiz, vert = self.profiles(probs)
        total, count = self.loss_terms(horiz, vert, boxes, gt_boxes)
        return total / max(count, 1)


Sample = tuple[Tensor, Tensor, Tensor]


def train_mbrm(
    mbrm: MBRM,
    samples: Iterable[Sample] | Callable[[], Iterable[Sample]],
    *,
    iters: int = 1000,
    lr: float = 0.01,
    momentum: float = 0.9,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fits ``mbrm``'s kernel and bias with SGD on the boundary cross-entropy (the paper's
    second stage: ~1k iterations after the rest has converged; only MBRM's two tensors change).

    ``samples`` yields ``(probs (n, H, W), boxes (n, 4), gt_boxes (n, 4))`` per step: one image's
    mask probabilities and boxes from a FROZEN model (any model, in any frame) with the gt box each
    detection matched, all in the same frame; a sequence is cycled, a callable is called again for
    each pass.  ``probs`` may also be the pair of :meth:`MBRM.profiles`.  Returns the loss per step.
    """
    opt = torch.optim.SGD(mbrm.parameters(), lr=lr, momentum=momentum)
    history: list[float] = []
    mbrm.train()
    step = 0
    while step < iters:
        source = samples() if callable(samples) else samples
        seen = False
        for probs, boxes, gt_boxes in source:
            seen = True
            horiz, vert = probs if isinstance(probs, (tuple, list)) else MBRM.profiles(probs)
            total, count = mbrm.loss_terms(horiz, vert, boxes, gt_boxes)
            if count == 0:
                continue
            loss = total / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            if log is not None:
                log(step, history[-1])
            step += 1
            if step >= iters:
                break
        if not seen:
            raise ValueError("train_mbrm: no samples")
        if not history and step == 0:
            raise ValueError("train_mbrm: no sample had a gt side inside its prior window")
    return history
