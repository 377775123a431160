"""Random small ONNX programs over every operator lipcert registers and every pattern it recognises.

A *program* is a sample shape, an opset, a seed for the weights, and a list of *blocks*; each block reads the
current value (a data-dependent tensor of known per-sample shape) and writes nodes with ``Builder``. The
last block is a *head* that makes the logits ``(N, k)``, 1 <= k <= 10 (k = 1: a binary model). Blocks draw
their sizes and attributes through a ``Draw`` (hypothesis' ``st.data()`` in the property tests, a seeded
numpy generator for the coverage sweep), so hypothesis can shrink a failing program.

Blocks cover: dense and convolution layers (strides, dilation, groups, asymmetric and automatic pads,
transposed convolutions, output padding), batch norm, scales and shifts by broadcast constants (including
constants larger than the data value, and large shifts such as +1e6 then -1e6), float64/float16 weights
behind Cast and constant arithmetic on initializers, pads of every mode and consecutive pads, torch's
circular-padding export (Slice/Concat) before a convolution and its near misses, reshapes and permutations,
slices and splits with every output read or unread, pooling with partial windows (ceil_mode, odd sizes,
padding, count_include_pad both ways), activations and constant max/min, sorts (TopK), operators without a
Lipschitz rule, constant subgraphs of shape operators, residual and broadcasting combinations (Add, Sub,
Sum, Mean, Max, Min, Concat, Mul), gated branches closed on [0, 1], and the patterns (SLL blocks, GroupSort,
MaxMin by Split or Slices, (Relu(x), Relu(-x)), L2-norm pooling) with near misses of each: an intermediate
value also read elsewhere ("side" values, concatenated into the head's features), a Split in B or A whose
other output is read elsewhere or whose other output A matches, A != B^T S, unequal parts that broadcast,
wrong axes, group size 1. Also values that depend on the batch size (Shape of the input used as a factor),
constant factors that are data-dependent by dataflow (0 * x + c), huge biases and pad values removed later.
Linear regions in every form the one-convolution rewrite reads (circular and grouped convolutions, signs alone,
concatenations and means with constants), reshapes to a higher rank with constants broadcast along the new axis
(and the data broadcast against itself), and Slices in every start/end/step form (negative, out of range,
INT_MIN/INT_MAX, steps above 1 and negative) inside and around regions, concatenations and partitions.
Heads: Gemm, MatMul, 1x1 conv + global pooling, and a Gemm followed by Reshape/Transpose permuting the logits; a
single logit (a binary model) also as a ReduceSum of the features, (N, 1) or (N,), or a Slice of one feature.
Polynomials in one zero-padded convolution (SOC's truncated exponential): a skew kernel, shared or copied, off skew
by a drawn amount, or a raw kernel with cancelling terms.

Every block has a main *variant* (``VARIANTS``); the focused property tests walk through all of them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from lipcert.graph.core import Node
from lipcert.graph.ops import REGISTRY, RunContext

from .build import Builder, Invalid, ort_session

BIG = 2 ** 62
SHAPES_1D = [(4,), (6,), (8,), (12,), (16,)]
SHAPES_3D = [(1, 4, 4), (2, 3, 3), (1, 5, 5), (3, 4, 4), (2, 4, 4), (1, 6, 6), (4, 3, 3), (1, 3, 5), (2, 2, 6)]
OPSETS = (17, 21)
STORAGES = ("float32",) * 8 + ("float64", "float16", "arith")
MAX_NUMEL = 512


# ---------------------------------------------------------------------------------------------- draws


class Draw:
    """Where a block's choices come from."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def bool(self) -> bool:
        return bool(self.int(0, 1))

    #: block kind -> the variant it must take (the focused tests walk through every variant)
    forced: dict[str, str] = {}

    def variant(self, kind: str) -> str:
        """The block's main form: forced when the test asks for one, else drawn (repeats weight the draw)."""
        options = VARIANTS[kind]
        wanted = self.forced.get(kind)
        if wanted is not None:
            if wanted not in options:
                raise ValueError(f"{kind} has no variant {wanted!r}")
            return wanted
        return self.choice(options)


#: the main form of each block (repeats weight the random draw); the focused tests walk through each one
VARIANTS: dict[str, list[str]] = {
    "dense": ["gemm_tB", "gemm", "gemm_alpha", "matmul"],
    "matmul_last": ["right", "right", "right", "left"],
    "conv": ["pads", "pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"],
    "conv_transpose": ["pads", "pads", "pads", "SAME_UPPER"],
    "scale": ["scalar", "channel", "full", "bigger", "swap", "div_scalar", "div_channel"],
    "shift": ["same", "smaller", "swap_sub", "swap_add", "bigger", "large", "large", "large_bias", "large_pad"],
    "unary_linear": ["Neg", "Identity", "Dropout", "Dropout"],
    "pad": ["constant", "reflect", "edge", "wrap", "wrap", "two_wraps"],
    "wrap_conv": ["ok", "ok", "ok", "mismatch", "wrong_slice", "side", "double", "double_pad", "one_axis"],
    "rearrange": ["reshape", "reshape_zero", "shape_ops", "flatten", "transpose", "transpose", "unsqueeze",
                  "depth_to_space", "space_to_depth"],
    "select": ["slice", "slice_reverse", "split_one", "split_all", "split_all", "split_unequal_side"],
    "avgpool": ["local", "local", "local", "global"],
    "act": ["Relu", "Relu", "LeakyRelu", "Abs", "Tanh", "Sigmoid", "Softplus", "Elu", "Clip", "MaxC", "MinC",
            "MaxC", "PadConst", "PRelu"],
    "maxpool": ["local", "local", "local", "global"],
    "lppool": ["local", "local", "local", "global"],
    "topk": ["unread", "unread", "side", "indices_only"],
    "nolip": ["Sign", "Sqrt", "Exp", "Log", "Reciprocal", "Pow", "Softmax", "LogSoftmax", "ReduceMax", "ReduceMin",
              "ReduceSum", "ReduceMean", "ReduceL2", "Gather", "Expand", "Tile", "Where", "MulSelf", "Mean",
              "ArgMax", "DivBy", "CastRound", "Compare", "ConstFactor", "Atan", "Floor", "IsNaN"],
    "consts": ["reshape_shape_ops", "range_scale", "const_of_shape", "where_const", "constant_node", "size_div",
               "expand_const", "batch_size"],
    "cast": ["float", "double_roundtrip", "half_roundtrip", "half_weight"],
    "residual": ["Add", "Add", "Sub", "Sum", "Mean", "Max", "Min", "Concat", "Mul"],
    "broadcast_pair": ["Add", "Sub", "Max", "Min", "Sum", "Mean"],
    "sll": ["ok", "ok", "ok", "add_form", "perturbed", "tiny_perturbed", "negative_s", "too_large", "leaky_out",
            "side_pre", "side_act", "split_b", "split_b_wrong", "split_a", "chain", "orth_skip", "orth_skip",
            "orth_skip_fused", "orth_skip_scaled", "orth_skip_wrong", "factored", "factored"],
    "groupsort": ["ok", "ok", "ok", "group1", "group_big", "side", "other_input", "wrong_concat_axis"],
    "maxmin": ["split", "split", "split_num", "slices", "slices", "unequal_split", "unequal_slices", "three_way",
               "three_way_side", "overlap", "side_max", "cross_axis"],
    "relu_neg": ["ok", "ok", "side_neg", "other_source", "three"],
    "maxmin_indexed": ["gather", "gather", "strided", "permutation", "permutation_repeat", "gather_repeat"],
    "householder": ["ok", "ok", "where", "shifted", "both_ties", "long_v"],
    "householder2": ["ok", "ok", "dynamo", "raw", "perturbed", "swapped", "uncovered", "bad_pi", "bad_mod"],
    "l2pool": ["torch", "torch", "deel", "plain", "pow_half", "side_pool", "div"],
    "split_residual": ["concat", "concat", "concat_slices", "swapped", "overlap", "sum_parts", "sum_overlap",
                       "three_parts", "scaled"],
    "l2norm": ["ok", "ok", "unequal", "same_twice", "broadcast", "mul_square", "pow_half", "side_square",
               "negative_const", "three_terms"],
    "linear_region": ["identity_conv", "identity_conv", "sub", "two_branches", "centering", "concat_branches",
                      "side", "scaled_sum"],
    "region_forms": ["circular", "grouped", "neg_sub", "concat_const", "mean_const"],
    "rank_up": ["scale", "shift", "copies", "broadcast_self", "broadcast_self"],
    "slices": ["one", "one", "two_axes", "concat_parts", "sum_parts", "region_inside", "region_around"],
    "region_whole": ["sym_pad_conv", "centred", "tail"],
    "series": ["skew", "skew", "copies", "perturbed", "cancelled"],
}


class HypothesisDraw(Draw):
    """Choices from hypothesis. Each choice is hypothesis' integer shifted by a pseudo-random offset (from a
    drawn salt, the focus and the choice's position), so that the simplest example hypothesis starts from is
    a varied program rather than the first option everywhere; shrinking still moves towards it."""

    def __init__(self, data, label: str = "") -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st
        self.salt = data.draw(st.integers(0, 2 ** 32 - 1), label="salt")
        self.label = label
        self.count = 0

    def int(self, lo: int, hi: int) -> int:
        if hi <= lo:
            return lo
        self.count += 1
        x = self.data.draw(self.st.integers(0, hi - lo))
        offset = zlib.crc32(f"{self.salt}/{self.label}/{self.count}".encode())
        return lo + (x + offset) % (hi - lo + 1)


class RandomDraw(Draw):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def int(self, lo: int, hi: int) -> int:
        return lo if hi <= lo else int(self.rng.integers(lo, hi + 1))


# ---------------------------------------------------------------------------------------------- helpers


def shape(b: Builder, v: str) -> tuple[int, ...]:
    return b.shape(v)


def need(cond: bool, why: str = "") -> None:
    if not cond:
        raise Invalid(why)


def operator_norm(op: str, in_shape: Sequence[int], consts: Sequence[torch.Tensor | None], **attrs: Any) -> float:
    """Spectral norm of the linear part of ``op`` (other inputs constant) at this per-sample input shape."""
    n = math.prod(in_shape)
    node = Node("probe", op, ["x"] + [f"c{i}" for i in range(len(consts))], ["y"], attrs)
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    zero = torch.zeros((1,) + tuple(in_shape), dtype=torch.float64)
    ctx = RunContext(torch.float64)
    try:
        with torch.no_grad():
            y = REGISTRY[op].run(node, [basis] + list(consts), ctx)[0]
            y0 = REGISTRY[op].run(node, [zero] + list(consts), ctx)[0]
    except Exception as exc:  # noqa: BLE001 - the layer does not fit this input
        raise Invalid(f"{op}: {exc}") from None
    m = (y - y0).reshape(n, -1)
    return float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0


def run_op(op: str, inputs: Sequence[torch.Tensor | None], **attrs: Any) -> torch.Tensor:
    """Output 0 of one operator of the registry, run in float64 (for constants the generator precomputes)."""
    node = Node("probe", op, [f"i{k}" for k in range(len(inputs))], ["y"], attrs)
    with torch.no_grad():
        return REGISTRY[op].run(node, list(inputs), RunContext(torch.float64))[0]


def gain(d: Draw) -> float | None:
    """Target operator norm of a layer: 1 (a 1-Lipschitz layer) most often; None keeps the raw weights."""
    return d.choice([1.0, 1.0, 1.0, 0.5, 2.0, None])


def normalised(arr: np.ndarray, norm: float, target: float | None) -> np.ndarray:
    return arr if target is None or norm <= 0 else arr * (target / norm)


def t64(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr, dtype=np.float32).astype(np.float64))


