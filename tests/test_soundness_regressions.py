"""Named regression tests: each counterexample the soundness harness (tests/test_soundness.py) found, as a small
explicit ONNX model checked with the same oracles (tests/soundness/oracle.py).

Each test says which defect it pins down. ``check`` runs every oracle (rows, values, network, verify, report)
unless told otherwise, and fails with all the violations found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from lipcert.bounds import thresholds

from .conftest import SAMPLES, graph_of
from .soundness import oracle
from .soundness.build import Builder
from .soundness.paths import LOWERED

torch.set_num_threads(1)


def check(tmp_path: Path, builder: Builder, output: str, *, allow_refusal: bool = False, **kwargs) -> oracle.Outcome:
    """Save the model and run the oracles on it; every violation fails the test."""
    path = tmp_path / "model.onnx"
    onnx.save(builder.model(output), path)
    outcome = oracle.check_model(path, **kwargs)
    if outcome.refused and not allow_refusal:
        pytest.fail(f"lipcert refuses a valid model: {outcome.refused}")
    if outcome.failures:
        pytest.fail("\n".join(outcome.failures), pytrace=False)
    return outcome


def orthonormal_rows(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q.T  # k x n, orthonormal rows: a dense layer of norm 1


def channel_copies_head(b: Builder, v: str, rng: np.random.Generator, k: int, channels: int, per: int) -> str:
    """A norm-1 Gemm whose rows repeat the same pattern on every channel: it reads a broadcast copy in full."""
    u = orthonormal_rows(rng, k, per)
    w = np.tile(u, (1, channels)) / np.sqrt(channels)
    return b.node("Gemm", [b.node("Flatten", [v], axis=1), b.const(w.astype(np.float32))], transB=1)


# ---------------------------------------------------------------------------------------------- broadcasting


@pytest.mark.parametrize("op", ["Add", "Sub", "Sum", "Mean"])
def test_sum_of_a_one_channel_value_broadcast_over_four_channels(tmp_path: Path, op: str) -> None:
    """Add/Sub/Sum(x, f(x)) with x of 1 channel and f(x) of 4: x is copied 4 times, so its share of the bound
    is 2 L(x), not L(x). (Mean: not a sum step at the commit the harness ran on; kept as a guard.)"""
    rng = np.random.default_rng(0)
    b = Builder((1, 4, 4), seed=0)
    f = b.node("Conv", ["input", b.const((0.01 * rng.standard_normal((4, 1, 1, 1))).astype(np.float32))])
    s = b.node(op, ["input", f])
    check(tmp_path, b, channel_copies_head(b, s, rng, 3, 4, 16))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_of_two_data_values_with_broadcasting(tmp_path: Path, op: str) -> None:
    """Max/Min(x, f(x)) with x of 1 channel broadcast against f(x) of 4: sqrt(L(x)^2 + L(f)^2) is wrong, the
    broadcast input counts sqrt(4) times."""
    rng = np.random.default_rng(1)
    b = Builder((1, 4, 4), seed=1)
    shift = -5.0 if op == "Max" else 5.0  # f(x) far below (above) x: the max (min) is the broadcast x
    f = b.node("Conv", ["input", b.const((0.01 * rng.standard_normal((4, 1, 1, 1))).astype(np.float32)),
                        b.const(np.full(4, shift, np.float32))])
    m = b.node(op, ["input", f])
    check(tmp_path, b, channel_copies_head(b, m, rng, 3, 4, 16))


def test_max_of_a_data_value_with_a_larger_constant(tmp_path: Path) -> None:
    """Max(x (1 channel), c (4 channels)): the rule says 1, but x is broadcast to 4 channels: sqrt(4)."""
    rng = np.random.default_rng(2)
    b = Builder((1, 4, 4), seed=2)
    m = b.node("Max", ["input", b.const(np.full((4, 1, 1), -10.0, np.float32))])
    check(tmp_path, b, channel_copies_head(b, m, rng, 3, 4, 16))


# ---------------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("how", ["slices", "split"])
def test_maxmin_of_unequal_parts_that_broadcast(tmp_path: Path, how: str) -> None:
    """Concat(Max(a, b), Min(a, b)) with a = x[0:1] and b = x[1:4]: a is broadcast over the 3 entries of b, so
    the MaxMin pattern's constant 1 is wrong (sqrt(3))."""
    rng = np.random.default_rng(3)
    b = Builder((4,), seed=3)
    if how == "slices":
        a, c = b.slice("input", [0], [1], [1]), b.slice("input", [1], [4], [1])
    else:
        a, c = b.split("input", 1, [1, 3], 2)
    cat = b.node("Concat", [b.node("Max", [a, c]), b.node("Min", [a, c])], axis=1)
    w = orthonormal_rows(rng, 3, 6)
    check(tmp_path, b, b.node("Gemm", [cat, b.const(w.astype(np.float32))], transB=1))


