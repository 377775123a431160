"""Upper bounds from lipcert.spectral against the dense SVD of explicitly built operators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipcert.bounds.spectral import (
    ROUNDING_MARGIN,
    conv_circular_norm,
    gram_norm_bound,
    kernel_matrix_norm,
    top_singular,
    upper_bound,
)
from lipcert.graph.linop import (
    ConvStructure,
    DiagStructure,
    IsometryStructure,
    MatrixStructure,
    NonnegativeStructure,
    ProjectionStructure,
    ScalarStructure,
    from_function,
)

from .conftest import dense_norm

CONV = {1: F.conv1d, 2: F.conv2d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}
LOW = 1 - 1e-12  # a sound bound is never below the true norm (beyond float64 noise in the reference)
HIGH = 1 + ROUNDING_MARGIN + 1e-12  # an exact value is the norm raised by the documented margin, no more


def torch_pads(pads: tuple[int, ...]) -> list[int]:
    """ONNX (begin..., end...) pads as F.pad's list (last axis first)."""
    nd = len(pads) // 2
    return [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])]


def conv_case(nd, c_in, c_out, k, n, *, stride=1, pads=None, dilation=1, groups=1, circular=False,
              transpose=False, output_padding=0, seed=0, weight=None):
    """A conv operator with its structure, and the exact forward function (by torch) it stands for."""
    k, n, stride, dilation, output_padding = (
        (v,) * nd if isinstance(v, int) else tuple(v) for v in (k, n, stride, dilation, output_padding))
    pads = tuple(pads) if pads is not None else (0,) * (2 * nd)
    gen = torch.Generator().manual_seed(seed)
    if transpose:
        w = weight if weight is not None else torch.randn(c_in, c_out // groups, *k, generator=gen,
                                                          dtype=torch.float64)

        def fn(x):  # ONNX ConvTranspose: full transposed conv, output padding at the end, crop pads
            full = CONV_T[nd](x, w, stride=stride, dilation=dilation, groups=groups)
            full = F.pad(full, torch_pads((0,) * nd + output_padding))
            crop = [slice(pads[i], full.shape[2 + i] - pads[nd + i]) for i in range(nd)]
            return full[(slice(None), slice(None), *crop)]
    else:
        w = weight if weight is not None else torch.randn(c_out, c_in // groups, *k, generator=gen,
                                                          dtype=torch.float64)

        def fn(x):
            x = F.pad(x, torch_pads(pads), mode="circular" if circular else "constant")
            return CONV[nd](x, w, stride=stride, dilation=dilation, groups=groups)

    in_shape = (c_in, *n)
    out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    structure = ConvStructure(weight=w, stride=stride, pads=pads, dilation=dilation, groups=groups,
                              circular=circular, input_spatial=n, transpose=transpose, output_padding=output_padding)
    return fn, from_function(fn, in_shape, out_shape, structure=structure)


