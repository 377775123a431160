"""Values that a graph never computes as -0.0, for the rules whose operators tell -0.0 from +0.0 (an exported atan2
divides by x, and y / -0.0 is the opposite infinity of y / +0.0).

Under IEEE 754 rounding to nearest, a + b is -0.0 only when a and b both are, so a sum is -0.0 only when every
summand is: an ``Add`` one of whose operands is never -0.0, and a ``Conv``, ``ConvTranspose`` or ``Gemm`` whose
added bias has no zero entry (whatever the order of its accumulation), never give -0.0. Copies and rearrangements
keep the property; any other operator may produce -0.0 (0 times a negative weight, ``Neg``, a ``Relu`` written as
a product, a graph input). Assumed, as in lipcert's float error analysis: IEEE 754's default mode (a runtime that
flushes subnormal results to zero turns a tiny negative sum into -0.0)."""

from __future__ import annotations

import torch

from lipcert.bounds.steps import Context
from lipcert.graph.core import Node
from lipcert.graph.ops import REGISTRY
from lipcert.graph.ops.tensor import Copies

#: how many producers the walk looks through
_DEPTH = 64


def _operand_free(ctx: Context, value: str, zero_sign: bool, depth: int) -> bool:
    """Whether the operand ``value`` never holds the zero of sign ``zero_sign`` (True: -0.0): a float constant
    without such an entry, or (for -0.0) a data value that ``never_negative_zero`` proves."""
    if value in ctx.data:
        return zero_sign and never_negative_zero(ctx, value, depth - 1) is None
    c = ctx.consts.get(value)
    return c is not None and c.is_floating_point() and not bool(((c == 0) & (torch.signbit(c) == zero_sign)).any())


def _bias(ctx: Context, node: Node) -> torch.Tensor | None:
    """The constant that ``node`` adds to its accumulation, as the runtime adds it (Gemm: beta C), or None."""
    if len(node.inputs) < 3 or not node.inputs[2] or node.inputs[2] in ctx.data:
        return None
    c = ctx.consts.get(node.inputs[2])
    if c is None or not c.is_floating_point():
        return None
    return c * float(node.attr("beta", 1.0)) if node.op == "Gemm" else c


def never_negative_zero(ctx: Context, value: str, depth: int = _DEPTH) -> str | None:
    """None when ``value`` is never -0.0 (round to nearest); otherwise why that is not proven, naming the node."""
    node = ctx.producer.get(value)
    if node is None:
        return f"{value!r} is a graph input, which may hold -0.0"
    if depth <= 0:
        return f"{value!r} is computed by more than {_DEPTH} copies"
    if node.op == "Identity" or (isinstance(REGISTRY.get(node.op), Copies) and node.op != "Pad"):
        # copies of the entries of input 0 (a Concat: of every input); Pad also writes its value, maybe -0.0
        for v in (node.inputs if node.op == "Concat" else node.inputs[:1]):
            if v in ctx.data:
                why = never_negative_zero(ctx, v, depth - 1)
                if why is not None:
                    return why
            elif not _operand_free(ctx, v, True, depth):
                return f"{node.op} node {node.name!r} copies a constant {v!r} that may hold -0.0"
        return None
    if node.op == "Add" and any(_operand_free(ctx, v, True, depth) for v in node.inputs[:2]):
        return None  # a + b is -0.0 only when both are
    if node.op == "Sub" and (_operand_free(ctx, node.inputs[0], True, depth)
                             or _operand_free(ctx, node.inputs[1], False, depth)):
        return None  # a - b is -0.0 only when a is -0.0 and b is +0.0
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        bias = _bias(ctx, node)
        if bias is not None and not bool((bias == 0).any()):
            return None
        return f"{node.op} node {node.name!r} has no bias, or its bias has a zero entry, so it may give -0.0"
    return f"{node.op} node {node.name!r} may give -0.0"
