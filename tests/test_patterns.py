"""lipcert.bounds.patterns: each pattern claimed with a constant above measured Jacobian norms; near misses not."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lipcert.bounds.decompose import decompose
from lipcert.bounds.fusion import refine
from lipcert.bounds.patterns import PATTERNS
from lipcert.bounds.propagate import propagate
from lipcert.bounds.rounding import gamma
from lipcert.bounds.spectral import upper_bound
from lipcert.bounds.steps import Step
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops.base import Rounding

from .conftest import dense_norm, graph_of
from .soundness.build import Builder
from .soundness.generator import householder_order2

SOUND = 1 + 1e-9  # a measured Jacobian norm may exceed a sound constant by float64 noise only


def analyse(b: Builder, output: str) -> tuple[Graph, list[Step]]:
    graph = graph_of(b, output)
    return graph, decompose(graph)


def claimed(steps: list[Step], label: str) -> list[Step]:
    """The steps whose label starts with the pattern's label."""
    return [s for s in steps if s.label.startswith(label)]


def jacobian_norm(graph: Graph, x: torch.Tensor) -> float:
    """||J(x)||_2 of the whole model at one input, by autograd in float64."""
    module = GraphModule(graph).to(dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: module(v[None]).reshape(-1), x, vectorize=True)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


def measured(graph: Graph, points: int = 8, seed: int = 0) -> float:
    """The largest Jacobian norm at random Gaussian inputs: a lower bound on the model's Lipschitz constant."""
    gen = torch.Generator().manual_seed(seed)
    return max(jacobian_norm(graph, torch.randn(graph.input_shape, generator=gen, dtype=torch.float64))
               for _ in range(points))


def network_bound(graph: Graph) -> float:
    return propagate(graph, lower_bounds=False).upper


def assert_near_miss(b: Builder, output: str, label: str) -> float:
    """The pattern is not claimed, and whatever bounds the model instead is still sound; returns that bound."""
    graph, steps = analyse(b, output)
    assert not claimed(steps, label), [(s.kind, s.label) for s in steps]
    bound = network_bound(graph)
    assert measured(graph) <= bound * SOUND
    return bound


# ------------------------------------------------------------------------------------------ SLL blocks

SLL = "SLL block"


def sll_dense(b: Builder, b_w: np.ndarray, s: np.ndarray, a_w: np.ndarray | None = None) -> str:
    """x - A relu(B x + c) on a flat input, A = B^T diag(s) unless given."""
    a_w = b_w.T * s[None, :] if a_w is None else a_w
    h = b.node("Gemm", ["input", b.const(b_w.astype(np.float32)), b.const(np.full(len(s), 0.1, np.float32))],
               transB=1)
    return b.node("Sub", ["input", b.node("Gemm", [b.node("Relu", [h]), b.const(a_w.astype(np.float32))], transB=1)])


