"""lipcert.bounds.fusion: refined linear chains are the same map, and their structural bounds are sound and tight."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from lipcert.bounds.decompose import decompose
from lipcert.bounds.fusion import refine
from lipcert.bounds.spectral import upper_bound
from lipcert.graph.linop import LinearOperator, MatrixStructure

from .conftest import graph_of
from .soundness.build import Builder

SHAPE = (2, 6, 6)  # per-sample input of the chains: even sides, so that a stride of 2 divides them
TIGHT = 1e-6  # relative distance to the dense norm allowed where the structure gives an exact bound


def structural_bound(op: LinearOperator) -> float:
    """``upper_bound`` from the operator's structure alone: never the dense SVD of the operator itself (a matrix
    is still bounded by the SVD of its own matrix, which is exact)."""
    return upper_bound(op, dense_limit=4096 if isinstance(op.structure, MatrixStructure) else 0).value


def weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def channel_scale(rng: np.random.Generator, c: int) -> np.ndarray:
    """Per-channel factors of both signs and different sizes: a bound that ignores them cannot be tight."""
    return (rng.uniform(0.3, 2.0, (c, 1, 1)) * rng.choice([-1.0, 1.0], (c, 1, 1))).astype(np.float32)


def wrap_pad(b: Builder, v: str, h: tuple[int, int], w: tuple[int, int]) -> str:
    """An ONNX Pad(mode=wrap) of the two spatial axes by (begin, end) each."""
    return b.pad(v, [0, 0, h[0], w[0], 0, 0, h[1], w[1]], "wrap")


def torch_circular(b: Builder, v: str) -> str:
    """torch's export of circular padding by 1: Concat(x[-1:], x, x[:1]) along H, then along W."""
    for axis in (2, 3):
        v = b.node("Concat", [b.slice(v, [-1], [2 ** 62], [axis]), v, b.slice(v, [0], [1], [axis])], axis=axis)
    return v


# Each case writes a chain of linear nodes from the input and says whether its structure allows an exact bound.
def circular_pad_conv(b: Builder, rng: np.random.Generator) -> str:
    return b.node("Conv", [wrap_pad(b, "input", (1, 1), (1, 1)), b.const(weights(rng, 3, 2, 3, 3))])


def torch_circular_conv(b: Builder, rng: np.random.Generator) -> str:
    return b.node("Conv", [torch_circular(b, "input"), b.const(weights(rng, 3, 2, 3, 3))])


def circular_conv_stride2(b: Builder, rng: np.random.Generator) -> str:
    return b.node("Conv", [wrap_pad(b, "input", (1, 1), (1, 1)), b.const(weights(rng, 3, 2, 3, 3))], strides=[2, 2])


def circular_conv_then_scale(b: Builder, rng: np.random.Generator) -> str:
    conv = b.node("Conv", [wrap_pad(b, "input", (1, 1), (0, 2)), b.const(weights(rng, 3, 2, 3, 3))])
    return b.node("Mul", [conv, b.const(channel_scale(rng, 3))])


def circular_conv_then_batchnorm(b: Builder, rng: np.random.Generator) -> str:
    conv = b.node("Conv", [wrap_pad(b, "input", (1, 1), (1, 1)), b.const(weights(rng, 3, 2, 3, 3))])
    stats = [channel_scale(rng, 3).reshape(3), weights(rng, 3), weights(rng, 3), rng.uniform(0.5, 2.0, 3)]
    return b.node("BatchNormalization", [conv] + [b.const(s.astype(np.float32)) for s in stats])


def circular_conv_then_scalars(b: Builder, rng: np.random.Generator) -> str:
    conv = b.node("Conv", [wrap_pad(b, "input", (1, 1), (1, 1)), b.const(weights(rng, 3, 2, 3, 3))])
    return b.node("Div", [b.node("Mul", [conv, b.const(np.float32(-1.5))]), b.const(np.float32(4.0))])


