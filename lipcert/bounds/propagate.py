"""Bounds each step of the decomposed graph (sound upper bound, power-iteration lower estimate) and propagates them
into the network bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from lipcert.bounds import partition
from lipcert.bounds.decompose import decompose
from lipcert.bounds.fusion import core, refine
from lipcert.bounds.kinds import Combination, Linear, NoRule, Pattern, Region, Rule
from lipcert.bounds.power_iteration import power_iteration
from lipcert.bounds.regions import absolute_operator, as_conv, region_bound
from lipcert.bounds.results import DEFAULT_TOL, NO_RULE, LayerResult, status_of
from lipcert.bounds.rounding import gamma, nonnegative_norm
from lipcert.bounds.spectral import UpperBound, mul_up, top_singular, upper_bound
from lipcert.bounds.steps import Step
from lipcert.bounds.thresholds import record
from lipcert.errors import SelfCheckError
from lipcert.graph.core import Graph
from lipcert.graph.linop import ConvStructure, LinearOperator, MatrixStructure, ProjectionStructure
from lipcert.graph.ops import REGISTRY
from lipcert.graph.ops.base import CombinationMode
from lipcert.model.fold import data_dependent
from lipcert.progress import StepCallback

#: the branches ``propagate`` records (``thresholds.record``): the power iteration's warm start (the top singular
#: vector of an SVD, DFT vectors of a circular convolution, none), and a partition profile that beat the plain bound
BRANCHES = ("propagate.start-svd", "propagate.start-fft", "propagate.start-random", "propagate.partition")


def _row_priority(op: str | None) -> int | None:
    """How strongly an operator names the row of a step it is in (``Op.row_priority``; smaller first): None never."""
    entry = None if op is None else REGISTRY.get(op)
    return None if entry is None else entry.row_priority



def _svd_start(op: LinearOperator, ub: UpperBound) -> torch.Tensor | None:
    """A start that needs no iterations: the top right singular vector the dense bound found (``ub.start``), or
    for a matrix on the last axis A^T applied to the matrix's top left singular vector at the first position
    (one eigendecomposition of its smaller Gram matrix, never a full SVD); None when neither fits the operator."""
    if ub.start is not None:
        return ub.start if ub.start.numel() == op.in_numel else None
    if not isinstance(op.structure, MatrixStructure):
        return None
    _, left, _ = top_singular(op.structure.matrix.double())
    if left.numel() > op.out_numel:
        return None
    target = torch.zeros(op.out_numel, dtype=torch.float64)
    target[: left.numel()] = left
    with torch.no_grad():
        return op.adjoint(target.reshape((1,) + tuple(op.out_shape)))[0]



def _fft_starts(op) -> torch.Tensor | None:
    """For a stride-1 circular 2-D convolution: real inputs built from the top singular vector of the
    kernel's DFT at its worst frequency (for both sign conventions of the DFT), which attain the norm."""
    s = op.structure
    if not isinstance(op.structure, ConvStructure) or not s.circular or s.transpose or s.groups != 1 \
            or len(s.input_spatial) != 2 or any(st != 1 for st in s.stride) or s.loose_in:
        return None
    h, w = s.input_spatial
    weight = s.weight.double()
    if weight.shape[1] * h * w != op.in_numel:  # the structure's input is not the chain's, up to a reshape
        return None
    grid = torch.zeros(weight.shape[:2] + (h, w), dtype=torch.float64)
    dh, dw = s.dilation
    for p in range(weight.shape[2]):
        for q in range(weight.shape[3]):
            grid[:, :, (p * dh) % h, (q * dw) % w] += weight[:, :, p, q]
    freq = torch.fft.fft2(grid).permute(2, 3, 0, 1)
    _, sv, vh = torch.linalg.svd(freq)
    flat = int(sv[..., 0].reshape(-1).argmax())
    u, v = divmod(flat, w)
    vector = vh[u, v, 0].conj()
    hh = torch.arange(h, dtype=torch.float64)[:, None]
    ww = torch.arange(w, dtype=torch.float64)[None, :]
    starts = []
    for sign in (1.0, -1.0):
        phase = torch.exp(sign * 2j * torch.pi * (u * hh / h + v * ww / w))
        starts.append(torch.real(vector[:, None, None] * phase[None]))
    return torch.stack(starts)



