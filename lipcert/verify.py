"""``lipcert verify``: is the exported model really L-Lipschitz (L2 to L2), and if not, where does it break?

Each step of the network (see ``analysis``) gets a sound upper bound on its exact operator (``spectral``)
and, for linear steps, a power-iteration lower estimate; the upper bounds propagate over the graph into
the network bound. An empirical network lower bound (``empirical``) can prove a claim false on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import __version__, partition
from .analysis import Step, decompose
from .empirical import Progress, network_lower_bound
from .errors import ConfigError, SelfCheckError
from .executor import GraphModule
from .fold import data_dependent
from .fusion import core, refine
from .graph import Graph
from .power_iteration import power_iteration
from .rounding import gamma, nonnegative_norm
from .spectral import UpperBound, mul_up, upper_bound
from .subgraph import absolute_operator, as_conv, region_bound

#: relative slack on the claim that absorbs float32 rounding of weights normalised to 1 (e.g. 1.0000005)
DEFAULT_TOL = 1e-5
SCHEMA = "lipcert.verify/1"
PROVEN, VIOLATED, UNPROVEN, NO_RULE = "proven", "violated", "unproven", "no rule"


@dataclass
class LayerResult:
    """One step of the network: its bounds, how they were obtained, and its status against the claim."""

    name: str
    op: str
    nodes: list[str]
    in_shape: list[int] | None
    out_shape: list[int] | None
    lower: float | None
    lower_method: str | None
    lower_iterations: int | None  # power-iteration steps taken (stopped on convergence or at the cap)
    upper: float | None
    upper_method: str
    exact: bool | None  # linear steps: the upper bound is the norm (up to rounding); None for rules and patterns
    gap: float | None
    status: str
    reason: str = ""


@dataclass
class VerifyResult:
    """The answer of ``verify``: per-layer bounds, the network bound and the verdict."""

    schema: str
    lipcert_version: str
    model: str
    claimed: float
    claim_source: str
    tol: float
    device: str
    seed: int
    layers: list[LayerResult]
    network_upper: float
    network_lower: float
    network_lower_method: str
    empirical_budget: float | None  # seconds the empirical search may take (None: no limit)
    network_lower_steps: int  # search steps it took
    network_lower_stopped: bool  # it ran out of budget before its last step
    status: str
    top_contributors: list[dict]
    no_rule: list[str]
    combinations: list[dict]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def breaking_layers(self) -> list[LayerResult]:
        """Layers whose norm is above the claim when the network's claim is not proven: where it breaks.

        In a proven network a layer above the claim is compensated by others below it; see ``layers_above``."""
        return [] if self.status == PROVEN else self.layers_above

    @property
    def layers_above(self) -> list[LayerResult]:
        """Layers whose norm is proven (by their lower bound) to be above the claim on their own."""
        return [layer for layer in self.layers if layer.status == VIOLATED]

    def to_dict(self) -> dict:
        data = asdict(self)
        return _finite(data)


def _finite(value):
    """JSON has no infinity: write unbounded values as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def status_of(lower: float | None, upper: float | None, claim: float, tol: float) -> str:
    """proven: upper <= claim (1 + tol); violated: lower > claim (1 + tol); otherwise unproven."""
    limit = claim * (1.0 + tol)
    if lower is not None and lower > limit:
        return VIOLATED
    if upper is not None and upper <= limit:
        return PROVEN
    return UNPROVEN


#: operators that name a layer row, by priority (the rest of a fused chain is reshaping and padding)
MAIN_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "AveragePool", "GlobalAveragePool",
            "Mul", "Div", "Pad", "Concat"]


def _svd_start(op) -> torch.Tensor:
    """The top right singular vector of the operator's matrix (for a matrix on the last axis: A^T applied to
    its top left singular vector at the first position): a start that needs no iterations."""
    if op.kind == "matrix":
        matrix = op.structure["matrix"].double()
        left = torch.linalg.svd(matrix, full_matrices=False).U[:, 0]
        target = torch.zeros(op.out_numel, dtype=torch.float64)
        target[: left.numel()] = left
        with torch.no_grad():
            return op.adjoint(target.reshape((1,) + tuple(op.out_shape)))[0]
    return torch.linalg.svd(op.to_dense(), full_matrices=False).Vh[0]


