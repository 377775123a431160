"""What a report certifies with: the network bound from ``propagate`` (with verify's self-checks), the per-pair
head and the float error plan."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lipcert.bounds.empirical import jacobian_lower_bound
from lipcert.bounds.kinds import Linear
from lipcert.bounds.propagate import check_network, propagate
from lipcert.bounds.rounding import gamma
from lipcert.bounds.rounding import plan as error_plan
from lipcert.bounds.steps import Step, absolute_chain
from lipcert.certification.radii import BINARY_RULE, PER_PAIR_RULE, SQRT2_RULE, CertificateSetup
from lipcert.errors import ConfigError
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule
from lipcert.progress import StepCallback
from lipcert.report.model import BoundInfo

#: a last dense layer is materialised for the per-pair rule up to this many entries
HEAD_MAX_ENTRIES = 2 ** 24


#: power-iteration steps per layer in report's self-check (any step gives a valid lower estimate)
CHECK_ITERATIONS = 30


#: points and Jacobian power-iteration steps of report's network self-check
CHECK_POINTS, CHECK_JACOBIAN_STEPS = 4, 10


def head_rows(step: Step) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of the last linear step's matrix, one per logit in the output's own order (taken from the
    operator's adjoint, so a reshape or transpose after the dense layer is accounted for), and a bound on
    each computed row's float64 rounding error (gamma of the accumulations times its |A| row)."""
    op = step.linear
    if op.out_numel * op.in_numel > HEAD_MAX_ENTRIES or not step.parts:
        return None
    eye = torch.eye(op.out_numel, dtype=torch.float64).reshape((op.out_numel,) + tuple(op.out_shape))
    with torch.no_grad():
        rows = op.adjoint(eye).reshape(op.out_numel, -1)
        chain = absolute_chain(step.parts)
        if chain is None:  # a part whose float evaluation is unknown
            return rows, torch.full((op.out_numel,), math.inf, dtype=torch.float64)
        absolute, terms = chain
        magnitude = absolute.adjoint(eye).reshape(op.out_numel, -1).norm(dim=1)
    return rows, magnitude * gamma(terms, 2.0 ** -53)


def certificate_setup(graph: Graph, *, device: str = "cpu", declared: float | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      dtype: torch.dtype = torch.float32, points: torch.Tensor | None = None,
                      progress: StepCallback | None = None) -> tuple[CertificateSetup, BoundInfo]:
    """The sound bound (or the user's declared one, stated as such) in pixel space, the per-pair head, and
    the float error allowance; ``mean``/``std`` is the normalisation applied before the model.

    It runs the self-checks of ``verify`` first (power iteration below each layer's upper bound, and a measured
    Jacobian norm at ``points``, or random points, below the network bound): a contradiction raises
    ``SelfCheckError`` and nothing is certified. ``progress(phase, done, total)`` follows the layer bounds."""
    if (mean is None) != (std is None) or (mean is not None and std is not None and len(mean) != len(std)):
        raise ConfigError("mean and std need the same number of values, and one needs the other",
                          parameter=("mean", "std"))
    prop = propagate(graph, device=device, lower_bounds=True, max_iter=CHECK_ITERATIONS, progress=progress)
    computed = prop.upper
    if math.isfinite(computed):
        if points is None:
            points = torch.rand((CHECK_POINTS,) + tuple(graph.input_shape), generator=torch.Generator().manual_seed(0))
        module = GraphModule(graph).to(device=device, dtype=torch.float64)
        found = jacobian_lower_bound(module, points[:CHECK_POINTS].to(device=device, dtype=torch.float64),
                                     iters=CHECK_JACOBIAN_STEPS)
        check_network(found.value, computed, found.method)
    factor = 1.0 / min(std) if std else 1.0
    value = declared if declared is not None else computed
    method = ("declared by the user (lipschitz), not verified" if declared is not None
              else "computed sound upper bound (lipcert verify)")
    head_weight, head_lip, row_error = None, None, None
    last = prop.steps[-1] if prop.steps else None
    binary = math.prod(graph.value_shapes.get(graph.output, (2,))) == 1
    if declared is None and not binary and last is not None and isinstance(last.details, Linear) \
            and last.output == graph.output:
        head = head_rows(last)
        if head is not None:
            (head_weight, row_error), head_lip = head, prop.bounds.get(last.inputs[0], math.inf) * factor
    errors = error_plan(graph, prop.steps, prop.bounds, factors=prop.step_factors, dtype=dtype, mean=mean, std=std)
    error = errors.evaluate()
    base = error.base
    if not isinstance(base, (int, float)):  # evaluated around the zero image: one number for every sample
        raise TypeError(f"the error allowance around the zero image is a number, not {type(base).__name__}")
    rule = BINARY_RULE if binary else PER_PAIR_RULE if head_weight is not None else SQRT2_RULE
    setup = CertificateSetup(lipschitz=value * factor, head_lipschitz=head_lip, head_weight=head_weight,
                             head_row_error=row_error, error_base=base, error_slope=error.slope,
                             error_plan=errors, propagation=prop)
    info = BoundInfo(value=value * factor, method=method, computed_upper=computed * factor, declared=declared,
                     normalisation_factor=factor, rule=rule, error_base=base, error_slope=error.slope)
    return setup, info