def test_groupsort_of_groups_of_one(tmp_path: Path) -> None:
    """Concat(ReduceMax(v, 2), ReduceMin(v, 2)) over an axis of size 1 is Concat(v, v): norm sqrt(2), not the
    GroupSort pattern's 1."""
    rng = np.random.default_rng(4)
    b = Builder((2, 3, 3), seed=4)
    g = b.node("Reshape", ["input", b.ints([-1, 2, 1, 3, 3])])
    mx, mn = b.reduce("ReduceMax", g, [2]), b.reduce("ReduceMin", g, [2])
    cat = b.node("Concat", [mx, mn], axis=2)
    flat = b.node("Flatten", [cat], axis=1)
    # rows that read both copies of each entry (entry e of channel c sits at (c, 0, e) and (c, 1, e))
    u = orthonormal_rows(rng, 2, 18).reshape(2, 2, 1, 9)
    w = np.concatenate([u, u], axis=2).reshape(2, 36) / np.sqrt(2)
    check(tmp_path, b, b.node("Gemm", [flat, b.const(w.astype(np.float32))], transB=1))


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_l2_pool_with_a_partial_last_window(tmp_path: Path, count_include_pad: int) -> None:
    """sqrt(AveragePool(x^2) * 2) with kernel 2, stride 2, ceil_mode on 5 columns: the last window holds one
    entry, so the pool divides by 1 there and the constant is sqrt(2/1), not the pattern's sqrt(2/2)."""
    b = Builder((1, 1, 5), seed=5)
    sq = b.node("Pow", ["input", b.const(np.float32(2.0))])
    pool = b.node("AveragePool", [sq], kernel_shape=[1, 2], strides=[1, 2], ceil_mode=1,
                  count_include_pad=count_include_pad)
    guard = b.node("Mul", [b.node("Sign", [pool]), b.node("Relu", [b.node("Abs", [pool])])])
    out = b.node("Pow", [b.node("Mul", [guard, b.const(np.float32(2.0))]), b.const(np.float32(0.5))])
    flat = b.node("Flatten", [out], axis=1)
    w = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)  # logit 0 reads the one-entry window
    check(tmp_path, b, b.node("Gemm", [flat, b.const(w)], transB=1))


def _sll_with_split(b: Builder, rng: np.random.Generator, n: int, m: int, used: int, matched: int) -> tuple[str, str]:
    """x - A relu(B x + bias) where B x is output ``used`` of a Split of a Gemm to 2m units and A = B_matched^T S
    (B_matched the rows of Split output ``matched``); returns (block output, the other Split output)."""
    halves_w = [orthonormal_rows(rng, m, n), orthonormal_rows(rng, m, n)]
    stacked = np.concatenate(halves_w)
    h2 = b.node("Gemm", ["input", b.const(stacked.astype(np.float32))], transB=1)
    halves = b.split(h2, 1, [m, m], 2)
    h = b.node("Add", [halves[used], b.const((0.1 * rng.standard_normal(m)).astype(np.float32))])
    a = b.node("Relu", [h])
    s = rng.uniform(0.8, 1.0, m) * 2.0
    aw = halves_w[matched] * s[:, None]
    r = b.node("Gemm", [a, b.const(aw.T.astype(np.float32))], transB=1)
    return b.node("Sub", ["input", r]), halves[1 - used]


def test_sll_block_claims_a_split_whose_other_output_is_read_elsewhere(tmp_path: Path) -> None:
    """An SLL block whose B is output 0 of a Split; the Split's output 1 also feeds the logits. The pattern
    claims the Split, so output 1 never gets a step and is propagated as a constant (bound 0)."""
    rng = np.random.default_rng(6)
    b = Builder((6,), seed=6)
    y, other = _sll_with_split(b, rng, 6, 4, used=0, matched=0)
    cat = b.node("Concat", [y, other], axis=1)
    w = orthonormal_rows(rng, 3, 10)
    check(tmp_path, b, b.node("Gemm", [cat, b.const(w.astype(np.float32))], transB=1))