def _fft_starts(op) -> torch.Tensor | None:
    """For a stride-1 circular 2-D convolution: real inputs built from the top singular vector of the
    kernel's DFT at its worst frequency (for both sign conventions of the DFT), which attain the norm."""
    s = op.structure
    if op.kind != "conv" or not s.get("circular") or s.get("transpose") or s["groups"] != 1 \
            or len(s["input_spatial"]) != 2 or any(st != 1 for st in s["stride"]) or s.get("loose_in"):
        return None
    h, w = s["input_spatial"]
    weight = s["weight"].double()
    if weight.shape[1] * h * w != op.in_numel:  # the structure's input is not the chain's, up to a reshape
        return None
    grid = torch.zeros(weight.shape[:2] + (h, w), dtype=torch.float64)
    dh, dw = s["dilation"]
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
    main = sorted((n for n in step.nodes if graph_ops.get(n) in MAIN_OPS), key=lambda n: MAIN_OPS.index(graph_ops[n]))
    name = (main or step.nodes)[0]
    if step.kind == "linear":
        op = refine(step.operator)
        region = "substeps" in step.details
        label = graph_ops.get(name, step.label)
        if op.kind == "conv" and op.structure.get("circular"):
            label += " (circular padding)"
        others = sorted({graph_ops[n] for n in step.nodes} & set(MAIN_OPS) - {graph_ops.get(name), "Pad", "Concat"})
        step.label = label + "".join(f" + {o}" for o in others)
        if region:
            step.label = "linear region (" + " + ".join(sorted({graph_ops[n] for n in step.nodes})) + ")"
        step.operator = op
        ub: UpperBound = (region_bound(step, lambda o: upper_bound(o, device=device)) if region
                          else upper_bound(op, device=device))
        ub = _with_chain_rounding(ub, step) if math.isfinite(ub.value) else ub
        sigma, method, gap, iterations = None, None, None, None
        if lower_bounds:
            shape = as_conv(step) if region and ub.method.startswith("fft-circular") else op
            c_in, c_out = core(op)  # the structure's matrix acts on the step's own entries, up to flat reshapes
            plain = math.prod(c_in) == op.in_numel and math.prod(c_out) == op.out_numel and not (
                op.structure.get("loose_in") or op.structure.get("loose_out"))
            init = _svd_start(op) if ub.method == "svd" and (plain or op.kind != "matrix") else (
                _fft_starts(shape) if ub.method.startswith("fft-circular") else None)
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
    if step.kind in ("rule", "pattern"):
        row = LayerResult(name, step.label, step.nodes, in_shape, out_shape, None, None, None, step.constant,
                          "rule" if step.kind == "rule" else "pattern", None, None,
                          status_of(None, step.constant, claim, tol), step.reason)
        return row, float(step.constant)
    row = LayerResult(name, step.label, step.nodes, in_shape, out_shape, None, None, None, None, "none", False,
                      None, NO_RULE, step.reason)
    return row, math.inf


def _with_chain_rounding(ub: UpperBound, step: Step) -> UpperBound:
    """A chain's (or a region's) bound is computed through its parts in float64 (an explicit matrix built
    through them, or weights multiplied together), which errs by at most gamma_T |A_k| ... |A_1| entrywise (T
    the accumulations along the way): add gamma_T times the norm of that non-negative map, so that cancellation
    between large weights cannot hide the exact operator's norm. A single node is exact (its entries are
    weights)."""
    region = "substeps" in step.details
    parts = [p for s in step.details["substeps"] if s.kind == "linear" for p in s.parts] if region else step.parts
    if len(parts) < 2:
        return ub
    if region:
        absolute = absolute_operator(step)
        size = math.inf if absolute is None else nonnegative_norm(absolute)
    elif any(p.rounding is None or p.rounding.abs_op is None for p in parts):
        size = math.inf
    else:
        size = 1.0
        for part in parts:
            size = mul_up(size, nonnegative_norm(part.rounding.abs_op))
    terms = sum((p.rounding.terms if p.rounding else 0) + 8 for p in parts)
    if region:
        terms += sum(s.details.get("count", 0) + 2 for s in step.details["substeps"] if s.kind != "linear")
    return replace(ub, value=math.nextafter(ub.value + mul_up(gamma(terms, 2.0 ** -53), size), math.inf))


def _combine(step: Step, values: list[float]) -> float:
    """A sum's bound is sum(w L); a concatenation's or elementwise max's is sqrt(sum((w L)^2)), rounded up."""
    weighted = [scale_up(v, w) for v, w in zip(values, step.details["weights"])]
    if step.kind == "sum":
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
    #: partition profiles of values that depend on disjoint parts of another value (``partition``)
    profiles: dict = field(default_factory=dict)
    #: whether the graph's output depends on the input's values (a constant output has bound 0)
    output_is_data: bool = True

    @property
    def upper(self) -> float:
        return self.bounds.get(self.output, math.inf if self.output_is_data else 0.0)


