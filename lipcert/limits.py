"""Resource limits for untrusted model and data files: refuse oversized tensors *before* allocating them.

Every size is counted in elements (not bytes) and compared with a maximum, ``DEFAULT_MAX_ELEMENTS`` unless the
caller passes ``max_elements`` (the CLI's ``--max-elements``). Counts are Python integers, so a declared shape
such as ``[2**40, 2**40]`` cannot overflow into a small number.

Intermediate values of an ONNX graph are bounded by :func:`bound_node_output`, an upper bound of a node's
output size computed from its inputs *before* the node runs; the loader runs a guarded probe of the graph
(:func:`lipcert.onnx_loader.guarded_probe`) with this check in front of every node before the ordinary fold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .errors import LipcertError, ModelError

#: Default largest number of elements of any one tensor, declared input or intermediate value (2**28 = 268M,
#: 1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 2**28


def resolve(max_elements: int | None) -> int:
    """The limit to apply: ``max_elements`` when given (a positive int), else the default."""
    if max_elements is None:
        return DEFAULT_MAX_ELEMENTS
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise LipcertError(f"max_elements must be a positive integer, got {max_elements!r}")
    return max_elements


def count(shape: Iterable[Any]) -> int:
    """Number of elements of a shape, as an exact Python int (negative dims count as 0)."""
    total = 1
    for d in shape:
        total *= max(int(d), 0)
    return total


def check(shape_or_count: Sequence[int] | int, limit: int, what: str, source: str | None = None,
          error: type[LipcertError] = ModelError) -> int:
    """Raise ``error`` naming ``what`` when a shape (or element count) exceeds ``limit``; return the count."""
    n = shape_or_count if isinstance(shape_or_count, int) else count(shape_or_count)
    if n > limit:
        shape = "" if isinstance(shape_or_count, int) else f" (shape {tuple(int(d) for d in shape_or_count)})"
        raise error(f"{what} has {n} elements{shape}, more than the limit of {limit} (max_elements)",
                    source=source)
    return n


def _broadcast(shapes: Iterable[Sequence[int]]) -> list[int]:
    """The broadcast of shapes, taking the largest size per axis (an upper bound even when they clash)."""
    shapes = [list(s) for s in shapes]
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, start=rank - len(s)):
            out[i] = max(out[i], int(d))
    return out


def _values(t: torch.Tensor | None) -> list[float]:
    if t is None:
        return []
    if t.numel() > 64:  # a shape or pads vector is short; a long one is reported by the op itself
        return []
    return [float(v) for v in t.reshape(-1).tolist()]


def _ints(values: list[float]) -> list[int]:
    return [int(v) if math.isfinite(v) else 2**62 for v in values]


def bound_node_output(op: str, attrs: dict[str, Any], inputs: Sequence[torch.Tensor | None]) -> int:
    """An upper bound of the largest output of a node, from its inputs, before running it.

    Ops that can make a large tensor out of small inputs get an exact or generous bound from the values of
    their shape-like inputs and attributes; every other op is bounded by the broadcast of its inputs' shapes
    (elementwise ops, and all shape-preserving or shrinking ops), times nothing."""
    shapes = [tuple(t.shape) for t in inputs if t is not None]
    generic = count(_broadcast(shapes)) if shapes else 1
    first = inputs[0] if inputs else None
    if op == "ConstantOfShape":
        return count(_ints(_values(first)))
    if op == "Expand" and len(inputs) > 1 and first is not None:
        return count(_broadcast([first.shape, _ints(_values(inputs[1]))]))
    if op == "Tile" and len(inputs) > 1 and first is not None:
        reps = _ints(_values(inputs[1]))
        return count(first.shape) * count(reps)
    if op == "Range" and len(inputs) == 3:
        try:
            start, limit, delta = (float(t.reshape(-1)[0]) for t in inputs)  # type: ignore[union-attr]
        except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
            return generic
        if not all(math.isfinite(v) for v in (start, limit, delta)) or delta == 0:
            return 2**62
        return max(0, math.ceil((limit - start) / delta))
    if op == "Pad" and first is not None:
        pads = _ints(_values(inputs[1])) if len(inputs) > 1 and inputs[1] is not None else list(
            attrs.get("pads") or [])
        rank = first.dim()
        if len(pads) == 2 * rank:
            return count(first.shape[i] + max(pads[i], 0) + max(pads[rank + i], 0) for i in range(rank))
        return generic
    if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool") and first is not None and first.dim() > 2:
        spatial = list(first.shape[2:])
        pads = [max(int(p), 0) for p in attrs.get("pads") or []]
        strides = [max(int(s), 1) for s in attrs.get("strides") or []]
        dil = [max(int(s), 1) for s in attrs.get("dilations") or []]
        channels = first.shape[1]
        if len(inputs) > 1 and inputs[1] is not None and inputs[1].dim() > 2:
            w = inputs[1]
            channels = max(channels, w.shape[0], w.shape[1] * max(int(attrs.get("group", 1)), 1))
            kernel = list(w.shape[2:])
        else:
            kernel = [int(k) for k in attrs.get("kernel_shape") or []]
        size = first.shape[0] * channels
        for i, d in enumerate(spatial):
            pad = sum(pads[i::len(spatial)]) if pads else 0
            if op == "ConvTranspose":
                s = strides[i] if i < len(strides) else 1
                k = kernel[i] if i < len(kernel) else 1
                dl = dil[i] if i < len(dil) else 1
                out_pad = list(attrs.get("output_padding") or [0] * len(spatial))
                extra = max(int(out_pad[i]), 0) if i < len(out_pad) else 0
                size *= d * s + dl * k + extra
            else:
                size *= d + pad
        return max(size, generic)
    if op in ("MatMul", "Gemm") and len(shapes) >= 2 and len(shapes[0]) >= 1 and len(shapes[1]) >= 1:
        a, b = shapes[0], shapes[1]
        rows = count(a[:-1]) if len(a) > 1 else 1
        cols = b[-1] if len(b) > 1 else 1
        if op == "Gemm" and attrs.get("transA"):
            rows = a[-1]
        if op == "Gemm" and attrs.get("transB"):
            cols = b[0]
        batch = count(_broadcast([a[:-2], b[:-2]]))
        return max(batch * rows * cols, generic)
    if op == "Gather" and len(shapes) >= 2 and shapes[0]:
        axis = int(attrs.get("axis", 0))
        data = shapes[0]
        rest = count(data) // max(data[axis % len(data)], 1) if data[axis % len(data)] else 0
        return count(shapes[1]) * max(rest, 1)
    if op == "Concat":
        return sum(count(s) for s in shapes)
    return generic


def check_node(node: Any, inputs: Sequence[torch.Tensor | None], limit: int, source: str | None = None) -> None:
    """Refuse to run ``node`` (a ``lipcert.graph.Node``) when its output could exceed ``limit`` elements."""
    n = bound_node_output(node.op, node.attrs, inputs)
    if n > limit:
        raise ModelError(f"node {node.name!r} ({node.op}) would produce a tensor of {n} elements, more than the "
                         f"limit of {limit} (max_elements)", source=source)