# (case, whether the DFT path should be exact)
CONV_CASES = {
    "2d-zero-s1": (dict(nd=2, c_in=3, c_out=4, k=3, n=6, pads=(1, 1, 1, 1)), False),
    "2d-zero-s2": (dict(nd=2, c_in=3, c_out=4, k=3, n=6, stride=2, pads=(1, 1, 1, 1)), False),
    "2d-zero-asym": (dict(nd=2, c_in=3, c_out=2, k=3, n=6, pads=(0, 1, 2, 1)), False),
    "2d-zero-s2-asym-rect": (dict(nd=2, c_in=2, c_out=3, k=(3, 2), n=(7, 6), stride=(2, 1),
                                  pads=(2, 0, 1, 1)), False),
    "2d-zero-dil2": (dict(nd=2, c_in=2, c_out=3, k=3, n=7, dilation=2, pads=(2, 2, 2, 2)), False),
    "2d-zero-groups2-s2": (dict(nd=2, c_in=4, c_out=6, k=3, n=6, stride=2, groups=2,
                                pads=(1, 1, 1, 1)), False),
    "2d-zero-nopad-k4s2": (dict(nd=2, c_in=2, c_out=2, k=4, n=8, stride=2), False),
    "2d-circ-s1": (dict(nd=2, c_in=3, c_out=4, k=3, n=6, pads=(1, 1, 1, 1), circular=True), True),
    "2d-circ-s2": (dict(nd=2, c_in=3, c_out=4, k=3, n=6, stride=2, pads=(1, 1, 1, 1), circular=True), True),
    "2d-circ-s2-odd": (dict(nd=2, c_in=2, c_out=3, k=3, n=7, stride=2, pads=(1, 1, 1, 1),
                            circular=True), False),
    "2d-circ-dil2-groups2": (dict(nd=2, c_in=4, c_out=4, k=3, n=6, dilation=2, groups=2, pads=(2, 2, 2, 2),
                                  circular=True), True),
    "2d-circ-asym-k2": (dict(nd=2, c_in=2, c_out=3, k=2, n=5, pads=(1, 0, 0, 1), circular=True), True),
    "2d-circ-nopad": (dict(nd=2, c_in=2, c_out=3, k=3, n=6, circular=True), False),
    "2d-circ-overpad": (dict(nd=2, c_in=2, c_out=2, k=3, n=5, pads=(2, 2, 2, 2), circular=True), False),
    "1d-zero-s1": (dict(nd=1, c_in=3, c_out=4, k=3, n=10, pads=(1, 1)), False),
    "1d-zero-s2-k4": (dict(nd=1, c_in=2, c_out=3, k=4, n=11, stride=2, pads=(1, 2)), False),
    "1d-circ-s1": (dict(nd=1, c_in=3, c_out=2, k=3, n=9, pads=(1, 1), circular=True), True),
    "1d-circ-s3-dil2": (dict(nd=1, c_in=2, c_out=2, k=3, n=12, stride=3, dilation=2, pads=(2, 2),
                             circular=True), True),
    "2d-tconv-s2": (dict(nd=2, c_in=4, c_out=3, k=3, n=4, stride=2, pads=(1, 1, 1, 1), output_padding=1,
                         transpose=True), False),
    "2d-tconv-groups2-dil2": (dict(nd=2, c_in=4, c_out=4, k=3, n=5, dilation=2, groups=2, pads=(1, 1, 1, 1),
                                   transpose=True), False),
    "2d-tconv-asym": (dict(nd=2, c_in=2, c_out=3, k=(3, 4), n=(4, 3), stride=2, pads=(0, 1, 1, 0),
                           transpose=True), False),
    "1d-tconv-s2-k4": (dict(nd=1, c_in=3, c_out=2, k=4, n=6, stride=2, pads=(1, 1), transpose=True), False),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_bound_sound_and_exact_where_claimed(name: str) -> None:
    kwargs, exact = CONV_CASES[name]
    fn, op = conv_case(**kwargs)
    true = dense_norm(fn, op.in_shape)

    fft = upper_bound(op, dense_limit=0)  # DFT path forced
    assert fft.method == ("fft-circular" if kwargs.get("circular") else "fft-embedding")
    assert fft.exact == exact
    assert fft.value >= true * LOW
    if exact:
        assert fft.value <= true * HIGH
    else:  # a bound, but not a sloppy one on these small grids
        assert fft.value <= 1.6 * true

    svd = upper_bound(op)  # small: exact dense SVD
    assert svd.method == "svd" and svd.exact
    assert true * LOW <= svd.value <= true * HIGH


# Kernels whose worst frequency (z = -1) exists on even grids only: a grid one too small (wrap-around)
# gives a value below the true norm, which these cases catch.
TIGHT_CASES = {
    "1d-diff-odd": dict(kernel=[1.0, -1.0], nd=1, n=7, pads=(1, 1)),
    "1d-diff-nopad": dict(kernel=[1.0, -1.0], nd=1, n=8),
    "2d-diff-odd": dict(kernel=[[1.0, -1.0], [-1.0, 1.0]], nd=2, n=7, pads=(1, 1, 1, 1)),
    "1d-diff-s2": dict(kernel=[1.0, 1.0, -1.0, -1.0], nd=1, n=13, stride=2, pads=(1, 0)),
    "1d-diff-dil2": dict(kernel=[1.0, -1.0], nd=1, n=9, dilation=2, pads=(1, 0)),
    "1d-tconv-diff": dict(kernel=[1.0, -1.0], nd=1, n=7, transpose=True),
    "1d-tconv-diff-s2": dict(kernel=[1.0, 1.0, -1.0, -1.0], nd=1, n=6, stride=2, transpose=True),
}


@pytest.mark.parametrize("name", list(TIGHT_CASES))
def test_embedding_grid_has_no_wraparound(name: str) -> None:
    kwargs = dict(TIGHT_CASES[name])
    w = torch.tensor(kwargs.pop("kernel"), dtype=torch.float64)[None, None]
    fn, op = conv_case(c_in=1, c_out=1, k=tuple(w.shape[2:]), weight=w, **kwargs)
    true = dense_norm(fn, op.in_shape)
    bound = upper_bound(op, dense_limit=0)
    assert bound.method == "fft-embedding"
    assert true * LOW <= bound.value <= true * 1.05


@pytest.mark.parametrize("grid,k,dilation,groups", [
    ((6, 6), 3, 1, 1), ((5, 8), 3, 2, 1), ((4, 4), 5, 1, 1), ((6, 5), 2, 1, 2)])
def test_circular_formula_equals_dense_svd(grid, k, dilation, groups) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4 // groups, k, k, generator=gen, dtype=torch.float64)
    reach = dilation * (k - 1)

    def fn(x):  # y[r] = sum_t w[t] x[(r + dilation*t) mod n]: circular padding at the end, valid conv
        return F.conv2d(F.pad(x, (0, reach, 0, reach), mode="circular"), w, dilation=dilation, groups=groups)

    true = dense_norm(fn, (4, *grid))
    value = conv_circular_norm(w, grid, dilation=(dilation, dilation), groups=groups)
    assert value == pytest.approx(true, rel=1e-9)


def test_kernel_matrix_norm_is_not_the_operator_norm() -> None:
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    fn, op = conv_case(nd=2, c_in=1, c_out=1, k=3, n=16, pads=(1, 1, 1, 1), weight=ones)
    true = dense_norm(fn, op.in_shape)
    assert kernel_matrix_norm(ones) == pytest.approx(3.0)
    assert true > 2 * kernel_matrix_norm(ones)  # ~8.7 vs 3: the reshaped kernel underestimates
    assert upper_bound(op, dense_limit=0).value >= true * LOW

    ring = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    ring[0, 0, 1, 1] = 0.1
    fn, op = conv_case(nd=2, c_in=1, c_out=1, k=3, n=1, pads=(1, 1, 1, 1), weight=ring)
    true_small = dense_norm(fn, op.in_shape)  # on a 1x1 input only the centre tap acts
    assert true_small == pytest.approx(0.1)
    assert kernel_matrix_norm(ring) > 2 * true_small  # ~2.0 vs 0.1: the reshaped kernel overestimates
    assert upper_bound(op, dense_limit=0).value >= true_small * LOW
    assert upper_bound(op).value <= true_small * HIGH  # the dense SVD sees that only one tap acts


@pytest.mark.parametrize("shape,seed", [((40, 60), 0), ((100, 30), 1), ((64, 64), 2)])
def test_gram_bound(shape, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=gen, dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(m, ord=2))
    bound = gram_norm_bound(m, iters=6)
    assert true * LOW <= bound <= true * (1 + 1e-3)
    assert true * LOW <= gram_norm_bound(m, iters=10) <= true * (1 + 1e-6)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_gram_bound_no_overflow(scale) -> None:
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    m = m * (scale / float(torch.linalg.matrix_norm(m, ord=2)))
    bound = gram_norm_bound(m, iters=8)
    assert math.isfinite(bound)
    assert scale * LOW <= bound <= scale * (1 + 1e-3)


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_schur_bound_on_overlapping_avgpool(count_include_pad) -> None:
    fn = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=count_include_pad)  # noqa: E731
    op = from_function(fn, (2, 7, 7), (2, 7, 7), structure=NonnegativeStructure())
    true = dense_norm(fn, (2, 7, 7))
    schur = upper_bound(op, dense_limit=0)
    assert schur.method == "schur" and not schur.exact
    assert schur.value >= true * LOW
    assert schur.value <= 1.6 * true
    svd = upper_bound(op)
    assert svd.method == "svd" and true * LOW <= svd.value <= true * HIGH


