"""Power iteration: a lower estimate of ||A||_2 that converges to the dense-SVD norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipcert.bounds.power_iteration import PowerResult, power_iteration
from lipcert.graph.linop import ConvStructure, MatrixStructure, from_function


def svd_norm(op) -> float:
    return float(torch.linalg.matrix_norm(op.to_dense(), ord=2))


def matrix_op(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    return from_function(lambda x: x @ m.to(x).T, (3, 30), (3, 20), structure=MatrixStructure(matrix=m))


def conv_op(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    structure = ConvStructure(weight=w, input_spatial=(8, 8), stride=(2, 2), pads=(1, 1, 1, 1), dilation=(1, 1))
    return from_function(lambda x: F.conv2d(x, w, stride=2, padding=1), (3, 8, 8), (4, 4, 4), structure=structure)


def test_lower_bound_and_convergence_dense_matrix() -> None:
    op = matrix_op()
    true = svd_norm(op)
    res = power_iteration(op, tol=1e-12, max_iter=5000)
    assert res.converged and res.rel_change < 1e-12
    assert res.sigma <= true * (1 + 1e-12)
    assert abs(res.sigma - true) <= 1e-6 * true


def test_lower_bound_and_convergence_conv() -> None:
    op = conv_op()
    true = svd_norm(op)
    res = power_iteration(op, tol=1e-12, max_iter=5000)
    assert res.converged
    assert res.sigma <= true * (1 + 1e-12)
    assert abs(res.sigma - true) <= 1e-6 * true


def test_every_iterate_is_a_lower_bound() -> None:
    op = conv_op(1)
    true = svd_norm(op)
    previous = 0.0
    for steps in range(6):
        res = power_iteration(op, max_iter=steps)
        assert res.iterations == steps and not res.converged
        assert previous * (1 - 1e-12) <= res.sigma <= true * (1 + 1e-12)  # monotone from below
        previous = res.sigma


def test_deterministic_with_seed() -> None:
    op = conv_op()
    a = power_iteration(op, max_iter=3, seed=7)
    b = power_iteration(op, max_iter=3, seed=7)
    c = power_iteration(op, max_iter=3, seed=8)
    assert a == b
    assert a.sigma != c.sigma


def test_starts_run_as_one_batch() -> None:
    op = matrix_op()
    batches = []

    def forward(x):
        batches.append(x.shape)
        return op.forward(x)

    counted = from_function(forward, op.in_shape, op.out_shape, adjoint=op.adjoint)
    res = power_iteration(counted, starts=5, max_iter=4, dtype=torch.float32)
    assert batches == [(5, 3, 30)] * 5  # one initial product, then one per step
    assert isinstance(res, PowerResult) and res.iterations == 4


def test_zero_operator() -> None:
    op = from_function(lambda x: 0 * x, (4,), (4,))
    res = power_iteration(op)
    assert res == PowerResult(sigma=0.0, iterations=1, converged=True, rel_change=0.0)
    assert not math.isnan(res.sigma)


def test_init_start_is_used_and_stays_a_lower_bound() -> None:
    op = conv_op(2)
    dense = op.to_dense()
    true = float(torch.linalg.matrix_norm(dense, ord=2))
    top = torch.linalg.svd(dense, full_matrices=False).Vh[0]
    res = power_iteration(op, init=top, max_iter=0)  # no step: the measured ratio of the given start
    assert true * (1 - 1e-12) <= res.sigma <= true * (1 + 1e-12)
    res = power_iteration(op, init=-top, tol=1e-9)
    assert res.converged and res.iterations <= 2 and res.sigma <= true * (1 + 1e-12)
