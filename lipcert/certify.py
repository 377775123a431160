"""Certified radii from logits and a sound Lipschitz bound (Tsuzuku et al. 2018; Leino et al. 2021).

Multi-class: r = (z_top - max_{j != top} z_j - 2 err) / (sqrt(2) L). When the network ends with a dense
layer W after a part bounded by L', the per-pair rule r = min_j (z_top - z_j - 2 err) / (L' ||w_top - w_j||)
is also sound, never smaller when ||W|| <= 1, and the larger of the two is used. One logit: r = (|z| - err) / L.
``err`` bounds the floating-point error of each logit, so rounding can never certify a point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SQRT2 = math.sqrt(2.0)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


@dataclass(frozen=True)
class CertificateSetup:
    """What turns logits into radii: the bound in input space, the optional last dense layer, the error."""

    lipschitz: float  # bound of the whole map input -> logits, in the space the user perturbs
    head_lipschitz: float | None = None  # bound of the part before the last dense layer (same space)
    head_weight: torch.Tensor | None = None  # the last dense layer's matrix (classes x features)
    error_scale: float = 0.0  # per-logit float error = error_scale * (max |z| + lipschitz * ||x||)


def float_error_scale(depth: int, max_fan_in: int, dtype: torch.dtype) -> float:
    """Relative float error of each logit: each of ``depth`` layers adds at most gamma_n = n u / (1 - n u)
    of the activations' magnitude (Higham, "Accuracy and Stability of Numerical Algorithms", 3.5), and a
    Lipschitz network carries earlier errors forward with factor at most 1; doubled for safety."""
    u = UNIT_ROUNDOFF.get(dtype, 2.0 ** -24)
    n = max(1, max_fan_in)
    gamma = n * u / max(1e-12, 1 - n * u)
    return 2.0 * depth * gamma


def pair_norms(weight: torch.Tensor) -> torch.Tensor:
    """||w_i - w_j|| for every pair of rows of the last dense layer (classes x classes)."""
    w = weight.double()
    sq = (w * w).sum(dim=1)
    gram = w @ w.T
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()


@dataclass
class Certificates:
    """Per-sample results of one batch."""

    prediction: torch.Tensor
    margin: torch.Tensor
    radius: torch.Tensor
    radius_sqrt2: torch.Tensor


def certify_logits(logits: torch.Tensor, x_norm: torch.Tensor, setup: CertificateSetup,
                   pairs: torch.Tensor | None = None) -> Certificates:
    """Prediction, margin (top logit minus the runner-up) and certified L2 radius of each sample."""
    z = logits.double()
    if not math.isfinite(setup.lipschitz):
        top = z.topk(min(2, z.shape[1]), dim=1)
        prediction = (z[:, 0] > 0).long() if z.shape[1] == 1 else top.indices[:, 0]
        margin = z[:, 0].abs() if z.shape[1] == 1 else top.values[:, 0] - top.values[:, 1]
        zero = torch.zeros_like(margin)
        return Certificates(prediction, margin, zero, zero)
    err = setup.error_scale * (z.abs().amax(dim=1) + setup.lipschitz * x_norm.double())
    if z.shape[1] == 1:
        score = z[:, 0]
        prediction = (score > 0).long()
        margin = score.abs()
        radius = ((margin - err) / setup.lipschitz).clamp_min(0)
        return Certificates(prediction, margin, radius, radius)
    top2 = z.topk(2, dim=1)
    prediction = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1]
    radius = ((margin - 2 * err) / (SQRT2 * setup.lipschitz)).clamp_min(0)
    sqrt2 = radius
    if setup.head_weight is not None and setup.head_lipschitz is not None and pairs is not None:
        gaps = z.gather(1, prediction[:, None]) - z - 2 * err[:, None]
        norms = setup.head_lipschitz * pairs[prediction]
        per_pair = torch.where(norms > 0, gaps / norms.clamp_min(1e-300), torch.full_like(gaps, math.inf))
        per_pair.scatter_(1, prediction[:, None], math.inf)
        radius = torch.maximum(radius, per_pair.amin(dim=1).clamp_min(0))
    return Certificates(prediction, margin, radius, sqrt2)


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor, eps: float) -> float:
    """Share of samples correctly classified with a certified radius above eps (strictly: a point at radius
    exactly eps could tie)."""
    if radius.numel() == 0:
        return 0.0
    return float(((radius > eps) & correct).double().mean())


def accuracy_curve(radius: torch.Tensor, correct: torch.Tensor, points: int = 101) -> list[tuple[float, float]]:
    """Certified accuracy as a function of the radius, from 0 to the largest certified radius."""
    top = float(radius[correct].max()) if bool(correct.any()) else 0.0
    if top <= 0:
        return [(0.0, certified_accuracy(radius, correct, 0.0))]
    grid = torch.linspace(0, top, points, dtype=torch.float64)
    return [(float(r), certified_accuracy(radius, correct, float(r))) for r in grid]
