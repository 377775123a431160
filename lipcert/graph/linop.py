"""Linear operators on per-sample tensors, with their adjoints: what verify measures the norms of.

An operator maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)``. ``structure`` describes what it is
(a dense matrix, a convolution with all its settings, a diagonal scale, a composition), so that
``lipcert.spectral`` can pick an exact or provable upper bound for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LinearOperator:
    """A linear map with its adjoint, both batched over the first dimension."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    forward: Fn
    adjoint: Fn
    kind: str = "generic"
    structure: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def then(self, after: "LinearOperator") -> "LinearOperator":
        """The composition ``after o self`` (self applied first)."""
        if tuple(after.in_shape) != tuple(self.out_shape):
            raise ValueError(f"cannot compose {self.out_shape} -> {after.in_shape}")
        parts = _parts(self) + _parts(after)
        return LinearOperator(
            in_shape=self.in_shape,
            out_shape=after.out_shape,
            forward=lambda x: after.forward(self.forward(x)),
            adjoint=lambda y: self.adjoint(after.adjoint(y)),
            kind="chain",
            structure={"parts": parts},
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
    return list(op.structure["parts"]) if op.kind == "chain" else [op]


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
                  kind: str = "generic", structure: dict[str, Any] | None = None,
                  name: str = "", adjoint: Fn | None = None) -> LinearOperator:
    """Wrap a linear function; its adjoint comes from autograd unless one is given."""
    return LinearOperator(
        in_shape=tuple(in_shape), out_shape=tuple(out_shape), forward=forward,
        adjoint=adjoint or autograd_adjoint(forward, tuple(in_shape)),
        kind=kind, structure=structure or {}, name=name,
    )


def identity(shape: tuple[int, ...], name: str = "") -> LinearOperator:
    """The identity on one sample's shape: an isometry in the same coordinates (flat order kept, onto)."""
    return from_function(lambda x: x, shape, shape, kind="isometry", structure={"flat": True, "onto": True},
                         name=name, adjoint=lambda y: y)
