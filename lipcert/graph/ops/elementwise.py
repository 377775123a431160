"""Elementwise operators: arithmetic, activations, comparisons."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lipcert.graph.core import Node
from lipcert.graph.linop import DiagStructure, LinearOperator, ScalarStructure, from_function
from lipcert.graph.ops import sizes
from lipcert.graph.ops.base import (
    EXACT,
    TRANSCENDENTAL_ULPS,
    CombinationMode,
    LinearCombination,
    LipschitzRule,
    Op,
    Rounding,
    RunContext,
    bad,
    register,
    required,
)

Inputs = Sequence[torch.Tensor | None]

#: why a weighted sum of data-dependent inputs (``Op.combination`` SUM) is bounded by the sum of their bounds
SUM_REASON = "L(w1 f + w2 g) <= |w1| L(f) + |w2| L(g); an input broadcast k times counts sqrt(k) times"
#: why an elementwise max or min of data-dependent inputs (``Op.combination`` MAX) is bounded by sqrt(sum(L^2))
MAX_REASON = ("|max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|): sqrt(sum of (sqrt(k) L)^2), k the broadcast "
              "repetitions of each input")


def per_sample(c: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor | None:
    """A constant operand as a per-sample factor (its batch axis of size 1 dropped), or None if it spans
    the batch."""
    if c.dim() > len(in_shape):
        if c.dim() > len(in_shape) + 1 or c.shape[0] != 1:
            return None
        c = c[0]
    return c


def scaling(name: str, factor: torch.Tensor | float, in_shape: tuple[int, ...],
            out_shape: tuple[int, ...]) -> LinearOperator | None:
    """The linear map x -> factor * x (broadcast), as a scalar or diagonal operator."""
    if isinstance(factor, float) or factor.numel() == 1:
        value = float(factor) if isinstance(factor, float) else float(factor.reshape(-1)[0])
        return from_function(lambda x: x * value, in_shape, out_shape,
                             structure=ScalarStructure(value=value), name=name, adjoint=lambda y: y * value)
    if tuple(torch.broadcast_shapes(factor.shape, in_shape)) != tuple(in_shape):
        return None
    scale = factor

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return y * scale.to(y)

    return from_function(lambda x: x * scale.to(x), in_shape, out_shape,
                         structure=DiagStructure(scale=scale), name=name, adjoint=adjoint)


class Unary(Op):
    """An elementwise function of one input, with an optional global Lipschitz constant."""

    size = sizes.SHRINKING
    constant: float | None = None
    reason = ""
    #: how the function's float evaluation errs, for operators with a rule
    error: Rounding = EXACT

    @property
    def absolute_error(self) -> bool:
        """The function's error is absolute when its rounding model says so (tanh, sigmoid: ``error.absolute``)."""
        return self.error.absolute > 0

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [self.fn(node, required(inputs, 0, node))]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        return None if self.constant is None else LipschitzRule(self.constant, self.reason)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        if self.linear(node, consts, var, in_shape, out_shape) is not None:
            return Rounding(abs_op=scaling(node.name, 1.0, in_shape, out_shape))  # Neg, Identity: exact copies
        return self.error if self.lipschitz(node, consts, var, in_shape, out_shape) is not None else None


@register
class Relu(Unary):
    name = "Relu"
    kink_at_zero = True
    exact = True
    constant, reason = 1.0, "ReLU is 1-Lipschitz"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def slope_range(self, node: Node) -> tuple[float, float]:
        return 0.0, 1.0


@register
class LeakyRelu(Unary):
    name = "LeakyRelu"
    kink_at_zero = True
    attributes = frozenset({'alpha'})
    error = Rounding(relative=1)  # slope * x: one rounding

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, float(node.attr("alpha", 0.01)))

    def slope_range(self, node: Node) -> tuple[float, float]:
        """Slopes alpha and 1 (NaN when alpha is, which no range holds)."""
        alpha = float(node.attr("alpha", 0.01))
        return min(alpha, 1.0), max(alpha, 1.0)

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule:
        slope = abs(float(node.attr("alpha", 0.01)))
        return LipschitzRule(max(1.0, slope), f"LeakyReLU with slope {slope:g}: max(1, |slope|)")