def scale_then_pointwise_conv(b: Builder, rng: np.random.Generator) -> str:
    scaled = b.node("Mul", ["input", b.const(channel_scale(rng, 2))])
    return b.node("Conv", [scaled, b.const(weights(rng, 3, 2, 1, 1))])


def scale_then_padded_conv(b: Builder, rng: np.random.Generator) -> str:
    scaled = b.node("Mul", ["input", b.const(channel_scale(rng, 2))])
    return b.node("Conv", [scaled, b.const(weights(rng, 3, 2, 3, 3))], pads=[1, 1, 1, 1])


def zero_pad_then_conv(b: Builder, rng: np.random.Generator) -> str:
    return b.node("Conv", [b.pad("input", [0, 0, 1, 1, 0, 0, 1, 1]), b.const(weights(rng, 3, 2, 3, 3))])


def conv_then_global_pool(b: Builder, rng: np.random.Generator) -> str:
    conv = b.node("Conv", [wrap_pad(b, "input", (1, 1), (1, 1)), b.const(weights(rng, 3, 2, 3, 3))])
    return b.node("GlobalAveragePool", [conv])


def two_matrices(b: Builder, rng: np.random.Generator) -> str:
    flat = b.node("Flatten", ["input"], axis=1)
    hidden = b.node("Gemm", [flat, b.const(weights(rng, 7, b.numel(flat)))], transB=1)
    return b.node("Gemm", [hidden, b.const(weights(rng, 5, 7))], transB=1)


def scales_around_a_square_matrix(b: Builder, rng: np.random.Generator) -> str:
    """A scalar, then different factors before and after a square matrix (folded on the wrong side, they differ)."""
    flat = b.node("Flatten", [b.node("Mul", ["input", b.const(np.float32(-1.5))])], axis=1)
    n = b.numel(flat)
    scaled = b.node("Mul", [flat, b.const(rng.uniform(0.2, 3.0, n).astype(np.float32))])
    hidden = b.node("Gemm", [scaled, b.const(weights(rng, n, n))], transB=1)
    return b.node("Mul", [hidden, b.const(rng.uniform(0.2, 3.0, n).astype(np.float32))])


def reshapes_between_matrices(b: Builder, rng: np.random.Generator) -> str:
    flat = b.node("Flatten", ["input"], axis=1)
    hidden = b.reshape_const(b.node("Gemm", [flat, b.const(weights(rng, 12, b.numel(flat)))], transB=1), [3, 4])
    return b.node("Gemm", [b.reshape_const(hidden, [12]), b.const(weights(rng, 5, 12))], transB=1)


def last_axis_matmuls(b: Builder, rng: np.random.Generator) -> str:
    rows = b.reshape_const("input", [12, 6])
    return b.node("MatMul", [b.node("MatMul", [rows, b.const(weights(rng, 6, 4))]), b.const(weights(rng, 4, 3))])


CHAINS: dict[str, tuple[Callable[[Builder, np.random.Generator], str], bool]] = {
    "circular pad + conv": (circular_pad_conv, True),
    "torch's circular padding (Slice/Concat) + conv": (torch_circular_conv, True),
    "circular conv, stride 2": (circular_conv_stride2, True),
    "circular conv then channel scale": (circular_conv_then_scale, True),
    "circular conv then batch norm": (circular_conv_then_batchnorm, True),
    "circular conv then Mul and Div by scalars": (circular_conv_then_scalars, True),
    "channel scale then 1x1 conv": (scale_then_pointwise_conv, True),
    "channel scale then zero-padded conv": (scale_then_padded_conv, False),
    "zero Pad then conv": (zero_pad_then_conv, False),
    "conv then global average pool": (conv_then_global_pool, False),
    "two matrices": (two_matrices, True),
    "scales around a square matrix": (scales_around_a_square_matrix, True),
    "reshapes between matrices": (reshapes_between_matrices, True),
    "two MatMuls on the last axis": (last_axis_matmuls, True),
}