def _layer(step: Step, claim: float, tol: float, device: str, seed: int, graph: Graph,
           lower_bounds: bool = True, max_iter: int = 1000) -> tuple[LayerResult, float]:
    """Bound one step; returns its row and its Lipschitz factor (inf when it has no rule)."""
    graph_ops = {n.name: n.op for n in graph.nodes}
    shapes = graph.value_shapes
    in_shape = list(shapes[step.inputs[0]]) if step.inputs and step.inputs[0] in shapes else None
    out_shape = list(shapes[step.output]) if step.output in shapes else None
    ranked = [(priority, n) for n in step.nodes if (priority := _row_priority(graph_ops.get(n))) is not None]
    main = [n for _, n in sorted(ranked, key=lambda ranked_node: ranked_node[0])]
    name = (main or step.nodes)[0]
    match step.details:
        case Linear() as chain:
            return _linear_layer(step, chain, name, in_shape, out_shape, claim, tol, device, seed, graph_ops,
                                 lower_bounds, max_iter)
        case Rule(constant=constant) | Pattern(constant=constant):
            row = LayerResult(name, step.label, step.nodes, in_shape, out_shape, None, None, None, constant,
                              step.kind, None, None, status_of(None, constant, claim, tol), step.reason)
            return row, float(constant)
    row = LayerResult(name, step.label, step.nodes, in_shape, out_shape, None, None, None, None, "none", False,
                      None, NO_RULE, step.reason)
    return row, math.inf


def _linear_layer(step: Step, chain: Linear, name: str, in_shape: list[int] | None, out_shape: list[int] | None,
                  claim: float, tol: float, device: str, seed: int, graph_ops: dict[str, str], lower_bounds: bool,
                  max_iter: int) -> tuple[LayerResult, float]:
    """Bound a linear step (a chain or a region, its details ``chain``): its row and its factor, the sound upper
    bound of its norm."""
    op = refine(chain.operator)
    region = isinstance(chain, Region)
    label = graph_ops.get(name, step.label)
    if isinstance(op.structure, ConvStructure) and op.structure.circular:
        label += " (circular padding)"
    others = sorted({o for o in (graph_ops[n] for n in step.nodes)
                     if _row_priority(o) is not None and REGISTRY[o].row_suffix} - {graph_ops.get(name)})
    step.label = label + "".join(f" + {o}" for o in others)
    if region:
        step.label = "linear region (" + " + ".join(sorted({graph_ops[n] for n in step.nodes})) + ")"
    chain.operator = op
    ub: UpperBound = (region_bound(step, lambda o: upper_bound(o, device=device)) if region
                      else upper_bound(op, device=device))
    ub = _with_chain_rounding(ub, step) if math.isfinite(ub.value) else ub
    sigma, method, gap, iterations = None, None, None, None
    if lower_bounds:
        shape = as_conv(step) if region and ub.method.startswith("fft-circular") else op
        c_in, c_out = core(op)  # the structure's matrix acts on the step's own entries, up to flat reshapes
        plain = math.prod(c_in) == op.in_numel and math.prod(c_out) == op.out_numel and not (
            op.structure.loose_in or op.structure.loose_out)
        dense_start = ub.method == "svd" and (plain or not isinstance(op.structure, MatrixStructure))
        init = _svd_start(op, ub) if dense_start else (
            _fft_starts(shape) if ub.method.startswith("fft-circular") else None)
        record("propagate.start-random" if init is None else
               "propagate.start-svd" if ub.method == "svd" else "propagate.start-fft")
        pi = power_iteration(op, device=device, seed=seed, init=init, max_iter=max_iter)
        sigma = pi.sigma
        if math.isfinite(ub.value) and sigma > ub.value * (1 + 1e-6) + 1e-12:
            raise SelfCheckError(f"layer {name}: the power-iteration lower bound {sigma:.9g} exceeds the upper "
                                 f"bound {ub.value:.9g} ({ub.method}); lipcert's bound for this operator is wrong")
        gap = (ub.value - sigma) / ub.value if ub.value > 0 and math.isfinite(ub.value) else None
        method = "power iteration" + ("" if pi.converged else f" (not converged, {pi.iterations} steps)")
        iterations = pi.iterations
    row = LayerResult(name, step.label, step.nodes, in_shape, out_shape, sigma, method, iterations,
                      ub.value if math.isfinite(ub.value) else None, ub.method, ub.exact, gap,
                      status_of(sigma, ub.value, claim, tol))
    return row, ub.value