def test_sll_block_materialises_the_wrong_split_output(tmp_path: Path) -> None:
    """An SLL block whose branch reads output 1 of a Split, with A built from output 0's rows: the pattern
    materialises output 0 as B, finds A = B^T S, and claims 1 for x - B0^T S relu(B1 x + b), which is not
    1-Lipschitz."""
    rng = np.random.default_rng(11)
    b = Builder((8,), seed=11)
    y, _ = _sll_with_split(b, rng, 8, 4, used=1, matched=0)
    w = orthonormal_rows(rng, 3, 8)
    check(tmp_path, b, b.node("Gemm", [y, b.const(w.astype(np.float32))], transB=1))


# ---------------------------------------------------------------------------------------------- fusion


def test_two_wrap_pads_before_a_conv_certificate(tmp_path: Path) -> None:
    """Pad(wrap, 1) twice then an unpadded 5x5 conv on a 66x66 input (large enough for the FFT bound): fusion
    adds the two pads into one wrap pad of 2 and bounds a circular conv, but the second pad wraps the padded
    grid, not the original one. With a kernel that is (nearly) a shift, the circular conv is (nearly) a
    permutation, norm 1, while the true operator copies the corner entry x[0, 0] to 4 outputs: norm 2. The
    certificate path (no power iteration) uses the wrong bound; ``verify``'s self-check raises on this model, so
    only rows, values and the report are checked. The head reads the 4 copies of x[0, 0]."""
    rng = np.random.default_rng(2)
    n = 66
    kernel = 0.01 * rng.standard_normal((1, 1, 5, 5))
    kernel[0, 0, 0, 0] = 1.0
    b = Builder((1, n, n), opset=21, seed=2, max_numel=10 ** 6)
    p1 = b.pad("input", [0, 0, 1, 1, 0, 0, 1, 1], "wrap")
    p2 = b.pad(p1, [0, 0, 1, 1, 0, 0, 1, 1], "wrap")
    conv = b.node("Conv", [p2, b.const(kernel.astype(np.float32))])
    act = b.node("Relu", [b.node("Add", [conv, b.const(np.float32(10.0))])])  # open on [0, 1]: a linear map
    flat = b.node("Flatten", [act], axis=1)
    # output (i, j) reads the doubly padded grid at (i, j): x[0, 0] sits there for i, j in {0, 2}
    w = np.zeros((n, n))
    w[np.ix_([0, 2], [0, 2])] = 0.5
    w = w.flatten()
    w2 = np.stack([w, -w]).astype(np.float32)
    centre = float((0.5 * kernel.sum() + 10.0) * w.sum())  # w . act(0.5): margins centred on 0
    bias = np.array([-centre, centre], np.float32)
    check(tmp_path, b, b.node("Gemm", [flat, b.const(w2), b.const(bias)], transB=1), verify=False,
          effort=oracle.Effort(step_points=1, net_points=3, ascent_steps=5, ascent_pairs=2, samples=8,
                               pgd_steps=30, pgd_restarts=2, directions=16, line_points=64))


# ---------------------------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("how", ["transpose", "unsqueeze_transpose"])
def test_per_pair_certificate_after_a_transpose_of_the_last_gemm(tmp_path: Path, how: str) -> None:
    """Gemm to 4 logits, then Reshape (2, 2), Transpose, Reshape (4): the logits are the Gemm's outputs in the
    order 0, 2, 1, 3. The per-pair rule still takes the last step as a dense head and pairs logit j with Gemm
    row j. Here logit 1 is row 2 = -e0 (far from row 0 = e0: the true distance to the boundary is |x0 - 1/2|),
    but the rule divides the gap z0 - z1 = 2 (x0 - 1/2) by ||row 0 - row 1|| = 0.1 and certifies about 0.47."""
    b = Builder((16,), seed=7)
    w = np.zeros((4, 16), np.float32)
    w[0, 0], w[1, 0], w[1, 1], w[2, 0], w[3, 2] = 1.0, 1.0, 0.1, -1.0, 1.0
    z = b.node("Gemm", ["input", b.const(w), b.const(np.array([-0.5, -1.0, 0.5, -2.0], np.float32))], transB=1)
    if how == "transpose":
        t = b.node("Transpose", [b.node("Reshape", [z, b.ints([-1, 2, 2])])], perm=[0, 2, 1])
    else:
        t = b.node("Transpose", [b.node("Reshape", [b.squeeze("Unsqueeze", z, [2]), b.ints([-1, 2, 2, 1])])],
                   perm=[0, 2, 1, 3])
    check(tmp_path, b, b.node("Reshape", [t, b.ints([-1, 4])]))