@register
class PRelu(Op):
    """x where x >= 0, slope * x elsewhere, with a constant slope broadcast to x (torch's PReLU,
    deel-torchlip's LPReLU)."""

    name = "PRelu"
    kink_at_zero = True
    size = sizes.BROADCAST

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x, slope = required(inputs, 0, node), required(inputs, 1, node)
        return [torch.where(x >= 0, x, x * slope.to(x.dtype))]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        """Assumes: x is the data input, the slope a constant, and the output has x's shape (each entry is
        t -> t or slope * t for one slope, so max(1, |slope|)-Lipschitz, and no entry of x is repeated)."""
        slope = consts[1] if len(consts) > 1 else None
        if var != 0 or slope is None or tuple(in_shape) != tuple(out_shape):
            return None
        largest = float(slope.abs().max()) if slope.numel() else 0.0
        return LipschitzRule(max(1.0, largest), f"PReLU with slopes up to {largest:g} in magnitude: "
                                                "max(1, max |slope|)")

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        rule = self.lipschitz(node, consts, var, in_shape, out_shape)
        return None if rule is None else Rounding(relative=1)  # slope * x: one rounding


@register
class Abs(Unary):
    name = "Abs"
    kink_at_zero = True
    exact = True
    constant, reason = 1.0, "|x| is 1-Lipschitz"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


@register
class Neg(Unary):
    name = "Neg"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return -x

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        return scaling(node.name, -1.0, in_shape, out_shape)


@register
class Sign(Unary):
    name = "Sign"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)


@register
class Sqrt(Unary):
    name = "Sqrt"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


@register
class Atan(Unary):
    """No rule of its own: exporters write it to compute an angle (atan2), which then selects pieces."""

    name = "Atan"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.atan(x)


@register
class Floor(Unary):
    """No rule: a step function (exporters write it for a floor remainder, ``%``)."""

    name = "Floor"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)


@register
class IsNaN(Unary):
    """No rule: a test, whose boolean output selects between values."""

    name = "IsNaN"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.isnan(x)


@register
class Exp(Unary):
    name = "Exp"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


@register
class Log(Unary):
    name = "Log"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


@register
class Reciprocal(Unary):
    name = "Reciprocal"

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.reciprocal(x)


@register
class Sigmoid(Unary):
    name = "Sigmoid"
    constant, reason = 0.25, "sigmoid' <= 1/4"
    error = Rounding(absolute=TRANSCENDENTAL_ULPS)

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def slope_range(self, node: Node) -> tuple[float, float]:
        return 0.0, 0.25


@register
class Tanh(Unary):
    name = "Tanh"
    constant, reason = 1.0, "tanh' <= 1"
    error = Rounding(absolute=TRANSCENDENTAL_ULPS)

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def slope_range(self, node: Node) -> tuple[float, float]:
        return 0.0, 1.0


@register
class Softplus(Unary):
    name = "Softplus"
    constant, reason = 1.0, "softplus' = sigmoid <= 1"
    error = Rounding(relative=TRANSCENDENTAL_ULPS, absolute=TRANSCENDENTAL_ULPS)

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


@register
class Elu(Unary):
    name = "Elu"
    attributes = frozenset({'alpha'})

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, float(node.attr("alpha", 1.0)))

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule:
        alpha = abs(float(node.attr("alpha", 1.0)))
        return LipschitzRule(max(1.0, alpha), f"ELU with alpha {alpha:g}: max(1, alpha)")

    @property
    def absolute_error(self) -> bool:
        return True

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        alpha = abs(float(node.attr("alpha", 1.0)))
        return Rounding(relative=TRANSCENDENTAL_ULPS, absolute=TRANSCENDENTAL_ULPS * max(1.0, alpha))


@register
class Identity(Unary):
    name = "Identity"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return x

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        return scaling(node.name, 1.0, in_shape, out_shape)