def propagate(graph: Graph, claim: float = 1.0, tol: float = DEFAULT_TOL, device: str = "cpu", seed: int = 0,
              lower_bounds: bool = True, max_iter: int = 1000, progress: Progress | None = None) -> Propagation:
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
            progress("layer bounds", done, len(steps))
        # a value no step bounds has no bound: infinite, never 0
        incoming = [prop.bounds.get(i, math.inf) for i in step.inputs]
        if step.kind in ("sum", "concat", "max"):
            bound = _combine(step, incoming)
            profile = partition.combine(step.kind, step.inputs, step.details["weights"], prop.profiles, order,
                                        lengths)
            rule = step.reason
            if profile is not None and scale_up(profile.top, prop.bounds[profile.base]) < bound:
                bound = scale_up(profile.top, prop.bounds[profile.base])
                rule = f"its inputs read disjoint parts of {profile.base}: largest gain {profile.top:.6g} x its bound"
            prop.bounds[step.output] = bound
            if profile is not None:
                prop.profiles[step.output] = profile
            prop.combinations.append({"node": step.nodes[0], "op": step.label, "rule": rule, "inputs": incoming,
                                      "weights": step.details["weights"], "bound": bound})
            continue
        row, factor = _layer(step, claim, tol, device, seed, graph, lower_bounds, max_iter)
        step.details["factor"] = factor
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
    if step.kind == "none" or len(step.inputs) != 1 or not math.isfinite(factor):
        return None
    first = step.parts[0].operator if step.kind == "linear" and step.parts else None
    if first is not None and "select" in first.structure:
        return partition.selection(step.inputs[0], first.structure["select"], factor)
    if "substeps" in step.details and step.kind == "linear":  # a linear region that reads parts of its input
        readers = [s.parts[0].operator.structure.get("select") if s.kind == "linear" and s.parts else None
                   for s in step.details["substeps"] if step.inputs[0] in s.inputs]
        if readers and all(readers) and len({axis for axis, _, _ in readers}) == 1:
            return partition.union(step.inputs[0], readers, factor)
    known = profiles.get(step.inputs[0])
    return None if known is None else known.scaled(factor)


#: relative slack of the network self-check: a ratio measured in float64 on nearby inputs carries rounding
NETWORK_CHECK_SLACK = 1e-4


def check_network(lower: float, upper: float, method: str) -> None:
    """A ratio measured on a real pair of inputs above the sound network bound is lipcert's bug: raise."""
    if lower > upper * (1 + NETWORK_CHECK_SLACK) + 1e-12:
        raise SelfCheckError(f"the measured network lower bound {lower:.9g} ({method}) exceeds the sound upper bound "
                             f"{upper:.9g}; lipcert's bound for this network is wrong")


def default_budget(device: str) -> float:
    """Seconds the empirical network search may take by default: it stops early on small models."""
    return 20.0 if str(device).startswith("cuda") else 60.0


def verify(graph: Graph, bound: float | None = None, *, tol: float = DEFAULT_TOL, device: str = "cpu",
           seed: int = 0, points: torch.Tensor | None = None, empirical: bool = True,
           empirical_budget: float | None = -1.0, progress: Progress | None = None) -> VerifyResult:
    """Check the model's Lipschitz claim: ``bound`` if given, else its metadata claim, else 1.

    The empirical network search stops after ``empirical_budget`` seconds keeping the best pair found (the
    default, -1, means ``default_budget(device)``; None means no limit). ``progress(phase, done, total)`` is
    called as layer bounds and search steps complete.

    Example::

        graph = lipcert.load_model("sample_models/digits_broken.onnx")
        result = lipcert.verify(graph)
        print(result.status, [layer.name for layer in result.breaking_layers])
    """
    start = time.perf_counter()
    if bound is not None:
        claim, source = float(bound), "--bound"
    elif graph.claimed_lipschitz() is not None:
        claim, source = graph.claimed_lipschitz(), "model metadata"
    else:
        claim, source = 1.0, "default"
    if not math.isfinite(claim) or claim <= 0:
        raise ConfigError(f"--bound must be a positive number, got {claim}")
    if tol < 0:
        raise ConfigError(f"--tol must be non-negative, got {tol}")
    if empirical_budget is not None and empirical_budget == -1.0:
        empirical_budget = default_budget(device)
    if empirical_budget is not None and not (math.isfinite(empirical_budget) and empirical_budget > 0):
        raise ConfigError(f"--empirical-budget must be a positive number of seconds, got {empirical_budget}")
    prop = propagate(graph, claim, tol, device, seed, progress=progress)
    layers, upper = prop.layers, prop.upper
    module = GraphModule(graph).to(device=device, dtype=torch.float64)
    lower, lower_method, steps, stopped = 0.0, "not run", 0, False
    if empirical:
        if points is None:
            gen = torch.Generator().manual_seed(seed)
            points = torch.rand((16,) + graph.input_shape, generator=gen)
        found = network_lower_bound(module, points.to(device=device, dtype=torch.float64), seed=seed,
                                    budget=empirical_budget, progress=progress)
        lower, steps, stopped = found.value, found.steps, found.stopped
        lower_method = f"{found.method} ({found.points} points" + (
            f", stopped by the {empirical_budget:g} s budget)" if stopped else ")")
        check_network(lower, upper, lower_method)
    status = status_of(lower, upper, claim, tol)
    top = sorted(((f, n) for f, n in prop.factors if f > 1.0 + tol), key=lambda t: -t[0])[:5]
    return VerifyResult(
        schema=SCHEMA, lipcert_version=__version__, model=graph.source, claimed=claim, claim_source=source,
        tol=tol, device=str(device), seed=seed, layers=layers, network_upper=upper, network_lower=lower,
        network_lower_method=lower_method, empirical_budget=empirical_budget if empirical else None,
        network_lower_steps=steps, network_lower_stopped=stopped, status=status,
        top_contributors=[{"layer": n, "factor": f} for f, n in top],
        no_rule=[row.name for row in layers if row.status == NO_RULE], combinations=prop.combinations,
        notes=list(graph.notes), seconds=time.perf_counter() - start)