@pytest.mark.parametrize("shift,form", [(1e6, "add"), (4e6, "add"), (1e6, "bias")])
def test_large_intermediate_values_in_the_float_error_allowance(tmp_path: Path, shift: float, form: str) -> None:
    """(x + 1e6) - 1e6 then a norm-1 Gemm: exact in the reals, but float32 rounds x + 1e6 to a multiple of
    1/16 (1/4 for 4e6). The logits are small, so the float error allowance (relative to the logits and ||x||)
    misses that rounding, and onnxruntime flips predictions well inside certified radii. ("bias": the 1e6 is
    the bias of an orthogonal Gemm, removed by a Sub.)"""
    rng = np.random.default_rng(8)
    b = Builder((16,), seed=8)
    if form == "add":
        up = b.node("Add", ["input", b.const(np.float32(shift))])
    else:
        q = orthonormal_rows(rng, 16, 16).astype(np.float32)
        up = b.node("Gemm", ["input", b.const(q), b.const(np.full(16, shift, np.float32))], transB=1)
    down = b.node("Sub", [up, b.const(np.float32(shift))])
    w = orthonormal_rows(rng, 4, 16)
    check(tmp_path, b, b.node("Gemm", [down, b.const(w.astype(np.float32))], transB=1))


def test_factor_that_is_the_batch_size(tmp_path: Path) -> None:
    """x * N with N = Cast(Shape(x)[0]), the batch size: each sample's logits depend on how many samples run
    together. Loading folds nothing (the value differs between the batch-1 and batch-2 probes), and the analysis
    reads the constant from its batch-1 run: factor 1. At batch 16 the logits are 16 times larger than the bound
    allows. A clean refusal is acceptable."""
    rng = np.random.default_rng(12)
    b = Builder((8,), seed=12)
    n = b.node("Cast", [b.node("Gather", [b.node("Shape", ["input"]), b.ints([0])], axis=0)], to=TensorProto.FLOAT)
    scaled = b.node("Mul", ["input", n])
    check(tmp_path, b, b.node("Gemm", [scaled, b.const(orthonormal_rows(rng, 3, 8).astype(np.float32))], transB=1),
          allow_refusal=True)


def test_global_average_pool_after_a_dense_layer_is_not_an_internal_error(tmp_path: Path) -> None:
    """Gemm 8 -> 4, Reshape (1, 2, 2), GlobalAveragePool: fusion folds the pool (a norm-only scalar 1/2) into the
    Gemm's matrix, which keeps its 4 rows while the fused step has 1 output; verify's power iteration warm start
    (_svd_start) then copies 4 entries into a 1-entry vector: RuntimeError (an internal error, exit code 3)."""
    rng = np.random.default_rng(13)
    b = Builder((8,), seed=13)
    h = b.node("Gemm", ["input", b.const(orthonormal_rows(rng, 4, 8).astype(np.float32))], transB=1)
    pooled = b.node("GlobalAveragePool", [b.node("Reshape", [h, b.ints([-1, 1, 2, 2])])])
    act = b.node("Relu", [b.node("Flatten", [pooled], axis=1)])
    check(tmp_path, b, b.node("Gemm", [act, b.const(np.array([[1.0], [-1.0], [0.5]], np.float32))], transB=1))


def test_verify_on_a_linear_model_with_a_cast_on_the_data_path(tmp_path: Path) -> None:
    """Gemm (alpha 2), Cast(to=FLOAT), Gemm: a linear map whose bound is its exact norm. Found on the work in
    progress (not at the last commit): verify's new network self-check measured a lower bound 1e-4 above the
    exact norm (a float32 secant through the Cast) and raised SelfCheckError on this correct model."""
    rng = np.random.default_rng(14)
    b = Builder((4,), seed=14)
    h = b.node("Gemm", ["input", b.const((rng.standard_normal((5, 4)) / 2).astype(np.float32))], transB=1, alpha=2.0)
    c = b.node("Cast", [h], to=TensorProto.FLOAT)
    check(tmp_path, b, b.node("Gemm", [c, b.const(rng.standard_normal((7, 5)).astype(np.float32)),
                                       b.const(rng.standard_normal(7).astype(np.float32))], transB=1))