@register
class Dropout(Op):
    """Inference-time dropout: the identity (the optional mask output is all true)."""

    name = "Dropout"
    size = sizes.BROADCAST
    exact = True
    attributes = frozenset({'ratio', 'seed'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        x = required(inputs, 0, node)
        training = len(inputs) > 2 and inputs[2] is not None and bool(inputs[2].reshape(-1)[0])
        ratio = float(inputs[1].reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else 0.5
        if training and ratio != 0.0:
            raise bad(node, "training-mode dropout is random and cannot be analysed; export in eval mode")
        return [x, torch.ones_like(x, dtype=torch.bool)]

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        return scaling(node.name, 1.0, in_shape, out_shape) if var == 0 and output == 0 else None

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        return Rounding(abs_op=scaling(node.name, 1.0, in_shape, out_shape)) if var == 0 and output == 0 else None


@register
class Clip(Op):
    name = "Clip"
    size = sizes.BROADCAST
    exact = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        """min(max(x, lo), hi) in x's type (so max when lo > hi, as the specification's definition gives)."""
        x = required(inputs, 0, node)
        lo, hi = (None if t is None else t.reshape(()).to(x) for t in (*inputs[1:3], None, None)[:2])
        return [torch.clamp(x, min=lo, max=hi) if lo is not None or hi is not None else x]

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        return LipschitzRule(1.0, "clipping is 1-Lipschitz") if var == 0 else None

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        return EXACT if var == 0 else None


@register
class Softmax(Op):
    name = "Softmax"
    size = sizes.SHRINKING
    attributes = frozenset({'axis'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [torch.softmax(required(inputs, 0, node), int(node.attr("axis", -1)))]


@register
class LogSoftmax(Op):
    name = "LogSoftmax"
    size = sizes.SHRINKING
    attributes = frozenset({'axis'})

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [torch.log_softmax(required(inputs, 0, node), int(node.attr("axis", -1)))]

    def magnitude(self, node: Node, inputs: Inputs, output: int = 0) -> torch.Tensor | None:
        """|x| + |x - y| (x minus its log-sum-exp: the terms the subtraction cancels)."""
        x = required(inputs, 0, node).double()
        return x.abs() + (x - torch.log_softmax(x, int(node.attr("axis", -1)))).abs()


class Binary(Op):
    """A broadcasting elementwise function of two inputs."""

    size = sizes.BROADCAST
    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        return [self.fn(required(inputs, 0, node), required(inputs, 1, node))]


def broadcast_norm(c: torch.Tensor | None, out_shape: tuple[int, ...]) -> float:
    """||c|| once broadcast to one sample of ``out_shape`` (a constant added to every sample)."""
    if c is None:
        return 0.0
    c = per_sample(c.double(), out_shape)
    if c is None:
        return math.inf
    return float(torch.broadcast_to(c.abs(), out_shape).norm()) if c.numel() else 0.0


class Shift(Binary):
    """Add or Sub: with one data input, x + c (or c - x): one rounding of each entry, relative to |x| + |c|; with
    several, a sum."""

    combination, combination_reason = CombinationMode.SUM, SUM_REASON

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        if self.linear(node, consts, var, in_shape, out_shape) is None:
            return None
        return Rounding(terms=1, abs_op=scaling(node.name, 1.0, in_shape, out_shape),
                        offset=broadcast_norm(consts[1 - var], out_shape))


class Scale(Binary):
    """Mul or Div by a constant: one rounding of each entry, relative to |c x| (or |x / c|)."""

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        op = self.linear(node, consts, var, in_shape, out_shape)
        if op is None:
            return None
        match op.structure:  # ``linear`` builds it with ``scaling``: a scalar or a diagonal
            case ScalarStructure(value=value):
                magnitude: torch.Tensor | float = abs(value)
            case DiagStructure(scale=scale):
                magnitude = scale.abs()
            case _:
                return None
        return Rounding(terms=1, abs_op=scaling(node.name, magnitude, in_shape, out_shape))


@register
class Add(Shift):
    name = "Add"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def linear_combination(self, n_inputs: int) -> LinearCombination:
        return LinearCombination((1.0, 1.0))

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        return scaling(node.name, 1.0, in_shape, out_shape) if tuple(in_shape) == tuple(out_shape) else None


@register
class Sub(Shift):
    name = "Sub"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b

    def linear_combination(self, n_inputs: int) -> LinearCombination:
        return LinearCombination((1.0, -1.0))

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if tuple(in_shape) != tuple(out_shape):
            return None
        return scaling(node.name, 1.0 if var == 0 else -1.0, in_shape, out_shape)


@register
class Mul(Scale):
    name = "Mul"
    row_priority = 7

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        factor = per_sample(required(consts, 1 - var, node), in_shape)
        return None if factor is None else scaling(node.name, factor.double(), in_shape, out_shape)


@register
class Div(Scale):
    name = "Div"
    row_priority = 8

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point() or b.is_floating_point():
            return a / b
        return torch.div(a, b, rounding_mode="trunc")

    def linear(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        if var != 0:
            return None
        factor = per_sample(required(consts, 1, node), in_shape)
        return None if factor is None else scaling(node.name, 1.0 / factor.double(), in_shape, out_shape)


@register
class Pow(Binary):
    name = "Pow"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.pow(a, b)
        return out.to(a.dtype)


def broadcast_rule(what: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LipschitzRule | None:
    """Elementwise max/min of one data input and constants: 1-Lipschitz per entry, and an entry that
    broadcasting repeats k = out/in times counts sqrt(k) times. Assumes out is the broadcast of in."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in == 0 or n_out % n_in or tuple(torch.broadcast_shapes(in_shape, out_shape)) != tuple(out_shape):
        return None
    k = n_out // n_in
    if k == 1:
        return LipschitzRule(1.0, f"{what} with constants is 1-Lipschitz")
    return LipschitzRule(math.sqrt(k), f"{what} with constants, each entry broadcast {k} times: sqrt({k})")


class Variadic(Op):
    """An elementwise function of one or more broadcast inputs (ONNX Max, Min, Sum, Mean)."""

    size = sizes.BROADCAST
    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        present = [t for t in inputs if t is not None]
        if not present:
            raise bad(node, "needs at least one input")
        out = present[0]
        for t in present[1:]:
            out = self.combine(out, t)
        return [self.finish(out, len(present))]

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, out: torch.Tensor, count: int) -> torch.Tensor:
        return out


class Extremum(Variadic):
    """Elementwise max or min: with one data input and constants, 1-Lipschitz per entry (``broadcast_rule``),
    and exact in floating point."""

    combination, combination_reason = CombinationMode.MAX, MAX_REASON

    def lipschitz(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> LipschitzRule | None:
        return broadcast_rule(self.name.lower(), in_shape, out_shape)

    def rounding(self, node: Node, consts: Inputs, var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding:
        return EXACT


@register
class Max(Extremum):
    name = "Max"

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.maximum(a, b)


@register
class Min(Extremum):
    name = "Min"

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.minimum(a, b)


@register
class Sum(Variadic):
    name = "Sum"
    accumulates = True
    combination, combination_reason = CombinationMode.SUM, SUM_REASON

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def linear_combination(self, n_inputs: int) -> LinearCombination:
        return LinearCombination((1.0,) * n_inputs)


@register
class Mean(Variadic):
    name = "Mean"
    accumulates = True
    combination, combination_reason = CombinationMode.SUM, SUM_REASON

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def finish(self, out: torch.Tensor, count: int) -> torch.Tensor:
        return out / count

    def linear_combination(self, n_inputs: int) -> LinearCombination:
        return LinearCombination((1.0,) * n_inputs, n_inputs)


class Compare(Binary):
    """Comparisons and logic: shape plumbing that exporters emit; outputs are booleans."""


@register
class Equal(Compare):
    name = "Equal"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.eq(a, b)


@register
class Less(Compare):
    name = "Less"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.lt(a, b)


@register
class LessOrEqual(Compare):
    name = "LessOrEqual"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.le(a, b)


@register
class GreaterOrEqual(Compare):
    name = "GreaterOrEqual"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ge(a, b)


@register
class Greater(Compare):
    name = "Greater"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.gt(a, b)


@register
class And(Compare):
    name = "And"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.logical_and(a, b)


@register
class Or(Compare):
    name = "Or"

    def fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.logical_or(a, b)


@register
class Not(Unary):
    name = "Not"
    exact = True

    def fn(self, node: Node, x: torch.Tensor) -> torch.Tensor:
        return torch.logical_not(x)


@register
class Where(Op):
    name = "Where"
    size = sizes.BROADCAST
    exact = True

    def run(self, node: Node, inputs: Inputs, ctx: RunContext) -> list[torch.Tensor]:
        cond, a, b = (required(inputs, i, node) for i in range(len(inputs)))
        return [torch.where(cond.bool(), a, b)]
