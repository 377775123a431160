"""The kinds of step: one dataclass per kind holds what a step of that kind carries (a linear step's operator, a
rule's or pattern's constant, a combination's weights), and analyses dispatch on the class (``match``). ``kind``
is the kind's printed name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from lipcert.bounds.results import NO_RULE
from lipcert.graph.ops.base import CombinationMode, Rounding

if TYPE_CHECKING:
    from lipcert.bounds.steps import Step
    from lipcert.graph.linop import LinearOperator

#: how a region runs one of its combination steps: (step, values so far, a tensor of the batch, absolute) -> value;
#: ``absolute`` gives the same map with every sign positive (``regions``)
Combine = Callable[["Step", "Combination", dict[str, torch.Tensor], torch.Tensor, bool], torch.Tensor]


@dataclass
class Linear:
    """A fused chain of linear operators, composed in ``operator`` (each node's share in ``Step.parts``): bounded
    by its operator norm."""

    kind: ClassVar[str] = "linear"
    operator: LinearOperator


@dataclass
class Region(Linear):
    """A linear region (``regions``): its operator runs ``substeps`` (linear chains and linear combinations) on
    values of the per-sample ``shapes``; ``combine`` runs one combination step."""

    substeps: list[Step]
    shapes: dict[str, tuple[int, ...]]
    combine: Combine


@dataclass
class Rule:
    """A nonlinear node with a registry rule: its Lipschitz constant is ``constant``."""

    kind: ClassVar[str] = "rule"
    constant: float


@dataclass
class Pattern:
    """A recognised subgraph (``patterns``) with the Lipschitz constant ``constant``. Its float evaluation rounds
    as ``rounding`` says, or as its own ``substeps`` compute it (neither: unknown); ``reads`` names the nodes it
    only re-reads (``steps.claim_error``)."""

    kind: ClassVar[str] = "pattern"
    constant: float
    rounding: Rounding | None = None
    substeps: list[Step] = field(default_factory=list)
    reads: tuple[str, ...] = ()
    #: a piecewise-linear activation's switches, when its recogniser knows them: s_k = v[first[k]] - v[second[k]]
    #: (second[k] = -1: v[first[k]]) over the flat per-sample entries of its one input v (``local``)
    switches: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Combination:
    """Several data inputs combined, each weighted by ``weights`` (its broadcast repetitions): ``mode`` SUM
    bounds sum(w L), CONCAT and MAX bound sqrt(sum((w L)^2)) (``Op.combination``)."""

    mode: CombinationMode
    weights: list[float]
    #: sums: the number of terms added, and the norm of the constants added (their rounding)
    count: int = 0
    offset: float = 0.0
    #: a linear combination (``Op.linear_combination``): the sign of each data input and the divisor
    signs: tuple[float, ...] | None = None
    divisor: float = 1
    #: a concatenation's axis (the batch axis 0), when the output's shape is known
    axis: int | None = None
    #: a pattern computed as a combination: how its float evaluation rounds
    rounding: Rounding | None = None
    #: one node's own combination (not a pattern's)
    node_op: bool = False

    @property
    def kind(self) -> str:
        return self.mode.value


@dataclass
class NoRule:
    """A node lipcert has no Lipschitz rule for (``Step.reason`` says why): its bound is infinite."""

    kind: ClassVar[str] = NO_RULE


#: what a step carries, by its kind
Details = Linear | Rule | Pattern | Combination | NoRule
