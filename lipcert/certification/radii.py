"""Certified radii from logits and a sound Lipschitz bound (Tsuzuku et al. 2018; Leino et al. 2021).

Two radii per sample, both from the same bound L of the logit map z:

- **exact**: the figure papers print. The computed (deployed float32) logits are taken as exact: margin /
  (sqrt(2) L), and for a last dense layer W after a part bounded by L' the per-pair radius min_j (z_top - z_j) /
  (L' ||w_top - w_j||) (Leino et al. 2021) when it is larger. It is never below the peers' rule margin /
  (sqrt(2) L) on the same logits, and it ignores floating-point rounding.
- **float** (float32-safe): no input within it changes the deployed float32 prediction. With E(r) = base + slope
  r a bound on the L2 error of the deployed logits at every input within r of x (``rounding.float_error``, around
  x: base is the error at x itself), and a centre estimate c of the exact logits z(x) within e_c of them (L2),
  a perturbation of norm below r cannot change the prediction when

  - several logits: (c_top - c_second) - sqrt(2) (e_c + base) - sqrt(2) (L + slope) r > 0, since the exact
    difference z_i - z_j at x is within sqrt(2) e_c of c's, moves by at most sqrt(2) L r, and the deployed
    difference at x + d is within sqrt(2) E(r) of the exact one;
  - a last dense layer W: for every j != top, (c_top - c_j) - sqrt(2) (e_c + base) - (L' ||w_top - w_j|| +
    sqrt(2) slope) r > 0; the larger radius of the two rules is used;
  - one logit s: |s_c| - (e_c + base) - (L + slope) r > 0 (the sign of the deployed prediction).

  Two centres are tried and the larger radius kept: the deployed logits themselves (e_c = base), and, when the
  engine gives them, the logits of a float64 run of the same graph (e_c its float64 error bound, about 1e-13):
  only the ball then needs the float32 allowance.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    #: the ``Propagation`` that gave the bound, kept on the process that computed it for later analyses of the
    #: same graph (``LocalCertifier``); never sent to other processes (``__getstate__``)
    propagation: Any = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "propagation": None}


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
    radius: torch.Tensor  # float32-safe
    radius_exact: torch.Tensor  # exact arithmetic (the deployed logits taken as exact)
    radius_local: torch.Tensor | None = None  # local certificates (``local``), at least ``radius``; set by the engine


def _ratio(gap: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    """gap / slope as a radius: 0 when the gap is not positive (a tie or a lost margin certifies nothing, even
    where the logits cannot move), inf when it is positive and nothing can move it."""
    slope = torch.as_tensor(slope, dtype=gap.dtype, device=gap.device).expand_as(gap)
    moving = torch.where(slope > 0, gap / slope.clamp_min(1e-300), torch.full_like(gap, math.inf))
    return torch.where(gap > 0, moving, torch.zeros_like(gap))


def _radii(gap: torch.Tensor, allowance: torch.Tensor, slope: float, prediction: torch.Tensor,
           setup: CertificateSetup, pairs: torch.Tensor | None) -> torch.Tensor:
    """The radius of the rules above for one centre: ``gap`` is c_pred - c (samples x classes), ``allowance``
    sqrt(2) (e_c + base) per sample, ``slope`` the error's growth per unit radius (0: exact arithmetic)."""
    margin = gap.scatter(1, prediction[:, None], math.inf).amin(dim=1)
    radius = _ratio(margin - allowance, SQRT2 * (setup.lipschitz + slope))
    if setup.head_weight is not None and setup.head_lipschitz is not None and pairs is not None:
        per_pair = _ratio(gap - allowance[:, None], setup.head_lipschitz * pairs[prediction] + SQRT2 * slope)
        per_pair.scatter_(1, prediction[:, None], math.inf)
        radius = torch.maximum(radius, per_pair.amin(dim=1))
    return radius


def certificates_from_logits(logits: torch.Tensor, x_norm: torch.Tensor, setup: CertificateSetup,
                             pairs: torch.Tensor | None = None, error: Any = None,
                             exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> Certificates:
    """Prediction, margin (top logit minus the runner-up, of the deployed logits), float32-safe and exact radius
    of each sample.

    ``error`` (a ``rounding.Affine``) bounds each sample's logit error by base + slope r over the ball of
    radius r around it; by default, setup.error_base + setup.error_slope (||x|| + r). ``exact``: (float64
    logits of the same samples, a bound per sample on their L2 distance to the exact logits), a second centre."""
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
    centres = [(z, err)]
    if exact is not None:
        centres.append((exact[0].double().to(z.device).reshape(z.shape), exact[1].double().to(z.device)))
    if z.shape[1] == 1:
        prediction = (z[:, 0] > 0).long()
        sign = prediction.double() * 2 - 1
        margin = z[:, 0].abs()
        radius = torch.stack([_ratio(sign * c[:, 0] - (e_c + err), setup.lipschitz + slope)
                              for c, e_c in centres]).amax(dim=0)
        return Certificates(prediction, margin, radius, _ratio(margin, setup.lipschitz))
    top2 = z.topk(2, dim=1)
    prediction = top2.indices[:, 0]
    margin = top2.values[:, 0] - top2.values[:, 1]
    radius = torch.stack([_radii(c.gather(1, prediction[:, None]) - c, SQRT2 * (e_c + err), slope, prediction,
                                 setup, pairs) for c, e_c in centres]).amax(dim=0)
    exact_radius = _radii(z.gather(1, prediction[:, None]) - z, torch.zeros_like(margin), 0.0, prediction, setup,
                          pairs)
    return Certificates(prediction, margin, radius, exact_radius)