def chain_of(b: Builder, output: str) -> LinearOperator:
    """The operator of the single fused linear step of a model that is one linear chain."""
    steps = decompose(graph_of(b, output))
    assert [s.kind for s in steps] == ["linear"], [(s.kind, s.label) for s in steps]
    return steps[0].linear


@pytest.mark.parametrize("name", CHAINS)
def test_refined_chain_is_the_same_map_with_a_sound_tighter_bound(name: str) -> None:
    build, exact = CHAINS[name]
    b = Builder(SHAPE, seed=1)
    op = chain_of(b, build(b, np.random.default_rng(1)))
    refined = refine(op)
    assert (tuple(refined.in_shape), tuple(refined.out_shape)) == (tuple(op.in_shape), tuple(op.out_shape))
    dense = op.to_dense()
    assert torch.allclose(refined.to_dense(), dense, rtol=0, atol=1e-10)
    norm = float(torch.linalg.matrix_norm(dense, ord=2))
    bound = structural_bound(refined)
    assert bound >= norm * (1 - 1e-12)
    assert bound <= structural_bound(op) * (1 + 1e-9)  # refining never loosens the product of the parts
    if exact:
        assert bound <= norm * (1 + TIGHT), (bound, norm)


def test_structure_is_used_where_the_product_of_parts_is_loose() -> None:
    """A circular conv with per-channel factors: the parts' product is far above the norm, the refined bound
    is the norm, so the scales were folded into the kernel (not just bounded by their largest factor)."""
    b = Builder(SHAPE, seed=1)
    op = chain_of(b, circular_conv_then_scale(b, np.random.default_rng(1)))
    norm = float(torch.linalg.matrix_norm(op.to_dense(), ord=2))
    assert structural_bound(op) > 1.05 * norm
    assert structural_bound(refine(op)) <= norm * (1 + TIGHT)


def test_transpose_between_matrices_is_not_multiplied_through() -> None:
    """M2 P M1 with P a transpose: M1 keeps the first 6 entries and M2 the last 6, so M2 M1 = 0, while P moves
    kept entries into the second half. Multiplying the matrices as if P were not there would bound by 0."""
    b = Builder((12,), seed=0)
    first = b.node("Gemm", ["input", b.const(np.diag([1.0] * 6 + [0.0] * 6).astype(np.float32))], transB=1)
    moved = b.node("Transpose", [b.reshape_const(first, [3, 4])], perm=[0, 2, 1])
    out = b.node("Gemm", [b.reshape_const(moved, [12]), b.const(np.diag([0.0] * 6 + [1.0] * 6).astype(np.float32))],
                 transB=1)
    op = chain_of(b, out)
    norm = float(torch.linalg.matrix_norm(op.to_dense(), ord=2))
    assert norm == pytest.approx(1.0)
    assert structural_bound(refine(op)) >= norm * (1 - 1e-12)


@pytest.mark.parametrize("pad", [(2, 2), (0, 1)], ids=["wider", "narrower"])
def test_wrap_pad_that_does_not_match_the_kernel_keeps_a_sound_bound(pad: tuple[int, int]) -> None:
    """A wrap pad whose total is not kernel - 1 re-reads (or drops) columns, so the map is not the circular conv
    of the kernel on the input grid (whose norm, 3, is below this map's when columns are re-read); the bound
    stays above the map's norm."""
    b = Builder((1, 3, 4), seed=0)
    out = b.node("Conv", [wrap_pad(b, "input", (0, 0), pad), b.const(np.ones((1, 1, 1, 3), np.float32))])
    op = chain_of(b, out)
    norm = float(torch.linalg.matrix_norm(op.to_dense(), ord=2))
    bound = structural_bound(refine(op))
    assert bound >= norm * (1 - 1e-12)
    if pad == (2, 2):
        assert norm > 3.0 * (1 + 1e-3)  # above the circular conv's norm, 3 (the kernel's sum)
