"""Pooling and reduction operators."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from lipcert.graph.core import Node
from lipcert.graph.linop import LinearOperator, NonnegativeStructure, ScalarStructure, from_function
from lipcert.graph.ops import sizes
from lipcert.graph.ops.base import (
    EXACT,
    LipschitzRule,
    Op,
    Rounding,
    RunContext,
    bad,
    int_list,
    ints,
    register,
    required,
    same_pads,
    torch_pad_list,
)

Inputs = Sequence[torch.Tensor | None]

AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
#: the pools ``window_sum`` runs (a 1-D window as a 2-D one): those with ``divisor_override``
WINDOW = {2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class PoolSettings:
    """A pooling's ONNX attributes, normalised: one entry per pooled axis (``nd`` of them), explicit pads (begins,
    then ends), and whether a last partial window counts (ceil_mode)."""

    nd: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil: bool


def pool_settings(node: Node, x_spatial: Sequence[int]) -> PoolSettings:
    """Normalised pooling attributes: kernel, strides, explicit pads, dilations, ceil mode."""
    kernel = ints(node.attr("kernel_shape"))
    nd = len(kernel)
    if nd not in AVG or nd != len(x_spatial):
        raise bad(node, f"pooling over {nd} axes of a {len(x_spatial)}-D input is not supported")
    strides = ints(node.attr("strides"), nd, 1)
    dilations = ints(node.attr("dilations"), nd, 1)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise bad(node, f"auto_pad {auto_pad!r} is not supported")
    if auto_pad in ("NOTSET", ""):
        pads = ints(node.attr("pads"), 2 * nd, 0)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER") and any(d != 1 for d in dilations):
        raise bad(node, f"auto_pad {auto_pad} with dilations {dilations}: the specification pads for the dilated "
                        "window (ceil(input / stride) outputs), onnxruntime for the undilated one")
    else:
        pads = same_pads(auto_pad, x_spatial, kernel, strides, dilations)
    return PoolSettings(nd=nd, kernel=tuple(kernel), stride=tuple(strides), pads=tuple(pads),
                        dilation=tuple(dilations), ceil=bool(node.attr("ceil_mode", 0)))


def window_sum(x: torch.Tensor, s: PoolSettings, pad_value: float = 0.0) -> torch.Tensor:
    """Sum over each pooling window of x padded with ``pad_value`` (ONNX pads, possibly asymmetric)."""
    nd = s.nd
    if any(d != 1 for d in s.dilation):
        raise ValueError("dilated average or Lp pooling is not supported")
    xp = F.pad(x, torch_pad_list(s.pads), value=pad_value)
    squeeze = nd == 1
    if squeeze:
        xp = xp.unsqueeze(-2)
        kernel, strides = (1,) + s.kernel, (1,) + s.stride
    else:
        kernel, strides = s.kernel, s.stride
    pool = WINDOW[len(kernel)]
    out = pool(xp, kernel, strides, 0, s.ceil, True, divisor_override=1)
    return out.squeeze(-2) if squeeze else out


def average_pool(x: torch.Tensor, s: PoolSettings, count_include_pad: bool) -> torch.Tensor:
    """ONNX AveragePool: window sums divided by the count of (padded or real) entries in each window."""
    sums = window_sum(x, s)
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    if count_include_pad:
        counts = window_sum(F.pad(ones, torch_pad_list(s.pads), value=1.0), replace(s, pads=(0,) * (2 * s.nd)))
    else:
        counts = window_sum(ones, s)
    return ceil_crop(sums / counts, x.shape[2:], s)


def ceil_crop(out: torch.Tensor, x_spatial: Sequence[int], s: PoolSettings) -> torch.Tensor:
    """With ceil_mode, drop a last window that starts in the end padding, as onnxruntime (and torch) do."""
    if not s.ceil:
        return out
    nd = s.nd
    index: list[slice] = [slice(None)] * (out.dim() - nd)
    for i in range(nd):
        size = out.shape[out.dim() - nd + i]
        if size > 1 and (size - 1) * s.stride[i] >= x_spatial[i] + s.pads[i]:
            size -= 1
        index.append(slice(0, size))
    return out[tuple(index)]


@register
class AveragePool(Op):
    name = "AveragePool"
    size = sizes.POOL
    accumulates = True
    attributes = frozenset({'auto_pad', 'ceil_mode', 'count_include_pad', 'dilations', 'kernel_shape', 'pads',
                            'strides'})
    row_priority = 5

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        s = pool_settings(node, x.shape[2:])
        try:
            return [average_pool(x, s, bool(node.attr("count_include_pad", 0)))]
        except ValueError as exc:
            raise bad(node, str(exc)) from None

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        s = pool_settings(node, in_shape[1:])
        include = bool(node.attr("count_include_pad", 0))
        return from_function(lambda x: average_pool(x, s, include), in_shape, out_shape,
                             structure=NonnegativeStructure(), name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        """A sum of at most K entries (the window), then a division: gamma_(K+1); the pool is its own |P|."""
        window = math.prod(pool_settings(node, in_shape[1:]).kernel)
        return Rounding(terms=window + 1, abs_op=self.linear(node, consts, var, in_shape, out_shape))


@register
class GlobalAveragePool(Op):
    name = "GlobalAveragePool"
    size = sizes.SHRINKING
    accumulates = True
    row_priority = 6

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        n = math.prod(in_shape[1:])
        return from_function(lambda x: self.run(node, [x], RunContext(x.dtype))[0], in_shape, out_shape,
                             structure=ScalarStructure(value=1.0 / math.sqrt(n), norm_only=True),
                             name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        return Rounding(terms=math.prod(in_shape[1:]) + 1, abs_op=self.linear(node, consts, var, in_shape, out_shape))


@register
class MaxPool(Op):
    name = "MaxPool"
    size = sizes.POOL
    exact = True
    attributes = frozenset({'auto_pad', 'ceil_mode', 'dilations', 'kernel_shape', 'pads', 'storage_order', 'strides'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        if len(node.outputs) > 1 and node.outputs[1]:
            raise bad(node, "MaxPool with an Indices output is not supported")
        s = pool_settings(node, x.shape[2:])
        lowest = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
        xp = F.pad(x, torch_pad_list(s.pads), value=lowest)
        out = MAX[s.nd](xp, s.kernel, s.stride, 0, s.dilation, s.ceil)
        return [ceil_crop(out, x.shape[2:], s)]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule:
        s = pool_settings(node, in_shape[1:])
        return pool_rule("max pooling", s)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        return EXACT


def pool_rule(what: str, s: PoolSettings) -> LipschitzRule:
    """Local pooling is 1-Lipschitz when windows do not overlap; an entry in m windows gives sqrt(m)."""
    overlap = 1
    for k, st, d in zip(s.kernel, s.stride, s.dilation, strict=False):
        extent = (k - 1) * d + 1
        overlap *= min(k, -(-extent // st))
    if overlap == 1:
        return LipschitzRule(1.0, f"{what} with non-overlapping windows is 1-Lipschitz")
    return LipschitzRule(math.sqrt(overlap), f"{what}: an entry lies in up to {overlap} windows, sqrt({overlap})")


@register
class GlobalMaxPool(Op):
    name = "GlobalMaxPool"
    size = sizes.SHRINKING
    exact = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        return [x.flatten(2).amax(dim=2).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule:
        return LipschitzRule(1.0, "global max pooling is 1-Lipschitz")

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        return EXACT


@register
class LpPool(Op):
    name = "LpPool"
    size = sizes.POOL
    accumulates = True
    attributes = frozenset({'auto_pad', 'ceil_mode', 'dilations', 'kernel_shape', 'p', 'pads', 'strides'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        p = float(node.attr("p", 2))
        s = pool_settings(node, x.shape[2:])
        try:
            return [ceil_crop(window_sum(x.abs() ** p, s) ** (1.0 / p), x.shape[2:], s)]
        except ValueError as exc:
            raise bad(node, str(exc)) from None

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        if float(node.attr("p", 2)) != 2.0:
            return None
        return pool_rule("L2-norm pooling", pool_settings(node, in_shape[1:]))

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        """sqrt of a sum of K squares: every term non-negative, so the error is relative to the output
        (squares, K - 1 additions, the root; 4 for a pow that is not a plain product)."""
        return Rounding(relative=math.prod(pool_settings(node, in_shape[1:]).kernel) + 6)


@register
class GlobalLpPool(Op):
    name = "GlobalLpPool"
    size = sizes.SHRINKING
    accumulates = True
    attributes = frozenset({'p'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        p = float(node.attr("p", 2))
        out = (x.abs() ** p).flatten(2).sum(dim=2) ** (1.0 / p)
        return [out.reshape(*x.shape[:2], *([1] * (x.dim() - 2)))]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        if float(node.attr("p", 2)) != 2.0:
            return None
        return LipschitzRule(1.0, "the L2 norm over all positions is 1-Lipschitz")

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        return Rounding(relative=math.prod(in_shape[1:]) + 6)


class Reduce(Op):
    """ONNX Reduce*: axes from the attribute (older opsets) or the second input (newer)."""

    size = sizes.SHRINKING
    attributes = frozenset({"axes", "keepdims", "noop_with_empty_axes"})
    #: why a reduction over no entries is refused (None: the specification defines its value)
    empty_set: ClassVar[str | None] = None

    def axes(self, node: Node, inputs: Inputs, rank: int) -> list[int] | None:
        axes = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attr("axes")
        if not axes:
            return None if node.attr("noop_with_empty_axes", 0) else list(range(rank))
        return [a + rank if a < 0 else a for a in axes]

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        raise NotImplementedError

    def unreduced(self, x: torch.Tensor) -> torch.Tensor:
        """The result when noop_with_empty_axes leaves every axis: the elementwise part of the reduction."""
        return x

    def check_empty(self, node: Node, inputs: Inputs, x: torch.Tensor, axes: list[int]) -> None:
        """Refuse the reductions of a tensor with no entries where the result is the runtime's: over negative
        axes (onnxruntime then returns a tensor of the input's shape), and over an empty set whose value the
        specification leaves undefined (``empty_set``)."""
        given = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attr("axes")
        if given and min(given) < 0:
            raise bad(node, f"reduces a tensor with no entries (shape {list(x.shape)}) over the negative axes "
                            f"{list(given)}: onnxruntime returns the input's shape, not the specification's")
        kept = math.prod(d for i, d in enumerate(x.shape) if i not in axes)
        if self.empty_set is not None and kept and any(x.shape[a] == 0 for a in axes):
            raise bad(node, self.empty_set)

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        axes = self.axes(node, inputs, x.dim())
        if axes is None:
            return [self.unreduced(x)]
        if not x.numel():
            self.check_empty(node, inputs, x, axes)
        return [self.reduce(x, axes, bool(node.attr("keepdims", 1)))]


def extremum(fn: Callable[..., torch.Tensor], x: torch.Tensor, axes: list[int], keep: bool,
             identity: str) -> torch.Tensor:
    """``fn`` (amax or amin) over ``axes``; over an empty set, the identity of the reduction (the lowest value
    for a max, the highest for a min: -inf and inf for floats), as the specification defines it."""
    if all(x.shape[a] for a in axes):
        return fn(x, dim=axes, keepdim=keep)
    info = torch.finfo(x.dtype) if x.is_floating_point() else torch.iinfo(x.dtype) if x.dtype != torch.bool else None
    fill: float
    if info is None:
        fill = identity == "max"
    elif x.is_floating_point():
        fill = float("inf") if identity == "max" else float("-inf")
    else:
        fill = info.max if identity == "max" else info.min
    shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else \
        [d for i, d in enumerate(x.shape) if i not in axes]
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


@register
class ReduceMax(Reduce):
    name = "ReduceMax"
    exact = True

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        return extremum(torch.amax, x, axes, keep, "min")


@register
class ReduceMin(Reduce):
    name = "ReduceMin"
    exact = True

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        return extremum(torch.amin, x, axes, keep, "max")


class LinearReduce(Reduce):
    """A sum or mean over axes of one sample: linear, with non-negative weights (bounded by the Schur test,
    which is exact for it); never over the batch axis."""

    accumulates = True

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        axes = self.axes(node, consts, len(in_shape) + 1)
        if var != 0 or axes is None or 0 in axes:
            return None
        return from_function(lambda x: self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0], in_shape,
                             out_shape, structure=NonnegativeStructure(), name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape)
        axes = self.axes(node, consts, len(in_shape) + 1)
        if op is None or axes is None:  # ``linear`` gives a map only over given axes
            return None
        return Rounding(terms=math.prod(in_shape[a - 1] for a in axes) + 1, abs_op=op)


@register
class ReduceSum(LinearReduce):
    name = "ReduceSum"

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        return torch.sum(x, dim=axes, keepdim=keep)


@register
class ReduceMean(LinearReduce):
    name = "ReduceMean"
    empty_set = "the mean of no entries is left undefined by the specification (onnxruntime gives 0)"

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        return torch.mean(x, dim=axes, keepdim=keep)


@register
class ReduceL2(Reduce):
    name = "ReduceL2"
    accumulates = True

    def reduce(self, x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        return torch.sqrt(torch.sum(x * x, dim=axes, keepdim=keep))

    def unreduced(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)
