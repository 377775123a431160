"""Operators that move, select or build tensors: shape plumbing, reshapes, slicing, padding, sorting."""

from __future__ import annotations

import math
from typing import Sequence

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
from lipcert.graph.ops.base import (
    EXACT,
    LipschitzRule,
    Op,
    Rounding,
    RunContext,
    bad,
    int_list,
    register,
    torch_pad_list,
)

Inputs = Sequence[torch.Tensor | None]

#: ONNX TensorProto data types lipcert can cast to. In a float32 run, floating casts round to their type and the
#: run continues in float32 (so float16 casts round as onnxruntime does); a float64 run (verify's analysis of the
#: real-number function) keeps every float exact.
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
    2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool,
}


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@register
class Constant(Op):
    name = "Constant"

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

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        to = int(node.attr("to", 1))
        if to not in ONNX_DTYPES:
            raise bad(node, f"cast to ONNX type {to} is not supported")
        target = ONNX_DTYPES[to]
        x = inputs[0]
        if target.is_floating_point:  # in float64 (the analysis' real-number function) a float cast is exact
            return [x.to(ctx.dtype) if ctx.dtype == torch.float64 else x.to(target).to(ctx.dtype)]
        return [x.to(target)]

    def _float_identity(self, node: Node, var: int) -> bool:
        return var == 0 and int(node.attr("to", 1)) in (1, 11)

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if not self._float_identity(node, var) or tuple(in_shape) != tuple(out_shape):
            return None
        return from_function(lambda x: x, in_shape, out_shape, kind="scalar", structure=ScalarStructure(value=1.0),
                             name=node.name, adjoint=lambda y: y)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape)
        return None if op is None else Rounding(abs_op=op, relative=1)  # one rounding when it narrows


@register
class Shape(Op):
    name = "Shape"
    shape_only = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        dims = list(inputs[0].shape)
        start, end = node.attr("start", 0), node.attr("end", None)
        return [torch.tensor(dims[start:end], dtype=torch.int64)]


@register
class Size(Op):
    name = "Size"
    shape_only = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@register
class ConstantOfShape(Op):
    name = "ConstantOfShape"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        value = node.attr("value")
        fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
        shape = int_list(inputs[0]) or []
        return [torch.full(shape, fill.item(), dtype=fill.dtype)]


@register
class Range(Op):
    name = "Range"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        start, limit, delta = inputs
        return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@register
class Gather(Op):
    name = "Gather"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, idx = inputs
        axis = _axis(int(node.attr("axis", 0)), x.dim())
        idx = idx.long().to(x.device)
        flat = torch.where(idx < 0, idx + x.shape[axis], idx).reshape(-1)
        out = torch.index_select(x, axis, flat)
        return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


@register
class Expand(Op):
    name = "Expand"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, shape = inputs
        target = torch.broadcast_shapes(tuple(x.shape), tuple(int_list(shape) or []))
        return [x.expand(target)]


@register
class Tile(Op):
    name = "Tile"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [inputs[0].repeat(*(int_list(inputs[1]) or []))]


class Copies(Op):
    """An operator whose linear map copies entries (each output a copy of one input entry, or zero): exact in
    floating point, and its own absolute value."""

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape, output)
        if op is not None:
            return Rounding(abs_op=op)
        return EXACT if self.lipschitz(node, consts, var, in_shape, out_shape) is not None else None


class Rearrange(Copies):
    """An operator that only moves entries of each sample (reshape, transpose, squeeze): an isometry."""

    #: whether the op keeps the flat order of each sample (a reshape); a permutation of entries otherwise
    flat = True

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        if not self.flat:  # a permutation of entries; the adjoint by autograd is exact
            return from_function(lambda x: self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0],
                                 in_shape, out_shape, kind="isometry",
                                 structure=IsometryStructure(flat=False, onto=True), name=node.name)
        return from_function(lambda x: x.reshape((x.shape[0],) + tuple(out_shape)), in_shape, out_shape,
                             kind="isometry", structure=IsometryStructure(flat=True, onto=True), name=node.name,
                             adjoint=lambda y: y.reshape((y.shape[0],) + tuple(in_shape)))


@register
class Reshape(Rearrange):
    name = "Reshape"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, shape = inputs
        dims = int_list(shape) or []
        if not node.attr("allowzero", 0):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return [x.reshape(dims)]


@register
class Flatten(Rearrange):
    name = "Flatten"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        axis = _axis(int(node.attr("axis", 1)), x.dim())
        return [x.reshape(math.prod(x.shape[:axis]), -1)]


