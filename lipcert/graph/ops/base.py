"""The operator registry: one small class per ONNX operator, in the spirit of onnx's reference evaluator.

Each entry says how the operator runs in torch (``run``); linear operators also say how to build their
exact linear map at a given input size (``linear``, with the typed structure of ``lipcert.graph.linop``), every
operator with a Lipschitz rule states it (``lipschitz``), and both say how their float evaluation errs
(``rounding``). Class attributes state the roles the analysis gives the operator (see ``Op``). The registry is
the single place where lipcert learns what an operator means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, overload

import onnx
import torch

from lipcert.errors import ModelError
from lipcert.graph.core import Node

if TYPE_CHECKING:
    from lipcert.graph.linop import LinearOperator
    from lipcert.graph.ops.sizes import SizeRule


@dataclass(frozen=True)
class RunContext:
    """What an operator needs besides its inputs: the floating-point type the graph runs in."""

    dtype: torch.dtype = torch.float32


class CombinationMode(Enum):
    """How a node with several data-dependent inputs combines them (``Op.combination``): ``SUM`` a weighted sum,
    bounded by sum(w L); ``CONCAT`` a concatenation and ``MAX`` an elementwise max or min, both bounded by
    sqrt(sum((w L)^2)). The value is the step kind's printed name."""

    SUM = "sum"
    CONCAT = "concat"
    MAX = "max"


@dataclass(frozen=True)
class LipschitzRule:
    """An elementwise or local Lipschitz fact about a nonlinear operator (per input it depends on)."""

    constant: float
    reason: str


@dataclass(frozen=True)
class Rounding:
    """How one node's floating-point evaluation errs (``lipcert.bounds.rounding`` turns it into a certificate margin).

    For the output y = op(u) computed from the computed input u, with gamma_n = n u / (1 - n u) and u the unit
    roundoff: ||fl(y) - y||_2 <= gamma_terms (||abs_op|| ||u|| + offset) + gamma_relative ||y||
    + gamma_absolute sqrt(numel(y)) + fixed ||y||. ``abs_op`` is the linear map with the absolute values of the
    node's matrix
    (|W|: conv with |kernel|, a copy for reshapes and pads); it is given for every linear node, exact or not, so
    that chains of them compose. ``terms`` is the longest accumulation of one output entry (a dot product of
    length n in any order, with or without FMA, is within gamma_n |W| |u|, Higham ch. 3), ``offset`` the norm of
    the constants added (bias). An exact node (a copy, ReLU, max, a comparison) has every count zero."""

    terms: int = 0
    abs_op: LinearOperator | None = None
    offset: float = 0.0
    relative: float = 0.0
    absolute: float = 0.0
    #: the node adds non-zero constants to its linear map (a Concat with constants): exact, but its output's
    #: size is not that of |W| |u|
    affine: bool = False
    #: an error relative to ||y|| that does not depend on the float format: a pattern whose constants meet its
    #: condition only up to their own rounding (a HouseHolder's pieces on the selector's zero line), ``fixed`` ||y||
    fixed: float = 0.0

    @property
    def exact(self) -> bool:
        return not (self.terms or self.relative or self.absolute or self.fixed)


EXACT = Rounding()


@dataclass(frozen=True)
class LinearCombination:
    """output = (sum_i signs[i] * broadcast(x_i)) / divisor, over every input of the node, constants included."""

    signs: tuple[float, ...]
    divisor: int = 1

#: per-entry error of elementwise transcendental functions (exp, tanh, sigmoid, ...), in units of u: far above
#: what correctly rounded or libm/MLAS/CUDA implementations reach (a few ulps), stated as an assumption
TRANSCENDENTAL_ULPS = 64