def test_matrix_kind_svd_and_gram() -> None:
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    op = from_function(lambda x: x @ m.T, (3, 20), (3, 12), structure=MatrixStructure(matrix=m))
    true = dense_norm(op.forward, op.in_shape)  # the operator on (3, 20) has the norm of M
    exact = upper_bound(op)
    assert exact.method == "svd" and exact.exact and true * LOW <= exact.value <= true * HIGH
    gram = upper_bound(op, dense_limit=0)
    assert gram.method == "gram" and not gram.exact
    assert true * LOW <= gram.value <= true * 1.01


def test_structural_kinds() -> None:
    scale = torch.tensor([[0.5], [-3.0], [2.0]], dtype=torch.float64)
    diag = from_function(lambda x: x * scale, (3, 4), (3, 4), structure=DiagStructure(scale=scale))
    up = math.nextafter  # one ulp up: the factor may be a rounded product of merged scales
    assert upper_bound(diag).value == up(3.0, math.inf) == pytest.approx(dense_norm(diag.forward, (3, 4)))
    scalar = from_function(lambda x: -2.5 * x, (5,), (5,), structure=ScalarStructure(value=-2.5))
    assert upper_bound(scalar).value == up(2.5, math.inf)
    iso = from_function(lambda x: x.reshape(x.shape[0], 6), (2, 3), (6,), structure=IsometryStructure())
    assert upper_bound(iso).value == 1.0 and upper_bound(iso).exact
    crop = from_function(lambda x: x[:, 1:3], (5,), (2,), structure=ProjectionStructure())
    b = upper_bound(crop)
    assert b.value == 1.0 and b.method == "structural" and not b.exact


