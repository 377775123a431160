"""Linear operators on per-sample tensors, with their adjoints: what verify measures the norms of.

An operator maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)``. Its ``structure`` says what it is: the class
(one per kind of operator) is what analyses dispatch on, and its fields hold what ``lipcert.bounds.spectral``
needs to pick an exact or provable upper bound for it: a dense matrix, a convolution with all its settings, a
diagonal scale, a composition. Every field is declared, so a misspelt one is a ``TypeError``, never a silent
default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True, eq=False)
class Structure:
    """What every structure carries: the flags ``lipcert.bounds.fusion`` sets when it merges operators. Used as
    it is, the structure of an operator known by its forward and adjoint alone (a linear region, say)."""

    #: the (input, output) shapes the structure describes, when they differ from the operator's own (an absorbed
    #: reshape); None: the operator's shapes
    core: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    #: a transpose or padding was absorbed on the input (output) side: coordinates there are not the operator's
    loose_in: bool = False
    loose_out: bool = False
    #: the structure's norm is only an upper bound of the operator's (an absorbed zero padding, a pooling)
    inexact: bool = False


@dataclass(frozen=True, kw_only=True, eq=False)
class ScalarStructure(Structure):
    """``x -> value * x``; ``norm_only`` marks a map counted as its norm ``|value|`` that is not a multiple of the
    identity (a global average pooling, 1/sqrt(n))."""

    value: float
    norm_only: bool = False


@dataclass(frozen=True, kw_only=True, eq=False)
class DiagStructure(Structure):
    """``x -> scale * x``, the scale broadcast against one sample."""

    scale: torch.Tensor


@dataclass(frozen=True, kw_only=True, eq=False)
class MatrixStructure(Structure):
    """A matrix applied along the last axis: ``y = x M^T``."""

    matrix: torch.Tensor


@dataclass(frozen=True, kw_only=True, eq=False)
class ConvStructure(Structure):
    """A (transposed) convolution at one input size, with every ONNX setting (one entry per spatial axis, pads
    as begins then ends); ``circular`` when ``pads`` is a circular padding before an unpadded convolution."""

    weight: torch.Tensor
    input_spatial: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    transpose: bool = False
    circular: bool = False
    output_padding: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False)
class IsometryStructure(Structure):
    """A map that keeps norms: ``flat`` when it keeps each sample's flat order (a reshape), ``onto`` when every
    output entry comes from the input (no zero padding). Both default to the cautious False."""

    flat: bool = False
    onto: bool = False


@dataclass(frozen=True, kw_only=True, eq=False)
class ProjectionStructure(Structure):
    """A map that keeps or drops entries (norm at most 1); ``select`` is (axis, start, end) when it keeps one
    contiguous range of one axis."""

    select: tuple[int, int, int] | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class NonnegativeStructure(Structure):
    """A map with non-negative entries (bounded by the Schur test); ``mode`` and ``pads`` (ONNX order) when it is
    a ``Pad`` that copies entries (``"wrap"``, ``"reflect"``, ``"edge"``)."""

    mode: str | None = None
    pads: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False)
class ChainStructure(Structure):
    """The composition of ``parts``, the first applied first."""

    parts: tuple[LinearOperator, ...]


@dataclass
class LinearOperator:
    """A linear map with its adjoint, both batched over the first dimension."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    forward: Fn
    adjoint: Fn
    structure: Structure = field(default_factory=Structure)
    name: str = ""

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def then(self, after: LinearOperator) -> LinearOperator:
        """The composition ``after o self`` (self applied first)."""
        if tuple(after.in_shape) != tuple(self.out_shape):
            raise ValueError(f"cannot compose {self.out_shape} -> {after.in_shape}")
        parts = _parts(self) + _parts(after)
        return LinearOperator(
            in_shape=self.in_shape,
            out_shape=after.out_shape,
            forward=lambda x: after.forward(self.forward(x)),
            adjoint=lambda y: self.adjoint(after.adjoint(y)),
            structure=ChainStructure(parts=tuple(parts)),
            name=" -> ".join(p.name for p in parts if p.name),
        )

    def to_dense(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                 chunk: int = 1024) -> torch.Tensor:
        """The explicit (out_numel, in_numel) matrix, built column by column in chunks."""
        cols = []
        n = self.in_numel
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            eye = torch.zeros(stop - start, n, dtype=dtype, device=device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            out = self.forward(eye.reshape(stop - start, *self.in_shape))
            cols.append(out.reshape(stop - start, -1).T)
        return torch.cat(cols, dim=1)


def _parts(op: LinearOperator) -> list[LinearOperator]:
    return list(op.structure.parts) if isinstance(op.structure, ChainStructure) else [op]


def autograd_adjoint(forward: Fn, in_shape: tuple[int, ...]) -> Fn:
    """The adjoint of a linear ``forward`` by reverse-mode autograd: exact for any linear map."""

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = torch.zeros(y.shape[0], *in_shape, dtype=y.dtype, device=y.device, requires_grad=True)
            out = forward(x)
            (grad,) = torch.autograd.grad(out, x, grad_outputs=y, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad.detach()

    return adjoint


def from_function(forward: Fn, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *,
                  structure: Structure | None = None, name: str = "", adjoint: Fn | None = None) -> LinearOperator:
    """Wrap a linear function; its adjoint comes from autograd unless one is given, its structure is the plain
    ``Structure`` (known by forward and adjoint alone) unless one is given."""
    return LinearOperator(
        in_shape=tuple(in_shape), out_shape=tuple(out_shape), forward=forward,
        adjoint=adjoint or autograd_adjoint(forward, tuple(in_shape)),
        structure=Structure() if structure is None else structure, name=name,
    )


def identity(shape: tuple[int, ...], name: str = "") -> LinearOperator:
    """The identity on one sample's shape: an isometry in the same coordinates (flat order kept, onto)."""
    return from_function(lambda x: x, shape, shape, structure=IsometryStructure(flat=True, onto=True),
                         name=name, adjoint=lambda y: y)
