"""Size rules: how large a node's values and buffers get, and how many multiply-adds it does, before it runs.

Each rule takes a node's attributes (Python values) and its inputs (torch tensors or numpy arrays: only
``.shape`` and, for short integer vectors, the values are read) and returns upper bounds of (largest value or
working buffer it allocates, multiply-adds), in elements, or None when the inputs do not let it say. The rules
serve lipcert's own executor and onnx's reference evaluator alike (constant folding), so they follow the ONNX
operator definitions and never rely on an executor's helper. An operator names its rule in ``Op.size`` (or
``FoldOnly.size``); ``lipcert.graph.budget`` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lipcert.errors import ModelError
from lipcert.limits import MAX_RANK, UNBOUNDED, count

#: (largest value or buffer, multiply-adds) in elements
Bounds = tuple[int, int]


@dataclass(frozen=True)
class SizeRule:
    """One operator family's size rule: ``bound(attrs, inputs, name)`` (see the module docstring)."""

    bound: Callable[[dict[str, Any], Sequence[Any], str], Bounds | None]


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _shapes(inputs: Sequence[Any]) -> list[tuple[int, ...]]:
    return [_shape(t) for t in inputs if t is not None]


def _largest(inputs: Sequence[Any]) -> int:
    return max((count(s) for s in _shapes(inputs)), default=1)


def _first(inputs: Sequence[Any]) -> tuple[int, ...] | None:
    return _shape(inputs[0]) if inputs and inputs[0] is not None else None


def _second(inputs: Sequence[Any]) -> Any | None:
    return inputs[1] if len(inputs) > 1 else None


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
    listed = [list(s) for s in shapes]
    rank = max((len(s) for s in listed), default=0)
    out = [1] * rank
    for s in listed:
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