@pytest.mark.parametrize("kind", ["double", "bool", "int64", "topk_indices"])
def test_report_on_a_model_with_non_float_intermediate_values(tmp_path: Path, kind: str) -> None:
    """Intermediate values of type double (Cast to DOUBLE and back), bool (Greater feeding Where) or int64
    (ArgMax, TopK indices). Found on the work in progress (not at the last commit): certify built an
    onnxruntime model exposing intermediate values all declared float, and onnxruntime refused it (Type Error):
    an internal error. A clean refusal at load is acceptable."""
    rng = np.random.default_rng(15)
    b = Builder((6,), seed=15)
    if kind == "double":
        v = b.node("Cast", [b.node("Mul", [b.node("Cast", ["input"], to=TensorProto.DOUBLE),
                                           b.const(np.float64(0.5), np.float64)])], to=TensorProto.FLOAT)
    elif kind == "bool":
        v = b.node("Where", [b.node("Greater", ["input", b.const(np.float32(0.5))]), "input", b.const(np.float32(0))])
    elif kind == "int64":
        v = b.node("Add", ["input", b.node("Cast", [b.node("ArgMax", ["input"], axis=1, keepdims=1)],
                                           to=TensorProto.FLOAT)])
    else:
        values, indices = b.node("TopK", ["input", b.ints([6])], n_out=2, axis=1)
        v = b.node("Concat", [values, b.node("Cast", [indices], to=TensorProto.FLOAT)], axis=1)
    n = b.numel(v)
    check(tmp_path, b, b.node("Gemm", [v, b.const(orthonormal_rows(rng, 3, n).astype(np.float32))], transB=1),
          allow_refusal=True)


@pytest.mark.parametrize("mode", ["wrap", "reflect", "constant"])
def test_pads_of_width_zero_and_a_single_input_concat_around_convolutions(tmp_path: Path, mode: str) -> None:
    """The identity rule for a Pad that pads nothing and a Concat of one input (how the exporters write a
    circular pad of width 0): the convolutions on either side are bounded through them, checked by every
    oracle."""
    rng = np.random.default_rng(17)
    b = Builder((2, 5, 5), seed=17)
    v = b.node("Concat", [b.pad("input", [0] * 8, mode)], axis=1)
    v = b.node("Conv", [v, b.const(rng.standard_normal((3, 2, 3, 3)).astype(np.float32) / 3)], pads=[0] * 4)
    v = b.node("Concat", [b.pad(b.node("Relu", [v]), [0] * 8, mode)], axis=2)
    v = b.node("Conv", [v, b.const(rng.standard_normal((2, 3, 3, 3)).astype(np.float32) / 3)], pads=[1] * 4)
    v = b.node("Flatten", [v], axis=1)
    check(tmp_path, b, b.node("Gemm", [v, b.const(orthonormal_rows(rng, 4, 18).astype(np.float32))], transB=1))


def test_gate_search_on_a_relu_of_values_constant_in_the_input(tmp_path: Path) -> None:
    """A Relu closed at every point whose input is TopK indices (piecewise constant in the input): the
    harness's gate search ascended a loss with no gradient and crashed (found by the long profile, on the
    harness, not on lipcert). Now the search stops; lipcert must still certify nothing past a flip of the
    indices."""
    b = Builder((2, 3, 3), seed=16)
    _, indices = b.node("TopK", ["input", b.ints([1])], n_out=2, axis=1, largest=0)
    shifted = b.node("Add", [b.node("Cast", [indices], to=TensorProto.FLOAT), b.const(np.float32(0.5))])
    gate = b.node("Mul", [b.node("Relu", [b.node("Sub", [shifted, b.const(np.float32(4.0))])]),
                          b.const(np.float32(2.0))])
    logits = b.node("Reshape", [b.node("Add", [shifted, gate]), b.ints([-1, 9])])
    check(tmp_path, b, logits, allow_refusal=True, effort=oracle.LONG, seed=1)


# ---------------------------------------------------------------------------------------------- loading


def test_float16_rounding_on_the_data_path_is_not_an_internal_error(tmp_path: Path) -> None:
    """Cast to float16 and back on the data path: lipcert's executor does not round (so the cross-check
    differs), and naming the diverging node builds an onnxruntime model whose extra outputs are all declared
    float, which onnxruntime rejects: load_model raised onnxruntime's Fail instead of a LipcertError."""
    rng = np.random.default_rng(9)
    b = Builder((2, 3, 3), seed=9)
    h = b.node("Cast", [b.node("Cast", [b.node("Mul", ["input", b.const(np.float32(3.3))])], to=TensorProto.FLOAT16)],
               to=TensorProto.FLOAT)
    flat = b.node("Flatten", [h], axis=1)
    check(tmp_path, b, b.node("Gemm", [flat, b.const(orthonormal_rows(rng, 3, 18).astype(np.float32))], transB=1),
          allow_refusal=True)