class Op:
    """Base class of a registry entry. Subclasses set ``name`` and implement ``run``, and override the methods
    and role attributes that apply to them:

    - ``combination``: how a node with several data-dependent inputs combines them, the kind of its step in
      ``lipcert.bounds.steps`` (``CombinationMode``): ``SUM`` (a weighted sum: bound sum(w L)), ``CONCAT`` or
      ``MAX`` (an elementwise max or min: both bound sqrt(sum((w L)^2))); None: such a node has no rule.
      ``combination_reason`` states the fact the bound rests on.
    - ``shape_only``: the output depends only on the input's shape, never on its values (``Shape``), so it cuts
      data dependence (``lipcert.model.fold``).
    - ``attributes``: the ONNX attributes (opsets 11 to 28) the entry implements; ``refused``: those it refuses
      whenever they are present, each with its reason. ``check_attributes`` refuses a node carrying any other
      attribute, so an attribute lipcert does not read can never change what a model means behind its back.
      Values an entry cannot run (a mode, an order left to the runtime) are refused by ``run`` with ``bad``.
    - ``row_priority``: a step's row (``lipcert.bounds.propagate``) is named after its node whose op has the
      smallest priority, else after its first node; None: the op never names a row. ``row_suffix``: a linear
      row's label also lists the op after the one naming it (``Conv + BatchNormalization``); False for ops that
      only move entries.

    The facts the bounds read (``lipcert.bounds``), each declared by an operator or absent (None):

    - ``size`` (every operator must declare it, None being a declaration): its size rule (``sizes.SizeRule``),
      how large its values and buffers get before it runs (``lipcert.graph.budget``).
    - ``linear_combination(n_inputs)``: the signs and divisor when the output is a weighted sum of the broadcast
      inputs (Add, Sub, Sum, Mean); None otherwise.
    - ``slope_range(node)``: (lo, hi) holding every slope of an elementwise monotone activation (Relu: (0, 1)),
      the fact the SLL pattern reads; None when unknown.
    """

    name: ClassVar[str]
    #: the output only moves, selects or compares input entries, or reads shapes: two runtimes agree on it bit for
    #: bit (``lipcert.model.crosscheck`` compares it exactly)
    exact: ClassVar[bool] = False
    #: each output entry accumulates many products or terms (``magnitude`` is then their absolute sum)
    accumulates: ClassVar[bool] = False
    attributes: ClassVar[frozenset[str]] = frozenset()
    refused: ClassVar[dict[str, str]] = {}
    combination: ClassVar[CombinationMode | None] = None
    combination_reason: ClassVar[str] = ""
    #: an elementwise activation linear on each side of 0, its only kink: its switch is the entry's sign
    #: (``lipcert.certification.local``)
    kink_at_zero: ClassVar[bool] = False
    shape_only: ClassVar[bool] = False
    row_priority: ClassVar[int | None] = None
    row_suffix: ClassVar[bool] = True
    size: ClassVar[SizeRule | None]

    def run(self, node: Node, inputs: Sequence[torch.Tensor | None], ctx: RunContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def linear(self, node: Node, consts: Sequence[torch.Tensor | None], var: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...], output: int = 0) -> LinearOperator | None:
        """The linear part of output ``output`` in input ``var`` (the other inputs are constants), or None."""
        return None

    def lipschitz(self, node: Node, consts: Sequence[torch.Tensor | None], var: int,
                  in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LipschitzRule | None:
        """A Lipschitz constant of a nonlinear operator in input ``var`` (others constant), or None."""
        return None

    def rounding(self, node: Node, consts: Sequence[torch.Tensor | None], var: int, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], output: int = 0) -> Rounding | None:
        """How the node's float evaluation errs (see ``Rounding``) when it has a linear map or a Lipschitz rule
        in input ``var``; None when unknown, which makes the certificate's error allowance infinite."""
        return None

    def linear_combination(self, n_inputs: int) -> LinearCombination | None:
        """The signs and divisor of a node with ``n_inputs`` inputs when it sums them (see ``LinearCombination``)."""
        return None

    def slope_range(self, node: Node) -> tuple[float, float] | None:
        """Bounds (lo, hi) on every slope (f(a) - f(b)) / (a - b) of an elementwise activation, or None."""
        return None

    @property
    def absolute_error(self) -> bool:
        """Whether the float evaluation's error can be absolute rather than relative to the output (tanh near 0)."""
        return False

    def magnitude(self, node: Node, inputs: Sequence[torch.Tensor | None], output: int = 0) -> torch.Tensor | None:
        """Entry by entry, the absolute size of what one output entry accumulates (|W| |x| + |b| for a product),
        which two float implementations may round differently in proportion to; None when their difference is
        relative to the output entry alone. By default, for ``accumulates`` operators, the operator run in float64
        on the absolute values of its float inputs."""
        if not self.accumulates:
            return None
        wide = [t.double().abs() if t is not None and t.is_floating_point() else t for t in inputs]
        return self.run(node, wide, RunContext(torch.float64))[output].abs()


REGISTRY: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator: add one operator to the registry under its ONNX name."""
    REGISTRY[cls.name] = cls()
    return cls


def check_attributes(node: Node, opset: int | None = None) -> None:
    """Refuse a node that carries an attribute its registry entry does not implement, or (given the model's
    opset) one its operator does not have in that opset: one line naming both."""
    entry = REGISTRY[node.op]
    schema = set(onnx.defs.get_schema(node.op, opset).attributes) if opset is not None else None
    for key in node.attrs:
        if key in entry.refused:
            raise bad(node, f"attribute {key!r} is not supported: {entry.refused[key]}")
        if key not in entry.attributes:
            raise bad(node, f"attribute {key!r} is not an attribute of {node.op} that lipcert implements")
        if schema is not None and key not in schema:
            raise bad(node, f"attribute {key!r} is not an attribute of {node.op} in opset {opset}")


def ints(value: Any, n: int | None = None, default: int = 0) -> list[int]:
    """An ONNX int or ints attribute as a list, repeated to length n when given a scalar."""
    if value is None:
        return [default] * (n or 0)
    if isinstance(value, (int, float)):
        return [int(value)] * (n or 1)
    return [int(v) for v in value]


@overload
def int_list(t: torch.Tensor) -> list[int]: ...
@overload
def int_list(t: None) -> None: ...
@overload
def int_list(t: torch.Tensor | None) -> list[int] | None: ...
def int_list(t: torch.Tensor | None) -> list[int] | None:
    """A constant int64 tensor input (shape, axes, pads) as a python list."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def bad(node: Node, message: str) -> ModelError:
    return ModelError(f"node {node.name!r} ({node.op}): {message}")


def required(inputs: Sequence[torch.Tensor | None], i: int, node: Node) -> torch.Tensor:
    """Input ``i`` of ``node`` (a value it runs on, or a constant a bound reads), where the operator cannot do
    without it: a one-line ``ModelError`` naming the node and the input when the model leaves it out (an empty
    name, or fewer inputs)."""
    value = inputs[i] if 0 <= i < len(inputs) else None
    if value is None:
        raise bad(node, f"input {i} is required but the node leaves it out")
    return value


def same_pads(auto_pad: str, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> list[int]:
    """Explicit ONNX pads (begins then ends) for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    if auto_pad == "VALID":
        return [0] * (2 * len(kernel))
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations, strict=False):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def torch_pad_list(pads: Sequence[int]) -> list[int]:
    """ONNX pads (x1_begin, x2_begin, ..., x1_end, x2_end) to torch's F.pad order (last axis first)."""
    n = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(n)):
        out += [int(pads[axis]), int(pads[axis + n])]
    return out