@register
class Transpose(Rearrange):
    name = "Transpose"
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        perm = node.attr("perm") or list(reversed(range(x.dim())))
        return [x.permute(*perm)]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        perm = node.attr("perm") or list(reversed(range(len(in_shape) + 1)))
        if var != 0 or perm[0] != 0:
            return None  # a transpose that moves the batch axis mixes samples
        inverse = [perm.index(i) for i in range(len(perm))]
        return from_function(lambda x: x.permute(*perm), in_shape, out_shape, kind="isometry",
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
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        b = _blocksize(node, x)
        n, c, h, w = x.shape
        if c % (b * b):
            raise bad(node, f"{c} channels are not divisible by blocksize^2 = {b * b}")
        if node.attr("mode", "DCR") == "CRD":
            t = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            t = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return [t.reshape(n, c // (b * b), h * b, w * b)]


@register
class SpaceToDepth(Rearrange):
    """Moves b x b spatial blocks into channels (the inverse of DepthToSpace in DCR order)."""

    name = "SpaceToDepth"
    flat = False

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        b = _blocksize(node, x)
        n, c, h, w = x.shape
        if h % b or w % b:
            raise bad(node, f"spatial size {h}x{w} is not divisible by blocksize {b}")
        t = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return [t.reshape(n, c * b * b, h // b, w // b)]


@register
class Squeeze(Rearrange):
    name = "Squeeze"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        axes = _axes(node, inputs)
        if axes is None:
            return [x.squeeze()]
        keep = [d for i, d in enumerate(x.shape) if i not in {_axis(a, x.dim()) for a in axes}]
        return [x.reshape(keep)]


@register
class Unsqueeze(Rearrange):
    name = "Unsqueeze"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        axes = _axes(node, inputs) or []
        rank = x.dim() + len(axes)
        out = x
        for a in sorted(_axis(a, rank) for a in axes):
            out = out.unsqueeze(a)
        return [out]


@register
class Concat(Copies):
    name = "Concat"
    combination, combination_reason = "concat", "L([f; g]) <= sqrt(L(f)^2 + L(g)^2)"
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
            parts = [x if i == var else torch.zeros(x.shape[:1] + tuple(c.shape[1:]), dtype=x.dtype, device=x.device)
                     for i, c in enumerate(consts) if i == var or c is not None]
            return torch.cat(parts, dim=axis)

        return from_function(forward, in_shape, out_shape, kind="isometry", name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape, output)
        nonzero = any(c is not None and bool(c.any()) for i, c in enumerate(consts) if i != var)
        return None if op is None else Rounding(abs_op=op, affine=nonzero)


@register
class Split(Copies):
    name = "Split"

    def sizes(self, node: Node, inputs: Inputs, length: int) -> list[int]:
        """The length of each output along the split axis (of ``length`` entries)."""
        sizes = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else node.attr("split")
        if sizes is None:
            n = int(node.attr("num_outputs", len(node.outputs)))
            chunk = -(-length // n)
            sizes = [min(chunk, length - i * chunk) for i in range(n)]
        return [int(s) for s in sizes]

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
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

        return from_function(forward, in_shape, out_shape, kind="projection", name=node.name,
                             structure=ProjectionStructure(select=(axis, start, start + sizes[output])))


@register
class Slice(Copies):
    name = "Slice"

    def params(self, node: Node, inputs: Inputs, rank: int) -> list[tuple[int, int, int, int]]:
        if len(inputs) > 1:
            starts, ends = int_list(inputs[1]), int_list(inputs[2])
            axes = int_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
            steps = int_list(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
        else:
            starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        return [(_axis(a, rank), s, e, st) for a, s, e, st in zip(axes, starts, ends, steps)]

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        index: list[slice] = [slice(None)] * x.dim()
        flips = []
        for axis, start, end, step in self.params(node, inputs, x.dim()):
            n = x.shape[axis]
            if step > 0:
                s = max(0, min(n, start + n if start < 0 else start))
                e = max(0, min(n, end + n if end < 0 else end))
                index[axis] = slice(s, e, step)
            else:
                s = max(-1, min(n - 1, start + n if start < 0 else start))
                e = max(-1, min(n - 1, end + n if end < 0 else end))
                idx = torch.arange(s, e, step, device=x.device)
                flips.append((axis, idx))
        out = x[tuple(index)]
        for axis, idx in flips:
            out = torch.index_select(out, axis, idx)
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
        sliced = [(axis, start, end) for axis, start, end, step in ranges if axis > 0 and step == 1]
        if len(sliced) == 1 and len(ranges) == 1:  # one axis, step 1: the entries [start, end) of that axis
            axis, start, end = sliced[0]
            n = in_shape[axis - 1]
            structure = ProjectionStructure(select=(axis, max(0, min(n, start + n if start < 0 else start)),
                                                    max(0, min(n, end + n if end < 0 else end))))

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0]

        return from_function(forward, in_shape, out_shape, kind="projection", name=node.name, structure=structure)


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@register
class Pad(Copies):
    name = "Pad"
    row_priority, row_suffix = 9, False

    def settings(self, node: Node, inputs: Inputs, rank: int) -> tuple[str, list[int], float]:
        mode = node.attr("mode", "constant")
        if mode not in PAD_MODES:
            raise bad(node, f"pad mode {mode!r} is not supported")
        pads = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(node.attr("pads", []))
        value = node.attr("value", 0.0)
        if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel():
            value = float(inputs[2].reshape(-1)[0])
        axes = int_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        if axes is not None:
            full = [0] * (2 * rank)
            for i, a in enumerate(axes):
                a = _axis(a, rank)
                full[a], full[a + rank] = pads[i], pads[i + len(axes)]
            pads = full
        return mode, pads, float(value)

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        mode, pads, value = self.settings(node, inputs, x.dim())
        if mode == "constant":
            return [F.pad(x, torch_pad_list(pads), mode="constant", value=value)]
        rank = x.dim()
        padded = [i for i in range(rank) if pads[i] or pads[i + rank]]
        if not padded:
            return [x]
        # torch pads the trailing k axes of a (k+1)- or (k+2)-D tensor only: start at axis 1 or 2
        first = min(min(padded), 2)
        if min(padded) < 1 or rank - first > 3:
            raise bad(node, f"{mode} padding is supported on the last three axes (not the batch axis) only")
        tp = torch_pad_list(pads[first:rank] + pads[rank + first:])
        return [F.pad(x, tp, mode=PAD_MODES[mode])]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        mode, pads, value = self.settings(node, list(consts), len(in_shape) + 1)
        if not any(pads):  # pads nothing, in any mode (how exporters write padding_mode="circular" with padding 0)
            return identity(in_shape, node.name)
        if mode == "constant" and value != 0.0:
            return None  # affine, not linear: see lipschitz

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.run(node, [x] + list(consts[1:]), RunContext(x.dtype))[0]

        if mode == "constant":  # zero padding keeps norms (it is not onto); negative pads crop
            return from_function(forward, in_shape, out_shape, kind="isometry" if min(pads) >= 0 else "projection",
                                 name=node.name)
        # each output copies one input entry: non-negative, and the Schur test gives sqrt(most copies)
        return from_function(forward, in_shape, out_shape, kind="nonnegative", name=node.name,
                             structure=NonnegativeStructure(mode=mode, pads=tuple(pads)))

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        mode, _, value = self.settings(node, list(consts), len(in_shape) + 1)
        if var != 0 or mode != "constant":
            return None
        return LipschitzRule(1.0, f"constant padding with value {value:g}: entries kept or dropped plus a "
                                  "constant, 1-Lipschitz")


@register
class TopK(Op):
    name = "TopK"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = inputs[0]
        k = int(inputs[1].reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else int(node.attr("k"))
        axis = int(node.attr("axis", -1))
        # a stable sort: equal values keep their order, lower index first (as ONNX and onnxruntime order ties)
        values, indices = torch.sort(x, dim=axis, descending=bool(node.attr("largest", 1)), stable=True)
        return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        axis = _axis(int(node.attr("axis", -1)), len(in_shape) + 1)
        if var != 0 or axis < 1:  # a sort along the batch axis mixes samples
            return None
        k = int(consts[1].reshape(-1)[0]) if len(consts) > 1 and consts[1] is not None else node.attr("k")
        if k is None:
            return None
        size = in_shape[axis - 1]
        if int(k) == size:
            return LipschitzRule(1.0, f"sort of the whole axis ({size} entries): a permutation per sample, "
                                      "1-Lipschitz (Anil et al. 2019)")
        return LipschitzRule(1.0, f"the top {k} of {size} sorted entries: a projection of a sort, 1-Lipschitz")

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        return EXACT if output == 0 and self.lipschitz(node, consts, var, in_shape, out_shape) else None


@register
class ArgMax(Op):
    name = "ArgMax"

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, axis, keep = inputs[0], int(node.attr("axis", 0)), bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):  # torch picks the first of tied maxima: search the flipped axis
            return [x.shape[axis] - 1 - torch.argmax(torch.flip(x, [axis]), dim=axis, keepdim=keep)]
        return [torch.argmax(x, dim=axis, keepdim=keep)]
