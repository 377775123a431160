"""A Lipschitz bound for a residual block y = Q x - A s(B x + b) from its explicit matrices, whatever their
structure (fused kernels, strides, paddings), by the S-procedure of LipSDP (Fazlyab et al., NeurIPS 2019) with a
diagonal multiplier Lambda: s acts entry by entry with slopes in [0, 1].

For two inputs, with v = B dx and u = s(Bx + b) - s(Bx' + b) entry by entry u_i (v_i - u_i) >= 0. For any
diagonal Lambda > 0 and L > 0, with w = sqrt(2 Lambda) (u - v / 2),
    L^2 |dx|^2 + |w|^2 - |N (L dx, w)|^2 = L^2 |dx|^2 - |dy|^2 - 2 sum_i Lambda_i u_i (v_i - u_i),
    N = [[(Q - A B / 2) / L, -A (2 Lambda)^-1/2], [(Lambda / 2)^1/2 B / L, 0]],
so |dy|^2 <= |N (L dx, w)|^2 - |w|^2 <= nu^2 L^2 |dx|^2 + (nu^2 - 1)+ |w|^2 with nu >= ||N||, and
|w| <= (max Lambda / 2)^1/2 ||B|| |dx|: the block is sqrt(nu^2 L^2 + (nu^2 - 1)+ max Lambda ||B||^2 / 2)-Lipschitz,
for every Lambda and L. They are chosen where the LMI holds at the least L (nu = 1): for Lambda = lambda D with
2 Lambda > A^T A, that L^2 is the top eigenvalue of Q^T Q + Y Z^-1 Y^T, Y = Q^T A - B^T Lambda, Z = 2 Lambda - A^T A
(a Schur complement), a convex function of lambda, minimised by golden section for D = I, for D_i = |a_i| / |b_i|
(A's column over B's row) and for the least-squares S of A = Q B^T S (an SLL block's S), then lowered by steps on
each multiplier. Only nu and ||B|| are bounds that must be proven."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipcert.bounds import spectral
from lipcert.bounds.rounding import UNIT_ROUNDOFF, gamma

#: golden-section steps on log lambda (the bound holds at any lambda: more steps only tighten it)
SEARCH_STEPS = 32
#: steps of ``_refine`` on the multipliers after the search
REFINE_STEPS = 60
#: how far above ||A||^2 / 2 (relative) and up to how many times it lambda is searched
_LOW, _SPAN = 1e-9, 1e4


@dataclass
class QuadraticBound:
    """The proven constant and the multiplier's range, L, and nu behind it."""

    value: float
    lam: tuple[float, float]
    level: float
    nu: float


def _least_level(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor,
                 slope: bool = False) -> tuple[float, torch.Tensor | None]:
    """The least L^2 for which the LMI holds with the multipliers ``lam`` (float64, not a bound: a choice), or inf;
    with ``slope``, its derivative in log lam: for the top eigenvector e of Q^T Q + Y Z^-1 Y^T and g = Z^-1 Y^T e,
    d L^2 / d lam_i = -2 g_i ((B e)_i + g_i)."""
    z = torch.diag(2 * lam) - a.T @ a
    chol, info = torch.linalg.cholesky_ex(z)
    if int(info) != 0:
        return math.inf, None
    y = q.T @ a - b.T * lam
    w = torch.linalg.solve_triangular(chol, y.T, upper=False)
    if not slope:
        return float(torch.linalg.eigvalsh(q.T @ q + w.T @ w)[-1]), None
    values, vectors = torch.linalg.eigh(q.T @ q + w.T @ w)
    e = vectors[:, -1]
    g = torch.cholesky_solve((y.T @ e)[:, None], chol)[:, 0]
    return float(values[-1]), -2 * g * (b @ e + g) * lam


