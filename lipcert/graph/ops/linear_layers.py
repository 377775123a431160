"""Layers that are affine in their data input: Conv, ConvTranspose, Gemm, MatMul, BatchNormalization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lipcert.graph.core import Node
from lipcert.graph.linop import ConvStructure, DiagStructure, LinearOperator, MatrixStructure, from_function
from lipcert.graph.ops import sizes
from lipcert.graph.ops.base import (
    Op,
    Rounding,
    RunContext,
    bad,
    ints,
    register,
    required,
    same_pads,
    torch_pad_list,
)

Inputs = Sequence[torch.Tensor | None]

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class ConvSettings:
    """A (transposed) convolution's ONNX attributes, normalised: one entry per spatial axis (``nd`` of them),
    explicit pads (begins, then ends), no output padding unless a ConvTranspose gives one."""

    nd: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...]


def conv_settings(node: Node, x_spatial: Sequence[int], w: torch.Tensor, transpose: bool = False) -> ConvSettings:
    """Normalised ONNX convolution attributes: strides, dilations, explicit pads, groups."""
    nd = w.dim() - 2
    if nd not in CONV:
        raise bad(node, f"{nd}-D convolutions are not supported")
    kernel = ints(node.attr("kernel_shape")) or list(w.shape[2:])
    strides = ints(node.attr("strides"), nd, 1)
    dilations = ints(node.attr("dilations"), nd, 1)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise bad(node, f"auto_pad {auto_pad!r} is not supported")
    if transpose or auto_pad in ("NOTSET", ""):
        pads = ints(node.attr("pads"), 2 * nd, 0)
    else:
        pads = same_pads(auto_pad, x_spatial, kernel, strides, dilations)
    return ConvSettings(nd=nd, kernel=tuple(kernel), stride=tuple(strides), dilation=tuple(dilations),
                        pads=tuple(pads), groups=int(node.attr("group", 1)), output_padding=(0,) * nd)


def conv_structure(w: torch.Tensor, s: ConvSettings, in_shape: tuple[int, ...], transpose: bool) -> ConvStructure:
    """What ``spectral`` needs to bound a (transposed) convolution at this input size."""
    return ConvStructure(weight=w, stride=s.stride, pads=s.pads, dilation=s.dilation, groups=s.groups,
                         circular=False, input_spatial=tuple(in_shape[1:]), transpose=transpose,
                         output_padding=s.output_padding)


def run_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, s: ConvSettings) -> torch.Tensor:
    """ONNX Conv semantics in torch, including asymmetric pads."""
    nd, pads = s.nd, s.pads
    if pads[:nd] == pads[nd:]:
        padding = pads[:nd]
    else:
        x = F.pad(x, torch_pad_list(pads))
        padding = (0,) * nd
    return CONV[nd](x, w, b, stride=s.stride, padding=padding, dilation=s.dilation, groups=s.groups)


@register
class Conv(Op):
    name = "Conv"
    size = sizes.CONV
    accumulates = True
    attributes = frozenset({'auto_pad', 'dilations', 'group', 'kernel_shape', 'pads', 'strides'})
    row_priority = 0

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, w = required(inputs, 0, node), required(inputs, 1, node)
        b = inputs[2] if len(inputs) > 2 else None
        return [run_conv(x, w, b, conv_settings(node, x.shape[2:], w))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        w = required(consts, 1, node)
        s = conv_settings(node, in_shape[1:], w)
        return from_function(lambda x: run_conv(x, w.to(x), None, s), in_shape, out_shape,
                             structure=conv_structure(w, s, in_shape, False), name=node.name,
                             adjoint=conv_adjoint(w, s, in_shape))

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        return conv_rounding(self, node, consts, var, in_shape, out_shape, required(consts, 1, node).shape[1])


def bias_norm(b: torch.Tensor | None, out_shape: tuple[int, ...]) -> float:
    """||b|| broadcast over the positions of one output sample (channels first)."""
    if b is None or not b.numel():
        return 0.0
    return float(b.double().norm()) * math.sqrt(math.prod(out_shape[1:]))


def conv_rounding(op: Op, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...], in_channels: int) -> Rounding | None:
    """A (transposed) convolution: each output sums at most in_channels x taps products (+2 for the bias and a
    pre-scaling a backend may fold in); |W| is the same convolution with the absolute kernel."""
    if op.linear(node, consts, var, in_shape, out_shape) is None:
        return None
    w = required(consts, 1, node)
    absolute = op.linear(node, [None, w.abs()] + list(consts[2:]), var, in_shape, out_shape)
    taps = math.prod(w.shape[2:])
    return Rounding(terms=in_channels * taps + 2, abs_op=absolute,
                    offset=bias_norm(consts[2] if len(consts) > 2 else None, out_shape))


def conv_adjoint(w: torch.Tensor, s: ConvSettings, in_shape: tuple[int, ...]):
    """The exact adjoint of a zero-padded convolution: the matching transposed convolution, cropped."""
    nd, pads = s.nd, s.pads

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        full = CONV_T[nd](y, w.to(y), stride=s.stride, dilation=s.dilation, groups=s.groups)
        padded = [n + pads[i] + pads[i + nd] for i, n in enumerate(in_shape[1:])]
        extra = [p - f for p, f in zip(padded, full.shape[2:], strict=False)]
        full = F.pad(full, torch_pad_list([0] * nd + extra))
        index = [slice(None), slice(None)] + [slice(pads[i], pads[i] + in_shape[1 + i]) for i in range(nd)]
        return full[tuple(index)]

    return adjoint


def run_conv_transpose(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, s: ConvSettings) -> torch.Tensor:
    """ONNX ConvTranspose: full transposed convolution, then output padding and crop by pads."""
    nd = s.nd
    full = CONV_T[nd](x, w, None, stride=s.stride, dilation=s.dilation, groups=s.groups)
    # output padding adds entries at the end; pads crop, and negative pads (an ``output_shape`` larger than
    # the full output) add zeros: F.pad crops for negative widths
    pads, extra = s.pads, s.output_padding
    out = F.pad(full, torch_pad_list([-p for p in pads[:nd]] + [e - p for e, p in zip(extra, pads[nd:], strict=False)]))
    return out if b is None else out + b.reshape(1, -1, *([1] * nd))


def conv_transpose_settings(node: Node, x: torch.Tensor | tuple[int, ...], w: torch.Tensor) -> ConvSettings:
    """Normalised ONNX ConvTranspose attributes: those of ``conv_settings``, the output padding, and the pads
    that ``output_shape`` or auto_pad SAME_* imply."""
    spatial = list(x.shape[2:]) if isinstance(x, torch.Tensor) else list(x)
    s = conv_settings(node, spatial, w, transpose=True)
    nd = s.nd
    s = replace(s, output_padding=tuple(ints(node.attr("output_padding"), nd, 0)))
    out_shape = node.attr("output_shape")
    auto_pad = node.attr("auto_pad", "NOTSET")
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(out_shape)[-nd:] if out_shape is not None else \
            [n * st for n, st in zip(spatial, s.stride, strict=False)]
        begins, ends = [], []
        for i in range(nd):
            full = s.stride[i] * (spatial[i] - 1) + s.output_padding[i] + (s.kernel[i] - 1) * s.dilation[i] + 1
            total = full - target[i]
            if total < 0 and out_shape is None:
                raise bad(node, f"auto_pad {auto_pad} asks for {target[i]} entries on spatial axis {i}, more than "
                                f"the {full} of the full transposed convolution: the specification adds zeros, "
                                f"onnxruntime returns the {full}")
            if total < 0 and auto_pad == "SAME_UPPER":
                raise bad(node, f"output_shape asks for {target[i]} entries on spatial axis {i}, more than the "
                                f"{full} of the full transposed convolution, under auto_pad SAME_UPPER: the "
                                "specification adds the zeros at the start, onnxruntime at the end")
            small, large = total // 2, total - total // 2
            # the odd unit goes at the end only for SAME_UPPER; SAME_LOWER and an explicit output_shape put it first
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        s = replace(s, pads=tuple(begins + ends))
    return s


@register
class ConvTranspose(Op):
    name = "ConvTranspose"
    size = sizes.CONV_TRANSPOSE
    accumulates = True
    attributes = frozenset({'auto_pad', 'dilations', 'group', 'kernel_shape', 'output_padding', 'output_shape', 'pads',
                            'strides'})
    row_priority = 1

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, w = required(inputs, 0, node), required(inputs, 1, node)
        b = inputs[2] if len(inputs) > 2 else None
        return [run_conv_transpose(x, w, b, conv_transpose_settings(node, x, w))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        w = required(consts, 1, node)
        s = conv_transpose_settings(node, in_shape[1:], w)
        return from_function(lambda x: run_conv_transpose(x, w.to(x), None, s), in_shape, out_shape,
                             structure=conv_structure(w, s, in_shape, True), name=node.name)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        groups = int(node.attr("group", 1))
        in_channels = required(consts, 1, node).shape[0] // max(groups, 1)
        return conv_rounding(self, node, consts, var, in_shape, out_shape, in_channels)


@register
class Gemm(Op):
    name = "Gemm"
    size = sizes.GEMM
    accumulates = True
    attributes = frozenset({'alpha', 'beta', 'transA', 'transB'})
    row_priority = 2

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        a, b = required(inputs, 0, node), required(inputs, 1, node)
        c = inputs[2] if len(inputs) > 2 else None
        a = a.T if node.attr("transA", 0) else a
        b = b.T if node.attr("transB", 0) else b
        out = float(node.attr("alpha", 1.0)) * (a @ b)
        if c is not None:
            out = out + float(node.attr("beta", 1.0)) * c
        return [out]

    def magnitude(self, node: Node, inputs: Inputs, output: int = 0) -> torch.Tensor | None:
        """|alpha| |A| |B| + |beta| |C|."""
        positive = replace(node, attrs={**node.attrs, "alpha": abs(float(node.attr("alpha", 1.0))),
                                        "beta": abs(float(node.attr("beta", 1.0)))})
        return super().magnitude(positive, inputs, output)

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0 or node.attr("transA", 0):
            return None
        b = required(consts, 1, node)
        matrix = float(node.attr("alpha", 1.0)) * (b if node.attr("transB", 0) else b.T)
        return from_function(lambda x: x @ matrix.to(x).T, in_shape, out_shape,
                             structure=MatrixStructure(matrix=matrix), name=node.name,
                             adjoint=lambda y: y @ matrix.to(y))

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        """alpha (x B) + beta C: the dot product, the scaling by alpha, the scaled bias and its addition."""
        op = self.linear(node, consts, var, in_shape, out_shape)
        if op is None or not isinstance(op.structure, MatrixStructure):  # ``linear`` gives a matrix or None
            return None
        matrix = op.structure.matrix.abs()
        c = consts[2] if len(consts) > 2 else None
        offset = 0.0
        if c is not None and c.numel():  # the largest bias row (C may have one row per sample)
            rows = torch.broadcast_to(c.double().abs(), (c.shape[0] if c.dim() == 2 else 1,) + tuple(out_shape))
            offset = abs(float(node.attr("beta", 1.0))) * float(rows.norm(dim=-1).max())
        return Rounding(terms=matrix.shape[1] + 3, offset=offset,
                        abs_op=from_function(lambda x: x @ matrix.to(x).T, in_shape, out_shape,
                                             structure=MatrixStructure(matrix=matrix), name=node.name,
                                             adjoint=lambda y: y @ matrix.to(y)))


@register
class MatMul(Op):
    name = "MatMul"
    size = sizes.MATMUL
    accumulates = True
    row_priority = 3

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [torch.matmul(required(inputs, 0, node), required(inputs, 1, node))]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0 or consts[1] is None or consts[1].dim() != 2 or not in_shape:
            return None
        w = consts[1]
        return from_function(lambda x: x @ w.to(x), in_shape, out_shape,
                             structure=MatrixStructure(matrix=w.T), name=node.name, adjoint=lambda y: y @ w.to(y).T)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        if self.linear(node, consts, var, in_shape, out_shape) is None:
            return None
        magnitude = required(consts, 1, node).abs()
        return Rounding(terms=magnitude.shape[0] + 1,
                        abs_op=self.linear(node, [None, magnitude], var, in_shape, out_shape))


@register
class BatchNormalization(Op):
    name = "BatchNormalization"
    size = sizes.BROADCAST
    attributes = frozenset({'epsilon', 'momentum', 'training_mode'})
    row_priority = 4

    def affine(self, node: Node, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if node.attr("training_mode", 0):
            raise bad(node, "training-mode batch normalisation cannot be analysed; export in eval mode")
        scale, bias, mean, var = (required(inputs, i, node) for i in range(1, 5))
        eps = float(node.attr("epsilon", 1e-5))
        factor = scale / torch.sqrt(var + eps)
        return factor, bias - mean * factor

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        factor, shift = self.affine(node, inputs)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return [x * factor.reshape(shape) + shift.reshape(shape)]

    def magnitude(self, node: Node, inputs: Inputs, output: int = 0) -> torch.Tensor | None:
        """|x f| + |mean f| + |bias|, f = scale / sqrt(var + eps): what either way of evaluating it rounds."""
        wide = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
        factor, _ = self.affine(node, wide)
        x, bias, mean = (required(wide, i, node) for i in (0, 2, 3))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * factor.reshape(shape)).abs() + (mean * factor).abs().reshape(shape) + bias.abs().reshape(shape)

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        # the real-number scale of the stored float32 parameters, computed in float64
        factor, _ = self.affine(node, [c.double() if c is not None and c.is_floating_point() else c for c in consts])
        scale = factor.reshape((-1,) + (1,) * (len(in_shape) - 1))
        return from_function(lambda x: x * scale.to(x), in_shape, out_shape,
                             structure=DiagStructure(scale=scale), name=node.name, adjoint=lambda y: y * scale.to(y))

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        """(x - mean) / sqrt(var + eps) * scale + bias, or x * f + t with f, t folded in float32: each within
        gamma_8 (|f| |x| + |f mean| + |bias|) of the exact value."""
        if self.linear(node, consts, var, in_shape, out_shape) is None:
            return None
        wide = [c.double() if c is not None and c.is_floating_point() else c for c in consts]
        factor, _ = self.affine(node, wide)
        shift = (factor * required(wide, 3, node)).abs() + required(wide, 2, node).abs()
        magnitude = factor.abs().reshape((-1,) + (1,) * (len(in_shape) - 1))
        return Rounding(terms=8, offset=bias_norm(shift, out_shape),
                        abs_op=from_function(lambda x: x * magnitude.to(x), in_shape, out_shape,
                                             structure=DiagStructure(scale=magnitude), name=node.name,
                                             adjoint=lambda y: y * magnitude.to(y)))