def _with_chain_rounding(ub: UpperBound, step: Step) -> UpperBound:
    """A chain's (or a region's) bound is computed through its parts in float64 (an explicit matrix built
    through them, or weights multiplied together), which errs by at most gamma_T |A_k| ... |A_1| entrywise (T
    the accumulations along the way): add gamma_T times the norm of that non-negative map, so that cancellation
    between large weights cannot hide the exact operator's norm. A single node is exact (its entries are
    weights)."""
    region = step.details if isinstance(step.details, Region) else None
    parts = step.parts if region is None else [p for s in region.substeps if isinstance(s.details, Linear)
                                               for p in s.parts]
    if len(parts) < 2:
        return ub
    abs_ops = [p.rounding.abs_op for p in parts if p.rounding is not None and p.rounding.abs_op is not None]
    if region is not None:
        absolute = absolute_operator(step)
        size = math.inf if absolute is None else nonnegative_norm(absolute)
    elif len(abs_ops) < len(parts):  # a part without |W|
        size = math.inf
    else:
        size = 1.0
        for abs_op in abs_ops:
            size = mul_up(size, nonnegative_norm(abs_op))
    terms = sum((p.rounding.terms if p.rounding else 0) + 8 for p in parts)
    if region is not None:
        terms += sum(s.details.count + 2 for s in region.substeps if isinstance(s.details, Combination))
    return replace(ub, value=math.nextafter(ub.value + mul_up(gamma(terms, 2.0 ** -53), size), math.inf))



def _combine(combination: Combination, values: list[float]) -> float:
    """A sum's bound is sum(w L); a concatenation's or elementwise max's is sqrt(sum((w L)^2)), rounded up."""
    weighted = [scale_up(v, w) for v, w in zip(values, combination.weights, strict=False)]
    if combination.mode is CombinationMode.SUM:
        return math.fsum(weighted) * (1 + 1e-12)
    return math.sqrt(math.fsum(v * v for v in weighted)) * (1 + 1e-12)



def scale_up(value: float, factor: float) -> float:
    """value x factor rounded up, where a zero on either side gives 0 (a map with a constant input, or a
    zero linear map, has a constant output) instead of inf x 0."""
    return 0.0 if value == 0.0 or factor == 0.0 else mul_up(value, factor)



@dataclass
class Propagation:
    """Bounds of every step and value, from the input to the output."""

    layers: list[LayerResult]
    steps: list[Step]
    bounds: dict[str, float]
    factors: list[tuple[float, str]]
    combinations: list[dict]

    output: str = ""
    #: the Lipschitz factor of each step of one input (inf: no rule), by the value it produces
    step_factors: dict[str, float] = field(default_factory=dict)
    #: partition profiles of values that depend on disjoint parts of another value (``partition``)
    profiles: dict = field(default_factory=dict)
    #: whether the graph's output depends on the input's values (a constant output has bound 0)
    output_is_data: bool = True
    #: "node: why", for each step whose form a pattern recognised but could not prove (``Step.near_miss``)
    near_misses: list[str] = field(default_factory=list)

    @property
    def upper(self) -> float:
        return self.bounds.get(self.output, math.inf if self.output_is_data else 0.0)



