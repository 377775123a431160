"""The S-procedure bound of y = Q x - A s(Bx + b) (``quadratic.residual_block_bound``): never below the largest
Jacobian any activation with slopes in [0, 1] can give (max over D in [0, 1]^h of ||Q - A D B||, reached at a
vertex of the box), never above the product bound, and 1 for the SLL core between two maps of norm 1."""

from __future__ import annotations

import itertools

import pytest
import torch

from lipcert.bounds.quadratic import residual_block_bound

F64 = torch.float64


def _vertex_max(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """max over D in {0, 1}^h of ||Q - A D B||: the block's Lipschitz constant over all slope-[0, 1] activations
    (each D is the Jacobian of entrywise linear pieces of those slopes, and the norm is convex in D)."""
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=a.shape[1]):
        d = torch.tensor(bits, dtype=F64)
        best = max(best, float(torch.linalg.matrix_norm(q - (a * d) @ b, ord=2)))
    return best


def _orthonormal_rows(gen: torch.Generator, rows: int, n: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn((n, n), generator=gen, dtype=F64))[0][:rows]


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_between_the_exact_constant_and_the_product(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m, n, h = 4, 5, 7
    q, a, b = (torch.randn(shape, generator=gen, dtype=F64) for shape in ((m, n), (m, h), (h, n)))
    found = residual_block_bound(q, a, b)
    assert found is not None
    exact = _vertex_max(q, a, b)
    product = float(torch.linalg.matrix_norm(q, ord=2) + torch.linalg.matrix_norm(a, ord=2)
                    * torch.linalg.matrix_norm(b, ord=2))
    assert exact <= found.value <= product * (1 + 1e-9), (exact, found.value, product)


@pytest.mark.parametrize("seed", range(4))
def test_sll_core_between_a_contraction_and_orthonormal_rows_is_1_lipschitz(seed: int) -> None:
    """y = Post (Pre x - K^T S s(K Pre x + b)), ||S^1/2 K||^2 <= 2, Pre a contraction and Post orthonormal rows, given
    only as Q = Post Pre, A = Post K^T S, B = K Pre (no A = Q B^T S): 1 up to its rounding margins."""
    gen = torch.Generator().manual_seed(100 + seed)
    n, h, rows = 6, 5, 3
    k = torch.randn((h, n), generator=gen, dtype=F64)
    k = k / torch.linalg.matrix_norm(k, ord=2)
    s = 2 * torch.rand(h, generator=gen, dtype=F64).clamp_min(0.2)
    pre = _orthonormal_rows(gen, n, n)
    pre[seed % n] = 0.0
    post = _orthonormal_rows(gen, rows, n)
    q, a, b = post @ pre, post @ k.T * s, k @ pre
    found = residual_block_bound(q, a, b)
    assert found is not None
    assert _vertex_max(q, a, b) <= found.value <= 1 + 1e-6


def test_an_sll_core_past_its_condition_is_bounded_above_1() -> None:
    """x - 2 K^T s(Kx + b) with ||K|| = 1.2: the Jacobian I - 2 K^T D K reaches 1 - 2 (1.44) in norm, 1.88."""
    gen = torch.Generator().manual_seed(7)
    k = torch.randn((4, 4), generator=gen, dtype=F64)
    k = 1.2 * k / torch.linalg.matrix_norm(k, ord=2)
    found = residual_block_bound(torch.eye(4, dtype=F64), 2 * k.T, k)
    assert found is not None
    assert found.value >= _vertex_max(torch.eye(4, dtype=F64), 2 * k.T, k) == pytest.approx(1.88, rel=1e-9)


def test_units_that_nothing_reads_are_dropped() -> None:
    """A unit whose column of A is 0 changes nothing: the bound equals that of the block without it."""
    gen = torch.Generator().manual_seed(3)
    q, a, b = (torch.randn(shape, generator=gen, dtype=F64) for shape in ((3, 4), (3, 5), (5, 4)))
    padded = residual_block_bound(q, torch.cat([a, torch.zeros((3, 1), dtype=F64)], 1),
                                  torch.cat([b, torch.randn((1, 4), generator=gen, dtype=F64)]))
    plain = residual_block_bound(q, a, b)
    assert padded is not None and plain is not None and padded.value == pytest.approx(plain.value, rel=1e-9)
