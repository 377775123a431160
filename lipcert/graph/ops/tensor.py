"""Operators that move, select or build tensors: shape plumbing, reshapes, slicing, padding, sorting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lipcert.graph.core import Node
from lipcert.graph.linop import (
    IsometryStructure,
    LinearOperator,
    NonnegativeStructure,
    ProjectionStructure,
    ScalarStructure,
    from_function,
    identity,
)
from lipcert.graph.ops import sizes
from lipcert.graph.ops.base import (
    EXACT,
    CombinationMode,
    LipschitzRule,
    Op,
    Rounding,
    RunContext,
    bad,
    int_list,
    register,
    required,
)

Inputs = Sequence[torch.Tensor | None]

#: ONNX TensorProto data types lipcert can cast to. In a float32 run, a cast to float32 or float64 gives that type
#: (the run goes on in it, as the specification says), and a cast to a half type rounds to it and goes on in
#: float32, as lipcert holds half types (onnxruntime would go on in the half type: the cross-check of every
#: intermediate value tells the two apart); a float64 run (verify's analysis of the real-number function) keeps
#: every float exact.
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
    2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool,
}

#: the integer types a float is cast to, with the range [low, high) its truncation must lie in: outside it (and for
#: NaN) the specification leaves the result undefined
INTEGER_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 2 ** 8), torch.int8: (-2 ** 7, 2 ** 7), torch.int16: (-2 ** 15, 2 ** 15),
    torch.int32: (-2 ** 31, 2 ** 31), torch.int64: (-2 ** 63, 2 ** 63),
}


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@register
class Constant(Op):
    name = "Constant"
    size = sizes.CONSTANT
    exact = True
    attributes = frozenset({'value', 'value_float', 'value_floats', 'value_int', 'value_ints'})
    refused = {'sparse_value': 'sparse constants are not supported',
               'value_string': 'string constants are not supported',
               'value_strings': 'string constants are not supported'}

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                           ("value_int", torch.int64), ("value_ints", torch.int64)):
            if key in node.attrs:
                return [torch.tensor(node.attrs[key], dtype=dtype)]
        if "value" in node.attrs:
            return [node.attrs["value"]]
        raise bad(node, "has no supported value attribute")


@register
class Cast(Op):
    """Casts between float types keep real values up to one rounding to the target type: the identity map,
    with that rounding in its ``Rounding`` (float32 and float64 targets; half types have no rule, since they
    can also overflow). Casts to integers and booleans have no rule."""

    name = "Cast"
    size = sizes.SHRINKING
    exact = True
    attributes = frozenset({'round_mode', 'saturate', 'to'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        to = int(node.attr("to", 1))
        if to not in ONNX_DTYPES:
            raise bad(node, f"cast to ONNX type {to} is not supported")
        target = ONNX_DTYPES[to]
        x = required(inputs, 0, node)
        if not target.is_floating_point:
            if x.is_floating_point() and target in INTEGER_RANGES:
                low, high = INTEGER_RANGES[target]
                whole = torch.trunc(x.detach())
                outside = ~((whole >= low) & (whole < high))  # NaN is outside too
                if bool(outside.any()):
                    value = float(x.detach()[outside].reshape(-1)[0])
                    raise bad(node, f"casts {value:g} to {str(target).removeprefix('torch.')}, whose range it is "
                                    "outside: the specification leaves the result undefined (runtimes differ)")
            return [x.to(target)]
        if ctx.dtype == torch.float64:  # the analysis' real-number function: a float cast is exact
            return [x.to(torch.float64)]
        if target.itemsize < 4:  # rounded to the half type, then held in float32 as lipcert holds half types
            return [x.to(target).to(torch.float32)]
        return [x.to(target)]

    def _float_identity(self, node: Node, var: int) -> bool:
        return var == 0 and int(node.attr("to", 1)) in (1, 11)

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if not self._float_identity(node, var) or tuple(in_shape) != tuple(out_shape):
            return None
        return from_function(lambda x: x, in_shape, out_shape, structure=ScalarStructure(value=1.0),
                             name=node.name, adjoint=lambda y: y)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape)
        return None if op is None else Rounding(abs_op=op, relative=1)  # one rounding when it narrows


@register
class Shape(Op):
    name = "Shape"
    size = sizes.SHRINKING
    exact = True
    attributes = frozenset({'end', 'start'})
    shape_only = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        dims = list(required(inputs, 0, node).shape)
        start, end = node.attr("start", 0), node.attr("end", None)
        return [torch.tensor(dims[start:end], dtype=torch.int64)]


@register
class Size(Op):
    name = "Size"
    size = sizes.SHRINKING
    exact = True
    shape_only = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [torch.tensor(required(inputs, 0, node).numel(), dtype=torch.int64)]


@register
class ConstantOfShape(Op):
    name = "ConstantOfShape"
    size = sizes.CONSTANT_OF_SHAPE
    exact = True
    attributes = frozenset({'value'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        value = node.attr("value")
        fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
        shape = int_list(inputs[0]) or []
        return [torch.full(shape, fill.item(), dtype=fill.dtype)]


@register
class Range(Op):
    """start + i * delta for i < max(ceil((limit - start) / delta), 0), computed in the inputs' type (half
    types are read as float32, which is the default ``stash_type``)."""

    name = "Range"
    size = sizes.RANGE
    attributes = frozenset({"stash_type"})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        if int(node.attr("stash_type", 1)) != 1:
            raise bad(node, "stash_type other than float (1) is not supported")
        start, limit, delta = (required(inputs, i, node).reshape(()) for i in range(len(inputs)))
        if float(delta) == 0:
            raise bad(node, "delta is 0")
        count = max(math.ceil(float((limit - start) / delta)) if start.is_floating_point()
                    else -(-(int(limit) - int(start)) // int(delta)), 0)
        return [start + torch.arange(count, dtype=start.dtype) * delta]


@register
class Expand(Op):
    name = "Expand"
    size = sizes.EXPAND
    exact = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, shape = required(inputs, 0, node), *inputs[1:]
        target = torch.broadcast_shapes(tuple(x.shape), tuple(int_list(shape) or []))
        return [x.expand(target)]


@register
class Tile(Op):
    name = "Tile"
    size = sizes.TILE
    exact = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [required(inputs, 0, node).repeat(*(int_list(inputs[1]) or []))]


class Copies(Op):
    """An operator whose linear map copies entries (each output a copy of one input entry, or zero): exact in
    floating point, and its own absolute value."""

    exact = True

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape, output)
        if op is not None:
            return Rounding(abs_op=op)
        return EXACT if self.lipschitz(node, consts, var, in_shape, out_shape) is not None else None


def selection(name: str, index: torch.Tensor, forward, in_shape: tuple[int, ...],
              out_shape: tuple[int, ...]) -> LinearOperator:
    """The copy map of a gather: each output entry the input entry at ``index`` (per sample, flat). A projection
    when no input entry is read twice (norm 1), else a non-negative map (its norm the root of the most reads)."""
    flat = index.reshape(-1)
    repeats = flat.numel() != int(torch.unique(flat).numel())
    structure = NonnegativeStructure() if repeats else ProjectionStructure()
    return from_function(forward, in_shape, out_shape, name=name, structure=structure)


@register
class Gather(Copies):
    """Entries at constant indices along one axis: a copy map (see ``selection``)."""

    name = "Gather"
    size = sizes.GATHER
    attributes = frozenset({'axis'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, idx = (required(inputs, i, node) for i in range(len(inputs)))
        axis = _axis(int(node.attr("axis", 0)), x.dim())
        idx = idx.long().to(x.device)
        flat = torch.where(idx < 0, idx + x.shape[axis], idx).reshape(-1)
        out = torch.index_select(x, axis, flat)
        return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        idx = consts[1] if len(consts) > 1 else None
        axis = _axis(int(node.attr("axis", 0)), len(in_shape) + 1)
        if var != 0 or idx is None or axis < 1 or idx.is_floating_point():
            return None  # a gather along the batch axis selects samples, not entries of one sample
        positions = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape((1,) + tuple(in_shape))
        index = self.run(node, [positions, idx], RunContext(torch.float64))[0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x, idx], RunContext(x.dtype))[0]

        return selection(node.name, index, forward, in_shape, out_shape)


@register
class GatherElements(Copies):
    """torch.gather: each output entry the input entry at its index along one axis; with constant indices a copy
    map (``selection``), a fixed permutation when no entry is read twice."""

    name = "GatherElements"
    size = sizes.GATHER_ELEMENTS
    attributes = frozenset({'axis'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, idx = (required(inputs, i, node) for i in range(len(inputs)))
        axis = _axis(int(node.attr("axis", 0)), x.dim())
        if idx.dim() != x.dim():
            raise bad(node, f"indices of rank {idx.dim()} for data of rank {x.dim()}")
        idx = idx.long().to(x.device)
        n = x.shape[axis]
        if bool(((idx < -n) | (idx >= n)).any()):
            raise bad(node, f"an index is outside [-{n}, {n - 1}]")
        return [torch.gather(x, axis, torch.where(idx < 0, idx + n, idx))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        idx = consts[1] if len(consts) > 1 else None
        axis = _axis(int(node.attr("axis", 0)), len(in_shape) + 1)
        if var != 0 or idx is None or axis < 1 or idx.dim() != len(in_shape) + 1 or idx.shape[0] != 1:
            return None  # indices per sample of the batch, or along the batch axis: not one map of a sample
        positions = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape((1,) + tuple(in_shape))
        index = self.run(node, [positions, idx], RunContext(torch.float64))[0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x, idx.expand((x.shape[0],) + tuple(idx.shape[1:]))], RunContext(x.dtype))[0]

        return selection(node.name, index, forward, in_shape, out_shape)


class Rearrange(Copies):
    """An operator that only moves entries of each sample (reshape, transpose, squeeze): an isometry."""

    size = sizes.SHRINKING
    #: whether the op keeps the flat order of each sample (a reshape); a permutation of entries otherwise
    flat = True

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        if not self.flat:  # a permutation of entries; the adjoint by autograd is exact
            return from_function(lambda x: self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0],
                                 in_shape, out_shape,
                                 structure=IsometryStructure(flat=False, onto=True), name=node.name)
        return from_function(lambda x: x.reshape((x.shape[0],) + tuple(out_shape)), in_shape, out_shape,
                             structure=IsometryStructure(flat=True, onto=True), name=node.name,
                             adjoint=lambda y: y.reshape((y.shape[0],) + tuple(in_shape)))


@register
class Reshape(Rearrange):
    name = "Reshape"
    attributes = frozenset({'allowzero'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, shape = required(inputs, 0, node), *inputs[1:]
        dims = int_list(shape) or []
        allowzero = bool(node.attr("allowzero", 0))
        if dims.count(-1) > 1 or min(dims, default=0) < -1 or (allowzero and 0 in dims and -1 in dims):
            raise bad(node, f"shape {dims} is invalid (at most one -1, no other negative size, and with allowzero=1 "
                            "not both 0 and -1)")
        if not allowzero:
            if any(d == 0 and i >= x.dim() for i, d in enumerate(dims)):
                raise bad(node, f"shape {dims} copies a dimension (0) beyond the {x.dim()} of the input")
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return [x.reshape(dims)]


@register
class Flatten(Rearrange):
    name = "Flatten"
    attributes = frozenset({'axis'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        axis = _axis(int(node.attr("axis", 1)), x.dim())
        return [x.reshape(math.prod(x.shape[:axis]), -1)]


@register
class Transpose(Rearrange):
    name = "Transpose"
    attributes = frozenset({'perm'})
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        perm = node.attr("perm") or list(reversed(range(x.dim())))
        return [x.permute(*perm)]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        perm = node.attr("perm") or list(reversed(range(len(in_shape) + 1)))
        if var != 0 or perm[0] != 0:
            return None  # a transpose that moves the batch axis mixes samples
        inverse = [perm.index(i) for i in range(len(perm))]
        return from_function(lambda x: x.permute(*perm), in_shape, out_shape,
                             structure=IsometryStructure(flat=False, onto=True), name=node.name,
                             adjoint=lambda y: y.permute(*inverse))


def _axes(node: Node, inputs: Inputs) -> list[int] | None:
    """Axes from the opset-13+ input or the older attribute."""
    if len(inputs) > 1 and inputs[1] is not None:
        return int_list(inputs[1])
    value = node.attr("axes")
    return None if value is None else [int(a) for a in value]


def _blocksize(node: Node, x: torch.Tensor) -> int:
    """DepthToSpace / SpaceToDepth: the block size, checked with the 4-D input it applies to."""
    b = int(node.attr("blocksize"))
    if x.dim() != 4 or b < 1:
        raise bad(node, f"needs a 4-D input and a positive blocksize (got {x.dim()}-D, blocksize {b})")
    return b


@register
class DepthToSpace(Rearrange):
    """Moves channel blocks into b x b spatial blocks (DCR or CRD order, as in the ONNX definition)."""

    name = "DepthToSpace"
    attributes = frozenset({'blocksize', 'mode'})
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        b = _blocksize(node, x)
        n, c, h, w = x.shape
        if c % (b * b):
            raise bad(node, f"{c} channels are not divisible by blocksize^2 = {b * b}")
        mode = node.attr("mode", "DCR")
        if mode not in ("DCR", "CRD"):
            raise bad(node, f"mode {mode!r} is not DCR or CRD")
        if mode == "CRD":
            t = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            t = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return [t.reshape(n, c // (b * b), h * b, w * b)]


@register
class SpaceToDepth(Rearrange):
    """Moves b x b spatial blocks into channels (the inverse of DepthToSpace in the same mode, DCR or CRD)."""

    name = "SpaceToDepth"
    attributes = frozenset({'blocksize', 'mode'})
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        b = _blocksize(node, x)
        n, c, h, w = x.shape
        if h % b or w % b:
            raise bad(node, f"spatial size {h}x{w} is not divisible by blocksize {b}")
        t = x.reshape(n, c, h // b, b, w // b, b)
        mode = node.attr("mode", "DCR")
        if mode not in ("DCR", "CRD"):
            raise bad(node, f"mode {mode!r} is not DCR or CRD")
        t = t.permute(0, 1, 3, 5, 2, 4) if mode == "CRD" else t.permute(0, 3, 5, 1, 2, 4)
        return [t.reshape(n, c * b * b, h // b, w // b)]


@register
class Squeeze(Rearrange):
    name = "Squeeze"
    attributes = frozenset({'axes'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        axes = _axes(node, inputs)
        if axes is None:
            return [x.squeeze()]
        keep = [d for i, d in enumerate(x.shape) if i not in {_axis(a, x.dim()) for a in axes}]
        return [x.reshape(keep)]


@register
class Unsqueeze(Rearrange):
    name = "Unsqueeze"
    attributes = frozenset({'axes'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        axes = _axes(node, inputs) or []
        rank = x.dim() + len(axes)
        out = x
        for a in sorted(_axis(a, rank) for a in axes):
            out = out.unsqueeze(a)
        return [out]


@register
class Concat(Copies):
    name = "Concat"
    size = sizes.CONCAT
    attributes = frozenset({'axis'})
    combination, combination_reason = CombinationMode.CONCAT, "L([f; g]) <= sqrt(L(f)^2 + L(g)^2)"
    row_priority, row_suffix = 10, False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        parts = [t for t in inputs if t is not None]
        dtype = torch.promote_types(parts[0].dtype, parts[-1].dtype) if parts else None
        return [torch.cat([p.to(dtype) for p in parts], dim=int(node.attr("axis", 0)))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        """One data input among constants: its linear part places x among zeros, an isometry; the identity
        when the other parts are empty (equal shapes), as TorchScript exports a circular pad of width 0."""
        axis = int(node.attr("axis", 0))
        if tuple(in_shape) == tuple(out_shape):
            return identity(in_shape, node.name)

        def forward(x: torch.Tensor) -> torch.Tensor:
            parts = [x if i == var or c is None
                     else torch.zeros(x.shape[:1] + tuple(c.shape[1:]), dtype=x.dtype, device=x.device)
                     for i, c in enumerate(consts) if i == var or c is not None]
            return torch.cat(parts, dim=axis)

        return from_function(forward, in_shape, out_shape, structure=IsometryStructure(), name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape, output)
        nonzero = any(c is not None and bool(c.any()) for i, c in enumerate(consts) if i != var)
        return None if op is None else Rounding(abs_op=op, affine=nonzero)


@register
class Split(Copies):
    name = "Split"
    size = sizes.SHRINKING
    attributes = frozenset({'axis', 'num_outputs', 'split'})

    def sizes(self, node: Node, inputs: Inputs, length: int) -> list[int]:
        """The length of each output along the split axis (of ``length`` entries): the ``split`` input (or, before
        opset 13, attribute); else ``num_outputs`` parts of ceil(length / n), the last one smaller (opset 18);
        else equal parts, one per output. Sizes that do not add up to ``length`` are refused."""
        given = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attr("split")
        if given is not None:
            sizes = [int(v) for v in given]
        elif node.attr("num_outputs") is not None:
            n = int(node.attr("num_outputs"))
            if n < 1 or n != len(node.outputs):
                raise bad(node, f"num_outputs = {n} but the node has {len(node.outputs)} outputs")
            chunk = -(-length // n)
            sizes = [chunk] * (n - 1) + [length - chunk * (n - 1)]
        else:
            n = len(node.outputs)
            if length % n:
                raise bad(node, f"an axis of {length} entries cannot be split into {n} equal parts")
            sizes = [length // n] * n
        if len(sizes) != len(node.outputs) or any(v < 0 for v in sizes) or sum(sizes) != length:
            raise bad(node, f"split sizes {sizes} do not divide an axis of {length} entries into "
                            f"{len(node.outputs)} outputs")
        return sizes

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        axis = _axis(int(node.attr("axis", 0)), x.dim())
        return list(torch.split(x, self.sizes(node, inputs, x.shape[axis]), dim=axis))

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        axis = _axis(int(node.attr("axis", 0)), len(in_shape) + 1)
        if var != 0 or axis < 1:
            return None  # a split of the batch axis is not a map of one sample
        sizes = self.sizes(node, consts, in_shape[axis - 1])
        start = sum(sizes[:output])

        def forward(x: torch.Tensor) -> torch.Tensor:
            full = [x] + [None if c is None else c.to(x.device) for c in consts[1:]]
            return self.run(node, full, RunContext(x.dtype))[output]

        return from_function(forward, in_shape, out_shape, name=node.name,
                             structure=ProjectionStructure(select=(axis, start, start + sizes[output])))


#: the largest int32 and int64: an ``end`` of either is "to the end of the axis" for every runtime when the step
#: is positive, and read differently by runtimes when it is negative (see ``Slice``)
END_OF_AXIS = (2 ** 31 - 1, 2 ** 63 - 1)


def slice_indices(node: Node, n: int, start: int, end: int, step: int) -> range:
    """The indices one ONNX Slice axis of length ``n`` keeps, by the specification's clamping rules: negative
    starts and ends count from the end; for a positive step start and end are clamped to [0, n]; for a negative
    step start is clamped to [0, n - 1] and end to [-1, n - 1].

    An end of INT_MAX with a negative step is refused: the specification clamps it to n - 1 (an empty or
    one-sided slice), while onnxruntime reads it as "down to the first entry", so the deployed result depends on
    the runtime."""
    if step == 0:
        raise bad(node, "a slice step of 0 is invalid")
    if step < 0 and end in END_OF_AXIS:
        raise bad(node, f"end {end} with the negative step {step} is read differently by runtimes (the ONNX "
                        "specification clamps it to the last entry, onnxruntime slices down to the first); use "
                        "an end below -length (INT_MIN) to slice down to the first entry")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return range(max(0, min(n, start)), max(0, min(n, end)), step)
    if n == 0:
        return range(0)
    return range(max(0, min(n - 1, start)), max(-1, min(n - 1, end)), step)


@register
class Slice(Copies):
    name = "Slice"
    size = sizes.SHRINKING

    def params(self, node: Node, inputs: Inputs, rank: int) -> list[tuple[int, int, int, int]]:
        """(axis, start, end, step) per sliced axis, axes made non-negative; repeated or out-of-range axes and
        lists of different lengths are refused."""
        starts, ends = int_list(inputs[1]), int_list(inputs[2])
        axes = int_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = int_list(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
        if starts is None or ends is None:
            raise bad(node, "needs starts and ends inputs")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise bad(node, f"starts, ends, axes and steps have different lengths ({len(starts)}, {len(ends)}, "
                            f"{len(axes)}, {len(steps)})")
        if any(not -rank <= a < rank for a in axes):
            raise bad(node, f"axes {axes} are out of range for a {rank}-D input")
        normal = [_axis(a, rank) for a in axes]
        if len(set(normal)) != len(normal):
            raise bad(node, f"axes {axes} name an axis twice")
        return list(zip(normal, starts, ends, steps, strict=False))

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        out = required(inputs, 0, node)
        for axis, start, end, step in self.params(node, inputs, out.dim()):
            kept = slice_indices(node, out.shape[axis], start, end, step)
            if step == 1:
                out = out.narrow(axis, kept.start, len(kept))
            else:
                out = torch.index_select(out, axis, torch.tensor(kept, dtype=torch.long, device=out.device))
        return [out]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        ranges = self.params(node, list(consts), len(in_shape) + 1)
        for axis, start, end, step in ranges:
            whole = step == 1 and (start == 0 or start <= -2 ** 31) and end >= 2 ** 31 - 1
            if axis == 0 and not whole:
                return None  # a slice of the batch axis selects or reorders samples, not entries of one sample
        structure = ProjectionStructure()
        sliced = [(axis, slice_indices(node, in_shape[axis - 1], start, end, step))
                  for axis, start, end, step in ranges if axis > 0]
        if len(sliced) == 1 and len(ranges) == 1 and sliced[0][1].step == 1:  # one axis, step 1: one range
            axis, kept = sliced[0]
            structure = ProjectionStructure(select=(axis, kept.start, kept.start + len(kept)))

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0]

        return from_function(forward, in_shape, out_shape, name=node.name, structure=structure)


PAD_MODES = ("constant", "reflect", "edge", "wrap")


@dataclass(frozen=True)
class PadSettings:
    """A Pad node's inputs, normalised: the mode, one (begin, end) pair per axis of the data (negative: entries
    removed), and the constant value (a Python int for integer data)."""

    mode: str
    pads: tuple[int, ...]
    value: float


def _copied_index(node: Node, mode: str, n: int, begin: int, end: int, axis: int) -> list[int]:
    """Which input entry each output entry copies along one axis of ``n`` entries padded in ``mode`` (reflect,
    edge or wrap) by ``begin`` and ``end``: negative pads remove entries first, then the rest is padded from
    what is left, as onnxruntime does.

    Reflect pads longer than the axis reflect again, and wrap pads wrap again (``numpy.pad``, which the
    specification names). An axis cropped at one end and padded at the other is refused where the order of the
    two matters (wrap, or reflect beyond the remaining entries): the specification does not order them."""
    low, high = max(0, -begin), max(0, -end)
    before, after = max(0, begin), max(0, end)
    kept = n - low - high
    if kept < 0 or (kept == 0 and before + after):
        raise bad(node, f"{mode} pads ({begin}, {end}) on axis {axis} of {n} entries leave no entry to pad from")
    if (low or high) and (before or after) and (mode == "wrap" or (mode == "reflect" and before + after >= kept)):
        raise bad(node, f"{mode} pads ({begin}, {end}) on axis {axis} of {n} entries remove entries at one end and "
                        "pad the other from what remains; the specification does not say which comes first, and "
                        "the two orders give different results here")
    index = []
    for t in range(-before, kept + after):
        if mode == "edge":
            i = min(max(t, 0), kept - 1)
        elif mode == "wrap":
            i = t % kept
        elif kept == 1:
            i = 0
        else:  # reflect about the first and last entries, period 2 (kept - 1)
            i = t % (2 * (kept - 1))
            i = i if i < kept else 2 * (kept - 1) - i
        index.append(low + i)
    return index


def constant_pad(node: Node, x: torch.Tensor, pads: Sequence[int], value: float) -> torch.Tensor:
    """ONNX constant padding: output entry j of an axis padded by (begin, end) copies input entry j - begin where
    there is one and is ``value`` elsewhere, for j < n + begin + end (so a crop longer than the axis leaves only
    padding, and a negative size is refused)."""
    rank = x.dim()
    out, widths = x, []
    for axis in range(rank):
        n, begin, end = x.shape[axis], pads[axis], pads[axis + rank]
        size = n + begin + end
        if size < 0:
            raise bad(node, f"pads ({begin}, {end}) remove more than the {n} entries of axis {axis}")
        first, last = max(0, begin), min(size, begin + n)  # the output entries that copy input entries
        start, length = (first - begin, last - first) if last > first else (0, 0)
        if last <= first:
            first = last = size
        if (start, length) != (0, n):
            out = out.narrow(axis, start, length)
        widths += [first, size - last]
    flat = [w for axis in reversed(range(rank)) for w in (widths[2 * axis], widths[2 * axis + 1])]
    return F.pad(out, flat, mode="constant", value=value) if any(flat) else out


@register
class Pad(Copies):
    name = "Pad"
    size = sizes.PAD
    attributes = frozenset({'mode'})
    row_priority, row_suffix = 9, False

    def settings(self, node: Node, inputs: Inputs, rank: int) -> PadSettings:
        """The mode, the pads of every axis (from the ``axes`` input, opset 18, where given) and the value;
        pads of the wrong length and repeated or out-of-range axes are refused."""
        mode = node.attr("mode", "constant")
        if mode not in PAD_MODES:
            raise bad(node, f"pad mode {mode!r} is not supported")
        pads = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(node.attr("pads", []))
        value: float = node.attr("value", 0.0)
        if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel():
            value = inputs[2].reshape(-1)[0].item()
        axes = int_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(rank))
        if any(not -rank <= a < rank for a in axes) or len({_axis(a, rank) for a in axes}) != len(axes):
            raise bad(node, f"axes {axes} are repeated or out of range for a {rank}-D input")
        if len(pads) != 2 * len(axes):
            raise bad(node, f"{len(pads)} pads for {len(axes)} axes (2 per axis)")
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            a = _axis(a, rank)
            full[a], full[a + rank] = pads[i], pads[i + len(axes)]
        return PadSettings(mode=mode, pads=tuple(full), value=value)

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        s = self.settings(node, inputs, x.dim())
        rank = x.dim()
        if s.mode == "constant":
            return [constant_pad(node, x, s.pads, s.value)]
        if self._batch_padded(s):
            raise bad(node, f"{s.mode} padding of axis 0 is not supported: it is the batch axis, and the pad would "
                            "copy samples into other samples")
        out = x
        for axis in range(rank):
            begin, end = s.pads[axis], s.pads[axis + rank]
            if begin or end:
                index = _copied_index(node, s.mode, x.shape[axis], begin, end, axis)
                out = torch.index_select(out, axis, torch.tensor(index, dtype=torch.long, device=x.device))
        return [out]

    def _batch_padded(self, s: PadSettings) -> bool:
        """Whether the pads change the batch axis (axis 0): then the node is not a map of one sample."""
        return bool(s.pads[0] or s.pads[len(s.pads) // 2])

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        s = self.settings(node, list(consts), len(in_shape) + 1)
        if not any(s.pads):  # pads nothing, in any mode (how exporters write padding_mode="circular" with padding 0)
            return identity(in_shape, node.name)
        if self._batch_padded(s) or (s.mode == "constant" and s.value != 0):
            return None  # a pad of the batch axis adds or drops samples; a non-zero constant is affine: see lipschitz

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0]

        if s.mode == "constant":  # zero padding keeps norms (it is not onto); negative pads crop
            structure = IsometryStructure() if min(s.pads) >= 0 else ProjectionStructure()
            return from_function(forward, in_shape, out_shape, structure=structure, name=node.name)
        # each output copies one input entry: non-negative, and the Schur test gives sqrt(most copies)
        return from_function(forward, in_shape, out_shape, name=node.name,
                             structure=NonnegativeStructure(mode=s.mode, pads=s.pads))

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        s = self.settings(node, list(consts), len(in_shape) + 1)
        if var != 0 or s.mode != "constant" or self._batch_padded(s):
            return None
        return LipschitzRule(1.0, f"constant padding with value {float(s.value):g}: entries kept or dropped plus a "
                                  "constant, 1-Lipschitz")


@register
class TopK(Op):
    """The k largest (or smallest) entries along an axis, sorted, ties by the lower index (as ONNX orders them).
    ``sorted=0`` leaves the order of the k entries to the runtime (onnxruntime returns them unsorted), so it is
    refused unless k = 1, where there is one order."""

    name = "TopK"
    size = sizes.SHRINKING
    exact = True
    attributes = frozenset({"axis", "largest", "sorted"})

    def k(self, node: Node, inputs: Inputs) -> int | None:
        return int(inputs[1].reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else None

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        k = self.k(node, inputs)
        axis = int(node.attr("axis", -1))
        if k is None or not 0 <= k <= x.shape[axis]:
            raise bad(node, f"k = {k} is not between 0 and the axis length {x.shape[axis]}")
        if not node.attr("sorted", 1) and k > 1:
            raise bad(node, f"sorted=0 with k = {k} returns the top entries in an order each runtime chooses "
                            "(onnxruntime's is not sorted), so the output is not one function; export with "
                            "sorted=1")
        # a stable sort: equal values keep their order, lower index first (as ONNX and onnxruntime order ties)
        values, indices = torch.sort(x, dim=axis, descending=bool(node.attr("largest", 1)), stable=True)
        return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        """Assumes: the sorted values along a per-sample axis (``run`` refuses the unsorted form)."""
        axis = _axis(int(node.attr("axis", -1)), len(in_shape) + 1)
        k = self.k(node, consts)
        if var != 0 or axis < 1 or k is None:  # a sort along the batch axis mixes samples
            return None
        size = in_shape[axis - 1]
        if k == size:
            return LipschitzRule(1.0, f"sort of the whole axis ({size} entries): a permutation per sample, "
                                      "1-Lipschitz (Anil et al. 2019)")
        return LipschitzRule(1.0, f"the top {k} of {size} sorted entries: a projection of a sort, 1-Lipschitz")

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        return EXACT if output == 0 and self.lipschitz(node, consts, var, in_shape, out_shape) else None


@register
class ArgMax(Op):
    name = "ArgMax"
    size = sizes.SHRINKING
    exact = True
    attributes = frozenset({'axis', 'keepdims', 'select_last_index'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, axis, keep = required(inputs, 0, node), int(node.attr("axis", 0)), bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):  # torch picks the first of tied maxima: search the flipped axis
            return [x.shape[axis] - 1 - torch.argmax(torch.flip(x, [axis]), dim=axis, keepdim=keep)]
        return [torch.argmax(x, dim=axis, keepdim=keep)]