def test_generic_is_svd_when_small_and_none_when_large() -> None:
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    op = from_function(lambda x: x @ m, (8,), (8,))  # a plain Structure
    small = upper_bound(op)
    assert small.method == "svd" and small.value >= float(torch.linalg.matrix_norm(m, ord=2)) * LOW
    none = upper_bound(op, dense_limit=0)
    assert none.method == "none" and none.value == math.inf and not none.exact


def test_chain_dense_and_product() -> None:
    fn, conv = conv_case(nd=2, c_in=2, c_out=3, k=3, n=5, stride=2, pads=(1, 1, 1, 1))
    scale = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64).reshape(3, 1, 1)
    diag = from_function(lambda x: x * scale, conv.out_shape, conv.out_shape, structure=DiagStructure(scale=scale))
    chain = conv.then(diag)
    true = dense_norm(chain.forward, chain.in_shape)
    svd = upper_bound(chain)
    assert svd.method == "svd" and svd.exact and true * LOW <= svd.value <= true * HIGH
    prod = upper_bound(chain, dense_limit=0)
    assert prod.method == "product(fft-embedding,structural)" and not prod.exact
    assert prod.value >= true * LOW
    assert prod.value >= upper_bound(conv, dense_limit=0).value * 2.0  # product of the parts' bounds


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_dense_bound_carries_a_top_singular_vector(shape: tuple[int, int]) -> None:
    """The dense bound decomposes the Gram matrix once and hands power iteration a top right singular vector of
    the operator (wide or tall, whichever side it built): ||A v|| = ||A|| at that vector, with no SVD."""
    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64)
    op = from_function(lambda x: x @ a.T.to(x), (shape[1],), (shape[0],))
    bound = upper_bound(op)
    exact = float(torch.linalg.matrix_norm(a, 2))
    assert bound.method == "svd" and exact <= bound.value <= exact * (1 + 1e-8)
    v = bound.start
    assert v is not None and v.shape == (shape[1],) and float(v.norm()) == pytest.approx(1.0)
    assert float((a @ v).norm()) == pytest.approx(exact, rel=1e-10)
    sigma, left, right = top_singular(a)
    assert sigma == pytest.approx(exact, rel=1e-12)
    assert float((a @ right).norm()) == pytest.approx(exact, rel=1e-10)
    assert float((a.T @ left).norm()) == pytest.approx(exact, rel=1e-10)
