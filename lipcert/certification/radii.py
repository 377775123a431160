"""Certified radii from logits and a sound Lipschitz bound (Tsuzuku et al. 2018; Leino et al. 2021).

With L the bound of the logit map z, and E(R) = base + slope R a bound on the L2 error of the deployed float
logits at every input within R of the reference point (``rounding.float_error``; R = ||x|| at x itself and
||x|| + r over the ball of radius r around x), a perturbation of norm below r cannot change the deployed
prediction when:

- several logits: (z_top - z_second) - 2 sqrt(2) E(||x||) - sqrt(2) (L + slope) r > 0, since each computed
  difference z_i - z_j is within sqrt(2) E of the exact one, at x and at x + d;
- a last dense layer W after a part bounded by L' (per pair, Leino et al. 2021): for every j != top,
  (z_top - z_j) - 2 sqrt(2) E(||x||) - (L' ||w_top - w_j|| + sqrt(2) slope) r > 0; the larger radius of the
  two rules is used;
- one logit s: |s| - 2 E(||x||) - (L + slope) r > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SQRT2 = math.sqrt(2.0)

#: the certificate rules, as ``bound.rule`` in the report states them
SQRT2_RULE = "sqrt(2) margin"
PER_PAIR_RULE = "per-pair (last dense layer) and sqrt(2), the larger"
BINARY_RULE = "binary |s| / L (one logit s, class 1 when s > 0)"


@dataclass(frozen=True)
class CertificateSetup:
    """What turns logits into radii: the bound in input space, the optional last dense layer, the error."""

    lipschitz: float  # bound of the whole map input -> logits, in the space the user perturbs
    head_lipschitz: float | None = None  # bound of the part before the last dense layer (same space)
    head_weight: torch.Tensor | None = None  # the last dense layer's rows, one per logit, in logit order
    head_row_error: torch.Tensor | None = None  # how far each computed row may be from the exact one (L2)
    error_base: float = 0.0  # the deployed logits err by at most error_base + error_slope R (L2), R >= ||x'||
    error_slope: float = 0.0
    error_plan: Any = None  # ``rounding.ErrorPlan``: the same bound around each sample, from measured norms


def sample_norms(values: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Each sample's ``norm`` (l2 or linf) over all its entries, for a batch of samples (first dimension), in
    their dtype and on their device: the size of the certificates' perturbations and of the values the float
    error analysis reads."""
    flat = values.flatten(1) if values.dim() > 1 else values.reshape(-1, 1)
    return torch.linalg.vector_norm(flat, dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def pair_norms(weight: torch.Tensor, row_error: torch.Tensor | None = None) -> torch.Tensor:
    """Upper bounds on ||w_i - w_j|| for every pair of rows of the last dense layer (classes x classes).

    The differences are formed entry by entry (no cancellation through a Gram matrix), their norms raised by
    their float64 rounding, plus ``row_error[i] + row_error[j]``, a bound on how far each computed row is
    from the exact one."""
    w = weight.double()
    norms = torch.stack([(w - row).norm(dim=1) for row in w]) * (1 + 4 * w.shape[1] * 2.0 ** -53)
    if row_error is not None:
        norms = norms + row_error[:, None] + row_error[None, :]
    return norms


@dataclass
class Certificates:
    """Per-sample results of one batch."""

    prediction: torch.Tensor
    margin: torch.Tensor
    radius: torch.Tensor
    radius_sqrt2: torch.Tensor


def _ratio(gap: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    """gap / slope as a radius: 0 when the gap is not positive (a tie or a lost margin certifies nothing, even
    where the logits cannot move), inf when it is positive and nothing can move it."""
    slope = torch.as_tensor(slope, dtype=gap.dtype, device=gap.device).expand_as(gap)
    moving = torch.where(slope > 0, gap / slope.clamp_min(1e-300), torch.full_like(gap, math.inf))
    return torch.where(gap > 0, moving, torch.zeros_like(gap))


def certificates_from_logits(logits: torch.Tensor, x_norm: torch.Tensor, setup: CertificateSetup,
                   pairs: torch.Tensor | None = None, error: Any = None) -> Certificates:
    """Prediction, margin (top logit minus the runner-up) and certified L2 radius of each sample.

    ``error`` (a ``rounding.Affine``) bounds each sample's logit error by base + slope r over the ball of
    radius r around it; by default, setup.error_base + setup.error_slope (||x|| + r)."""
    z = logits.double()
    if not math.isfinite(setup.lipschitz):
        top = z.topk(min(2, z.shape[1]), dim=1)
        prediction = (z[:, 0] > 0).long() if z.shape[1] == 1 else top.indices[:, 0]
        margin = z[:, 0].abs() if z.shape[1] == 1 else top.values[:, 0] - top.values[:, 1]
        zero = torch.zeros_like(margin)
        return Certificates(prediction, margin, zero, zero)
    if error is None:
        err, slope = setup.error_base + setup.error_slope * x_norm.double(), setup.error_slope
    else:
        err, slope = torch.as_tensor(error.base, dtype=torch.float64).to(z.device), error.slope
    err = err.expand(z.shape[0]) if err.dim() == 0 else err
    if z.shape[1] == 1:
        score = z[:, 0]
        prediction = (score > 0).long()
        margin = score.abs()
        radius = _ratio(margin - 2 * err, setup.lipschitz + slope)
        return Certificates(prediction, margin, radius, radius)
    top2 = z.topk(2, dim=1)
    prediction = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1]
    radius = _ratio(margin - 2 * SQRT2 * err, SQRT2 * (setup.lipschitz + slope))
    sqrt2 = radius
    if setup.head_weight is not None and setup.head_lipschitz is not None and pairs is not None:
        gaps = z.gather(1, prediction[:, None]) - z - 2 * SQRT2 * err[:, None]
        norms = setup.head_lipschitz * pairs[prediction] + SQRT2 * slope
        per_pair = _ratio(gaps, norms)
        per_pair.scatter_(1, prediction[:, None], math.inf)
        radius = torch.maximum(radius, per_pair.amin(dim=1))
    return Certificates(prediction, margin, radius, sqrt2)