def propagate(graph: Graph, claim: float = 1.0, tol: float = DEFAULT_TOL, device: str = "cpu", seed: int = 0,
              lower_bounds: bool = True, max_iter: int = 1000, progress: StepCallback | None = None) -> Propagation:
    """Bound each step and propagate: linear and rule steps multiply, sums add, concatenations and
    elementwise max/min combine as sqrt(sum of squares). With ``lower_bounds``, each linear step also gets a
    power-iteration lower estimate (at most ``max_iter`` steps), and one above its upper bound raises
    ``SelfCheckError``."""
    steps = decompose(graph)
    prop = Propagation([], steps, {graph.input_name: 1.0}, [], [], output=graph.output,
                       output_is_data=graph.output in data_dependent(graph))
    order = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs}
    lengths = {(v, a + 1): n for v, shape in graph.value_shapes.items() for a, n in enumerate(shape)}
    for done, step in enumerate(steps, 1):
        if progress:
            progress("layer bounds", done, len(steps), "layers")
        # a value no step bounds has no bound: infinite, never 0
        incoming = [prop.bounds.get(i, math.inf) for i in step.inputs]
        if step.near_miss:
            prop.near_misses.append(f"{step.nodes[0]}: {step.near_miss}")
        if isinstance(step.details, Combination):
            combination = step.details
            bound = _combine(combination, incoming)
            profile = partition.combine(combination.mode, step.inputs, combination.weights, prop.profiles, order,
                                        lengths)
            rule = step.reason
            if profile is not None and scale_up(profile.top, prop.bounds[profile.base]) < bound:
                record("propagate.partition")
                bound = scale_up(profile.top, prop.bounds[profile.base])
                rule = f"its inputs read disjoint parts of {profile.base}: largest gain {profile.top:.6g} x its bound"
            prop.bounds[step.output] = bound
            if profile is not None:
                prop.profiles[step.output] = profile
            prop.combinations.append({"node": step.nodes[0], "op": step.label, "rule": rule, "inputs": incoming,
                                      "weights": combination.weights, "bound": bound})
            continue
        row, factor = _layer(step, claim, tol, device, seed, graph, lower_bounds, max_iter)
        prop.step_factors[step.output] = factor
        prop.layers.append(row)
        prop.factors.append((factor, row.name))
        # steps of one input scale its bound; a step without a rule may read several: inf unless all constant
        moving = max(incoming, default=0.0) if len(incoming) > 1 else incoming[0]
        prop.bounds[step.output] = scale_up(moving, factor)
        profile = _profile(step, factor, prop.profiles)
        if profile is not None:
            prop.profiles[step.output] = profile
            prop.bounds[step.output] = min(prop.bounds[step.output],
                                           scale_up(profile.top, prop.bounds[profile.base]))
    return prop



def _profile(step: Step, factor: float, profiles: dict[str, partition.Profile]) -> partition.Profile | None:
    """The partition profile of a step of one input: a chain that starts by selecting part of its input, or a
    step applied to a value that has a profile."""
    if isinstance(step.details, NoRule) or len(step.inputs) != 1 or not math.isfinite(factor):
        return None
    first = _selection(step.parts[0].operator) if isinstance(step.details, Linear) and step.parts else None
    if first is not None:
        return partition.selection(step.inputs[0], first, factor)
    if isinstance(step.details, Region):  # a linear region that reads parts of its input
        readers = [_selection(s.parts[0].operator) if isinstance(s.details, Linear) and s.parts else None
                   for s in step.details.substeps if step.inputs[0] in s.inputs]
        selections = [r for r in readers if r is not None]
        if readers and len(selections) == len(readers) and len({axis for axis, _, _ in selections}) == 1:
            return partition.union(step.inputs[0], selections, factor)
    known = profiles.get(step.inputs[0])
    return None if known is None else known.scaled(factor)


def _selection(op: LinearOperator | None) -> tuple[int, int, int] | None:
    """The (axis, start, end) range of one axis that a projection keeps, or None (any other operator)."""
    return op.structure.select if op is not None and isinstance(op.structure, ProjectionStructure) else None



#: relative slack of the network self-check: a ratio measured in float64 on nearby inputs carries rounding
NETWORK_CHECK_SLACK = 1e-4



def check_network(lower: float, upper: float, method: str) -> None:
    """A ratio measured on a real pair of inputs above the sound network bound is lipcert's bug: raise."""
    if lower > upper * (1 + NETWORK_CHECK_SLACK) + 1e-12:
        raise SelfCheckError(f"the measured network lower bound {lower:.9g} ({method}) exceeds the sound upper bound "
                             f"{upper:.9g}; lipcert's bound for this network is wrong")