def _shrinking(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds:
    largest = _largest(inputs)
    return largest, largest


def _broadcasting(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds:
    shapes = _shapes(inputs)
    n = max(count(_broadcast(shapes)) if shapes else 1, _largest(inputs))
    return n, n


def _constant(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds:
    return _largest(inputs), 0


def _constant_of_shape(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds:
    first = inputs[0] if inputs else None
    return count(_ints(_vector(first, name, "ConstantOfShape")) if first is not None else []), 0


def _expand(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    x, target = _first(inputs), _second(inputs)
    if x is None or target is None:
        return None
    n = count(_broadcast([x, [abs(d) for d in _ints(_vector(target, name, "Expand"))]]))
    return max(n, _largest(inputs)), 0


def _tile(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    x, repeats = _first(inputs), _second(inputs)
    if x is None or repeats is None:
        return None
    return count(x) * count(abs(r) for r in _ints(_vector(repeats, name, "Tile"))), 0


def _range(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    present = [t for t in inputs if t is not None]
    if len(present) != 3:
        return None
    try:
        start, limit, delta = (float(t.reshape(-1)[0]) for t in present)
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (start, limit, delta)) or delta == 0:
        return UNBOUNDED, 0
    n = max(0, math.ceil((limit - start) / delta))
    return n, n


def _pad(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    x, given = _first(inputs), _second(inputs)
    if x is None:
        return None
    pads = _ints(_vector(given, name, "Pad")) if given is not None else _ints(attrs.get("pads") or [])
    largest = _largest(inputs)
    return max(count(d + sum(abs(p) for p in pads) for d in x), largest), largest


def _concat(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds:
    n = sum(count(s) for s in _shapes(inputs))
    return n, n


def _gather(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    shapes = _shapes(inputs)
    if len(shapes) < 2:
        return None
    data, idx = shapes[0], shapes[1]
    if not data:
        n = count(idx) * max(count(data), 1)
        return n, n
    axis = int(attrs.get("axis", 0)) % len(data)
    n = count(idx) * count(d for i, d in enumerate(data) if i != axis)
    return n, n


def _gather_elements(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    shapes = _shapes(inputs)
    return (count(shapes[1]), count(shapes[1])) if len(shapes) >= 2 else None


def _gather_nd(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
    shapes = _shapes(inputs)
    if len(shapes) < 2:
        return None
    n = count(shapes[1]) * max(count(shapes[0]), 1)  # generous: every index selects at most all of the data
    return n, n


def _window(form: str) -> Callable[[dict[str, Any], Sequence[Any], str], Bounds | None]:
    """The rule of a windowed operator: ``form`` "conv", "transpose" (ConvTranspose) or "pool"."""

    def bound(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
        x = _first(inputs)
        if x is None or len(x) <= 2:
            return None
        w = _second(inputs)
        size, work = _conv_like(form, attrs, x, _shape(w) if w is not None else None)
        return max(size, _largest(inputs)), work

    return bound


def _conv_like(form: str, attrs: dict[str, Any], x: tuple[int, ...], w: tuple[int, ...] | None) -> Bounds:
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
    reach = [d * (k - 1) for d, k in zip(dil, kernel, strict=False)]
    if form == "transpose":
        out_ch = (w[1] if w is not None and len(w) > 1 else channels) * max(int(attrs.get("group", 1) or 1), 1)
        extra = [abs(p) for p in _per_axis(attrs.get("output_padding"), nd, 0)]
        full = [(n - 1) * s + r + 1 + e + pads[i] + pads[nd + i]
                for i, (n, s, r, e) in enumerate(zip(spatial, strides, reach, extra, strict=False))]
        if attrs.get("output_shape") is not None:
            full = [max(f, abs(int(o))) for f, o in zip(full, list(attrs["output_shape"])[-nd:], strict=False)]
        k_total = count(w[2:]) if w is not None else count(kernel)
        return batch * out_ch * count(full), batch * channels * count(spatial) * (out_ch // max(
            int(attrs.get("group", 1) or 1), 1)) * k_total
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        padded = [n + r for n, r in zip(spatial, reach, strict=False)]
    else:
        padded = [n + pads[i] + pads[nd + i] for i, n in enumerate(spatial)]
    out = [max((p - r - 1) // s + 2, 1) for p, r, s in zip(padded, reach, strides, strict=False)]  # +1 covers ceil_mode
    if form == "conv":
        out_ch = w[0] if w is not None and len(w) > 1 else channels
        per_out = count(w[1:]) if w is not None else channels * count(kernel)
        unfolded = batch * per_out * count(out)  # im2col buffer of torch's slow convolution path
        size = max(batch * channels * count(padded), batch * out_ch * count(out), unfolded)
        return size, batch * out_ch * count(out) * per_out
    return max(batch * channels * count(padded), batch * channels * count(out)), \
        batch * channels * count(out) * count(kernel)


def _product(transposes: bool) -> Callable[[dict[str, Any], Sequence[Any], str], Bounds | None]:
    """The rule of a matrix product; ``transposes``: Gemm (transA/transB, and a bias C broadcast to the output)."""

    def bound(attrs: dict[str, Any], inputs: Sequence[Any], name: str) -> Bounds | None:
        shapes = _shapes(inputs)
        if len(shapes) < 2 or not shapes[0] or not shapes[1]:
            return None
        a, b = list(shapes[0]), list(shapes[1])
        if transposes:
            a, b = (a[::-1] if attrs.get("transA") else a), (b[::-1] if attrs.get("transB") else b)
        a = [1] + a if len(a) == 1 else a
        b = b + [1] if len(b) == 1 else b
        n = count(_broadcast([a[:-2], b[:-2]])) * a[-2] * b[-1]
        out = max(n, count(_broadcast([[a[-2], b[-1]], *shapes[2:]]))) if transposes else n
        return max(out, _largest(inputs)), n * max(a[-1], 1)

    return bound


#: every output is no larger than the largest input (same shape, a permutation, a part, a reduction)
SHRINKING = SizeRule(_shrinking)
#: the output is the broadcast of the inputs
BROADCAST = SizeRule(_broadcasting)
#: a value stored in the node: as large as it is, no arithmetic
CONSTANT = SizeRule(_constant)
#: a tensor of the shape given by the input's values
CONSTANT_OF_SHAPE = SizeRule(_constant_of_shape)
#: the broadcast of the data to the shape given by the second input's values
EXPAND = SizeRule(_expand)
#: the data repeated as many times as the second input's values say
TILE = SizeRule(_tile)
#: ceil((limit - start) / delta) entries, unbounded when that is not finite
RANGE = SizeRule(_range)
#: each axis grown by the sum of all pads (the input's or the attribute's)
PAD = SizeRule(_pad)
#: the sum of the inputs' sizes
CONCAT = SizeRule(_concat)
#: one slice of the data per index, along the gathered axis
GATHER = SizeRule(_gather)
#: as many entries as the indices
GATHER_ELEMENTS = SizeRule(_gather_elements)
#: every index selects at most all of the data
GATHER_ND = SizeRule(_gather_nd)
#: a convolution: the padded input, the output and the unfolded (im2col) input
CONV = SizeRule(_window("conv"))
#: a transposed convolution: its full output
CONV_TRANSPOSE = SizeRule(_window("transpose"))
#: a windowed pool: the padded input and the output (ceil_mode included)
POOL = SizeRule(_window("pool"))
#: a (batched, broadcast) matrix product
MATMUL = SizeRule(_product(False))
#: Gemm: a matrix product with transposes and a broadcast bias
GEMM = SizeRule(_product(True))