@pytest.mark.parametrize("storage", ["float64", "float16"])
def test_weights_stored_in_another_precision_behind_a_cast(tmp_path: Path, storage: str) -> None:
    """A Gemm weight stored as float64 (or float16) and Cast to float32, as mixed-precision exports do. Not a
    soundness defect: lipcert refused the float64 case ("expected ... Float but found Double"), its Cast keeping
    the constant in float64."""
    rng = np.random.default_rng(10)
    b = Builder((8,), seed=10)
    w = b.weight(orthonormal_rows(rng, 3, 8), storage)
    check(tmp_path, b, b.node("Gemm", ["input", w], transB=1))


@pytest.mark.parametrize("bias", [False, True])
def test_logits_that_cannot_move_certify_nothing_when_they_tie(tmp_path: Path, bias: bool) -> None:
    """Found by the long profile: logits = 0 * Gemm(x) (+ a constant) cannot move, so every per-pair slope is 0.
    With every logit equal (no bias) the prediction is a tie, which the per-pair rule (gap 0 over slope 0)
    certified at an infinite radius, while onnxruntime's tie-break picks another class. A tie must certify
    nothing; distinct constant logits may certify any radius."""
    b = Builder((8,), seed=11)
    w = np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32)
    z = b.node("Mul", [b.node("Gemm", ["input", b.const(w)], transB=1), b.const(np.float32(0.0))])
    if bias:
        z = b.node("Add", [z, b.const(np.linspace(-1, 1, 10).astype(np.float32))])
    check(tmp_path, b, z)
    from lipcert import certify, load_model

    x = np.random.default_rng(4).random((16, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.full(16, 9 if bias else 0))
    radii = certify(load_model(tmp_path / "model.onnx"), tmp_path / "d.npz", "0.1", attack=False).samples.radii
    assert (radii == float("inf")).all() if bias else (radii == 0).all()


def test_float_error_of_a_linear_region_with_large_values(tmp_path: Path) -> None:
    """Found by the long profile: ((x + 1e4) - 1e4) * 2 and its Mean with (x + 1e4) - 1e4 form one linear region;
    its error allowance was taken from the region's (empty) chain of nodes instead of its own steps, so it was
    zero, and onnxruntime flipped certified points inside their radius."""
    b = Builder((12,), seed=13)
    shifted = b.node("Add", [b.node("Add", ["input", b.const(np.float32(1e4))]), b.const(np.float32(-1e4))])
    mean = b.node("Mean", [b.node("Mul", [shifted, b.const(np.float32(2.0))]), shifted])
    w = np.random.default_rng(6).standard_normal((8, 12)).astype(np.float32) * 0.2
    check(tmp_path, b, b.node("Gemm", [mean, b.const(w), b.const(np.zeros(8, np.float32))], transB=1),
          effort=oracle.LONG)


# ---------------------------------------------------------------------------------------------- size-dependent paths


def value_against_its_own_reshape(b: Builder, factor: str) -> str:
    """Sub(x, Reshape(x) * s) for x of shape (1, H, W) reshaped to (H, 1, W): broadcasting makes the (H, H, W)
    value x_j - s x_i over every pair (i, j) of rows, a map of norm 2 for H = 2 and s = 1."""
    _, h, w = b.sample_shape
    moved = b.node("Reshape", ["input", b.ints([-1, h, 1, w])])
    scaled = b.node("Mul", [moved, b.const(np.float32(1.0))]) if factor == "mul" else b.node("Identity", [moved])
    return b.node("Sub", ["input", scaled])


@pytest.mark.parametrize("factor", ["mul", "identity"])
def test_linear_region_of_a_value_and_its_own_reshape_broadcast_against_it(tmp_path: Path, factor: str) -> None:
    """The red-team report's model, found again by the harness with the thresholds lowered: a linear region
    Sub(x, Reshape(x) * 1) whose inputs broadcast against each other was read as one convolution (regions.as_conv)
    on the input's grid, because the scale's form ignored that its value had another shape: the kernels cancelled
    to a bound of 7e-15 where the truth is 2; verify crashed (its power iteration exceeded the bound) and the
    report certified with it. Every value's form must now describe a tensor of that value's own shape."""
    b = Builder((1, 2, 3), seed=21)
    s = value_against_its_own_reshape(b, factor)
    head = b.node("Gemm", [b.node("Flatten", [s], axis=1), b.const(np.eye(12, dtype=np.float32))], transB=1)
    with thresholds.override(**LOWERED["structured"]):
        check(tmp_path, b, head)


def test_linear_region_broadcast_against_itself_at_production_sizes(tmp_path: Path) -> None:
    """The same region large enough (1 x 2 x 4097 in, 2 x 2 x 4097 out) that production thresholds skip the
    dense SVD: its bound must stay at least its norm, 2 (each column pair gives x_j - x_i, and ||D|| = 2 for
    the 4 x 2 difference matrix D). A Relu ends the region (a linear sum after it would join the region, and the
    sum of all the differences is 0)."""
    from lipcert.bounds.propagate import propagate

    b = Builder((1, 2, 4097), seed=22, max_numel=1 << 16)
    s = b.node("Relu", [value_against_its_own_reshape(b, "mul")])
    graph = graph_of(b, b.node("ReduceSum", [b.node("Flatten", [s], axis=1), b.ints([1])], keepdims=1))
    rows = [row for row in propagate(graph, lower_bounds=False).layers if row.op.startswith("linear region")]
    assert len(rows) == 1 and rows[0].upper >= 2.0, [(row.op, row.upper, row.upper_method) for row in rows]


def class_token_region(seed: int) -> tuple[Builder, str]:
    """Concat(x, Expand(c, [N, 1, 4, 4]), conv(x)) (a class token concatenated to the features), then a dense head."""
    rng = np.random.default_rng(seed)
    b = Builder((2, 4, 4), seed=seed)
    conv = b.node("Conv", ["input", b.const((0.3 * rng.standard_normal((2, 2, 3, 3))).astype(np.float32))],
                  pads=[1, 1, 1, 1])
    batch = b.node("Slice", [b.node("Shape", ["input"]), b.ints([0]), b.ints([1]), b.ints([0])])
    token = b.node("Expand", [b.const(rng.standard_normal((1, 1, 4, 4)).astype(np.float32)),
                              b.node("Concat", [batch, b.ints([1, 4, 4])], axis=0)])
    cat = b.node("Concat", ["input", token, conv], axis=1)
    return b, b.node("Gemm", [b.node("Flatten", [cat], axis=1),
                              b.const((0.1 * rng.standard_normal((3, 80))).astype(np.float32))], transB=1)


@pytest.mark.parametrize("lowered", [None, "structured"])
def test_concat_with_a_batch_expanded_constant_in_a_linear_region(tmp_path: Path, lowered: str | None) -> None:
    """Found by the harness: Concat(x, Expand(c, [N, ...]), conv(x)) forms one linear region; the region's
    operator fed the constant's zeros with a batch of 1 while its input had a batch of many columns, so the
    concatenation raised (verify and report ended in an internal error, at every size). The constant's zeros now
    take the batch of the input."""
    with thresholds.override(**(LOWERED[lowered] if lowered else {})):
        check(tmp_path, *class_token_region(23))


def test_linear_region_after_a_concatenation_with_a_constant(tmp_path: Path) -> None:
    """Found by the harness's path sweep: Concat(x, W x, Expand(c)) then a residual dense layer on it form one
    linear region; the region's absolute map (for the float error allowance) concatenated only the data inputs,
    2 entries short, and the dense layer after it raised (an internal error at every size). The absolute map
    now runs the concatenation with the constant's zeros in place."""
    rng = np.random.default_rng(24)
    b = Builder((13,), seed=24)
    dense = b.node("Gemm", ["input", b.const((0.3 * rng.standard_normal((13, 13))).astype(np.float32))], transB=1)
    batch = b.node("Slice", [b.node("Shape", ["input"]), b.ints([0]), b.ints([1]), b.ints([0])])
    token = b.node("Expand", [b.const(rng.standard_normal((1, 2)).astype(np.float32)),
                              b.node("Concat", [batch, b.ints([2])], axis=0)])
    cat = b.node("Concat", ["input", dense, token], axis=1)
    res = b.node("Add", [cat, b.node("Gemm", [cat, b.const((0.2 * rng.standard_normal((28, 28))).astype(
        np.float32))], transB=1)])
    check(tmp_path, b, b.node("Gemm", [res, b.const((0.2 * rng.standard_normal((4, 28))).astype(np.float32))],
                              transB=1))


def test_absolute_map_of_a_region_whose_constant_broadcasts_the_sum(tmp_path: Path) -> None:
    """Found by review of the same map: Sum(x, conv(x), c) with c of 3 channels and x of 1 copies x + conv(x)
    three times; the absolute map summed the data inputs only, without the copies, so its norm (the float error
    allowance's size) was sqrt(3) times too small. It must bound the region's own norm from above."""
    from lipcert.bounds.kinds import Region
    from lipcert.bounds.propagate import propagate
    from lipcert.bounds.regions import absolute_operator
    from lipcert.bounds.rounding import nonnegative_norm

    b = Builder((1, 4, 4), seed=25)
    conv = b.node("Conv", ["input", b.const(np.full((1, 1, 3, 3), 0.1, np.float32))], pads=[1, 1, 1, 1])
    total = b.node("Sum", ["input", conv, b.const(np.arange(3, dtype=np.float32).reshape(3, 1, 1))])
    graph = graph_of(b, b.node("Flatten", [total], axis=1))
    (step,) = [s for s in propagate(graph, lower_bounds=False).steps if isinstance(s.details, Region)]
    dense = torch.linalg.matrix_norm(step.linear.to_dense(), ord=2)
    assert nonnegative_norm(absolute_operator(step)) >= float(dense) * (1 - 1e-9)


def test_a_single_logit_near_zero_is_compared_at_the_size_of_its_terms() -> None:
    """Found by the long profile (MaxMin of unequal slices, Gemm 32 -> 1, chunked thresholds): ``report`` refused
    a valid one-logit model because its end-to-end check with onnxruntime's optimised run compared a logit that
    cancels to almost nothing relative to itself (a difference of 2e-4 of a tiny logit, rounding of terms of
    size 1). The check scales each sample by the largest magnitude its output node accumulates (|W| |x| + |b|)
    when that is larger, and still refuses a difference at the size of those terms."""
    from lipcert.errors import ModelError
    from lipcert.graph.executor import GraphModule
    from lipcert.model.crosscheck import _compare_output, _output_magnitude
    from lipcert.model.loader import load_model

    graph = load_model(SAMPLES / "digits_dense.onnx")
    x = torch.rand(3, *graph.input_shape)
    values = GraphModule(graph).run_all(x)
    magnitude = _output_magnitude(graph, values, 3)
    assert magnitude is not None and magnitude.shape == (3, 1) and bool((magnitude > 0).all())
    mine = torch.full((3, 10), 1e-6, dtype=torch.float32)
    rounding = (mine.double() + 1e-6 * magnitude).numpy()  # a rounding-sized difference of a cancelling logit
    with pytest.raises(ModelError, match="differs from onnxruntime's"):
        _compare_output(graph, mine, rounding, 1e-4, "test points")
    _compare_output(graph, mine, rounding, 1e-4, "test points", magnitude)
    with pytest.raises(ModelError, match="differs from onnxruntime's"):
        _compare_output(graph, mine, (mine.double() + 1e-3 * magnitude).numpy(), 1e-4, "test points", magnitude)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_householder_by_angle_reading_negative_zero(tmp_path: Path, dynamo: bool) -> None:
    """A scale with negative entries before HouseHolder_Order_2: an input pixel at 0 gives x = -0.0, which the
    exported atan2 turns by half a turn, a jump of the deployed function (the harness broke a certified radius
    through it). The block must not be proven there; with +0.0 added first (no -0.0 left) it is, and certifies."""
    from .soundness.generator import householder_order2

    for guard in (False, True):
        b = Builder((2, 3, 3), seed=0)
        rng = np.random.default_rng(334590430)
        v = b.node("Mul", ["input", b.const(rng.uniform(-1.5, 1.5, (2, 3, 3)).astype(np.float32))])
        if guard:
            v = b.node("Add", [v, b.const(np.zeros((2, 3, 3), np.float32))])
        x, y = b.split(v, 1, [1, 1], 2)
        h = householder_order2(b, x, y, 1, rng.uniform(0.05, np.pi, (3, 1, 3, 3)), "dynamo" if dynamo else "ok")
        w = b.const(rng.standard_normal((6, 2, 1, 1)).astype(np.float32))
        out = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Conv", [h, w])])], axis=1)
        zeros = np.random.default_rng(1).random((24, 2, 3, 3)) * (np.random.default_rng(2).random((24, 2, 3, 3)) > 0.4)
        outcome = check(tmp_path, b, out, seed=430, data=zeros)
        assert (outcome.upper < float("inf")) == guard
