"""Batched power iteration: a LOWER estimate of the spectral norm ||A||_2 of a linear operator.

Power iteration on A^T A converges to the largest singular value from below: for every vector v,
||A v|| / ||v|| <= ||A||_2 (Golub and Van Loan, "Matrix Computations", 4th ed., sec. 8.2.1). Its result
is therefore an attack-side number (how large the norm at least is), never a certificate;
``lipcert.bounds.spectral`` computes the upper bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipcert.graph.linop import LinearOperator


@dataclass
class PowerResult:
    """Outcome of ``power_iteration``: a lower estimate of ||A||_2 and how the iteration ended."""

    sigma: float  # max over starts of ||A v|| / ||v|| at the final iterate: always <= ||A||_2
    iterations: int  # number of products with A^T A performed
    converged: bool  # rel_change < tol at the last step
    rel_change: float  # |sigma_k - sigma_{k-1}| / sigma_k at the last step (inf if no step was made)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norms of a batch."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale each sample to unit norm; a zero sample stays zero."""
    n = _norms(x)
    n = torch.where(n > 0, n, torch.ones_like(n))
    return x / n.reshape(-1, *([1] * (x.dim() - 1)))


def _rayleigh(v: torch.Tensor, av: torch.Tensor) -> float:
    """max over the batch of ||A v|| / ||v||, with 0 for zero samples."""
    vn, an = _norms(v), _norms(av)
    ratio = torch.where(vn > 0, an / torch.where(vn > 0, vn, torch.ones_like(vn)), torch.zeros_like(an))
    return float(ratio.max())


def power_iteration(op: LinearOperator, *, starts: int = 4, tol: float = 1e-6, max_iter: int = 1000,
                    dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                    seed: int = 0, init: torch.Tensor | None = None) -> PowerResult:
    """Lower estimate of ||A||_2 by power iteration on A^T A from ``starts`` random vectors, run as one batch.

    ``init`` (vectors of the input shape, e.g. singular vectors from an SVD) replaces the first starts; the
    estimate stays a measured ratio ||A v|| / ||v||, so it remains a lower bound whatever the starts.

    The starts are drawn from a CPU ``torch.Generator`` seeded with ``seed`` (then moved to ``device``), so
    the result is deterministic. Stops when the relative change of sigma between two steps is below ``tol``.
    """
    if starts < 1:
        raise ValueError("starts must be >= 1")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn((starts, *op.in_shape), generator=gen, dtype=dtype)
    if init is not None:
        given = init.reshape((-1, *op.in_shape)).to(dtype)[:starts]
        v[: given.shape[0]] = given
    v = v.to(device)
    with torch.no_grad():
        v = _normalise(v)
        av = op.forward(v)
        sigma = _rayleigh(v, av)
        rel = math.inf
        for it in range(1, max_iter + 1):
            v = _normalise(op.adjoint(av))
            av = op.forward(v)
            new = _rayleigh(v, av)
            rel = abs(new - sigma) / new if new > 0 else 0.0
            sigma = new
            if rel < tol:
                return PowerResult(sigma=sigma, iterations=it, converged=True, rel_change=rel)
    return PowerResult(sigma=sigma, iterations=max_iter, converged=False, rel_change=rel)