def sll_weights(seed: int = 0, n: int = 6, m: int = 4, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """B (m x n) of norm 1 and s in [0.4, 2] * gain: ||S^1/2 B||^2 <= 2 for gain 1."""
    rng = np.random.default_rng(seed)
    b_w = rng.standard_normal((m, n))
    return b_w / np.linalg.norm(b_w, 2), rng.uniform(0.2, 1.0, m) * 2.0 * gain


def test_sll_block_under_the_sqrt2_condition_is_1_lipschitz() -> None:
    b_w, s = sll_weights()
    b = Builder((6,))
    graph, steps = analyse(b, sll_dense(b, b_w, s))
    (step,) = steps
    assert step.kind == "pattern" and step.label.startswith(SLL)
    assert step.details.constant == pytest.approx(1.0, abs=1e-6)
    assert measured(graph) <= step.details.constant * SOUND
    assert network_bound(graph) == pytest.approx(step.details.constant, rel=1e-12)


def test_sll_block_beyond_the_condition_is_bounded_by_q2_minus_1_which_is_attained() -> None:
    """With ||S^1/2 B||^2 = q^2 > 2 the constant is q^2 - 1; where every unit is active the Jacobian is
    I - B^T S B, whose norm is exactly that."""
    b_w, s = sll_weights(gain=3.0)
    b = Builder((6,))
    graph, steps = analyse(b, sll_dense(b, b_w, s))
    (step,) = claimed(steps, SLL)
    b32 = b_w.astype(np.float32).astype(np.float64)
    q2 = np.linalg.norm(np.sqrt(s)[:, None] * b32, 2) ** 2
    assert q2 > 2 and step.details.constant == pytest.approx(q2 - 1, rel=1e-6)
    active = torch.from_numpy(np.linalg.pinv(b32) @ np.ones(4))  # B x = 1 > 0: every unit active
    assert jacobian_norm(graph, active) == pytest.approx(step.details.constant, rel=1e-5)
    assert measured(graph) <= step.details.constant * SOUND


def sll_conv(b: Builder, b_k: np.ndarray, a_k: np.ndarray) -> str:
    """x - ConvT_A(relu(Conv_B(x))) with the same 3x3 geometry (pads 1)."""
    h = b.node("Conv", ["input", b.const(b_k.astype(np.float32))], pads=[1, 1, 1, 1])
    r = b.node("ConvTranspose", [b.node("Relu", [h]), b.const(a_k.astype(np.float32))], pads=[1, 1, 1, 1])
    return b.node("Sub", ["input", r])


def conv_sll_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """B a 3x3 conv 2 -> 3 channels of norm 1 on 4x4 inputs, s per hidden channel in [0.4, 2]."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((3, 2, 3, 3))
    norm = dense_norm(lambda v: torch.nn.functional.conv2d(v, torch.from_numpy(k), padding=1), (2, 4, 4))
    return k / norm, rng.uniform(0.2, 1.0, 3) * 2.0


def test_convolutional_sll_block_is_1_lipschitz() -> None:
    b_k, s = conv_sll_weights()
    b = Builder((2, 4, 4))
    graph, steps = analyse(b, sll_conv(b, b_k, b_k * s[:, None, None, None]))
    (step,) = claimed(steps, SLL)
    assert step.details.constant == pytest.approx(1.0, abs=1e-6)
    assert measured(graph) <= step.details.constant * SOUND


@pytest.mark.parametrize("miss", ["flipped kernel", "negative s"])
def test_convolutional_sll_near_misses(miss: str) -> None:
    """A's kernel must be s_h times B's for each hidden channel h, with s_h >= 0: a spatially flipped kernel is
    not B^T S (ConvTranspose already transposes), and a negative s_h makes the block expansive."""
    b_k, s = conv_sll_weights()
    if miss == "negative s":
        s[0] = -s[0]
    a_k = b_k * s[:, None, None, None]
    b = Builder((2, 4, 4))
    assert assert_near_miss(b, sll_conv(b, b_k, a_k[:, :, ::-1, ::-1] if miss == "flipped kernel" else a_k),
                            SLL) > 1 + 1e-3


def test_dense_sll_near_misses() -> None:
    """A perturbed away from B^T S is not an SLL block: the S-procedure bounds it instead (above 1, below the
    product bound); the activation read outside the block is no block: the sum rule bounds it by 1 + ||A|| ||B||."""
    b_w, s = sll_weights()
    b = Builder((6,))
    a_w = b_w.T * s[None, :] + 0.05 * np.random.default_rng(1).standard_normal((6, 4))
    assert 1 + 1e-3 < assert_near_miss(b, sll_dense(b, b_w, s, a_w), SLL) < 1.5
    b = Builder((6,))
    out = sll_dense(b, b_w, s)
    relu = next(n.output[0] for n in b.nodes if n.op_type == "Relu")
    assert assert_near_miss(b, b.node("Concat", [out, relu], axis=1), SLL) > 1.5


def sll_skip(b: Builder, q: np.ndarray, b_w: np.ndarray, s: np.ndarray, a_w: np.ndarray | None = None) -> str:
    """Q x - A relu(B x + c) on a flat input (orthogonium's fused SLLxAOC form), A = Q B^T diag(s) unless given."""
    a_w = q @ b_w.T * s[None, :] if a_w is None else a_w
    h = b.node("Gemm", ["input", b.const(b_w.astype(np.float32)), b.const(np.full(len(s), 0.1, np.float32))],
               transB=1)
    skip = b.node("Gemm", ["input", b.const(q.astype(np.float32))], transB=1)
    return b.node("Sub", [skip, b.node("Gemm", [b.node("Relu", [h]), b.const(a_w.astype(np.float32))], transB=1)])


def skip_matrix(rows: int, seed: int = 3) -> np.ndarray:
    """``rows`` orthonormal rows of a random 6 x 6 orthogonal matrix (6: an isometry; fewer: a co-isometry)."""
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((6, 6)))[0][:rows]


@pytest.mark.parametrize("rows", [6, 4], ids=["orthogonal", "co-isometry"])
def test_sll_block_with_a_linear_skip_is_bounded_through_the_skip(rows: int) -> None:
    """y = Q x - Q B^T S relu(Bx + c) = Q (x - B^T S relu(Bx + c)): bounded by ||Q|| = 1 with the skip's chain
    counted in the float error analysis (its substep Q)."""
    b_w, s = sll_weights()
    b = Builder((6,))
    graph, steps = analyse(b, sll_skip(b, skip_matrix(rows), b_w, s))
    (step,) = steps
    assert step.label.startswith(SLL + " Q x") and step.details.constant == pytest.approx(1.0, abs=1e-6)
    assert [t.label for t in step.details.substeps] == ["Q", "B", "Relu", "A", "Sub"]
    assert measured(graph) <= step.details.constant * SOUND
    assert network_bound(graph) == pytest.approx(step.details.constant, rel=1e-12)


def test_sll_block_with_a_linear_skip_near_misses() -> None:
    """A = B^T S without the skip's Q is not the form (the S-procedure bounds it instead, above 1); and with no
    structured check of a skip, operators above ``sll_dense_entries`` step aside rather than being materialised."""
    from lipcert.bounds import thresholds

    b_w, s = sll_weights()
    b = Builder((6,))
    assert assert_near_miss(b, sll_skip(b, skip_matrix(6), b_w, s, b_w.T * s[None, :]), SLL) > 1 + 1e-3
    b = Builder((6,))
    with thresholds.override(sll_dense_entries=30):  # B and A have 24 entries, Q 36
        assert assert_near_miss(b, sll_skip(b, skip_matrix(6), b_w, s), SLL) > 1.5


# ------------------------------------------------------------------------------------------ circular padding


WRAP = "Pad (wrap: Slice/Concat)"


def circular_conv(b: Builder, left: tuple[int, int] = (-1, 2 ** 62), side: bool = False) -> str:
    """torch's export of circular padding by 1 along W, Concat(x[..., left], x, x[..., :1]), then a 1x3 conv."""
    start = b.slice("input", [left[0]], [left[1]], [3])
    cat = b.node("Concat", [start, "input", b.slice("input", [0], [1], [3])], axis=3)
    out = b.node("Conv", [cat, b.const(np.random.default_rng(0).standard_normal((3, 2, 1, 3)).astype(np.float32))])
    if side:
        return b.node("Concat", [b.node("Flatten", [out], axis=1), b.node("Flatten", [start], axis=1)], axis=1)
    return out


def test_circular_padding_is_claimed_and_bounded_exactly_as_a_circular_conv() -> None:
    b = Builder((2, 3, 5))
    graph, steps = analyse(b, circular_conv(b))
    (step,) = steps
    assert step.kind == "linear" and step.label.startswith(WRAP)
    norm = float(torch.linalg.matrix_norm(step.linear.to_dense(), ord=2))
    structural = upper_bound(refine(step.linear), dense_limit=0)  # from the structure, by DFT
    assert norm <= structural.value <= norm * (1 + 1e-6)
    assert measured(graph, points=1) == pytest.approx(norm, rel=1e-9)  # a linear model: J is the operator


@pytest.mark.parametrize("miss", ["wrong slice", "slice read elsewhere"])
def test_circular_padding_near_misses(miss: str) -> None:
    """Concat(x[-2:-1], x, x[:1]) is not a wrap pad; nor is a wrap whose slice is also read elsewhere."""
    b = Builder((2, 3, 5))
    out = circular_conv(b, left=(-2, -1)) if miss == "wrong slice" else circular_conv(b, side=True)
    assert_near_miss(b, out, WRAP)


# ------------------------------------------------------------------------------------------ GroupSort, MaxMin


GROUPSORT = "GroupSort"


def groupsort(b: Builder, group: int = 2, min_of_copy: bool = False, side: bool = False) -> str:
    """Reshape to groups, Concat(ReduceMax, ReduceMin) on the group axis, Reshape back."""
    n = b.numel("input")
    grouped = b.reshape_const("input", [n // group, group])
    mx = b.reduce("ReduceMax", grouped, [2])
    src = b.node("Mul", [grouped, b.const(np.float32(1.0))]) if min_of_copy else grouped
    out = b.reshape_const(b.node("Concat", [mx, b.reduce("ReduceMin", src, [2])], axis=2), [2 * n // group])
    return b.node("Concat", [out, b.reshape_const(mx, [n // group])], axis=1) if side else out


def test_groupsort_is_1_lipschitz() -> None:
    b = Builder((8,))
    graph, steps = analyse(b, groupsort(b))
    (step,) = claimed(steps, GROUPSORT)
    assert step.kind == "pattern" and step.details.constant == 1.0
    assert measured(graph) == pytest.approx(1.0)  # a permutation of the input at every point
    assert network_bound(graph) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("miss", ["group of one", "min of another value", "max read elsewhere"])
def test_groupsort_near_misses(miss: str) -> None:
    """Groups of one give each entry twice (sqrt(2)); the min of another value, or a max also read elsewhere,
    is not a sort of the groups."""
    b = Builder((8,))
    out = groupsort(b, group=1 if miss == "group of one" else 2, min_of_copy=miss == "min of another value",
                    side=miss == "max read elsewhere")
    assert assert_near_miss(b, out, GROUPSORT) > 1.0 + 1e-6


MAXMIN = "Concat (MaxMin pairs)"


def maxmin(b: Builder, mismatched: bool = False, side: bool = False) -> str:
    """Concat(Max(a, b), Min(a, b)) of the two halves of a Split (Min(a, c) of a third part when mismatched)."""
    a, c, d = b.split("input", 1, [4, 4, 4], 3)
    mx = b.node("Max", [a, c])
    out = b.node("Concat", [mx, b.node("Min", [a, d if mismatched else c]), d], axis=1)
    return b.node("Concat", [out, mx], axis=1) if side else out


def test_maxmin_pairs_are_bounded_as_the_values_they_permute() -> None:
    b = Builder((12,))
    graph, steps = analyse(b, maxmin(b))
    (step,) = claimed(steps, MAXMIN)
    assert step.kind == "concat"
    assert measured(graph) == pytest.approx(1.0)
    assert network_bound(graph) == pytest.approx(1.0, rel=1e-9)  # three disjoint parts of the input


@pytest.mark.parametrize("miss", ["different pairs", "max read elsewhere"])
def test_maxmin_near_misses(miss: str) -> None:
    b = Builder((12,))
    out = maxmin(b, mismatched=miss == "different pairs", side=miss == "max read elsewhere")
    assert assert_near_miss(b, out, MAXMIN) > 1.0 + 1e-6


SELECTED = "MaxMin ("


def selected_maxmin(b: Builder, form: str, repeat: bool = False) -> str:
    """MaxMin of an 8-entry input whose halves are picked by indexing: ``gather`` (reshape to pairs, then x[..., 0]
    and x[..., 1]), ``step`` (x[:, ::2], x[:, 1::2]), ``split``, ``permutation`` (a fixed GatherElements
    permutation, then a split), stacked as torch.stack writes it (``stack``); ``repeat`` reads coordinate 3 twice."""
    if form == "gather":
        pairs = b.reshape_const("input", [4, 2])
        a, c = (b.node("Gather", [pairs, b.ints([k]) if repeat and k else b.const(np.int64(k), np.int64)], axis=2)
                for k in (0, 1))
        if repeat:  # the second half as 4 entries of 8 read from the first: (x1, x3, x5, x7) -> (x1, x3, x5, x3)
            c = b.node("Gather", ["input", b.ints([1, 3, 5, 3])], axis=1)
            a = b.node("Gather", ["input", b.ints([0, 2, 4, 6])], axis=1)
    elif form == "step":
        a = b.slice("input", [0], [8], [1], [2])
        c = b.slice("input", [3 if repeat else 1], [8], [1], [2 if not repeat else 1])
        if repeat:
            c = b.slice(c, [0], [4], [1])  # x3..x6: x4 and x6 are read twice
    elif form in ("split", "stack"):
        a, c = b.split("input", 1, [4, 4], 2)
    else:
        index = np.array([[5, 2, 7, 0, 3, 6, 1, 3 if repeat else 4]], dtype=np.int64)
        shuffled = b.node("GatherElements", ["input", b.node("Expand", [b.const(index, np.int64), b.node(
            "Shape", ["input"])])], axis=1)
        a, c = b.split(shuffled, 1, [4, 4], 2)
    mx, mn = b.node("Max", [a, c]), b.node("Min", [a, c])
    if form == "stack":
        mx, mn = (b.node("Unsqueeze", [v, b.ints([2])]) for v in (mx, mn))
        return b.reshape_const(b.node("Concat", [mx, mn], axis=2), [8])
    return b.node("Concat", [mx, mn], axis=1)


@pytest.mark.parametrize("form", ["gather", "step", "split", "permutation", "stack"])
def test_maxmin_of_selected_coordinates_is_1_lipschitz_in_every_spelling(form: str) -> None:
    b = Builder((8,))
    graph, steps = analyse(b, selected_maxmin(b, form))
    (step,) = claimed(steps, SELECTED)
    assert step.kind == "pattern" and step.details.constant == 1.0
    assert measured(graph) == pytest.approx(1.0)  # a permutation of the input at every point
    assert network_bound(graph) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("form", ["gather", "step"])
def test_maxmin_of_a_selection_that_repeats_a_coordinate_is_not_claimed(form: str) -> None:
    """A coordinate in two pairs moves two outputs: sqrt(2), measured, and the bound stays above it."""
    b = Builder((8,))
    bound = assert_near_miss(b, selected_maxmin(b, form, repeat=True), SELECTED)
    assert bound > 1.0 + 1e-6


def test_maxmin_of_selected_coordinates_joins_the_other_inputs_of_its_concat() -> None:
    """Concat(Max(a, b), Min(a, b), w) with a, b strided slices of the input and w = 2 x: sqrt(1 + 4)."""
    b = Builder((8,))
    a, c = b.slice("input", [0], [8], [1], [2]), b.slice("input", [1], [8], [1], [2])
    twice = b.node("Mul", ["input", b.const(np.float32(2.0))])
    graph, steps = analyse(b, b.node("Concat", [b.node("Max", [a, c]), twice, b.node("Min", [a, c])], axis=1))
    (step,) = claimed(steps, "Concat (" + SELECTED)
    assert step.kind == "concat" and len(step.inputs) == 2
    assert network_bound(graph) == pytest.approx(math.sqrt(5), rel=1e-9)
    assert measured(graph) <= network_bound(graph) * SOUND


def test_a_gather_elements_that_repeats_an_entry_is_bounded_by_its_own_norm() -> None:
    """The MaxMin after it is claimed on the gathered value (1-Lipschitz in it), and the gather that reads entry 3
    twice is a linear step of norm sqrt(2): the network bound is sqrt(2), and measured there."""
    b = Builder((8,))
    graph, steps = analyse(b, selected_maxmin(b, "permutation", repeat=True))
    assert claimed(steps, SELECTED) and claimed(steps, "GatherElements")[0].kind == "linear"
    assert math.sqrt(2) <= network_bound(graph) == pytest.approx(math.sqrt(2), rel=1e-8)
    assert measured(graph) <= network_bound(graph) * SOUND


HOUSEHOLDER = "HouseHolder"


def householder_block(b: Builder, miss: str = "", where: bool = False, split: str = "split") -> str:
    """deel-torchlip's and orthogonium's HouseHolder on 8 entries (4 pairs, one angle each), as their exports
    write it: s = x sin(t/2) - y cos(t/2); (x, y) where s <= 0, the reflection (x cos t + y sin t,
    x sin t - y cos t) where s > 0. ``miss``: ``"shifted selector"`` tests s at another angle (the pieces disagree
    on its zero line), ``"both ties"`` gives s = 0 to both sides, ``"long v"`` reflects by I - 2 v v^T with |v| = 1.2
    (continuous, norm 1.88). ``where``: as Where nodes; ``split``: the halves by Split or by strided Slice."""
    theta = np.array([0.3, 1.2, 2.5, -0.7])
    if split == "split":
        x, y = b.split("input", 1, [4, 4], 2)
    else:
        x, y = b.slice("input", [0], [8], [1], [2]), b.slice("input", [1], [8], [1], [2])

    def lin(cx: np.ndarray, cy: np.ndarray, op: str = "Add") -> str:
        return b.node(op, [b.node("Mul", [x, b.const(cx.astype(np.float32))]),
                           b.node("Mul", [y, b.const(cy.astype(np.float32))])])

    half = theta / 2 + (0.3 if miss == "shifted selector" else 0.0)
    if miss == "long v":
        v1, v2 = 1.2 * np.sin(theta / 2), -1.2 * np.cos(theta / 2)
        s = lin(v1, -v2, "Sub")
        a2 = b.node("Sub", [x, b.node("Mul", [s, b.const((2 * v1).astype(np.float32))])])
        b2 = b.node("Sub", [y, b.node("Mul", [s, b.const((2 * v2).astype(np.float32))])])
    else:
        s = lin(np.sin(half), np.cos(half), "Sub")
        a2, b2 = lin(np.cos(theta), np.sin(theta)), lin(np.sin(theta), np.cos(theta), "Sub")
    zero = b.const(np.float32(0.0))
    gt = b.node("Greater" if miss != "both ties" else "GreaterOrEqual", [s, zero])
    if where:
        return b.node("Concat", [b.node("Where", [gt, a2, x]), b.node("Where", [gt, b2, y])], axis=1)
    le = b.node("Cast", [b.node("LessOrEqual", [s, zero])], to=1)
    gt = b.node("Cast", [gt], to=1)
    pieces = [b.node("Add", [b.node("Mul", [v, le]), b.node("Mul", [r, gt])]) for v, r in ((x, a2), (y, b2))]
    return b.node("Concat", pieces, axis=1)


@pytest.mark.parametrize("where, split", [(False, "split"), (True, "split"), (False, "strided slices")])
def test_householder_is_1_lipschitz_up_to_its_constants_rounding(where: bool, split: str) -> None:
    b = Builder((8,))
    graph, steps = analyse(b, householder_block(b, where=where, split=split))
    (step,) = claimed(steps, HOUSEHOLDER)
    assert step.kind == "pattern" and 1.0 <= step.details.constant <= 1.0 + 1e-6
    assert isinstance(step.details.rounding, Rounding) and 0 < step.details.rounding.fixed < 1e-6
    assert measured(graph, points=16) == pytest.approx(1.0)  # identity or a reflection at every point
    assert measured(graph, points=16) <= network_bound(graph) * SOUND


def test_householder_by_a_longer_v_is_bounded_by_its_reflection_norm() -> None:
    """I - 2 v v^T with |v| = 1.2 has the eigenvalue 1 - 2 |v|^2 = -1.88 along v: the constant, not 1."""
    b = Builder((8,))
    graph, steps = analyse(b, householder_block(b, miss="long v"))
    (step,) = claimed(steps, HOUSEHOLDER)
    assert step.details.constant == pytest.approx(1.88, rel=1e-6) and step.details.constant >= 1.88
    assert measured(graph, points=16) <= step.details.constant * SOUND
    assert measured(graph, points=64) > 1.5  # points on the reflected side see it


@pytest.mark.parametrize("miss, why", [("shifted selector", "differ by"), ("both ties", "other side")])
def test_householder_near_misses_are_refused_with_the_failed_assumption(miss: str, why: str) -> None:
    b = Builder((8,))
    graph, steps = analyse(b, householder_block(b, miss=miss))
    (step,) = claimed(steps, HOUSEHOLDER)
    assert step.kind == "no rule" and why in step.reason and step.reason.startswith("no rule: ")
    assert network_bound(graph) == math.inf


HOUSEHOLDER2 = "HouseHolder by angle"


def householder2(variant: str) -> tuple[Graph, list[Step], np.ndarray]:
    """orthogonium's HouseHolder_Order_2 on 8 entries (4 pairs), as ``householder_order2`` writes it; with its
    angles (theta0, theta1, theta2 per pair)."""
    b = Builder((8,))
    graph, steps = analyse(b, _order2(b, variant))
    return graph, steps, np.random.default_rng(3).uniform(0.05, np.pi, (3, 4))


def _pair_outputs(graph: Graph, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return GraphModule(graph).to(dtype)(z.to(dtype)).double()


@pytest.mark.parametrize("variant", ["ok", "dynamo"])
def test_householder_order_2_is_1_lipschitz_up_to_its_constants_rounding(variant: str) -> None:
    """Four pieces (identity, two reflections, a rotation) on the sectors of the angle: proven at 1 up to the
    float32 thresholds' and sines' rounding, with a finite rounding that covers the float32 evaluation, even for
    directions within 1e-6 of every boundary ray and of the wrap."""
    graph, steps, theta = householder2(variant)
    (step,) = claimed(steps, HOUSEHOLDER2)
    assert step.kind == "pattern" and 1.0 <= step.details.constant <= 1.0 + 1e-4
    rounding = step.details.rounding
    assert isinstance(rounding, Rounding) and 0 < rounding.fixed < 1e-4 and rounding.relative > 0
    assert measured(graph, points=16) == pytest.approx(1.0)
    assert measured(graph, points=16) <= network_bound(graph) * SOUND
    c = theta[0] / 2
    t1, t2 = theta[1] / 2, (theta[1] + theta[2]) / 2
    rays = np.concatenate([c + t for t in (0.0, t1, t2, 2 * np.pi - t1, 2 * np.pi)])  # boundaries, per pair
    offsets = np.linspace(-1e-6, 1e-6, 41)
    phi = (rays[None, :] + offsets[:, None]).reshape(-1, 1) + np.zeros((1, 4))
    phi = np.concatenate([phi, np.random.default_rng(4).uniform(-np.pi, np.pi, (400, 4))])
    radius = np.random.default_rng(5).uniform(0.1, 10, phi.shape)
    z = torch.from_numpy(np.concatenate([radius * np.cos(phi), radius * np.sin(phi)], axis=1))
    low, high = _pair_outputs(graph, z, torch.float32), _pair_outputs(graph, z, torch.float64)
    pair = lambda v: torch.sqrt(v[:, :4] ** 2 + v[:, 4:] ** 2)  # noqa: E731
    allowed = (gamma(rounding.relative, 2.0 ** -24) + rounding.fixed) * pair(high) + 1e-12
    assert bool((pair(low - high) <= allowed).all()), float((pair(low - high) / pair(high)).max())


def test_householder_order_2_float_hole_makes_its_rounding_unknown() -> None:
    """orthogonium's own float32 thresholds end the top sector at fl(2 pi) or below, while the float angle reaches
    fl(2 pi): there the float evaluation takes no piece and outputs 0. The constant is proven; the rounding is
    unknown (no certificate leans on it), and the reason says why. The hole is real: directions just below the
    angle c give a zero output."""
    graph, steps, theta = householder2("raw")
    (step,) = claimed(steps, HOUSEHOLDER2)
    assert step.kind == "pattern" and 1.0 <= step.details.constant <= 1.0 + 1e-4
    assert step.details.rounding is None and "hole" in step.reason
    phi = np.float32(theta[0] / 2)[None, :] - np.linspace(0, 2e-6, 401)[:, None]
    z = torch.from_numpy(np.concatenate([np.cos(phi), np.sin(phi)], axis=1).astype(np.float32))
    out = _pair_outputs(graph, z, torch.float32)
    assert bool(((out[:, :4] == 0) & (out[:, 4:] == 0)).any())


def test_two_householder_order_2_blocks_in_a_row_are_each_proven() -> None:
    b = Builder((8,))
    first = b.node("Add", [_order2(b, "ok"), b.const(np.zeros(8, np.float32))])
    x, y = b.split(first, 1, [4, 4], 2)
    graph, steps = analyse(b, householder_order2(b, x, y, 1, np.random.default_rng(9).uniform(0.05, 3, (3, 4))))
    assert [s.kind for s in claimed(steps, HOUSEHOLDER2)] == ["pattern", "pattern"]
    assert network_bound(graph) <= 1 + 1e-4


@pytest.mark.parametrize("variant, why", [("perturbed", "differ by"), ("swapped", "differ by"),
                                          ("uncovered", "differ by"), ("bad_pi", "is not pi"),
                                          ("bad_mod", "is not 2 pi")])
def test_householder_order_2_near_misses_are_refused_with_the_failed_assumption(variant: str, why: str) -> None:
    """A piece off by 1e-2 (discontinuous at its boundaries), sectors that overlap (thresholds out of order) or
    that no mask covers, and an atan2 whose pi or modulus is not pi or 2 pi: no rule, the assumption named."""
    graph, steps, _ = householder2(variant)
    refusals = [s for s in steps if s.kind == "no rule" and why in s.reason]
    assert refusals and all(s.reason.startswith("no rule: ") for s in refusals), [(s.label, s.reason) for s in steps]
    assert network_bound(graph) == math.inf


RELU_NEG = "MaxMin-style (Relu(x), Relu(-x))"


def relu_neg(b: Builder, source_copy: bool = False, side: bool = False) -> str:
    neg = b.node("Neg", [b.node("Mul", ["input", b.const(np.float32(1.0))]) if source_copy else "input"])
    out = b.node("Concat", [b.node("Relu", ["input"]), b.node("Relu", [neg])], axis=1)
    return b.node("Concat", [out, neg], axis=1) if side else out


def test_relu_of_x_and_of_minus_x_is_1_lipschitz() -> None:
    b = Builder((6,))
    graph, steps = analyse(b, relu_neg(b))
    (step,) = steps
    assert step.kind == "pattern" and step.label == RELU_NEG and step.details.constant == 1.0
    assert measured(graph) == pytest.approx(1.0)


@pytest.mark.parametrize("miss", ["Neg of another value", "Neg read elsewhere"])
def test_relu_neg_near_misses(miss: str) -> None:
    """Relu(x) and Relu(-y) for another value y, or -x also read elsewhere: bounded as a concatenation."""
    b = Builder((6,))
    out = relu_neg(b, source_copy=miss == "Neg of another value", side=miss == "Neg read elsewhere")
    assert assert_near_miss(b, out, RELU_NEG) >= math.sqrt(2)


# ------------------------------------------------------------------------------------------ L2 norms


L2_POOL = "L2-norm pool"


def l2_pool(b: Builder, factor: float, stride: int, exponent: float = 2.0, side: bool = False) -> str:
    """sqrt(factor * AveragePool_2x2(x^e)) on one channel."""
    square = b.node("Pow", ["input", b.const(np.float32(exponent))])
    pooled = b.node("AveragePool", [square], kernel_shape=[2, 2], strides=[stride, stride])
    out = b.node("Sqrt", [b.node("Mul", [pooled, b.const(np.float32(factor))])])
    return b.node("Concat", [out, pooled], axis=1) if side else out


@pytest.mark.parametrize("factor, stride, expected", [(4.0, 2, 1.0), (1.0, 2, 0.5), (4.0, 1, 2.0)])
def test_l2_norm_pooling_constant(factor: float, stride: int, expected: float) -> None:
    """sqrt(c * the largest total weight of one input entry): windows of 4 entries weigh 1/4 each; with
    stride 1 an entry inside the grid is in 4 windows."""
    b = Builder((1, 4, 4))
    graph, steps = analyse(b, l2_pool(b, factor, stride))
    (step,) = steps
    assert step.kind == "pattern" and step.label.startswith(L2_POOL)
    assert step.details.constant == pytest.approx(expected, rel=1e-9)
    assert measured(graph) <= step.details.constant * SOUND


@pytest.mark.parametrize("miss", ["fourth powers", "pool read elsewhere"])
def test_l2_norm_pooling_near_misses(miss: str) -> None:
    """sqrt(pool(x^4)) is not a norm (it grows as x^2); a pool also read elsewhere is not claimed either, which
    leaves the root without a rule (no bound)."""
    b = Builder((1, 4, 4))
    out = l2_pool(b, 4.0, 2, exponent=4.0 if miss == "fourth powers" else 2.0, side=miss == "pool read elsewhere")
    assert assert_near_miss(b, out, L2_POOL) == math.inf


L2_COMBINATION = "L2-norm combination"


def l2_combination(b: Builder, constant: float = 1e-6, side: bool = False) -> str:
    """sqrt(0.5 x^2 + 0.5 (W x)^2 + e) with ||W|| = 1 (orthogonium's L2NormResidual)."""
    w = np.random.default_rng(0).standard_normal((6, 6))
    w = w / np.linalg.norm(w, 2)
    fx = b.node("Gemm", ["input", b.const(w.astype(np.float32))], transB=1)
    x2 = b.node("Pow", ["input", b.const(np.float32(2.0))])
    terms = [b.node("Mul", [x2, b.const(np.float32(0.5))]),
             b.node("Mul", [b.node("Pow", [fx, b.const(np.float32(2.0))]), b.const(np.float32(0.5))])]
    total = b.node("Add", [b.node("Add", terms), b.const(np.float32(constant))])
    out = b.node("Sqrt", [total])
    return b.node("Concat", [out, x2], axis=1) if side else out


def test_l2_norm_combination_is_bounded_as_the_weighted_terms() -> None:
    b = Builder((6,))
    graph, steps = analyse(b, l2_combination(b))
    (step,) = claimed(steps, L2_COMBINATION)
    assert step.kind == "concat" and step.details.weights == pytest.approx([math.sqrt(0.5)] * 2)
    bound = network_bound(graph)
    assert bound == pytest.approx(1.0, rel=1e-6)  # sqrt(0.5 * 1^2 + 0.5 * 1^2)
    assert measured(graph) <= bound * SOUND


@pytest.mark.parametrize("miss", ["negative constant", "square read elsewhere"])
def test_l2_norm_combination_near_misses(miss: str) -> None:
    """A negative constant under the root (real at the points measured) or a square also read elsewhere: not a
    norm of the terms."""
    b = Builder((6,))
    out = l2_combination(b, constant=-1e-6 if miss == "negative constant" else 1e-6, side=miss != "negative constant")
    assert_near_miss(b, out, L2_COMBINATION)


# ------------------------------------------------------------------------------------------ every pattern


def _sll_miss(b: Builder) -> str:
    b_w, s = sll_weights()
    return sll_dense(b, b_w, s, b_w.T * s[None, :] + 0.05 * np.random.default_rng(1).standard_normal((6, 4)))


def _householder_miss(b: Builder) -> str:
    """The HouseHolder form whose halves overlap (x and x shifted by one): not two disjoint selections."""
    x, y = b.slice("input", [0], [4], [1]), b.slice("input", [1], [5], [1])
    s = b.node("Sub", [x, y])
    gt = b.node("Cast", [b.node("Greater", [s, b.const(np.float32(0.0))])], to=1)
    return b.node("Concat", [b.node("Mul", [x, gt]), b.node("Mul", [y, gt])], axis=1)


ANGLE = "Atan (an angle"


def _angle(b: Builder) -> str:
    """An angle (an exported atan2) that selects between two values: no rule, said so."""
    x, y = b.split("input", 1, [4, 4], 2)
    turn = b.node("Cast", [b.node("Greater", [b.node("Atan", [b.node("Div", [y, x])]), b.const(np.float32(0.5))])],
                  to=1)
    return b.node("Mul", [x, turn])


def _order2(b: Builder, variant: str, source: str = "input", zero: float | None = 0.0) -> str:
    """HouseHolder_Order_2 on the halves of ``source`` plus ``zero`` (+0.0: exact, and no half is ever -0.0)."""
    if zero is not None:
        source = b.node("Add", [source, b.const(np.full((8,), zero, np.float32))])
    x, y = b.split(source, 1, [4, 4], 2)
    return householder_order2(b, x, y, 1, np.random.default_rng(3).uniform(0.05, np.pi, (3, 4)), variant)


#: for each recogniser in ``PATTERNS`` (by name): the input shape, a model it claims, a near miss it must not
#: claim, and the label of its step
CASES: dict[str, tuple[tuple[int, ...], Callable[[Builder], str], Callable[[Builder], str], str]] = {
    "sll_block": ((6,), lambda b: sll_dense(b, *sll_weights()), _sll_miss, SLL),
    "wrap_concat": ((2, 3, 5), circular_conv, lambda b: circular_conv(b, left=(-2, -1)), WRAP),
    "groupsort_reduce": ((8,), groupsort, lambda b: groupsort(b, min_of_copy=True), GROUPSORT),
    "maxmin_concat": ((12,), maxmin, lambda b: maxmin(b, mismatched=True), MAXMIN),
    "maxmin_select": ((8,), lambda b: selected_maxmin(b, "gather"), lambda b: selected_maxmin(b, "gather", True),
                      SELECTED),
    "householder": ((8,), householder_block, _householder_miss, HOUSEHOLDER),
    "householder_angle": ((8,), lambda b: _order2(b, "ok"), lambda b: _order2(b, "bad_pi"), HOUSEHOLDER2),
    "angle_selector": ((8,), _angle, lambda b: b.node("Atan", ["input"]), ANGLE),
    "relu_neg_concat": ((6,), relu_neg, lambda b: relu_neg(b, source_copy=True), RELU_NEG),
    "l2_pool": ((1, 4, 4), lambda b: l2_pool(b, 4.0, 2), lambda b: l2_pool(b, 4.0, 2, exponent=4.0), L2_POOL),
    "l2_norm_combination": ((6,), l2_combination, lambda b: l2_combination(b, constant=-1e-6), L2_COMBINATION),
}


def test_every_case_names_a_pattern() -> None:
    assert set(CASES) <= {p.__name__ for p in PATTERNS}


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.__name__)
def test_every_pattern_fires_on_its_case_and_not_on_its_near_miss(pattern: Callable) -> None:
    """Driven by ``PATTERNS`` itself: a new recogniser without a case in ``CASES`` fails here."""
    assert pattern.__name__ in CASES, f"pattern {pattern.__name__} has no case: add one to CASES in {__file__}"
    shape, fires, misses, label = CASES[pattern.__name__]
    b = Builder(shape)
    assert claimed(analyse(b, fires(b))[1], label)
    b = Builder(shape)
    steps = analyse(b, misses(b))[1]
    assert not claimed(steps, label), [(s.kind, s.label) for s in steps]