def _refine(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, level2: float,
            lam: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Lower the least L^2 by steps on log Lambda against its derivative, each halved until it lowers L^2."""
    for _ in range(REFINE_STEPS):
        _, slope = _least_level(q, a, b, lam, slope=True)
        if slope is None or float(slope.abs().max()) == 0.0:
            break
        direction, step = slope / float(slope.abs().max()), 0.5
        while step > 1e-6:
            trial = lam * torch.exp(-step * direction)
            value, _ = _least_level(q, a, b, trial)
            if value < level2:
                level2, lam = value, trial
                break
            step /= 2
        else:
            break
    return level2, lam


def _search(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shape: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The least L^2 over Lambda = lambda ``shape`` (golden section on log lambda from where 2 Lambda > A^T A may
    start, up to ``_SPAN`` times it), and that Lambda."""
    top = spectral.largest_singular_value(a / shape.sqrt()) ** 2
    lo = math.log(max(top, 1e-300) / 2 * (1 + _LOW) + 1e-300)
    hi = lo + math.log(_SPAN)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = _least_level(q, a, b, math.exp(c) * shape)[0], _least_level(q, a, b, math.exp(d) * shape)[0]
    for _ in range(SEARCH_STEPS):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = _least_level(q, a, b, math.exp(c) * shape)[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = _least_level(q, a, b, math.exp(d) * shape)[0]
    return (fc, math.exp(c) * shape) if fc <= fd else (fd, math.exp(d) * shape)


def residual_block_bound(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         errors: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> QuadraticBound | None:
    """A proven Lipschitz constant of x -> Q x - A s(Bx + b) (Q: m x n, A: m x h, B: h x n), s entrywise with slopes
    in [0, 1], from float64 matrices within ``errors`` (Frobenius norms) of the exact Q, A, B; None when no
    multiplier makes the LMI hold."""
    q, a, b = (t.to(torch.float64) for t in (q, a, b))
    keep = (a.abs().sum(0) > 0) & (b.abs().sum(1) > 0)  # a unit that A or B ignores adds nothing to the matrices
    if errors[1] > 0 or errors[2] > 0:
        keep = torch.ones_like(keep)  # ... but the exact A or B may not ignore it
    a, b = a[:, keep], b[keep]
    if a.shape[1] == 0:
        return None
    level2, lam = _search(q, a, b, torch.ones(a.shape[1], dtype=a.dtype))
    # L >= ||Q|| (the Jacobian where s is flat): at that level the choice cannot be improved
    if not level2 <= spectral.largest_singular_value(q) ** 2 * (1 + 1e-9):
        ratio = a.norm(dim=0).clamp_min(1e-300) / b.norm(dim=1).clamp_min(1e-300)
        qbt = q @ b.T  # A = Q B^T S in an SLL block: S fitted per unit, where positive
        fit = (a * qbt).sum(0) / (qbt * qbt).sum(0).clamp_min(1e-300)
        for shape in [ratio] + ([fit] if bool((fit > 0).all()) else []):
            found = _search(q, a, b, shape)
            level2, lam = min((level2, lam), found, key=lambda t: t[0])
        if not math.isfinite(level2):
            return None
        level2, lam = _refine(q, a, b, level2, lam)
    level = math.sqrt(max(level2, 0.0)) * (1 + 1e-10) + 1e-300
    nu = _proven_norm(q, a, b, lam, level, errors)
    b_norm = math.nextafter(spectral.matrix_upper_bound(b) + errors[2], math.inf)
    square = spectral.mul_up(spectral.mul_up(nu, nu), spectral.mul_up(level, level))
    excess = max(0.0, spectral.mul_up(nu, nu) - 1.0)
    if excess > 0:
        square = math.nextafter(square + spectral.mul_up(spectral.mul_up(excess, float(lam.max()) / 2),
                                                         b_norm * b_norm), math.inf)
    value = math.nextafter(math.sqrt(square) * (1 + 1e-15), math.inf)
    return QuadraticBound(value, (float(lam.min()), float(lam.max())), level, nu)


def _proven_norm(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, level: float,
                 errors: tuple[float, float, float]) -> float:
    """An upper bound on ||N|| for the exact Q, A, B: ||fl(N)|| proven, plus the Frobenius norm of a bound on the
    rounding of N's entries (the product A B of h terms, the scalings), plus what the matrices' own errors
    (``errors``: dQ, dA, dB) move N by: (dQ + (dA |B| + |A| dB + dA dB) / 2) / L, dA / sqrt(2 min Lambda) and
    sqrt(max Lambda / 2) dB / L."""
    h = a.shape[1]
    dq, da, db = errors
    frob_a, frob_b = float(a.norm()), float(b.norm())
    moved = ((dq + 0.5 * (da * frob_b + frob_a * db + da * db)) / level + da / math.sqrt(2 * float(lam.min()))
             + math.sqrt(float(lam.max()) / 2) * db / level)
    left, right = 1 / (2 * lam).sqrt(), (lam / 2).sqrt()[:, None]
    top = torch.cat([(q - 0.5 * (a @ b)) / level, -a * left], dim=1)
    bottom = torch.cat([right * b / level, torch.zeros((h, h), dtype=a.dtype)], dim=1)
    abs_top = torch.cat([(q.abs() + 0.5 * (a.abs() @ b.abs())) / level, a.abs() * left], dim=1)
    abs_bottom = torch.cat([right * b.abs() / level, torch.zeros((h, h), dtype=a.dtype)], dim=1)
    rounding = gamma(h + 8, UNIT_ROUNDOFF[torch.float64]) * float(
        torch.linalg.matrix_norm(torch.cat([abs_top, abs_bottom]), ord="fro"))
    return math.nextafter(spectral.matrix_upper_bound(torch.cat([top, bottom])) + (rounding + moved) * (1 + 1e-12),
                          math.inf)
