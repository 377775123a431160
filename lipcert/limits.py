"""Resource limits for untrusted model and data files: refuse oversized tensors *before* allocating them.

Sizes are counted in elements (not bytes) and compared with a maximum: ``max_elements`` when the caller passes
one (the CLI's ``--max-elements``), else the environment variable ``LIPCERT_MAX_ELEMENTS`` when it is set, else
:data:`DEFAULT_MAX_ELEMENTS`. Counts are exact Python integers, so a declared shape such as
``[2**40, 2**40]`` cannot overflow into a small number.

What is bounded, and by what (``L`` is the limit):

* every tensor stored in a model file (ONNX initializers, Constant values, safetensors tensors): ``L``
  elements, checked from the declared dims before any byte of data is decoded;
* the model's input at the probe batch, and every value the loader computes while folding the graph (the
  *intermediate shapes*): ``L`` elements per value, predicted by :func:`node_bounds` from the node's inputs
  and attributes *before* the node runs, and checked again on what it produced;
* the working memory a node needs (a convolution's unfolded input, padded copies): ``L`` elements;
* all values held at once while folding: ``TOTAL_FACTOR * L`` elements;
* the multiply-adds of one node (convolutions, matrix products, pooling windows): ``WORK_FACTOR * L``, so that
  a small file cannot ask for hours of arithmetic;
* one dataset sample: ``L`` elements.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lipcert.errors import ConfigError, LipcertError, ModelError

#: Default largest number of elements of one tensor, declared input, intermediate value or dataset sample
#: (2**28 = 268,435,456: 1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 2**28
#: Environment variable that replaces the default when ``max_elements`` is not given.
ENV_VAR = "LIPCERT_MAX_ELEMENTS"
#: All values held at once while the loader folds a graph: at most this many times the limit.
TOTAL_FACTOR = 4
#: Multiply-adds one node may need while the loader folds a graph: at most this many times the limit.
WORK_FACTOR = 256
#: Largest rank of a shape the loader builds (torch's own limit is 64).
MAX_RANK = 64
#: Largest safetensors JSON header, in bytes (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

UNBOUNDED = 2**200  # what an unbounded or nonsensical size counts as: more than any limit


def resolve(max_elements: int | None) -> int:
    """The limit to apply: ``max_elements`` when given, else ``$LIPCERT_MAX_ELEMENTS``, else the default."""
    if max_elements is None:
        text = os.environ.get(ENV_VAR, "").strip()
        if not text:
            return DEFAULT_MAX_ELEMENTS
        try:
            max_elements = int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{ENV_VAR}={text!r} is not an integer") from None
        if max_elements < 1:
            raise ConfigError(f"{ENV_VAR}={text!r} must be a positive integer")
        return max_elements
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ConfigError(f"max_elements must be a positive integer, got {max_elements!r}")
    return max_elements


def count(shape: Iterable[Any]) -> int:
    """Number of elements of a shape, as an exact Python int (negative dims count as 0)."""
    total = 1
    for d in shape:
        total *= max(int(d), 0)
    return total


def shape_text(shape: Sequence[Any], most: int = 8) -> str:
    """A shape for a one-line message, shortened when it has many dimensions."""
    dims = [str(int(d)) for d in shape]
    if len(dims) > most:
        dims = dims[:most] + [f"... ({len(dims)} dims)"]
    return "(" + ", ".join(dims) + ")"


def check(shape_or_count: Sequence[int] | int, limit: int, what: str, source: str | None = None,
          error: type[LipcertError] = ModelError) -> int:
    """Raise ``error`` naming ``what`` when a shape (or element count) exceeds ``limit``; return the count."""
    n = shape_or_count if isinstance(shape_or_count, int) else count(shape_or_count)
    if n > limit:
        shape = "" if isinstance(shape_or_count, int) else f" (shape {shape_text(shape_or_count)})"
        size = "more than 10**60" if n >= UNBOUNDED else f"{n:,}"
        raise error(f"{what} has {size} elements{shape}, more than the limit of {limit:,} (max_elements; "
                    f"raise it with --max-elements)", source=source)
    return n


# ------------------------------------------------------------------ bounds of one node, before it runs
#
# The functions below take a node's op type, its attributes (Python values) and its inputs (torch tensors or
# numpy arrays: only ``.shape`` and, for short integer vectors, the values are read) and return upper bounds
# of (largest value or working buffer it allocates, multiply-adds), in elements. They are used both for
# lipcert's own executor and for onnx's reference evaluator, so they follow the ONNX operator definitions
# and never rely on an executor's helper.

#: Elementwise ops whose output is the broadcast of their inputs.
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "And", "Or", "Xor", "Where", "Clip", "PRelu", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr",
    "BitwiseXor", "BatchNormalization", "InstanceNormalization", "Dropout",
})
#: Ops whose every output is no larger than their largest input (same shape, a permutation, a part, a
#: reduction), in lipcert's registry and in the standard operator set.
SHRINKING_OPS = frozenset({
    "Abs", "Neg", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Gelu", "Mish", "HardSwish", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Reciprocal", "Sign", "Not",
    "Floor", "Ceil", "Round", "Erf", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh",
    "Acosh", "Atanh", "IsNaN", "IsInf", "BitwiseNot", "Identity", "Cast", "CastLike", "Softmax", "LogSoftmax",
    "Hardmax", "LpNormalization", "LayerNormalization", "GroupNormalization", "MeanVarianceNormalization",
    "CumSum", "Trilu", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
    "Split", "TopK", "DepthToSpace", "SpaceToDepth", "ReverseSequence", "Compress", "EyeLike", "Shape", "Size",
    "Det", "Shrink", "ScatterElements", "ScatterND", "Scatter", "NonMaxSuppression", "Unique", "Einsum_none",
})


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _vector(t: Any, node_name: str, op: str) -> list[float]:
    """The values of a short shape-like input (a shape, repeats, pads); a long one cannot be a valid shape."""
    n = count(_shape(t))
    if n > MAX_RANK * 2 + 8:
        raise ModelError(f"node {node_name!r} ({op}): a shape-like input of {n:,} values (at most "
                         f"{MAX_RANK} dimensions are supported)")
    return [float(v) for v in t.reshape(-1).tolist()]


def _ints(values: Iterable[float]) -> list[int]:
    return [int(v) if math.isfinite(v) and abs(v) < UNBOUNDED else UNBOUNDED for v in values]


def _broadcast(shapes: Iterable[Sequence[int]]) -> list[int]:
    """The broadcast of shapes, taking the largest size per axis (an upper bound even when they clash)."""
    shapes = [list(s) for s in shapes]
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, start=rank - len(s)):
            out[i] = max(out[i], int(d))
    return out


def _per_axis(value: Any, n: int, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [int(value)] * n
    values = [int(v) for v in value]
    return (values + [default] * n)[:n]


def _conv_like(op: str, attrs: dict[str, Any], x: tuple[int, ...], w: tuple[int, ...] | None) -> tuple[int, int]:
    """Bounds of Conv, ConvTranspose and the windowed pools from the ONNX attribute semantics."""
    nd = len(x) - 2
    batch, channels, spatial = x[0], x[1], list(x[2:])
    if w is not None and len(w) == len(x):
        kernel = _per_axis(attrs.get("kernel_shape"), nd, 1) if attrs.get("kernel_shape") else list(w[2:])
    else:
        kernel = _per_axis(attrs.get("kernel_shape"), nd, 1)
    kernel = [max(k, 1) for k in kernel]
    strides = [max(abs(s), 1) for s in _per_axis(attrs.get("strides"), nd, 1)]
    dil = [max(abs(d), 1) for d in _per_axis(attrs.get("dilations"), nd, 1)]
    pads = [abs(p) for p in _per_axis(attrs.get("pads"), 2 * nd, 0)]
    auto = str(attrs.get("auto_pad", "NOTSET"))
    reach = [d * (k - 1) for d, k in zip(dil, kernel)]
    if op == "ConvTranspose":
        out_ch = (w[1] if w is not None and len(w) > 1 else channels) * max(int(attrs.get("group", 1) or 1), 1)
        extra = [abs(p) for p in _per_axis(attrs.get("output_padding"), nd, 0)]
        full = [(n - 1) * s + r + 1 + e + pads[i] + pads[nd + i]
                for i, (n, s, r, e) in enumerate(zip(spatial, strides, reach, extra))]
        if attrs.get("output_shape") is not None:
            full = [max(f, abs(int(o))) for f, o in zip(full, list(attrs["output_shape"])[-nd:])]
        k_total = count(w[2:]) if w is not None else count(kernel)
        return batch * out_ch * count(full), batch * channels * count(spatial) * (out_ch // max(
            int(attrs.get("group", 1) or 1), 1)) * k_total
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        padded = [n + r for n, r in zip(spatial, reach)]
    else:
        padded = [n + pads[i] + pads[nd + i] for i, n in enumerate(spatial)]
    out = [max((p - r - 1) // s + 2, 1) for p, r, s in zip(padded, reach, strides)]  # +1 covers ceil_mode
    if op == "Conv":
        out_ch = w[0] if w is not None and len(w) > 1 else channels
        per_out = count(w[1:]) if w is not None else channels * count(kernel)
        unfolded = batch * per_out * count(out)  # im2col buffer of torch's slow convolution path
        size = max(batch * channels * count(padded), batch * out_ch * count(out), unfolded)
        return size, batch * out_ch * count(out) * per_out
    return max(batch * channels * count(padded), batch * channels * count(out)), \
        batch * channels * count(out) * count(kernel)


def node_bounds(op: str, attrs: dict[str, Any], inputs: Sequence[Any], name: str = "?") -> tuple[int, int] | None:
    """(elements, multiply-adds): upper bounds of the largest value or buffer a node allocates and of its
    arithmetic, from its inputs before it runs; None for an op this module does not know (the caller then
    relies on other means)."""
    present = [t for t in inputs if t is not None]
    shapes = [_shape(t) for t in present]
    largest = max((count(s) for s in shapes), default=1)
    first = inputs[0] if inputs else None
    x = _shape(first) if first is not None else None
    if op in SHRINKING_OPS:
        return largest, largest
    if op in BROADCAST_OPS:
        n = count(_broadcast(shapes)) if shapes else 1
        return max(n, largest), max(n, largest)
    if op == "Constant":
        return largest, 0
    if op == "ConstantOfShape":
        shape = _ints(_vector(first, name, op)) if first is not None else []
        return count(shape), 0
    if op == "Expand" and x is not None and len(inputs) > 1 and inputs[1] is not None:
        n = count(_broadcast([x, [abs(d) for d in _ints(_vector(inputs[1], name, op))]]))
        return max(n, largest), 0
    if op == "Tile" and x is not None and len(inputs) > 1 and inputs[1] is not None:
        return count(x) * count(abs(r) for r in _ints(_vector(inputs[1], name, op))), 0
    if op == "Range" and len(present) == 3:
        try:
            start, limit, delta = (float(t.reshape(-1)[0]) for t in present)
        except (IndexError, RuntimeError, TypeError, ValueError):
            return None
        if not all(math.isfinite(v) for v in (start, limit, delta)) or delta == 0:
            return UNBOUNDED, 0
        n = max(0, math.ceil((limit - start) / delta))
        return n, n
    if op == "Pad" and x is not None:
        pads = _ints(_vector(inputs[1], name, op)) if len(inputs) > 1 and inputs[1] is not None \
            else _ints(attrs.get("pads") or [])
        return max(count(d + sum(abs(p) for p in pads) for d in x), largest), largest
    if op == "Concat":
        n = sum(count(s) for s in shapes)
        return n, n
    if op in ("Gather", "GatherElements", "GatherND") and len(shapes) >= 2:
        data, idx = shapes[0], shapes[1]
        if op == "GatherElements":
            return count(idx), count(idx)
        n = count(idx) * max(count(data), 1)  # generous: every index selects at most all of the data
        if op == "Gather" and data:
            axis = int(attrs.get("axis", 0)) % len(data)
            n = count(idx) * count(d for i, d in enumerate(data) if i != axis)
        return n, n
    if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool") and x is not None and len(x) > 2:
        w = _shape(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        size, work = _conv_like(op, attrs, x, w)
        return max(size, largest), work
    if op in ("MatMul", "Gemm", "MatMulInteger") and len(shapes) >= 2 and shapes[0] and shapes[1]:
        a, b = list(shapes[0]), list(shapes[1])
        if op == "Gemm":
            a, b = (a[::-1] if attrs.get("transA") else a), (b[::-1] if attrs.get("transB") else b)
        a = [1] + a if len(a) == 1 else a
        b = b + [1] if len(b) == 1 else b
        n = count(_broadcast([a[:-2], b[:-2]])) * a[-2] * b[-1]
        out = max(n, count(_broadcast([[a[-2], b[-1]]] + shapes[2:])) if op == "Gemm" else n)
        return max(out, largest), n * max(a[-1], 1)
    return None


def check_node(node: Any, inputs: Sequence[Any], limit: int, source: str | None = None,
               live: int = 0) -> int:
    """Refuse to run ``node`` (with ``.name``, ``.op``, ``.attrs``) when it could allocate more than ``limit``
    elements, bring the values held at once (``live`` before it) above ``TOTAL_FACTOR * limit``, or need more
    than ``WORK_FACTOR * limit`` multiply-adds. Returns the predicted output size (0 when unknown)."""
    try:
        bounds = node_bounds(node.op, node.attrs, inputs, node.name)
    except (TypeError, ValueError, OverflowError, IndexError, RuntimeError, AttributeError):
        bounds = None  # malformed attributes: the op itself reports them when it runs
    if bounds is None:
        return 0
    size, work = bounds
    where = f"node {node.name!r} ({node.op})"
    if size > limit:
        text = "more than 10**60" if size >= UNBOUNDED else f"{size:,}"
        raise ModelError(f"{where} would allocate {text} elements, more than the limit of {limit:,} "
                         "(max_elements; raise it with --max-elements)", source=source)
    if live + size > TOTAL_FACTOR * limit:
        raise ModelError(f"{where} would bring the values held while folding the graph to {live + size:,} "
                         f"elements, more than {TOTAL_FACTOR} x the limit of {limit:,} (max_elements)",
                         source=source)
    if work > WORK_FACTOR * limit:
        raise ModelError(f"{where} would need {work:,} multiply-adds, more than {WORK_FACTOR} x the limit of "
                         f"{limit:,} (max_elements)", source=source)
    return size