def flatten(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    if len(s) == 1:
        return v
    how = d.choice(["Flatten", "Reshape", "ShapeOps"])
    if how == "Flatten":
        return b.node("Flatten", [v], axis=1)
    return b.reshape_const(v, [math.prod(s)], via_shape_ops=how == "ShapeOps")


def to_image(d: Draw, b: Builder, v: str) -> str:
    """A rank-3 (C, H, W) view of ``v`` (a reshape when it is not one already)."""
    s = shape(b, v)
    if len(s) == 3:
        return v
    n = math.prod(s)
    options = [(c, h, n // (c * h)) for c in (1, 2, 3, 4) for h in (2, 3, 4, 5, 6)
               if n % (c * h) == 0 and n // (c * h) >= 2]
    need(bool(options), f"no image shape for {n} entries")
    return b.reshape_const(v, list(d.choice(options)))


def weight(d: Draw, b: Builder, arr: np.ndarray, stem: str = "w") -> str:
    return b.weight(arr, d.choice(STORAGES), stem)


def side(b: Builder, v: str) -> None:
    """Read ``v`` elsewhere too: the head concatenates every side value into its features."""
    b.side.append(v)


# ---------------------------------------------------------------------------------------------- linear blocks


def blk_dense(d: Draw, b: Builder, v: str) -> str:
    v = flatten(d, b, v)
    n = b.numel(v)
    need(n <= 256)
    m = d.int(2, 16)
    w = b.rng.standard_normal((m, n))
    w = normalised(w, float(np.linalg.norm(w, 2)), gain(d))
    bias = b.const(b.rng.standard_normal(m).astype(np.float32) * 0.1) if d.bool() else None
    form = d.variant("dense")
    b.note(f"dense {n}->{m} ({form})")
    if form == "gemm_tB":
        return b.node("Gemm", [v, weight(d, b, w)] + ([bias] if bias else []), transB=1)
    if form == "gemm":
        return b.node("Gemm", [v, weight(d, b, w.T)] + ([bias] if bias else []))
    if form == "gemm_alpha":
        alpha = d.choice([0.5, 2.0, -1.0])
        return b.node("Gemm", [v, weight(d, b, w / alpha)] + ([bias] if bias else []), transB=1, alpha=alpha,
                      beta=d.choice([1.0, 0.5]))
    out = b.node("MatMul", [v, weight(d, b, w.T)])
    return b.node("Add", [out, bias]) if bias else out


def blk_matmul_last(d: Draw, b: Builder, v: str) -> str:
    """MatMul by a 2-D constant along the last axis of a rank >= 2 value (or by a constant on the left: no rule)."""
    s = shape(b, v)
    if len(s) == 1:
        options = [[a, s[0] // a] for a in range(2, s[0]) if s[0] % a == 0]
        need(bool(options))
        v = b.reshape_const(v, d.choice(options))
        s = shape(b, v)
    m = d.int(1, 5)
    if d.variant("matmul_last") == "left":  # constant @ value: linear, but lipcert has no linear map for input 1
        c = b.const(b.rng.standard_normal((m, s[-2])).astype(np.float32) * 0.5)
        b.note(f"matmul constant({m}x{s[-2]}) @ value")
        return b.node("MatMul", [c, v])
    w = b.rng.standard_normal((s[-1], m))
    w = normalised(w, float(np.linalg.norm(w, 2)), gain(d))
    b.note(f"matmul last axis {s[-1]}->{m}")
    return b.node("MatMul", [v, weight(d, b, w)])


def conv_attrs(d: Draw, spatial: Sequence[int], kernel: Sequence[int]) -> dict:
    nd = len(spatial)
    attrs: dict[str, Any] = {}
    strides = [d.int(1, 2) for _ in range(nd)]
    dil = [d.int(1, 2) if k > 1 else 1 for k in kernel]
    if any(s != 1 for s in strides):
        attrs["strides"] = strides
    if any(x != 1 for x in dil):
        attrs["dilations"] = dil
    mode = d.variant("conv")
    if mode.startswith("SAME") and "dilations" in attrs:
        mode = "pads"  # onnxruntime refuses dilation with SAME padding
    if mode == "pads":
        ext = [(k - 1) * x + 1 for k, x in zip(kernel, dil)]
        attrs["pads"] = [d.int(0, min(2, e - 1)) for e in ext] + [d.int(0, min(2, e - 1)) for e in ext]
    elif mode != "none":
        attrs["auto_pad"] = mode
    return attrs


def blk_conv(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    if len(s) not in (2, 3):
        v = to_image(d, b, v)
        s = shape(b, v)
    c, spatial = s[0], s[1:]
    cout = d.int(1, 6)
    groups = [g for g in range(1, c + 1) if c % g == 0 and cout % g == 0]
    g = d.choice(groups)
    kernel = [d.int(1, min(3, n + 1)) for n in spatial]
    attrs = conv_attrs(d, spatial, kernel)
    w = b.rng.standard_normal((cout, c // g) + tuple(kernel))
    norm = operator_norm("Conv", s, [t64(w)], group=g, **attrs)
    w = normalised(w, norm, gain(d))
    ins = [v, weight(d, b, w)]
    if d.bool():
        ins.append(b.const(b.rng.standard_normal(cout).astype(np.float32) * 0.1))
    b.note(f"conv {s}->{cout} k{kernel} group {g} {attrs}")
    out = b.node("Conv", ins, group=g, **attrs)
    need(b.numel(out) <= MAX_NUMEL)
    return out


def blk_conv_transpose(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    if len(s) not in (2, 3):
        v = to_image(d, b, v)
        s = shape(b, v)
    c, spatial = s[0], s[1:]
    g = d.choice([x for x in (1, 2) if c % x == 0])
    cout_g = d.int(1, 3)
    kernel = [d.int(1, 3) for _ in spatial]
    strides = [d.int(1, 2) for _ in spatial]
    dil = [d.int(1, 2) if k > 1 else 1 for k in kernel]
    attrs: dict[str, Any] = {"strides": strides, "dilations": dil, "group": g}
    if d.variant("conv_transpose") == "SAME_UPPER":
        attrs["auto_pad"] = "SAME_UPPER"
    else:
        ext = [(k - 1) * x + 1 for k, x in zip(kernel, dil)]
        attrs["pads"] = [d.int(0, e - 1) // 2 for e in ext] + [d.int(0, e - 1) // 2 for e in ext]
        attrs["output_padding"] = [d.int(0, st - 1) for st in strides]
    w = b.rng.standard_normal((c, cout_g) + tuple(kernel))
    norm = operator_norm("ConvTranspose", s, [t64(w)], **attrs)
    w = normalised(w, norm, gain(d))
    ins = [v, weight(d, b, w)]
    if d.bool():
        ins.append(b.const(b.rng.standard_normal(cout_g * g).astype(np.float32) * 0.1))
    b.note(f"conv-transpose {s} -> {cout_g * g} k{kernel} {attrs}")
    out = b.node("ConvTranspose", ins, **attrs)
    need(b.numel(out) <= MAX_NUMEL and all(n >= 1 for n in shape(b, out)))
    return out


def blk_batchnorm(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    need(len(s) >= 2, "batch norm needs channels")
    c = s[0]
    scale = b.rng.standard_normal(c) * d.choice([0.5, 1.0, 2.0])
    var = b.rng.uniform(0.5, 2.0, c)
    ins = [v] + [b.const(a.astype(np.float32)) for a in
                 (scale, b.rng.standard_normal(c) * 0.1, b.rng.standard_normal(c) * 0.1, var)]
    b.note(f"batch norm over {c} channels")
    return b.node("BatchNormalization", ins, epsilon=d.choice([1e-5, 1e-3]))


def channel_shape(s: Sequence[int], c: int) -> tuple[int, ...]:
    return (c,) + (1,) * (len(s) - 1)


def blk_scale(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    form = d.variant("scale")
    if form == "bigger":  # a constant with more channels than the data value: the data value is broadcast
        need(len(s) >= 2 and s[0] == 1)
        k = d.int(2, 4)
        c = b.const((b.rng.standard_normal(channel_shape(s, k)) * 0.7).astype(np.float32))
        b.note(f"Mul of a 1-channel value by a {k}-channel constant (broadcast)")
        return b.node("Mul", [v, c] if d.bool() else [c, v])
    if form in ("scalar", "swap", "div_scalar"):
        value = d.choice([0.5, -1.5, 2.0, 1.0, -1.0])
        c = b.const(np.float32(value)) if d.bool() else b.const(np.full((1,) * len(s), value, np.float32))
    elif form in ("channel", "div_channel"):
        c = b.const((b.rng.uniform(0.5, 1.5, channel_shape(s, s[0])) * b.rng.choice([-1, 1], s[0]).reshape(
            channel_shape(s, s[0]))).astype(np.float32))
    else:
        c = b.const(b.rng.uniform(-1.5, 1.5, s).astype(np.float32))
    b.note(f"scale ({form})")
    if form.startswith("div"):
        return b.node("Div", [v, c])
    return b.node("Mul", [c, v] if form == "swap" else [v, c])


def blk_shift(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    form = d.variant("shift")
    if form == "large":  # (x + L) - L: exact in reals, rounds x to the float32 grid near L
        big = d.choice([1e4, 1e6, 1e6, 4e6])
        b.note(f"large shift +{big:g} then -{big:g}")
        up = b.node("Add", [v, b.const(np.float32(big))])
        if d.bool():
            return b.node("Sub", [up, b.const(np.float32(big))])
        return b.node("Add", [up, b.const(np.float32(-big))])
    if form == "large_bias":  # a layer whose bias is huge, removed again later: large intermediate values
        big = d.choice([1e5, 1e6])
        flat = flatten(d, b, v)
        n = b.numel(flat)
        w = b.rng.standard_normal((n, n))
        w = w / float(np.linalg.norm(w, 2))
        h = b.node("Gemm", [flat, b.const(w.astype(np.float32)), b.const(np.full(n, big, np.float32))], transB=1)
        b.note(f"Gemm with bias {big:g}, then -{big:g}")
        return b.node("Sub", [h, b.const(np.float32(big))])
    if form == "large_pad":  # pad with a huge constant, convolve, then subtract the huge part again
        need(len(s) in (2, 3))
        big = d.choice([3e3, 1e4, 1e6])
        rank = len(s) + 1
        pads = [0] * (2 * rank)
        pads[rank - 1], pads[2 * rank - 1] = 1, 1
        padded = b.pad(v, pads, "constant", value=big)
        k = [1] * (len(s) - 2) + [3]
        w = b.rng.standard_normal((1, s[0]) + tuple(k))
        w = normalised(w, operator_norm("Conv", shape(b, padded), [t64(w)]), 1.0)
        conv = b.node("Conv", [padded, b.const(w.astype(np.float32))])
        x0 = torch.zeros((1,) + shape(b, padded), dtype=torch.float64)
        x0[..., 0], x0[..., -1] = big, big
        offset = run_op("Conv", [x0, t64(w)])
        b.note(f"pad with {big:g}, conv, remove the padding's contribution")
        return b.node("Sub", [conv, b.const(offset[0].numpy().astype(np.float32))])
    if form == "bigger":
        need(len(s) >= 2 and s[0] == 1)
        k = d.int(2, 4)
        c = b.const(b.rng.standard_normal(channel_shape(s, k)).astype(np.float32))
        b.note(f"Add of a 1-channel value and a {k}-channel constant (broadcast)")
        return b.node("Add", [v, c] if d.bool() else [c, v])
    c = b.const(b.rng.standard_normal(s if form in ("same", "swap_sub", "swap_add")
                                      else channel_shape(s, s[0])).astype(np.float32))
    b.note(f"shift ({form})")
    if form == "swap_sub":
        return b.node("Sub", [c, v])
    if form == "swap_add":
        return b.node("Add", [c, v])
    return b.node(d.choice(["Add", "Sub"]), [v, c])


def blk_unary_linear(d: Draw, b: Builder, v: str) -> str:
    op = d.variant("unary_linear")
    b.note(op)
    if op != "Dropout":
        return b.node(op, [v])
    form = d.int(0, 3)
    ins = [v]
    if form >= 1:
        ins.append(b.const(np.float32(d.choice([0.0, 0.3]))))
    if form >= 2:
        ins.append(b.const(np.bool_(False), np.bool_))
    if form == 3:
        out, _mask = b.node("Dropout", ins, n_out=2)
        return out
    return b.node("Dropout", ins)


def pad_amounts(d: Draw, s: Sequence[int], mode: str, axes: Sequence[int]) -> list[int]:
    begins, ends = [], []
    for a in axes:
        n = s[a - 1]
        if mode == "constant":
            lo, hi = (-1 if n > 2 else 0), 2
        elif mode == "reflect":
            lo, hi = 0, min(2, n - 1)
        elif mode == "wrap":
            lo, hi = 0, min(2, n)
        else:
            lo, hi = 0, 2
        begins.append(d.int(lo, hi))
        ends.append(d.int(lo, hi))
    return begins + ends


def one_pad(d: Draw, b: Builder, v: str, mode: str | None = None) -> str:
    s = shape(b, v)
    modes = ["constant", "reflect", "edge"] + (["wrap", "wrap"] if b.opset >= 19 else [])
    mode = mode or d.choice(modes)
    spatial = list(range(2, len(s) + 1)) if len(s) >= 2 else [1]
    if mode == "constant" and len(s) >= 2 and d.int(0, 3) == 0:
        spatial = [1] + spatial  # pad the channels too
    pads = pad_amounts(d, s, mode, spatial)
    value = None
    if mode == "constant" and d.int(0, 2) == 0:
        value = d.choice([0.0, 0.5, -1.0])
    rank = len(s) + 1
    if b.opset >= 18 and d.bool():
        out = b.pad(v, pads, mode, value=value if value is not None else 0.0, axes=spatial)
    else:
        full = [0] * (2 * rank)
        for i, a in enumerate(spatial):
            full[a], full[a + rank] = pads[i], pads[i + len(spatial)]
        out = b.pad(v, full, mode, value=value)
    b.note(f"pad {mode} {pads} on axes {spatial}" + (f" value {value}" if value else ""))
    need(b.numel(out) <= MAX_NUMEL and all(n >= 1 for n in shape(b, out)))
    return out


def blk_pad(d: Draw, b: Builder, v: str) -> str:
    """One or two consecutive pads of any modes, then (often) a convolution without padding."""
    s = shape(b, v)
    if len(s) == 1 and d.bool():
        v = to_image(d, b, v)
    before = shape(b, v)
    first = d.variant("pad")
    if first in ("wrap", "two_wraps"):
        need(b.opset >= 19, "wrap pads need opset 19")
    v = one_pad(d, b, v, "wrap" if first == "two_wraps" else first)
    if first == "two_wraps" or d.bool():
        v = one_pad(d, b, v, "wrap" if first == "two_wraps" else None)
    after = shape(b, v)
    if len(after) in (2, 3) and (first == "two_wraps" or d.int(0, 2) > 0):
        # a kernel spanning the added size: wrap pads then make a circular convolution
        kernel = [max(1, min(a - bb + 1, a)) for a, bb in zip(after[1:], before[1:])] if len(before) == len(after) \
            else [1] * (len(after) - 1)
        c, cout = after[0], d.int(1, 4)
        w = b.rng.standard_normal((cout, c) + tuple(kernel))
        w = normalised(w, operator_norm("Conv", after, [t64(w)]), gain(d))
        b.note(f"conv k{kernel} without padding after the pads")
        v = b.node("Conv", [v, weight(d, b, w)])
    return v


def wrap_concat(d: Draw, b: Builder, v: str, axis: int, p: int, q: int, variant: str = "ok") -> str:
    """torch's circular-padding export along per-sample axis ``axis``: Concat(x[-p:], x, x[:q])."""
    parts = []
    if p:
        if variant == "wrong_slice":
            parts.append(b.slice(v, [-p - 1], [-1], [axis]))
        else:
            parts.append(b.slice(v, [-p], [BIG], [axis]))
    parts.append(v)
    if q:
        parts.append(b.slice(v, [0], [q], [axis]))
    if variant == "side" and len(parts) > 1:
        side(b, parts[0] if p else parts[-1])
    return b.node("Concat", parts, axis=axis)


def blk_wrap_conv(d: Draw, b: Builder, v: str) -> str:
    """Circular padding as torch exports it (Slice/Concat per axis), or a wrap Pad, then an unpadded conv."""
    s = shape(b, v)
    if len(s) != 3:
        v = to_image(d, b, v)
        s = shape(b, v)
    variant = d.variant("wrap_conv")
    axes = [2, 3] if variant != "one_axis" else [d.choice([2, 3])]
    total = {2: 0, 3: 0}
    for a in axes:
        n = s[a - 1]
        p, q = d.int(0, min(2, n)), d.int(0, min(2, n))
        if p + q == 0:
            p = 1
        v = wrap_concat(d, b, v, a, p, q, variant if variant in ("wrong_slice", "side") else "ok")
        total[a] += p + q
        if variant in ("double", "double_pad"):
            if variant == "double_pad" and b.opset >= 19:
                pads = [0] * 8
                pads[a], pads[a + 4] = 1, 1
                v = b.pad(v, pads, "wrap")
                total[a] += 2
            else:
                v = wrap_concat(d, b, v, a, 1, 1)
                total[a] += 2
    c, cout = s[0], d.int(1, 4)
    dil = d.choice([1, 1, 2])
    kernel = []
    for a in (2, 3):
        k = total[a] + 1
        if variant == "mismatch":
            k = max(1, k + d.choice([-1, 1]))
        if dil == 2 and (k - 1) % 2 == 0 and k > 1:
            kernel.append((k - 1) // 2 + 1)
        else:
            kernel.append(k)
    attrs: dict[str, Any] = {}
    if dil == 2 and any((total[a] % 2 == 0 and total[a] > 0) for a in (2, 3)):
        attrs["dilations"] = [2 if (total[a] % 2 == 0 and total[a] > 0 and variant != "mismatch") else 1
                              for a in (2, 3)]
        kernel = [(total[a]) // 2 + 1 if attrs["dilations"][i] == 2 else kernel[i] for i, a in enumerate((2, 3))]
    if d.int(0, 3) == 0:
        attrs["strides"] = [d.int(1, 2), d.int(1, 2)]
    padded = shape(b, v)
    w = b.rng.standard_normal((cout, c) + tuple(kernel))
    w = normalised(w, operator_norm("Conv", padded, [t64(w)], **attrs), gain(d))
    b.note(f"circular conv via Slice/Concat ({variant}) pads {total} kernel {kernel} {attrs}")
    out = b.node("Conv", [v, weight(d, b, w)], **attrs)
    need(all(n >= 1 for n in shape(b, out)))
    return out


def factorisations(n: int) -> list[list[int]]:
    out = [[n]]
    for a in range(2, n):
        if n % a == 0:
            out.append([a, n // a])
            for c in range(2, n // a):
                if (n // a) % c == 0:
                    out.append([a, c, n // a // c])
    return out


def blk_rearrange(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    n = math.prod(s)
    form = d.variant("rearrange")
    b.note(f"rearrange ({form})")
    if form == "reshape":
        return b.reshape_const(v, d.choice(factorisations(n)))
    if form == "reshape_zero":
        need(len(s) >= 2)
        return b.node("Reshape", [v, b.ints([0, s[0], -1])])
    if form == "shape_ops":
        full = b.node("Shape", [v])
        head = b.node("Slice", [full, b.ints([0]), b.ints([1]), b.ints([0])])
        tail = b.node("Constant", [], value=onnx.helper.make_tensor("t", TensorProto.INT64, [1], [-1]))
        return b.node("Reshape", [v, b.node("Concat", [head, tail], axis=0)])
    if form == "flatten":
        return b.node("Flatten", [v], axis=1)
    if form == "transpose":
        need(len(s) >= 2)
        perm = list(b.rng.permutation(len(s)) + 1)
        return b.node("Transpose", [v], perm=[0] + [int(p) for p in perm])
    if form == "unsqueeze":
        axis = d.int(1, len(s) + 1)
        u = b.squeeze("Unsqueeze", v, [axis])
        if d.bool():
            return b.squeeze("Squeeze", u, [axis])
        return u
    need(len(s) == 3)
    if form == "depth_to_space":
        need(s[0] % 4 == 0)
        return b.node("DepthToSpace", [v], blocksize=2, mode=d.choice(["DCR", "CRD"]))
    need(s[1] % 2 == 0 and s[2] % 2 == 0)
    return b.node("SpaceToDepth", [v], blocksize=2)


def blk_select(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    form = d.variant("select")
    axis = d.int(1, len(s))
    n = s[axis - 1]
    if form == "slice":
        need(n >= 2)
        start = d.int(0, n - 1)
        end = d.int(start + 1, n)
        step = d.int(1, 2)
        b.note(f"slice axis {axis} {start}:{end}:{step}")
        return b.slice(v, [start], [end], [axis], [step])
    if form == "slice_reverse":
        b.note(f"slice axis {axis} reversed")
        return b.slice(v, [-1], [-BIG], [axis], [-1])
    need(n >= 2)
    parts = d.int(2, min(3, n))
    if form == "split_unequal_side" or d.bool():
        cuts = sorted(set(int(x) for x in b.rng.choice(np.arange(1, n), parts - 1, replace=False)))
        sizes = [e - s0 for s0, e in zip([0] + cuts, cuts + [n])]
    else:
        need(n % parts == 0)
        sizes = None
    outs = b.split(v, axis, sizes, len(sizes) if sizes else parts)
    b.note(f"split axis {axis} sizes {sizes or parts} ({form})")
    if form == "split_one":
        return d.choice(outs)
    if form == "split_unequal_side":
        keep = d.int(0, len(outs) - 1)
        for k, o in enumerate(outs):
            if k != keep and d.bool():
                side(b, o)
        return outs[keep]
    order = [int(i) for i in b.rng.permutation(len(outs))]
    return b.node("Concat", [outs[i] for i in order], axis=axis)


def batch_constant(b: Builder, v: str, arr: np.ndarray) -> str:
    """A constant repeated over the batch (Expand to Shape(v)[0:1] + its shape): Concat needs one per sample."""
    c = b.const(arr[None].astype(np.float32))
    batch = b.node("Slice", [b.node("Shape", [v]), b.ints([0]), b.ints([1]), b.ints([0])])
    target = b.node("Concat", [batch, b.ints(list(arr.shape))], axis=0)
    return b.node("Expand", [c, target])


def blk_concat_const(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    axis = d.int(1, len(s))
    cs = list(s)
    cs[axis - 1] = d.int(1, 3)
    c = batch_constant(b, v, b.rng.standard_normal(cs) * d.choice([0.0, 1.0]))
    b.note(f"concat with a constant on axis {axis}")
    return b.node("Concat", [v, c] if d.bool() else [c, v], axis=axis)


def pool_attrs(d: Draw, spatial: Sequence[int], allow_dilation: bool = False, max_kernel: int = 3) -> dict:
    kernel = [d.int(1, min(max_kernel, n + 1)) for n in spatial]
    attrs: dict[str, Any] = {"kernel_shape": kernel}
    strides = [d.int(1, 3) for _ in spatial]
    attrs["strides"] = strides
    if d.bool():
        attrs["pads"] = [d.int(0, k - 1) for k in kernel] + [d.int(0, k - 1) for k in kernel]
    if d.bool():
        attrs["ceil_mode"] = 1
        # no window may start past the end (onnxruntime keeps such a window, torch and lipcert drop it)
        attrs["strides"] = [min(st, k) for st, k in zip(strides, kernel)]
    if allow_dilation and d.int(0, 2) == 0:
        attrs["dilations"] = [d.int(1, 2) for _ in spatial]
    return attrs


def image_or_line(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    if len(s) in (2, 3):
        return v
    return to_image(d, b, v)


def blk_avgpool(d: Draw, b: Builder, v: str) -> str:
    v = image_or_line(d, b, v)
    s = shape(b, v)
    if d.variant("avgpool") == "global":
        b.note("global average pool")
        return b.node("GlobalAveragePool", [v])
    attrs = pool_attrs(d, s[1:])
    attrs["count_include_pad"] = d.int(0, 1)
    b.note(f"average pool {attrs}")
    return b.node("AveragePool", [v], **attrs)


# ---------------------------------------------------------------------------------------------- rules


def blk_act(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    op = d.variant("act")
    if op == "LeakyRelu":
        alpha = d.choice([0.01, 0.2, -0.5, 1.5, 3.0])
        b.note(f"LeakyRelu {alpha}")
        return b.node("LeakyRelu", [v], alpha=alpha)
    if op == "Elu":
        alpha = d.choice([1.0, 0.5, 2.0])
        b.note(f"Elu {alpha}")
        return b.node("Elu", [v], alpha=alpha)
    if op == "Clip":
        form = d.int(0, 3)
        lo = b.const(np.float32(-0.2)) if form in (1, 3) else ""
        hi = b.const(np.float32(0.4)) if form in (2, 3) else ""
        b.note(f"Clip form {form}")
        ins = [v, lo, hi]
        while ins and ins[-1] == "":
            ins.pop()
        return b.node("Clip", ins)
    if op in ("MaxC", "MinC"):
        form = d.choice(["scalar", "channel", "same", "bigger"])
        if form == "bigger":
            need(len(s) >= 2 and s[0] == 1)
            cshape = channel_shape(s, d.int(2, 4))
        else:
            cshape = {"scalar": (), "channel": channel_shape(s, s[0]), "same": s}[form]
        c = b.const((b.rng.standard_normal(cshape) * 0.3).astype(np.float32))
        b.note(f"{op[:3]} with a constant ({form} {cshape})")
        return b.node(op[:3], [v, c] if d.bool() else [c, v])
    if op == "PadConst":
        return one_pad(d, b, v, "constant")
    if op == "PRelu":  # ONNX broadcasts the slope to x only (unidirectional)
        form = d.choice(["scalar", "channel", "same"])
        cshape = {"scalar": (1,), "channel": channel_shape(s, s[0]), "same": s}[form]
        slope = b.rng.uniform(-1.5, 1.5, cshape).astype(np.float32)
        b.note(f"PRelu with a {form} slope (largest |slope| {float(np.abs(slope).max()):.3g})")
        return b.node("PRelu", [v, b.const(slope)])
    b.note(op)
    return b.node(op, [v])


def blk_maxpool(d: Draw, b: Builder, v: str) -> str:
    v = image_or_line(d, b, v)
    s = shape(b, v)
    if d.variant("maxpool") == "global":
        b.note("global max pool")
        return b.node("GlobalMaxPool", [v])
    attrs = pool_attrs(d, s[1:], allow_dilation=True)
    b.note(f"max pool {attrs}")
    return b.node("MaxPool", [v], **attrs)


def blk_lppool(d: Draw, b: Builder, v: str) -> str:
    v = image_or_line(d, b, v)
    s = shape(b, v)
    p = d.choice([2, 2, 1, 3])
    if d.variant("lppool") == "global":
        b.note(f"global Lp pool p={p}")
        return b.node("GlobalLpPool", [v], p=p)
    attrs = pool_attrs(d, s[1:])
    if b.opset < 18:
        attrs.pop("ceil_mode", None)
    b.note(f"Lp pool p={p} {attrs}")
    return b.node("LpPool", [v], p=p, **attrs)


def blk_topk(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    axis = d.int(1, len(s))
    n = s[axis - 1]
    k = d.choice([n, n, d.int(1, n)])
    largest = d.choice([1, 1, 0])
    values, indices = b.node("TopK", [v, b.ints([k])], n_out=2, axis=axis if d.bool() else axis - len(s) - 1,
                             largest=largest)
    use = d.variant("topk")
    b.note(f"TopK axis {axis} k {k}/{n} largest {largest}, indices {use}")
    if use == "side":
        side(b, b.node("Cast", [indices], to=TensorProto.FLOAT))
    if use == "indices_only":  # the values output unread, the indices (a staircase) used
        return b.node("Add", [b.node("Cast", [indices], to=TensorProto.FLOAT),
                              b.node("Mul", [v, b.const(np.float32(0.5))]) if shape(b, v) == shape(b, values)
                              else b.const(np.float32(0.0))])
    return values


def positive(b: Builder, v: str) -> str:
    return b.node("Add", [b.node("Abs", [v]), b.const(np.float32(1.0))])


def blk_nolip(d: Draw, b: Builder, v: str) -> str:
    """Operators without a Lipschitz rule on the data path (the bound becomes infinite)."""
    s = shape(b, v)
    op = d.variant("nolip")
    b.note(f"no-rule operator {op}")
    if op == "Sign":
        return b.node("Sign", [v])
    if op in ("Sqrt", "Log", "Reciprocal"):
        return b.node(op, [positive(b, v)])
    if op == "Exp":
        return b.node("Exp", [b.node("Clip", [v, b.const(np.float32(-5)), b.const(np.float32(3))])])
    if op == "Pow":
        e = d.choice([2.0, 3.0, 0.5])
        base = positive(b, v) if e == 0.5 else v
        return b.node("Pow", [base, b.const(np.float32(e))])
    if op in ("Softmax", "LogSoftmax"):
        return b.node(op, [v], axis=d.choice([-1, 1]))
    if op.startswith("Reduce"):
        axis = d.int(1, len(s))
        return b.reduce(op, v, [axis], keepdims=d.int(0, 1) if len(s) > 1 else 1)
    if op == "Gather":
        axis = d.int(1, len(s))
        idx = b.ints([int(i) for i in b.rng.integers(-s[axis - 1], s[axis - 1], d.int(1, 4))])
        return b.node("Gather", [v, idx], axis=axis)
    if op == "Expand":
        need(s[0] == 1 or len(s) >= 1)
        target = [1, d.int(2, 3)] + list(s[1:]) if s[0] == 1 else [1] + list(s)
        return b.node("Expand", [v, b.ints(target)])
    if op == "Tile":
        reps = [1] + [d.int(1, 2) for _ in s]
        need(math.prod(reps) * math.prod(s) <= MAX_NUMEL)
        return b.node("Tile", [v, b.ints(reps)])
    if op == "Where":
        cond = b.node("Greater", [v, b.const(np.float32(0.5))])
        return b.node("Where", [cond, v, b.const(np.float32(0.0))])
    if op == "Compare":
        c1 = b.node("Less", [v, b.const(np.float32(0.3))])
        c2 = b.node("Equal", [b.node("Sign", [v]), b.const(np.float32(1.0))])
        c = b.node("Or", [b.node("And", [c1, c2]), b.node("Less", [v, b.const(np.float32(-2.0))])])
        if d.bool():
            c = b.node("Not", [c])
        return b.node("Where", [c, v, b.node("Neg", [v])])
    if op == "MulSelf":
        return b.node("Mul", [v, v])
    if op in ("Atan", "Floor"):
        return b.node(op, [b.node("Mul", [v, b.const(np.float32(4.0))])])
    if op == "IsNaN":  # a 0/0 guard: where v is 0, 1 (NaN, replaced), else v / v
        ratio = b.node("Div", [v, v])
        return b.node("Mul", [v, b.node("Where", [b.node("IsNaN", [ratio]), b.const(np.float32(1.0)), ratio])])
    if op == "Mean":
        return b.node("Mean", [v, b.node("Relu", [v])])
    if op == "ArgMax":
        axis = d.int(1, len(s))
        am = b.node("ArgMax", [v], axis=axis, keepdims=1, select_last_index=d.int(0, 1))
        return b.node("Add", [v, b.node("Cast", [am], to=TensorProto.FLOAT)])
    if op == "DivBy":
        return b.node("Div", [b.const(np.float32(1.0)), positive(b, v)])
    if op == "ConstFactor":  # k = 0 * v + c is data-dependent by dataflow but constant: Mul(k, v) = c v
        k = b.node("Add", [b.node("Mul", [v, b.const(np.float32(0.0))]), b.const(np.float32(d.choice([2.0, -3.0])))])
        return b.node("Mul", [k, v] if d.bool() else [v, k])
    # CastRound: through an integer type and back (a staircase)
    return b.node("Cast", [b.node("Cast", [b.node("Mul", [v, b.const(np.float32(4.0))])], to=TensorProto.INT64)],
                  to=TensorProto.FLOAT)


def blk_consts(d: Draw, b: Builder, v: str) -> str:
    """Constant subgraphs that loading folds: shape arithmetic, Range, ConstantOfShape, comparisons, Where,
    Constant nodes, arithmetic on initializers; combined with the data value linearly."""
    s = shape(b, v)
    form = d.variant("consts")
    b.note(f"constant subgraph ({form})")
    if form == "reshape_shape_ops":
        full = b.node("Shape", [v])
        batch = b.node("Gather", [full, b.ints([0])], axis=0)
        rest = b.node("Slice", [full, b.ints([1]), b.ints([BIG]), b.ints([0])])
        flat = b.node("Cast", [b.node("Cast", [rest], to=TensorProto.FLOAT)], to=TensorProto.INT64)
        target = b.node("Concat", [batch, b.ints([-1])], axis=0) if d.bool() else \
            b.node("Concat", [batch, flat], axis=0)
        return b.node("Reshape", [v, target])
    if form == "range_scale":
        n = math.prod(s)
        r = b.node("Range", [b.const(np.float32(1.0)), b.const(np.float32(n + 1)), b.const(np.float32(1.0))])
        r = b.node("Div", [r, b.const(np.float32(n))])
        r = b.node("Reshape", [r, b.ints(list(s))])
        return b.node("Mul", [v, r])
    if form == "const_of_shape":
        shp = b.node("Shape", [v])
        zeros = b.node("ConstantOfShape", [shp], value=onnx.helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))
        return b.node("Add", [v, zeros])
    if form == "where_const":
        c1 = b.const(b.rng.standard_normal(s).astype(np.float32))
        cond = b.node("Greater", [c1, b.const(np.float32(0.0))])
        factor = b.node("Where", [cond, b.const(np.float32(0.5)), b.const(np.float32(-1.0))])
        return b.node("Mul", [v, factor])
    if form == "constant_node":
        kind = d.choice(["value", "value_float", "value_floats"])
        if kind == "value":
            c = b.node("Constant", [], value=onnx.helper.make_tensor("c", TensorProto.FLOAT, [1], [0.75]))
        elif kind == "value_float":
            c = b.node("Constant", [], value_float=1.5)
        else:
            c = b.node("Constant", [], value_floats=[0.5])
        return b.node("Mul", [v, c])
    if form == "size_div":
        size = b.node("Cast", [b.node("Size", [v])], to=TensorProto.FLOAT)
        per = b.node("Div", [size, b.node("Cast", [b.node("Gather", [b.node("Shape", [v]), b.ints([0])], axis=0)],
                                              to=TensorProto.FLOAT)])
        return b.node("Div", [v, b.node("Sqrt", [per])])
    if form == "batch_size":  # a factor that is the batch size: the per-sample function depends on the batch
        n = b.node("Cast", [b.node("Gather", [b.node("Shape", [v]), b.ints([0])], axis=0)], to=TensorProto.FLOAT)
        return b.node(d.choice(["Mul", "Div"]), [v, n])
    c = b.const(np.float32(0.5))
    e = b.node("Expand", [c, b.node("Shape", [v])])
    return b.node("Mul", [v, e])


def blk_cast(d: Draw, b: Builder, v: str) -> str:
    form = d.variant("cast")
    b.note(f"cast ({form})")
    if form == "float":
        return b.node("Cast", [v], to=TensorProto.FLOAT)
    if form == "double_roundtrip":
        dv = b.node("Cast", [v], to=TensorProto.DOUBLE)
        dv = b.node("Mul", [dv, b.const(np.float64(0.5), np.float64)])
        return b.node("Cast", [dv], to=TensorProto.FLOAT)
    if form == "half_roundtrip":  # data rounded to float16 and back: a staircase, no Lipschitz rule
        return b.node("Cast", [b.node("Cast", [v], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    # a float32 weight rounded through float16 (a mixed-precision export): the deployed scale is the rounded one
    s = shape(b, v)
    c = b.const((1.0 + b.rng.uniform(-1e-3, 1e-3, channel_shape(s, s[0]))).astype(np.float32))
    ch = b.node("Cast", [b.node("Cast", [c], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    return b.node("Mul", [v, ch])


# ---------------------------------------------------------------------------------------------- combinations


def branch(d: Draw, b: Builder, v: str, keep_shape: bool = True) -> str:
    """A short branch from ``v`` (same per-sample shape unless ``keep_shape`` is False)."""
    s = shape(b, v)
    form = d.choice(["conv", "act", "scale", "dense", "identity", "act_conv"])
    if form in ("conv", "act_conv") and len(s) in (2, 3):
        x = b.node("Relu", [v]) if form == "act_conv" else v
        k = [d.choice([1, 3]) for _ in s[1:]]
        w = b.rng.standard_normal((s[0], s[0]) + tuple(k))
        attrs = {"pads": [x_ // 2 for x_ in k] * 2}
        w = normalised(w, operator_norm("Conv", s, [t64(w)], **attrs), gain(d))
        return b.node("Conv", [x, weight(d, b, w)], **attrs)
    if form == "dense" and len(s) == 1:
        w = b.rng.standard_normal((s[0], s[0]))
        w = normalised(w, float(np.linalg.norm(w, 2)), gain(d))
        return b.node("Gemm", [v, weight(d, b, w)], transB=1)
    if form in ("act", "act_conv"):
        return b.node(d.choice(["Relu", "Tanh", "Abs"]), [v])
    if form == "scale":
        return b.node("Mul", [v, b.const(np.float32(d.choice([0.5, -1.0, 2.0])))])
    return b.node("Identity", [v])


def one_channel(d: Draw, b: Builder, v: str) -> str:
    """A 1-channel linear function of ``v`` (a conv to 1 channel, or a 1-unit dense layer): broadcasts."""
    s = shape(b, v)
    if len(s) in (2, 3):
        w = b.rng.standard_normal((1, s[0]) + (1,) * (len(s) - 1))
        w = w / max(float(np.linalg.norm(w)), 1e-9) * d.choice([1.0, 0.2, 0.0])
        return b.node("Conv", [v, weight(d, b, w)])
    w = b.rng.standard_normal((1, s[0]))
    w = w / max(float(np.linalg.norm(w)), 1e-9) * d.choice([1.0, 0.2])
    return b.node("Gemm", [v, weight(d, b, w)], transB=1)


def blk_residual(d: Draw, b: Builder, v: str) -> str:
    """v (+) f(v) with Add/Sub/Sum/Mean/Max/Min/Concat/Mul; f may have one channel (then it broadcasts)."""
    s = shape(b, v)
    combine = d.variant("residual")
    form = d.choice(["same", "same", "broadcast", "broadcast_other"])
    if form == "same":
        f = branch(d, b, v)
        a, c = (v, f) if d.bool() else (f, v)
    else:
        f = one_channel(d, b, v)
        g = branch(d, b, v) if form == "broadcast_other" else v
        a, c = (f, g) if d.bool() else (g, f)
    b.note(f"residual {combine} ({form})")
    if combine == "Sum":
        ins = [a, c]
        if d.bool():
            ins.append(b.const((b.rng.standard_normal(channel_shape(s, s[0])) * 0.1).astype(np.float32)))
        if d.bool():
            ins.append(branch(d, b, v))
        return b.node("Sum", ins)
    if combine == "Mean":
        return b.node("Mean", [a, c])
    if combine == "Concat":
        need(shape(b, a)[1:] == shape(b, c)[1:] or len(s) == 1 and shape(b, a) == shape(b, c))
        return b.node("Concat", [a, c], axis=1)
    return b.node(combine, [a, c])


def blk_broadcast_pair(d: Draw, b: Builder, v: str) -> str:
    """Two data values of different shapes combined by a broadcasting Add/Sub/Max/Min/Sum (both data)."""
    s = shape(b, v)
    need(len(s) >= 2)
    small = one_channel(d, b, v)
    if d.bool():
        small = b.node("Relu", [small])
    op = d.variant("broadcast_pair")
    order = [small, v] if d.bool() else [v, small]
    b.note(f"{op} of a {shape(b, small)} data value and a {s} one (broadcast)")
    return b.node(op, order)


def blk_gated(d: Draw, b: Builder, v: str) -> str:
    """v + g * Relu(v - t): a branch that inputs in [0, 1] never open (t = 5), with a large gain g."""
    t = d.choice([5.0, 3.0, 20.0])
    g = d.choice([3.0, 10.0])
    pre = branch(d, b, v) if d.bool() else v
    gate = b.node("Relu", [b.node("Sub", [pre, b.const(np.float32(t))])])
    b.note(f"gated branch Relu(x - {t}) * {g}")
    return b.node("Add", [v, b.node("Mul", [gate, b.const(np.float32(g))])])


# ---------------------------------------------------------------------------------------------- patterns


def blk_sll(d: Draw, b: Builder, v: str) -> str:
    """SLL block x - A s(B x + b), A = B^T S, S >= 0 with ||S^1/2 B||^2 <= 2, dense or convolutional, or with an
    orthogonal skip Q x - Q B^T S s(Bx + b) (orthogonium's fused SLLxAOC form: Q a Gemm or 1x1 Conv, A fused with
    Q, ``orth_skip_fused`` as one Conv of the flipped, transposed kernel, or a chain); and near misses (A perturbed,
    S < 0, S too large, slope outside [0, 1], intermediates read elsewhere, a Split in B, Q scaled by 1.1 in the
    skip and in A, A without Q)."""
    variant = d.variant("sll")
    act = d.choice(["Relu", "Relu", "Tanh", "Sigmoid", "LeakyRelu"])
    if variant == "factored":
        return _sll_factored(d, b, flatten(d, b, v), act)
    conv = len(shape(b, v)) == 3 and (variant == "orth_skip_fused" or d.bool()) \
        and variant not in ("split_b", "split_b_wrong", "split_a")
    if not conv:
        v = flatten(d, b, v)
    s = shape(b, v)
    b.note(f"SLL block ({'conv' if conv else 'dense'}, {act}, {variant})")
    if conv:
        c = s[0]
        m = d.int(1, 4)
        k = d.choice([1, 3])
        attrs = {"pads": [k // 2] * 4}
        bw = b.rng.standard_normal((m, c, k, k))
        bnorm = operator_norm("Conv", s, [t64(bw)], **attrs)
        bw = bw / bnorm
        sdiag = b.rng.uniform(0.2, 1.0, m) * 2.0 * d.choice([1.0, 0.999])
    else:
        n = s[0]
        m = d.int(2, 10)
        bw = b.rng.standard_normal((m, n))
        bw = bw / float(np.linalg.norm(bw, 2))
        sdiag = b.rng.uniform(0.2, 1.0, m) * 2.0 * d.choice([1.0, 0.999])
    if variant == "negative_s":
        sdiag[0] = -abs(sdiag[0]) - 0.1
    if variant == "too_large":
        sdiag = sdiag * 3.0
    aw = bw * sdiag.reshape((m,) + (1,) * (bw.ndim - 1))  # rows of B scaled by S: A = B^T S
    if variant == "perturbed":
        aw = aw + 0.05 * b.rng.standard_normal(aw.shape)
    if variant == "tiny_perturbed":
        aw = aw + 1e-7 * b.rng.standard_normal(aw.shape)
    bias = b.const((b.rng.standard_normal(m) * 0.1).astype(np.float32))
    sides = []
    if conv:
        h = b.node("Conv", [v, b.const(bw.astype(np.float32)), bias], **attrs)
    elif variant in ("split_b", "split_b_wrong"):
        other = b.rng.standard_normal((m, n))
        other = other / float(np.linalg.norm(other, 2))  # satisfies the sqrt(2) condition too
        which = d.int(0, 1)
        stacked = np.concatenate([bw, other] if which == 0 else [other, bw])
        h2 = b.node("Gemm", [v, b.const(stacked.astype(np.float32))], transB=1)
        halves = b.split(h2, 1, [m, m], 2)
        h_lin = halves[which]
        if variant == "split_b_wrong":  # A matches the Split's *other* output
            aw = (stacked[m:] if which == 0 else stacked[:m]) * sdiag[:, None]
        if d.bool():
            sides.append(halves[1 - which])
        h = b.node("Add", [h_lin, bias])
    elif variant == "chain":
        h = b.node("Gemm", [b.node("Mul", [v, b.const(np.float32(2.0))]), b.const((bw / 2).astype(np.float32)), bias],
                   transB=1)
    else:
        h = b.node("Gemm", [v, b.const(bw.astype(np.float32)), bias], transB=1)
    if variant == "side_pre":
        sides.append(h)
    if act == "LeakyRelu":
        alpha = 1.5 if variant == "leaky_out" else d.choice([0.1, 0.5])
        a = b.node("LeakyRelu", [h], alpha=alpha)
    else:
        a = b.node(act if variant != "leaky_out" else "LeakyRelu", [h], **({"alpha": -0.3} if variant == "leaky_out"
                                                                            else {}))
    if variant == "side_act":
        sides.append(a)
    sign = -1.0 if variant == "add_form" else 1.0
    q = None  # the orthogonal skip's matrix (channels), and the one fused into A
    q_in_a = np.eye(s[0])
    if variant.startswith("orth_skip"):
        q = np.linalg.qr(b.rng.standard_normal((s[0], s[0])))[0] * (1.1 if variant == "orth_skip_scaled" else 1.0)
        q_in_a = q if variant != "orth_skip_wrong" else q_in_a
    if variant == "split_a":  # A is output 1 of a Split of a Gemm to 2n; A is matched by output 0's rows
        which = d.int(0, 1)
        other = aw.T * b.rng.uniform(-1, 1, (1, m)) if d.bool() else aw.T[::-1]  # rows for the other output
        stacked = np.concatenate([other, aw.T] if which == 1 else [aw.T, other])
        halves = b.split(b.node("Gemm", [a, b.const(stacked.astype(np.float32))], transB=1), 1, [n, n], 2)
        if d.bool():
            side(b, halves[1 - which])
        r = halves[which]
    elif conv and variant == "orth_skip_fused":  # Q and A fused into one Conv, as orthogonium exports them
        fused = np.einsum("oi,hikl->hokl", q_in_a, aw)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        r = b.node("Conv", [a, b.const(np.ascontiguousarray(fused).astype(np.float32))], **attrs)
    elif conv:
        r = b.node("ConvTranspose", [a, b.const((sign * aw).astype(np.float32))], **attrs)
        if q is not None:
            r = b.node("Conv", [r, b.const(q_in_a[:, :, None, None].astype(np.float32))])
    elif variant == "chain":
        r = b.node("Mul", [b.node("Gemm", [a, b.const((sign * aw.T * 2).astype(np.float32))], transB=1),
                           b.const(np.float32(0.5))])
    else:
        r = b.node("Gemm", [a, b.const((sign * q_in_a @ aw.T).astype(np.float32))], transB=1)
    for x in sides:
        side(b, x)
    if variant == "add_form":
        return b.node("Add", [v, r] if d.bool() else [r, v])
    if q is not None:
        v = b.node("Conv", [v, b.const(q[:, :, None, None].astype(np.float32))]) if conv else \
            b.node("Gemm", [v, b.const(q.astype(np.float32))], transB=1)
    return b.node("Sub", [v, r])


def _sll_factored(d: Draw, b: Builder, v: str, act: str) -> str:
    """The SLL core between two maps fused into its weights, as orthogonium's stride-2 SLLxAOC block is on a
    finite grid: y = Post (Pre x - K^T S s(K Pre x + b)) with Pre a contraction (an orthogonal matrix less a row),
    Post rows of an orthogonal matrix, exported as Q = Post Pre, B = K Pre, A = Post K^T S (no A = Q B^T S)."""
    n = shape(b, v)[0]
    m, rows = d.int(2, 8), d.int(1, n)
    k = b.rng.standard_normal((m, n))
    k = k / float(np.linalg.norm(k, 2))
    sdiag = b.rng.uniform(0.2, 1.0, m) * 2.0
    pre = np.linalg.qr(b.rng.standard_normal((n, n)))[0]
    pre[d.int(0, n - 1)] = 0.0
    post = np.linalg.qr(b.rng.standard_normal((n, n)))[0][:rows]
    b.note(f"SLL core between a contraction and {rows} orthonormal rows, fused ({act}, {m} hidden)")
    bias = b.const((b.rng.standard_normal(m) * 0.1).astype(np.float32))
    h = b.node(act, [b.node("Gemm", [v, b.const((k @ pre).astype(np.float32)), bias], transB=1)],
               **({"alpha": d.choice([0.1, 0.5])} if act == "LeakyRelu" else {}))
    r = b.node("Gemm", [h, b.const((post @ k.T * sdiag).astype(np.float32))], transB=1)
    return b.node("Sub", [b.node("Gemm", [v, b.const((post @ pre).astype(np.float32))], transB=1), r])


def blk_groupsort(d: Draw, b: Builder, v: str) -> str:
    """GroupSort as exported: Reshape to groups, Concat(ReduceMax, ReduceMin) on the group axis, Reshape back;
    near misses: group size 1, keepdims=0, different axes, a reduction read elsewhere, different inputs."""
    s = shape(b, v)
    n = math.prod(s)
    variant = d.variant("groupsort")
    if len(s) == 3 and variant != "group_big" and s[0] % 2 == 0:
        c = s[0]
        g = 1 if variant == "group1" else 2
        need(c % g == 0)
        grouped = b.node("Reshape", [v, b.ints([-1, c // g, g, s[1], s[2]])])
        axis = 2
    else:
        g = 1 if variant == "group1" else d.choice([2, 2, 3, 4]) if variant != "group_big" else d.choice([3, 4])
        if n % g:
            g = 2 if n % 2 == 0 and variant != "group1" else 1
        grouped = b.reshape_const(v, [n // g, g])
        axis = 2
    b.note(f"GroupSort{g} via ReduceMax/ReduceMin ({variant})")
    mx = b.reduce("ReduceMax", grouped, [axis], keepdims=1)
    src = b.node("Mul", [grouped, b.const(np.float32(1.0))]) if variant == "other_input" else grouped
    mn = b.reduce("ReduceMin", src, [axis], keepdims=1)
    if variant == "side":
        side(b, mx)
    cat_axis = axis if variant != "wrong_concat_axis" else 1
    parts = [mx, mn] if d.int(0, 3) else [mn, mx]
    out = b.node("Concat", parts, axis=cat_axis)
    total = b.numel(out)
    if len(s) == 3 and total % (s[1] * s[2]) == 0:
        return b.reshape_const(out, [total // (s[1] * s[2]), s[1], s[2]])
    return b.reshape_const(out, [total]) if d.bool() else out


def blk_maxmin(d: Draw, b: Builder, v: str) -> str:
    """MaxMin: Concat(Max(a, b), Min(a, b)) with a, b the halves of a Split or two disjoint Slices; near misses:
    unequal parts that broadcast, a third Split output read elsewhere, overlapping slices, slices of different
    axes, a Max read elsewhere."""
    s = shape(b, v)
    even = [a for a in range(1, len(s) + 1) if s[a - 1] % 2 == 0]
    axis = d.choice(even) if even and d.int(0, 3) else d.int(1, len(s))
    n = s[axis - 1]
    need(n >= 2)
    variant = d.variant("maxmin")
    b.note(f"MaxMin on axis {axis} of {s} ({variant})")
    if variant in ("split", "split_num"):
        need(n % 2 == 0)
        parts = b.split(v, axis, None if variant == "split_num" else [n // 2, n // 2], 2)
    elif variant == "unequal_split":
        k = d.int(1, n - 1)
        parts = b.split(v, axis, [k, n - k], 2)
    elif variant in ("three_way", "three_way_side"):
        need(n >= 3)
        k = d.int(1, (n - 1) // 2)
        sizes = [k, k, n - 2 * k]
        outs = b.split(v, axis, sizes, 3)
        order = d.choice([(0, 1, 2), (1, 2, 0), (0, 2, 1)])
        parts = [outs[order[0]], outs[order[1]]]
        if shape(b, parts[0]) != shape(b, parts[1]):
            parts = [outs[0], outs[1]]
            order = (0, 1, 2)
        if variant == "three_way_side":
            side(b, outs[order[2]])
    elif variant == "cross_axis":
        need(len(s) >= 2 and s[0] >= 2)
        other = 1 if axis != 1 else 2
        m = min(n, s[other - 1]) // 2
        need(m >= 1)
        parts = [b.slice(v, [0], [m], [axis]), b.slice(v, [0], [m], [other])]
    else:
        if variant == "unequal_slices":
            k = d.int(1, n - 1)
            ranges = [(0, k), (k, n)]
        elif variant == "overlap":
            k = max(1, n // 2)
            ranges = [(0, k + 1 if k + 1 <= n else k), (k - 1 if k > 0 else 0, min(n, 2 * k))]
        else:
            need(n % 2 == 0)
            ranges = [(0, n // 2), (n // 2, n)]
        if d.bool():
            ranges = ranges[::-1]
        parts = [b.slice(v, [r0], [r1], [axis]) for r0, r1 in ranges]
    a, c = parts if d.int(0, 3) else parts[::-1]
    mx = b.node("Max", [a, c])
    mn = b.node("Min", [a, c] if d.bool() else [c, a])
    if variant == "side_max":
        side(b, mx)
    return b.node("Concat", [mx, mn] if d.int(0, 3) else [mn, mx], axis=axis)


def blk_maxmin_indexed(d: Draw, b: Builder, v: str) -> str:
    """MaxMin with the halves picked by indexing: a reshape to pairs then Gather at 0 and 1, strided Slices, or a
    fixed GatherElements permutation then a Split; near misses read a coordinate twice."""
    s = shape(b, v)
    n = math.prod(s)
    need(n % 2 == 0 and n >= 2)
    variant = d.variant("maxmin_indexed")
    b.note(f"MaxMin by indexing ({variant})")
    flat = b.reshape_const(v, [n])
    if variant == "gather":
        pairs = b.reshape_const(flat, [n // 2, 2])
        a, c = (b.node("Gather", [pairs, b.const(np.int64(k), np.int64)], axis=2) for k in (0, 1))
    elif variant == "strided":
        a, c = b.slice(flat, [0], [n], [1], [2]), b.slice(flat, [1], [n], [1], [2])
    elif variant in ("permutation", "permutation_repeat"):
        index = b.rng.permutation(n)
        if variant == "permutation_repeat":
            index[-1] = index[0]
        shuffled = b.node("GatherElements", [flat, b.node("Expand", [b.const(index[None].astype(np.int64), np.int64),
                                                                     b.node("Shape", [flat])])], axis=1)
        a, c = b.split(shuffled, 1, [n // 2, n // 2], 2)
    else:  # gather_repeat: the second half reads the first's first coordinate
        idx = list(range(1, n, 2))
        a = b.node("Gather", [flat, b.ints(list(range(0, n, 2)))], axis=1)
        c = b.node("Gather", [flat, b.ints([0] + idx[1:])], axis=1)
    mx, mn = b.node("Max", [a, c]), b.node("Min", [a, c] if d.bool() else [c, a])
    return b.node("Concat", [mx, mn] if d.int(0, 3) else [mn, mx], axis=1)


def _householder_halves(d: Draw, b: Builder, v: str, kind: str, label: str) -> tuple[str, str, int, str]:
    """The two halves (x, y) of a drawn even axis of ``v`` for a HouseHolder block, the axis and the drawn variant."""
    s = shape(b, v)
    even = [a for a in range(1, len(s) + 1) if s[a - 1] % 2 == 0]
    need(bool(even))
    axis = d.choice(even)
    variant = d.variant(kind)
    b.note(f"{label} on axis {axis} of {s} ({variant})")
    x, y = b.split(v, axis, [s[axis - 1] // 2] * 2, 2)
    return x, y, axis, variant


def blk_householder(d: Draw, b: Builder, v: str) -> str:
    """deel-torchlip's / orthogonium's HouseHolder on the two halves of one axis: s = x sin(t/2) - y cos(t/2), the
    identity where s <= 0 and the reflection by angle t where s > 0 (Mul by cast comparisons, or Where); near
    misses: a selector at another angle (pieces disagree on its zero line), both comparisons taking s = 0, a
    reflection by a longer v (continuous, norm 1 - 2|v|^2)."""
    x, y, axis, variant = _householder_halves(d, b, v, "householder", "HouseHolder")
    theta = b.rng.uniform(-math.pi, math.pi, shape(b, x))

    def lin(cx: np.ndarray, cy: np.ndarray, op: str = "Add") -> str:
        return b.node(op, [b.node("Mul", [x, b.const(cx.astype(np.float32))]),
                           b.node("Mul", [y, b.const(cy.astype(np.float32))])])

    half = theta / 2 + (0.2 if variant == "shifted" else 0.0)
    if variant == "long_v":
        v1, v2 = 1.1 * np.sin(theta / 2), -1.1 * np.cos(theta / 2)
        sel = lin(v1, -v2, "Sub")
        a2 = b.node("Sub", [x, b.node("Mul", [sel, b.const((2 * v1).astype(np.float32))])])
        b2 = b.node("Sub", [y, b.node("Mul", [sel, b.const((2 * v2).astype(np.float32))])])
    else:
        sel = lin(np.sin(half), np.cos(half), "Sub")
        a2, b2 = lin(np.cos(theta), np.sin(theta)), lin(np.sin(theta), np.cos(theta), "Sub")
    zero = b.const(np.float32(0.0))
    up = b.node("GreaterOrEqual" if variant == "both_ties" else "Greater", [sel, zero])
    if variant == "where":
        return b.node("Concat", [b.node("Where", [up, a2, x]), b.node("Where", [up, b2, y])], axis=axis)
    down = b.node("Cast", [b.node("LessOrEqual", [sel, zero])], to=TensorProto.FLOAT)
    up = b.node("Cast", [up], to=TensorProto.FLOAT)
    return b.node("Concat", [b.node("Add", [b.node("Mul", [p, down]), b.node("Mul", [r, up])])
                             for p, r in ((x, a2), (y, b2))], axis=axis)


def householder_order2(b: Builder, x: str, y: str, axis: int, theta: np.ndarray, variant: str = "ok") -> str:
    """orthogonium's HouseHolder_Order_2 on the halves x, y as its TorchScript export writes it (``dynamo``: with
    the IsNaN guard), its thresholds and sines folded in float32: r = (atan2(y, x) - theta0 / 2) mod 2 pi picks
    the identity, two reflections or a rotation by four sectors. ``theta`` holds (theta0, theta1, theta2) per pair.
    ``ok`` and ``dynamo`` move the top threshold above fl(2 pi), as the layer means (``raw`` keeps it: a float
    hole at r = m); near misses: ``perturbed`` (a piece off by 1e-2: discontinuous), ``swapped`` (the first two
    thresholds swapped: sectors overlap), ``uncovered`` (a sector no mask covers), ``bad_pi``, ``bad_mod``."""
    f32 = np.float32
    zero = b.const(f32(0.0))
    p = b.const(f32(3.2 if variant == "bad_pi" else np.pi))
    t = b.node("Atan", [b.node("Div", [y, x])])
    turn = b.node("Where", [b.node("Greater", [y, zero]), b.node("Add", [t, p]), b.node("Sub", [t, p])])
    psi = b.node("Where", [b.node("Less", [x, zero]), turn, t])
    if variant == "dynamo":
        psi = b.node("Where", [b.node("IsNaN", [psi]), zero, psi])
    th0, th1, th2 = (np.clip(v, 0, 2 * np.pi).astype(f32) for v in theta)
    a = b.node("Sub", [psi, b.const(f32(0.5) * th0)])
    m = f32(6.0 if variant == "bad_mod" else 2 * np.pi)
    r = b.node("Sub", [a, b.node("Mul", [b.node("Floor", [b.node("Div", [a, b.const(m)])]), b.const(m)])])
    two_pi = f32(2 * np.pi)
    th3, th4 = two_pi - th1, two_pi - th2
    ends = [f32(0.5) * th1, f32(0.5) * (th1 + th2), f32(0.5) * (th1 + th2 + th3), f32(0.5) * (th1 + th2 + th3 + th4)]
    if variant not in ("raw", "bad_pi", "bad_mod"):
        ends[3] = np.maximum(ends[3], np.nextafter(two_pi, f32(7.0)))
    starts = [np.zeros_like(th0)] + ends[:3]
    if variant == "swapped":
        ends[0], ends[1] = ends[1], ends[0]
        starts = [np.zeros_like(th0)] + ends[:3]
    if variant == "uncovered":
        starts[3] = starts[3] + f32(0.3)
    masks = [b.node("Cast", [b.node("And", [b.node("Cast", [b.node("GreaterOrEqual", [r, b.const(lo)])],
                                                    to=TensorProto.BOOL),
                                             b.node("Cast", [b.node("Less", [r, b.const(hi)])], to=TensorProto.BOOL)])],
                    to=TensorProto.FLOAT) for lo, hi in zip(starts, ends, strict=True)]

    def lin(cx: np.ndarray, cy: np.ndarray, op: str = "Add") -> str:
        return b.node(op, [b.node("Mul", [x, b.const(cx.astype(f32))]), b.node("Mul", [y, b.const(cy.astype(f32))])])

    t01 = th0 + th1
    c2 = np.cos(th2) + (f32(1e-2) if variant == "perturbed" else f32(0.0))
    pieces = [(x, y), (lin(np.cos(t01), np.sin(t01)), lin(np.sin(t01), np.cos(t01), "Sub")),
              (lin(c2, np.sin(th2)), lin(-np.sin(th2), np.cos(th2))),
              (lin(np.cos(th0), np.sin(th0)), lin(np.sin(th0), np.cos(th0), "Sub"))]
    outs = []
    for k in range(2):
        total = b.node("Mul", [pieces[0][k], masks[0]])
        for piece, mask in zip(pieces[1:], masks[1:], strict=True):
            total = b.node("Add", [total, b.node("Mul", [piece[k], mask])])
        outs.append(total)
    return b.node("Concat", outs, axis=axis)


def blk_householder2(d: Draw, b: Builder, v: str) -> str:
    """orthogonium's HouseHolder_Order_2 on the two halves of one axis (``householder_order2``), random angles,
    after an Add of +0.0, of a bias, of -0.0 or nothing (the exported atan2 jumps at x = -0.0, which an input pixel
    at 0 times a negative scale reaches: only the first two keep x from -0.0)."""
    guard = d.choice(["plus_zero", "bias", "bias", "minus_zero", "none"])
    if guard != "none":
        s = shape(b, v)
        c = {"plus_zero": np.zeros(s), "minus_zero": np.full(s, -0.0),
             "bias": b.rng.uniform(0.05, 0.5, s) * b.rng.choice([-1.0, 1.0], s)}[guard]
        v = b.node("Add", [v, b.const(c.astype(np.float32))])
        b.note(f"Add ({guard})")
    x, y, axis, variant = _householder_halves(d, b, v, "householder2", "HouseHolder_Order_2")
    theta = b.rng.uniform(0.05, math.pi, (3,) + shape(b, x))
    return householder_order2(b, x, y, axis, theta, variant)


def blk_relu_neg(d: Draw, b: Builder, v: str) -> str:
    s = shape(b, v)
    variant = d.variant("relu_neg")
    axis = d.int(1, len(s))
    b.note(f"Concat(Relu(x), Relu(-x)) on axis {axis} ({variant})")
    neg_src = b.node("Mul", [v, b.const(np.float32(1.0))]) if variant == "other_source" else v
    neg = b.node("Neg", [neg_src])
    if variant == "side_neg":
        side(b, neg)
    parts = [b.node("Relu", [v]), b.node("Relu", [neg])]
    if d.bool():
        parts = parts[::-1]
    if variant == "three":
        parts.append(b.node("Relu", [v]))
    return b.node("Concat", parts, axis=axis)


def blk_l2pool(d: Draw, b: Builder, v: str) -> str:
    """L2-norm pooling as exported: Sqrt(c * AveragePool(x^2)) with Abs/Relu/Sign guards; partial windows
    (ceil_mode, pads with count_include_pad 0 or 1) and near misses."""
    v = image_or_line(d, b, v)
    s = shape(b, v)
    variant = d.variant("l2pool")
    square = b.node("Pow", [v, b.const(np.float32(2.0))]) if d.bool() else b.node("Mul", [v, v])
    attrs = pool_attrs(d, s[1:], max_kernel=3)
    attrs["count_include_pad"] = d.int(0, 1)
    pooled = b.node("AveragePool", [square], **attrs)
    window = math.prod(attrs["kernel_shape"])
    if variant == "torch":  # torch LPPool: sign(t) * relu(|t|) * K, then ** 0.5
        guard = b.node("Mul", [b.node("Sign", [pooled]), b.node("Relu", [b.node("Abs", [pooled])])])
    elif variant == "deel":
        guard = b.node("Abs", [pooled])
    elif variant == "side_pool":
        guard = b.node("Relu", [pooled])
        side(b, pooled)
    else:
        guard = pooled
    factor = d.choice([float(window), 1.0, 2.0])
    if variant == "div":
        scaled = b.node("Div", [guard, b.const(np.float32(1.0 / factor))])
    else:
        scaled = b.node("Mul", [guard, b.const(np.float32(factor))])
    b.note(f"L2-norm pool ({variant}) {attrs} factor {factor}")
    if variant == "pow_half" or (variant == "torch" and d.bool()):
        return b.node("Pow", [scaled, b.const(np.float32(0.5))])
    return b.node("Sqrt", [scaled])


# ---------------------------------------------------------------------------------------------- heads


def head(d: Draw, b: Builder, v: str, k: int) -> str:
    """Logits (N, k): a Gemm (often of norm 1), MatMul, 1x1 conv + global pooling, the value itself, or a
    Gemm whose output is permuted by Reshape/Transpose; one logit (k = 1) also as a ReduceSum of the features,
    (N, 1) or (N,), or a Slice of one feature."""
    s = shape(b, v)
    forms = ["gemm", "gemm", "gemm", "gemm_permute", "matmul", "conv_gap", "direct"]
    if k == 1:
        forms += ["reduce_sum", "slice_one"]
    form = d.choice(forms)
    if form == "conv_gap" and (len(s) != 3 or b.side):
        form = "gemm"
    if form == "direct" and (math.prod(s) != k or b.side):
        form = "gemm"
    if form == "gemm_permute" and not [a for a in range(2, k) if k % a == 0]:
        form = "gemm"
    if form == "direct":
        b.note("logits: the value itself")
        return flatten(d, b, v)
    if form == "conv_gap":
        w = b.rng.standard_normal((k, s[0], 1, 1))
        w = normalised(w, float(np.linalg.norm(w.reshape(k, -1), 2)), d.choice([1.0, None]))
        c = b.node("Conv", [v, weight(d, b, w)])
        b.note(f"logits: 1x1 conv to {k} + global average pool")
        return b.node("Flatten", [b.node("GlobalAveragePool", [c])], axis=1)
    feats = [flatten(d, b, v)] + [flatten(d, b, x) for x in b.side]
    f = feats[0] if len(feats) == 1 else b.node("Concat", feats, axis=1)
    n = b.numel(f)
    if form == "reduce_sum":
        keep, scale = d.choice([1, 0]), d.choice([1.0 / math.sqrt(n), 1.0])
        b.note(f"logit: ReduceSum of {n} features (keepdims={keep}) times {scale:.4g}")
        return b.node("Mul", [b.reduce("ReduceSum", f, [1], keepdims=keep), b.const(np.float32(scale))])
    if form == "slice_one":
        j = d.int(0, n - 1)
        b.note(f"logit: feature {j} of {n} (Slice)")
        return b.slice(f, [j], [j + 1], [1])
    w = b.rng.standard_normal((k, n))
    w = normalised(w, float(np.linalg.norm(w, 2)), d.choice([1.0, 1.0, None]))
    bias = b.const((b.rng.standard_normal(k) * 0.1).astype(np.float32))
    if form == "matmul":
        b.note(f"logits: MatMul {n}->{k}")
        return b.node("Add", [b.node("MatMul", [f, weight(d, b, w.T)]), bias])
    z = b.node("Gemm", [f, weight(d, b, w), bias], transB=1)
    if form == "gemm":
        b.note(f"logits: Gemm {n}->{k}")
        return z
    a = d.choice([x for x in range(2, k) if k % x == 0])
    how = d.choice(["transpose", "transpose", "reshape_only", "unsqueeze_transpose"])
    b.note(f"logits: Gemm {n}->{k} then {how} as ({a}, {k // a})")
    if how == "reshape_only":
        return b.reshape_const(b.reshape_const(z, [a, k // a]), [k])
    if how == "unsqueeze_transpose":
        u = b.squeeze("Unsqueeze", z, [2])
        t = b.node("Transpose", [b.reshape_const(u, [a, k // a])], perm=[0, 2, 1])
        return b.node("Flatten", [t], axis=1)
    t = b.node("Transpose", [b.reshape_const(z, [a, k // a])], perm=[0, 2, 1])
    return b.reshape_const(t, [k])


# ---------------------------------------------------------------------------------------------- programs

def _halves(d: Draw, b: Builder, v: str, how: str, overlap: bool = False) -> list[str]:
    """Parts of ``v`` along its first per-sample axis: a Split into halves (or thirds), or Slices (overlapping
    by one entry when ``overlap``)."""
    n = shape(b, v)[0]
    need(n >= 2)
    if how == "thirds":
        need(n >= 3)
        cut = [n // 3, 2 * n // 3]
        return [b.node("Slice", [v, b.ints([a]), b.ints([e]),
                                 b.ints([1])]) for a, e in zip([0] + cut, cut + [n])]
    if how == "split":
        need(n % 2 == 0)
        return list(b.node("Split", [v, b.ints([n // 2, n // 2])], 2, axis=1))
    half = n // 2
    ends = [(0, half + (1 if overlap else 0)), (half, n)]
    return [b.node("Slice", [v, b.ints([a]), b.ints([e]),
                             b.ints([1])]) for a, e in ends]


def blk_split_residual(d: Draw, b: Builder, v: str) -> str:
    """A channel-split residual (orthogonium's ConcatResidual): Concat(x1, f(x2)) of the two parts of a value,
    or a sum of functions of disjoint parts; near misses with overlapping parts."""
    variant = d.variant("split_residual")
    b.note(f"split residual ({variant})")
    how = {"concat": "split", "swapped": "split", "scaled": "split", "three_parts": "thirds"}.get(variant, "slices")
    parts = _halves(d, b, v, how, overlap=variant in ("overlap", "sum_overlap"))
    if variant == "scaled":
        parts[0] = b.node("Mul", [parts[0], b.const(np.float32(d.choice([0.5, 2.0])))])
    changed = [parts[0]] + [branch(d, b, p) for p in parts[1:]]
    if variant == "swapped":
        changed = changed[::-1]
    if variant in ("sum_parts", "sum_overlap"):
        need(shape(b, changed[0]) == shape(b, changed[1]))
        return b.node("Add", changed)
    return b.node("Concat", changed, axis=1)


def blk_l2norm(d: Draw, b: Builder, v: str) -> str:
    """sqrt(a x^2 + c f(x)^2 + e) elementwise (orthogonium's L2NormResidual) and near misses."""
    variant = d.variant("l2norm")
    b.note(f"L2-norm combination ({variant})")
    f = one_channel(d, b, v) if variant == "broadcast" else branch(d, b, v)
    if variant == "same_twice":
        f = v

    def square(u: str) -> str:
        if variant == "mul_square":
            return b.node("Mul", [u, u])
        return b.node("Pow", [u, b.const(np.float32(2.0))])

    a, c = (2.0, 0.3) if variant == "unequal" else (0.5, 0.5)
    terms = [b.node("Mul", [square(v), b.const(np.float32(a))]), b.node("Mul", [square(f), b.const(np.float32(c))])]
    if variant == "three_terms":
        terms.append(b.node("Mul", [square(branch(d, b, v)), b.const(np.float32(0.25))]))
    if variant == "side_square":
        side(b, terms[0])
    total = terms[0]
    for t in terms[1:]:
        total = b.node("Add", [total, t])
    e = -1e-3 if variant == "negative_const" else 1e-6
    total = b.node("Add", [total, b.const(np.float32(e))])
    if variant == "negative_const":
        total = b.node("Relu", [total])  # keeps the root real; not a pattern any more
    if variant == "pow_half":
        return b.node("Pow", [total, b.const(np.float32(0.5))])
    return b.node("Sqrt", [total])


def blk_linear_region(d: Draw, b: Builder, v: str) -> str:
    """Linear parts of the graph that end at a sum or concatenation: x + conv(x), x - W x, two branches,
    centring x - mean(x), a concatenation of branches, a scaled sum; and one value of it read elsewhere."""
    variant = d.variant("linear_region")
    b.note(f"linear region ({variant})")
    s = shape(b, v)
    if variant == "centering":
        axes = list(range(1, len(s) + 1))[-1:]
        mean = b.node("ReduceMean", [v, b.ints(axes)], keepdims=1)
        return b.node("Sub", [v, mean])
    f = branch(d, b, v)
    if variant == "side":
        side(b, f)
    if variant == "sub":
        return b.node("Sub", [v, f])
    if variant == "two_branches":
        return b.node("Sum", [v, f, branch(d, b, v)])
    if variant == "concat_branches":
        return b.node("Concat", [f, branch(d, b, v)], axis=1)
    if variant == "scaled_sum":
        total = b.node("Add", [b.node("Mul", [v, b.const(np.float32(0.7))]), f])
        return b.node("Div", [total, b.const(np.float32(1.7))])
    return b.node("Add", [v, f])


def circular_conv(d: Draw, b: Builder, v: str) -> str:
    """A C -> C convolution on the same grid with circular padding, as torch exports it (Slice/Concat per axis)."""
    s = shape(b, v)
    need(len(s) == 3)
    kernel = [d.choice([1, 2, 3]) if n >= 2 else 1 for n in s[1:]]
    x = v
    for axis, k in zip((2, 3), kernel):
        p = d.int(0, k - 1)
        if k > 1:
            x = wrap_concat(d, b, x, axis, p, k - 1 - p)
    w = b.rng.standard_normal((s[0], s[0]) + tuple(kernel))
    w = normalised(w, operator_norm("Conv", shape(b, x), [t64(w)]), gain(d))
    b.note(f"circular conv k{kernel}")
    return b.node("Conv", [x, weight(d, b, w)])


def grouped_conv(d: Draw, b: Builder, v: str) -> str:
    """A C -> C convolution on the same grid with groups > 1."""
    s = shape(b, v)
    need(len(s) in (2, 3))
    groups = [g for g in range(2, s[0] + 1) if s[0] % g == 0]
    need(bool(groups))
    g = d.choice(groups)
    k = [d.choice([1, 3]) for _ in s[1:]]
    attrs = {"pads": [x // 2 for x in k] * 2, "group": g}
    w = b.rng.standard_normal((s[0], s[0] // g) + tuple(k))
    w = normalised(w, operator_norm("Conv", s, [t64(w)], **attrs), gain(d))
    b.note(f"grouped conv k{k} group {g}")
    return b.node("Conv", [v, weight(d, b, w)], **attrs)


def blk_region_forms(d: Draw, b: Builder, v: str) -> str:
    """Linear regions in the forms the one-convolution rewrite reads: circular and grouped convolutions, signs
    alone (x - (-x)), a concatenation and a mean that also read a constant."""
    variant = d.variant("region_forms")
    b.note(f"linear region form ({variant})")
    s = shape(b, v)
    if variant == "circular":
        return b.node("Add", [v, circular_conv(d, b, v)] if d.bool() else [circular_conv(d, b, v), v])
    if variant == "grouped":
        return b.node(d.choice(["Add", "Sub"]), [v, grouped_conv(d, b, v)])
    if variant == "neg_sub":
        neg = b.node("Neg", [v]) if d.bool() else b.node("Mul", [v, b.const(np.float32(-0.5))])
        return b.node("Sub", [v, neg] if d.bool() else [neg, v])
    f = branch(d, b, v)
    if variant == "concat_const":
        need(len(s) >= 1)
        cs = list(s)
        cs[0] = d.int(1, 2)
        c = batch_constant(b, v, b.rng.standard_normal(cs))
        parts = [v, f, c]
        order = [int(i) for i in b.rng.permutation(3)]
        return b.node("Concat", [parts[i] for i in order], axis=1)
    c = b.const((b.rng.standard_normal(channel_shape(s, s[0])) * 0.5).astype(np.float32))
    return b.node("Mean", [v, f, c])


def rank_up(d: Draw, b: Builder, v: str) -> tuple[str, tuple[int, ...], int]:
    """``v`` with one more axis of length 1 (Unsqueeze or Reshape), its shape, and the new axis (batched index)."""
    s = shape(b, v)
    pos = d.int(1, len(s) + 1)
    new = list(s)
    new.insert(pos - 1, 1)
    u = b.squeeze("Unsqueeze", v, [pos]) if d.bool() else b.reshape_const(v, new)
    return u, tuple(new), pos


def broadcast_const(d: Draw, b: Builder, s: Sequence[int], pos: int, copies: int, value: float) -> str:
    """A constant that varies along one axis of ``s`` other than the new axis ``pos`` and has ``copies`` entries
    along it (1: it is broadcast along the new axis), with leading axes of length 1 dropped or kept."""
    cshape = [1] * len(s)
    others = [i for i in range(len(s)) if i != pos - 1 and s[i] > 1]
    if others and d.int(0, 3):
        j = d.choice(others)
        cshape[j] = s[j]
    cshape[pos - 1] = copies
    lead = 0
    while lead < len(cshape) - 1 and cshape[lead] == 1 and d.bool():
        lead += 1
    arr = value + 0.5 * b.rng.standard_normal(cshape[lead:])
    return b.const(arr.astype(np.float32))


def blk_rank_up(d: Draw, b: Builder, v: str) -> str:
    """What exporters write around linear regions: a reshape to a higher rank (N, C, 1, H, W), a constant broadcast
    along the new axis (a scale or shift), a reshape back, then a sum or concatenation with the value; also a
    constant with several entries on the new axis (copies of the data), and the value combined with its own
    reshape, which broadcasts the data against itself (x_i - x_j over all pairs)."""
    variant = d.variant("rank_up")
    s = shape(b, v)
    if variant == "broadcast_self":
        return broadcast_self(d, b, v)
    u, new, pos = rank_up(d, b, v)
    b.note(f"rank up {s} -> {new} ({variant})")
    if variant in ("scale", "shift"):
        c = broadcast_const(d, b, new, pos, 1, 1.0 if variant == "scale" else 0.0)
        w = b.node("Mul" if variant == "scale" else "Add", [u, c] if d.bool() else [c, u])
        need(shape(b, w) == new, "the constant broadcast the data")
        back = b.squeeze("Squeeze", w, [pos]) if d.bool() else b.reshape_const(w, list(s))
        op = d.choice(["Add", "Sub", "Concat"])
        return b.node(op, [v, back] if d.bool() else [back, v], **({"axis": 1} if op == "Concat" else {}))
    k = d.int(2, 3)  # copies: a constant with k entries on the new axis repeats the data k times
    w = b.node("Mul", [u, broadcast_const(d, b, new, pos, k, 1.0)])
    merged = list(shape(b, w))
    need(len(merged) == len(new))
    at = pos - 2 if pos >= 2 else 0
    merged[at:at + 2] = [merged[at] * merged[at + 1]]
    back = b.reshape_const(w, merged)
    need(b.numel(back) <= MAX_NUMEL)
    if tuple(merged[:at] + merged[at + 1:]) == tuple(s[:at] + s[at + 1:]) and d.bool():
        return b.node("Concat", [v, back] if d.bool() else [back, v], axis=at + 1)
    return back


def broadcast_self(d: Draw, b: Builder, v: str) -> str:
    """The value combined with a reshape of itself that moves an axis of length 1 (C = 1: (1, H, W) against
    (H, 1, W)), or two reshapes of it to a higher rank ((1, C, H, W) against (C, 1, H, W)): the data broadcasts
    against itself, every pair of entries combined (never against the batch axis)."""
    s = shape(b, v)
    ones = [i for i, n in enumerate(s) if n == 1]
    big = [i for i, n in enumerate(s) if n > 1]
    if ones and big and d.bool():
        t = list(s)
        i, j = d.choice(ones), d.choice(big)
        t[i], t[j] = t[j], t[i]
        u = b.reshape_const(v, t)
    else:
        u = b.squeeze("Unsqueeze", v, [2]) if d.bool() else b.reshape_const(v, [s[0], 1] + list(s[1:]))
        v = b.squeeze("Unsqueeze", v, [1]) if d.bool() else b.reshape_const(v, [1] + list(s))
    factor = d.choice(["none", "mul", "neg", "identity"])
    if factor == "mul":
        u = b.node("Mul", [u, b.const(np.float32(d.choice([1.0, 0.5, -2.0])))])
    elif factor != "none":
        u = b.node("Neg" if factor == "neg" else "Identity", [u])
    op = d.choice(["Sub", "Sub", "Add", "Sum", "Mean"])
    out = b.node(op, [v, u] if d.bool() else [u, v])
    b.note(f"{op} of {s} and {shape(b, u)} -> {shape(b, out)} ({factor})")
    need(b.numel(out) <= MAX_NUMEL)
    return out


INT32_MAX, INT64_MAX, INT32_MIN, INT64_MIN = 2 ** 31 - 1, 2 ** 63 - 1, -2 ** 31, -2 ** 63


def slice_bounds(d: Draw, first: int, last: int, n: int, step: int) -> tuple[int, int]:
    """(start, end) of the slice that keeps indices first, first + step, ... strictly before ``last`` (below it for
    step > 0, above it for step < 0) of an axis of ``n`` entries, written in a form exporters emit: as is, counted
    from the end, or past the axis (out of range, INT_MIN, INT_MAX, int64 limits) where the specification clamps."""
    if step > 0:
        start = d.choice([first, first - n] + ([-n - d.int(1, 5), INT32_MIN, INT64_MIN] if first == 0 else []))
        end = d.choice([last] + ([last - n] if last < n else [n + d.int(1, 5), INT32_MAX, INT64_MAX, BIG]))
        return start, end
    start = d.choice([first, first - n] + ([n + d.int(0, 5), INT32_MAX, INT64_MAX] if first == n - 1 else []))
    end = d.choice([last, last - n] if last >= 0 else [-n - d.int(1, 5), INT32_MIN, INT64_MIN, -BIG])
    return start, end


def slice_range(d: Draw, b: Builder, v: str, axis: int, lo: int, hi: int, step: int = 1) -> str:
    """A Slice of per-sample axis ``axis`` keeping [lo, hi) by ``step`` (reversed when negative), in a drawn form."""
    n = shape(b, v)[axis - 1]
    first, last = (lo, hi) if step > 0 else (hi - 1, lo - 1)
    start, end = slice_bounds(d, first, last, n, step)
    axis_arg = axis - len(shape(b, v)) - 1 if d.int(0, 3) == 0 else axis  # a negative axis now and then
    return b.slice(v, [start], [end], [axis_arg], [step] if step != 1 or d.bool() else None)


def cuts(b: Builder, n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges that cover [0, n)."""
    need(n >= parts)
    points = sorted(int(x) for x in b.rng.choice(np.arange(1, n), parts - 1, replace=False))
    return list(zip([0] + points, points + [n]))


def blk_slices(d: Draw, b: Builder, v: str) -> str:
    """Slices in every start/end/step form (negative, out of range, INT_MIN/INT_MAX, steps above 1 and negative)
    alone, on two axes, as the parts of a concatenation or a sum (partitions, reversed or strided parts), inside a
    linear region and after one."""
    variant = d.variant("slices")
    s = shape(b, v)
    axis = d.int(1, len(s))
    n = s[axis - 1]
    b.note(f"slices ({variant}) on axis {axis} of {s}")
    if variant == "one":
        step = d.choice([1, 1, 2, 3, -1, -2])
        lo = d.int(0, n - 1)
        return slice_range(d, b, v, axis, lo, d.int(lo + 1, n), step)
    if variant == "two_axes":
        need(len(s) >= 2)
        other = d.choice([a for a in range(1, len(s) + 1) if a != axis])
        starts, ends, steps = [], [], []
        for a in (axis, other):
            m = s[a - 1]
            step = d.choice([1, 2, -1, -2])
            lo = d.int(0, m - 1)
            hi = d.int(lo + 1, m)
            first, last = (lo, hi) if step > 0 else (hi - 1, lo - 1)
            start, end = slice_bounds(d, first, last, m, step)
            need(len(range(first, last, step)) > 0)
            starts.append(start)
            ends.append(end)
            steps.append(step)
        return b.slice(v, starts, ends, [axis, other], steps)
    if variant == "concat_parts":
        ranges = cuts(b, n, d.int(2, min(3, n)))
        parts = []
        for lo, hi in ranges:
            part = slice_range(d, b, v, axis, lo, hi, d.choice([1, 1, 1, -1]))
            parts.append(branch(d, b, part) if d.int(0, 2) == 0 else part)
        order = [int(i) for i in b.rng.permutation(len(parts))]
        return b.node("Concat", [parts[i] for i in order], axis=axis)
    if variant == "sum_parts":
        need(n >= 2)
        half = n // 2
        first = slice_range(d, b, v, axis, 0, half, 1)
        lo = n - half if d.int(0, 2) else 0  # disjoint (a partition), or the same part twice
        second = slice_range(d, b, v, axis, lo, lo + half, d.choice([1, -1]))
        if d.bool():
            second = branch(d, b, second)
        return b.node(d.choice(["Add", "Sub"]), [first, second])
    if variant == "region_inside":
        lo = d.int(0, n - 1)
        hi, step = d.int(lo + 1, n), d.choice([1, 2, -1])
        a = slice_range(d, b, v, axis, lo, hi, step)
        c = slice_range(d, b, branch(d, b, v), axis, lo, hi, step)
        return b.node(d.choice(["Add", "Sub", "Sum"]), [a, c])
    total = b.node("Add", [v, branch(d, b, v)])  # region_around: slices of a linear region's output
    ranges = cuts(b, n, 2) if n >= 2 and d.bool() else [(0, n)]
    parts = [slice_range(d, b, total, axis, lo, hi, d.choice([1, 2, -1])) for lo, hi in ranges]
    return parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=axis)


def symmetric_pad(d: Draw, b: Builder, v: str, axis: int, p: int, q: int, edge: bool) -> str:
    """deel-torchlip's symmetric (or reflect, without the edge entry) padding as exported: Concat of reversed
    Slices and the value along per-sample axis ``axis``."""
    n = shape(b, v)[axis - 1]
    skip = 0 if edge else 1
    parts = [slice_range(d, b, v, axis, skip, skip + p, -1)] if p else []
    parts.append(v)
    if q:
        parts.append(slice_range(d, b, v, axis, n - q - skip, n - skip, -1))
    return b.node("Concat", parts, axis=axis)


def blk_region_whole(d: Draw, b: Builder, v: str) -> str:
    """Linear regions bound whole: a symmetric or reflect pad written as Slice/Concat then the convolution reading
    it (``sym_pad_conv``); a circular convolution centred by its spatial mean, as orthogonium's PatchBasedCNN
    (``centred``, a Relu after so that nothing joins the region); x + conv(x) read by a dense layer (``tail``)."""
    variant = d.variant("region_whole")
    b.note(f"region bound whole ({variant})")
    s = shape(b, v)
    need(len(s) == 3)
    if variant == "sym_pad_conv":
        edge = d.bool()
        need(min(s[1:]) >= (2 if edge else 3))
        kernel = [d.choice([2, 3]) for _ in s[1:]]
        x = v
        for axis, k in zip((2, 3), kernel):
            p = d.int(0, k - 1)
            x = symmetric_pad(d, b, x, axis, p, k - 1 - p, edge)
        cout = d.int(1, 4)
        w = b.rng.standard_normal((cout, s[0]) + tuple(kernel))
        orthonormal = d.bool()  # deel-torchlip's: orthonormal rows of the reshaped kernel, over sqrt(taps)
        if orthonormal:
            flat = w.reshape(cout, -1)
            u, _, vt = np.linalg.svd(flat, full_matrices=False)
            w = (u @ vt).reshape(w.shape) / math.sqrt(math.prod(kernel))
        w = normalised(w, operator_norm("Conv", shape(b, x), [t64(w)]), gain(d))
        b.note(f"{'symmetric' if edge else 'reflect'} pad then conv k{kernel}{' orthonormal' if orthonormal else ''}")
        return b.node("Conv", [x, weight(d, b, w)])
    if variant == "centred":
        f = circular_conv(d, b, v)
        mean = b.reduce("ReduceMean", f, [2, 3])
        return b.node("Relu", [b.node("Sub", [f, mean])])
    total = b.node("Add", [v, circular_conv(d, b, v)])
    return blk_dense(d, b, total)


def blk_series(d: Draw, b: Builder, v: str) -> str:
    """A polynomial in one zero-padded "same" convolution C, as SOC's truncated exponential sum_k C^k x / k!: a skew
    kernel sharing one initializer (``skew``) or in equal copies (``copies``), a kernel off skew by a drawn amount
    (``perturbed``), and a term that cancels part of another (``cancelled``: x + Cx + C^2 x / 2 - C(Cx) / 4, a
    raw kernel), so that both the spectral and the coefficient bound of the ``series`` region are met."""
    variant = d.variant("series")
    s = shape(b, v)
    need(len(s) == 3)
    c = s[0]
    kernel = [d.choice([1, 3]) if n >= 2 else 1 for n in s[1:]]
    dil = [d.int(1, 2) if k > 1 else 1 for k in kernel]
    attrs: dict[str, Any] = {"pads": [x * (k // 2) for k, x in zip(kernel, dil)] * 2}
    if any(x != 1 for x in dil):
        attrs["dilations"] = dil
    raw = b.rng.standard_normal((c, c) + tuple(kernel))
    w = raw if variant == "cancelled" else raw - raw.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    if variant == "perturbed":
        w = w + d.choice([1e-6, 1e-3, 0.3]) * b.rng.standard_normal(w.shape)
    w = normalised(w, operator_norm("Conv", s, [t64(w)], **attrs), d.choice([0.5, 1.0, 1.5, None]))
    shared = weight(d, b, w) if variant != "copies" else None
    b.note(f"series of one conv ({variant}) k{kernel} {attrs}")

    def conv(x: str) -> str:
        return b.node("Conv", [x, shared if shared is not None else b.weight(w, "float32")], **attrs)

    total, power = v, v
    for i in range(1, d.int(2, 4) + 1):
        power = conv(power)
        term = b.node("Div", [power, b.const(np.float32(i))]) \
            if d.bool() else b.node("Mul", [power, b.const(np.float32(1 / i))])
        total, power = b.node("Add", [total, term]), term
        if variant == "cancelled" and i == 2:
            total = b.node("Sub", [total, b.node("Div", [conv(conv(v)), b.const(np.float32(4))])])
    return b.node("Relu", [total])


BLOCKS: dict[str, Callable[[Draw, Builder, str], str]] = {
    "dense": blk_dense, "matmul_last": blk_matmul_last, "conv": blk_conv, "conv_transpose": blk_conv_transpose,
    "batchnorm": blk_batchnorm, "scale": blk_scale, "shift": blk_shift, "unary_linear": blk_unary_linear,
    "pad": blk_pad, "wrap_conv": blk_wrap_conv, "rearrange": blk_rearrange, "select": blk_select,
    "concat_const": blk_concat_const, "avgpool": blk_avgpool, "act": blk_act, "maxpool": blk_maxpool,
    "lppool": blk_lppool, "topk": blk_topk, "nolip": blk_nolip, "consts": blk_consts, "cast": blk_cast,
    "residual": blk_residual, "broadcast_pair": blk_broadcast_pair, "gated": blk_gated, "sll": blk_sll,
    "groupsort": blk_groupsort, "maxmin": blk_maxmin, "relu_neg": blk_relu_neg, "l2pool": blk_l2pool,
    "maxmin_indexed": blk_maxmin_indexed, "householder": blk_householder, "householder2": blk_householder2,
    "split_residual": blk_split_residual, "l2norm": blk_l2norm, "linear_region": blk_linear_region,
    "region_forms": blk_region_forms, "rank_up": blk_rank_up, "slices": blk_slices, "region_whole": blk_region_whole,
    "series": blk_series,
}
#: how often a random program picks each block (patterns and the shapes that break things are favoured)
WEIGHTS = {"dense": 3, "conv": 3, "act": 3, "residual": 2, "broadcast_pair": 2, "sll": 2, "maxmin": 2,
           "groupsort": 2, "wrap_conv": 2, "pad": 2, "l2pool": 2, "select": 2, "rearrange": 2, "split_residual": 2,
           "l2norm": 2, "linear_region": 2, "region_forms": 2, "rank_up": 2, "slices": 2, "maxmin_indexed": 2,
           "householder": 2}
#: blocks whose natural input is an image (the focused tests start from a rank-3 sample shape)
IMAGE_BLOCKS = {"conv", "conv_transpose", "batchnorm", "pad", "wrap_conv", "avgpool", "maxpool", "lppool",
                "l2pool", "broadcast_pair", "groupsort", "region_forms", "region_whole", "series"}


#: variants that need an image (a rank-3 sample) to apply
IMAGE_VARIANTS = {"bigger", "depth_to_space", "space_to_depth", "reshape_zero"}


def focus_cases() -> list[tuple[str, str | None]]:
    """(block kind, variant) pairs the focused tests walk through: every variant of every block."""
    cases: list[tuple[str, str | None]] = []
    for kind in sorted(BLOCKS):
        options = list(dict.fromkeys(VARIANTS.get(kind, [])))
        cases += [(kind, v) for v in options] if options else [(kind, None)]
    return cases


@dataclass
class Program:
    """A generated model and how it was made."""

    model: onnx.ModelProto | None
    log: list[str]
    ops: dict[str, int]
    k: int
    sample_shape: tuple[int, ...]
    opset: int
    seed: int
    invalid: str | None = None
    blocks: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"sample shape {self.sample_shape}, opset {self.opset}, seed {self.seed}, {self.k} logits: "
                + "; ".join(self.log))


def _apply(d: Draw, b: Builder, v: str, kind: str) -> tuple[str, bool]:
    """Apply a block, or undo everything it wrote when it does not fit (returns the old value, False)."""
    mark = b.mark()
    try:
        return BLOCKS[kind](d, b, v), True
    except Invalid:
        b.undo(mark)
        return v, False


def draw_program(d: Draw, focus: str | None = None, max_blocks: int = 3, variant: str | None = None) -> Program:
    """A random program; with ``focus``, one block of that kind (must apply, in ``variant`` when given) between
    optional others."""
    d.forced = {focus: variant} if focus is not None and variant is not None else {}
    seed = d.int(0, 2 ** 31 - 1)
    if focus is not None and (focus in IMAGE_BLOCKS or variant in IMAGE_VARIANTS):
        sample = d.choice(SHAPES_3D)
    else:
        sample = d.choice(SHAPES_1D + SHAPES_3D)
    opset = d.choice(OPSETS)
    b = Builder(sample, opset, seed)
    v = "input"
    names = list(BLOCKS)
    pool = [n for n in names for _ in range(WEIGHTS.get(n, 1))]
    blocks: list[str] = []
    if focus is None:
        for _ in range(d.int(1, max_blocks)):
            kind = d.choice(pool)
            v, ok = _apply(d, b, v, kind)
            if ok:
                blocks.append(kind)
    else:
        if d.int(0, 2) == 0:
            kind = d.choice(["conv", "dense", "act", "rearrange", "scale"])
            v, ok = _apply(d, b, v, kind)
            blocks += [kind] if ok else []
        v, ok = _apply(d, b, v, focus)
        d.forced = {}
        if not ok:
            return Program(None, b.log, dict(b.ops), 0, sample, opset, seed, invalid=f"{focus} does not apply")
        blocks.append(focus)
        if d.int(0, 2) == 0:
            kind = d.choice(["act", "conv", "dense", "residual", "maxmin"])
            v, ok = _apply(d, b, v, kind)
            blocks += [kind] if ok else []
    k = d.choice([1, 2, 3, 4, 6, 8, 9, 10, 5, 7])
    try:
        out = head(d, b, v, k)
        model = b.model(out)
    except Invalid as exc:
        return Program(None, b.log, dict(b.ops), k, sample, opset, seed, invalid=f"head: {exc}", blocks=blocks)
    prog = Program(model, b.log, dict(b.ops), k, sample, opset, seed, blocks=blocks)
    prog.invalid = validate(prog)
    return prog


def validate(prog: Program) -> str | None:
    """None when onnxruntime runs the model and gives finite logits of the predicted shape ((N,) or (N, 1) for
    one logit)."""
    try:
        onnx.checker.check_model(prog.model)
        session = ort_session(prog.model)
        x = np.random.default_rng(0).random((3,) + prog.sample_shape).astype(np.float32)
        y = session.run(None, {"input": x})[0]
    except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise their own types
        return f"onnxruntime: {str(exc).splitlines()[0][:200]}"
    if y.shape != (3, prog.k) and not (prog.k == 1 and y.shape == (3,)):
        return f"onnxruntime gives shape {y.shape}, expected (3, {prog.k})"
    if not np.isfinite(y).all():
        return "non-finite logits"
    return None
