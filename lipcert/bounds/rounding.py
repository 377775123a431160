"""The floating-point error of the deployed network over a certified ball: the certificates' error allowance.

A certificate is about the float32 computation that ships (lipcert's executor or onnxruntime; TF32 off), not
about the real-number function that ``verify`` bounds. For every data-dependent value v of the graph let L_v
be the sound Lipschitz bound of x -> v (``verify.propagate``), s = 1 / min(std) for a normalisation outside the
model (else 1), and v_hat the computed value. Around a centre point p, for every input x' with
||x' - p|| <= R:

- **Magnitude.** ||v(x')|| <= ||v(p)|| + s L_v R (the triangle inequality). Two centres are used: the zero
  image c, with ||v(c)|| from one float64 run (``ErrorPlan.reference``) and R = ||x|| + r; or the certified
  point x itself, with ||v_hat(x)|| measured during inference and R = r, where ||v(x)|| <= ||v_hat(x)|| + E_v(x)
  (so errors count twice). Either way biases and shifts such as ``(x + 1e6) - 1e6`` count with their real size.
- **Error of one node.** Given its computed input, a node errs by at most what its ``Rounding`` says
  (``lipcert.graph.ops.base.Rounding``): gamma_n (|| |W| P || ||u|| + ||b||) for an accumulation of n terms, where P
  are the exact copies (pads, reshapes) in front of it since the last rounding node and || |W| P || is bounded
  by the Collatz-Wielandt iteration on that non-negative map (|fl(Wu) - Wu| <= gamma_n |W| |u|, Higham ch. 3);
  plus gamma_k of the output's size, or of sqrt(numel), for elementwise functions.
- **Propagation.** A step's output errs by E_out <= L_step E_in + delta_step, delta_step being the errors its
  own nodes make, each carried to the step's output by upper bounds on the norms of the parts after it. Sums
  add their inputs' errors (weighted by broadcasting) plus their own rounding; concatenations and maxima combine
  them in L2 (Minkowski keeps the bound affine in R).

Every bound is affine in R: ``Affine(base, slope)``, ||z_hat(x') - z(x')|| <= base + slope R for the logits z.
``certify`` turns it into radii. Unknown rounding (an operator without a ``Rounding``, a step without a rule)
makes it infinite. ``plan`` compiles the analysis once (plain numbers, so it travels to torchrun's processes);
``certification.engine`` runs it for the zero-image centre or for measured per-sample norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from lipcert.bounds.kinds import Combination, Linear, Pattern, Region, Rule
from lipcert.bounds.results import NO_RULE
from lipcert.bounds.spectral import STRUCTURAL, upper_bound
from lipcert.bounds.steps import Part, Step
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule
from lipcert.graph.linop import LinearOperator
from lipcert.graph.ops.base import CombinationMode, Rounding

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
#: relative slack on the float64 reference magnitudes and measured norms (their own rounding is far below)
NORM_SLACK = 1e-6
#: Collatz-Wielandt steps for the norm of a non-negative map (|W| with the copies in front of it)
NONNEGATIVE_STEPS = 12

def gamma(n: float, u: float) -> float:
    """gamma_n = n u / (1 - n u) (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1)."""
    if n <= 0:
        return 0.0
    return math.inf if n * u >= 0.5 else n * u / (1 - n * u) * (1 + 1e-12)


def _scale(a, factor: float):
    """a x factor where a zero on either side gives zero, even against infinity (a zero map's output is exact)."""
    if isinstance(a, torch.Tensor):
        return torch.zeros_like(a) if factor == 0.0 else torch.where(a == 0, torch.zeros_like(a), a * factor)
    return 0.0 if a == 0.0 or factor == 0.0 else a * factor


@dataclass(frozen=True)
class Affine:
    """base + slope R: a bound that grows with R, the distance from the centre point. ``base`` is a float, or
    one value per sample (a tensor) when the centre is each certified point."""

    base: float | torch.Tensor
    slope: float

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.base + other.base, self.slope + other.slope)

    def times(self, factor: float) -> Affine:
        return Affine(_scale(self.base, factor), _scale(self.slope, factor))

    @staticmethod
    def norm(items: Sequence[Affine]) -> Affine:
        """A bound on the L2 norm of a vector whose parts are bounded by ``items`` (Minkowski)."""
        if not items:
            return ZERO
        base = sum(a.base * a.base for a in items)
        root = base.sqrt() if isinstance(base, torch.Tensor) else math.sqrt(base)
        return Affine(root, math.sqrt(sum(a.slope * a.slope for a in items)))


ZERO = Affine(0.0, 0.0)
INFINITE = Affine(math.inf, math.inf)


def nonnegative_norm(op: LinearOperator, steps: int = NONNEGATIVE_STEPS) -> float:
    """An upper bound on ||A||_2 for a linear map with non-negative entries, by the Collatz-Wielandt bound:
    for the non-negative symmetric B = A^T A and any entrywise positive v, lambda_max(B) <= max_i (Bv)_i / v_i.
    Iterating v <- Bv (kept positive) drives the bound down towards ||A||^2; the first step from v = 1 is the
    Schur test. Sums of non-negative float64 terms err by at most gamma_n relatively, covered by the margin."""
    if op.in_numel == 0 or op.out_numel == 0:
        return 0.0
    v = torch.ones((1,) + tuple(op.in_shape), dtype=torch.float64)
    best = math.inf
    with torch.no_grad():
        for _ in range(steps):
            w = op.adjoint(op.forward(v))
            best = min(best, float((w / v).max()))
            top = float(w.max())
            if top <= 0.0:
                return 0.0
            v = w / top + 1e-6  # positive, so the bound stays valid for input entries the map ignores
    margin = 1.0 + 8 * (op.in_numel + op.out_numel) * 2.0 ** -53 + 1e-12
    return math.nextafter(math.sqrt(max(best, 0.0)) * margin, math.inf)


@dataclass(frozen=True)
class Site:
    """One node of a step, as the error analysis needs it (plain numbers)."""

    output: str
    norm: float  # upper bound on the norm of the node's linear map (1 for rules: they are absorbed in factor)
    rounds: bool  # the node rounds (else it is an exact copy)
    rebase: bool  # later nodes read the size of this node's output (it rounds, or adds constants)
    terms: int = 0
    abs_norm: float = 0.0  # || |W| P ||, P the copies since the previous rebase
    offset: float = 0.0
    relative: float = 0.0
    absolute: float = 0.0
    numel: int = 0
    fixed: float = 0.0  # a relative error independent of the float format (``Rounding.fixed``)


class InstructionKind(Enum):
    """How an instruction's own evaluation errs (``_Evaluation.local``)."""

    LINEAR = "linear"  # a linear chain: its sites in order
    RULE = "rule"  # a nonlinear node: its own rounding (one site)
    PATTERN = "pattern"  # a pattern that rounds as its ``Rounding`` says (one site)
    BLOCK = "block"  # a pattern or a linear region evaluated through its own steps (``inner``)
    SUM = "sum"  # a weighted sum of its inputs
    CONCAT = "concat"  # a concatenation: its inputs' errors combine in L2
    MAX = "max"  # an elementwise max or min: as a concatenation
    UNKNOWN = NO_RULE  # a step without a rule: infinite


#: a combination step's instruction, by its mode (``Op.combination``)
COMBINATION_KINDS = {CombinationMode.SUM: InstructionKind.SUM, CombinationMode.CONCAT: InstructionKind.CONCAT,
                     CombinationMode.MAX: InstructionKind.MAX}


@dataclass(frozen=True)
class Instruction:
    """One step of the network for the error analysis."""

    kind: InstructionKind
    inputs: tuple[str, ...]
    output: str
    factor: float = 0.0  # the step's Lipschitz bound (steps of one input)
    weights: tuple[float, ...] = ()  # sums, concatenations, maxima: each input's weight
    sites: tuple[Site, ...] = ()  # linear: the chain's nodes; rule, pattern: one site (its own rounding)
    count: int = 0  # sums: the number of terms added
    offset: float = 0.0  # sums: the norm of the constants added
    inner: tuple[Instruction, ...] = ()  # block: the pattern's own steps, with cheap factors
    known: bool = True  # False: the rounding of some node is unknown


@dataclass(frozen=True)
class ErrorPlan:
    """The compiled analysis of one network: everything the report engine needs, as plain numbers."""

    instructions: tuple[Instruction, ...]
    lipschitz: Mapping[str, float]  # L_v of each data-dependent value, in the model's input space
    input: str
    output: str
    output_bounded: bool  # the output depends on the input (else its error is zero)
    scale: float  # 1 / min(std), or 1
    unit: float  # the unit roundoff of the deployed computation
    normalised: bool  # lipcert normalises the input before the model (two roundings per entry)
    reference: Mapping[str, float] = field(default_factory=dict)  # ||v(c)||, c the zero image
    needed: tuple[str, ...] = ()  # the values whose norms the report engine reads

    def evaluate(self, norms: Mapping[str, float | torch.Tensor] | None = None) -> Affine:
        """The error bound base + slope R of the logits. Without ``norms``: around the zero image (R =
        ||x|| + r). With ``norms`` (per-sample float64 norms of the computed values in ``needed``, as
        tensors): around each certified point (R = r), base one value per sample."""
        return _Evaluation(self, norms).run()


class _Evaluation:
    def __init__(self, plan: ErrorPlan, norms: Mapping[str, float | torch.Tensor] | None) -> None:
        self.plan = plan
        self.reference = plan.reference if norms is None else norms
        self.twice = 1.0 if norms is None else 2.0  # measured values are computed ones: their error counts twice
        self.errors: dict[str, Affine] = {}

    def magnitude(self, value: str, deviation: Affine, error: Affine) -> Affine:
        """||v_hat(x')|| <= ||v(centre)|| + deviation + error (x2 around a measured centre)."""
        ref = self.reference.get(value, math.inf)
        return Affine(ref * (1 + NORM_SLACK), 0.0) + deviation + error.times(self.twice)

    def site_error(self, site: Site, base: Affine, out: Affine) -> Affine:
        """What one node adds: gamma_terms (|| |W| P || ||u|| + offset) + gamma_rel ||y|| + gamma_abs sqrt(n)."""
        u = self.plan.unit
        err = ZERO
        if site.terms:
            err = err + (base.times(site.abs_norm) + Affine(site.offset, 0.0)).times(gamma(site.terms, u))
        if site.relative:
            err = err + out.times(gamma(site.relative, u))
        if site.absolute:
            err = err + Affine(gamma(site.absolute, u) * math.sqrt(site.numel), 0.0)
        if site.fixed:
            err = err + out.times(site.fixed)
        return err

    def chain(self, start: str, sites: Sequence[Site], deviation: Affine, error: Affine) -> tuple[Affine, Affine]:
        """(error a linear chain's own nodes add at its output, its output's deviation bound), for an input
        ``start`` that deviates by ``deviation`` and errs by ``error``."""
        moved = deviation + error.times(self.twice)  # how far the computed input may be from v(centre)
        added = ZERO  # rounding made inside the chain so far, at the current value
        base_value, base_moved, base_added = start, moved, added
        for site in sites:
            delta = ZERO
            if site.rounds:
                base = self.magnitude(base_value, base_moved, base_added)
                out = self.magnitude(site.output, moved.times(site.norm), added.times(site.norm))
                delta = self.site_error(site, base, out)
            moved, added = moved.times(site.norm), added.times(site.norm) + delta
            if site.rebase:
                base_value, base_moved, base_added = site.output, moved, added
        return added, moved

    def local(self, ins: Instruction, deviations: list[Affine], errors: list[Affine]) -> Affine:
        """The error an instruction's own evaluation adds to its output (its inputs' errors excluded)."""
        if not ins.known:
            return INFINITE
        match ins.kind:
            case InstructionKind.LINEAR:
                return self.chain(ins.inputs[0], ins.sites, deviations[0], errors[0])[0]
            case InstructionKind.RULE | InstructionKind.PATTERN:
                site = ins.sites[0]
                base = self.magnitude(ins.inputs[0], deviations[0], errors[0])
                out = self.magnitude(ins.output, (deviations[0] + errors[0].times(self.twice)).times(ins.factor),
                                     ZERO)
                return self.site_error(site, base, out)
            case InstructionKind.SUM:
                total = Affine(ins.offset, 0.0)
                for value, w, d, e in zip(ins.inputs, ins.weights, deviations, errors, strict=False):
                    total = total + self.magnitude(value, d, e).times(w)
                return total.times(gamma(ins.count, self.plan.unit))
            case InstructionKind.CONCAT | InstructionKind.MAX:
                if not ins.sites:
                    return ZERO
                moved = Affine.norm([(d + e.times(self.twice)).times(w)
                                     for d, e, w in zip(deviations, errors, ins.weights, strict=False)])
                return self.site_error(ins.sites[0], ZERO, self.magnitude(ins.output, moved, ZERO))
            case InstructionKind.BLOCK:
                return self.block(ins, deviations[0], errors[0])
            case InstructionKind.UNKNOWN:
                return INFINITE

    def block(self, ins: Instruction, deviation: Affine, error: Affine) -> Affine:
        """The error a pattern adds, from the float evaluation of its inner steps (their factors are cheap
        upper bounds; the input's error is counted as part of its deviation, so only new errors are kept)."""
        moved = {ins.inputs[0]: deviation + error.times(self.twice)}
        added = {ins.inputs[0]: ZERO}
        for sub in ins.inner:
            ins_d = [moved.get(i, INFINITE) for i in sub.inputs]
            ins_e = [added.get(i, INFINITE) for i in sub.inputs]
            if sub.kind is InstructionKind.LINEAR:
                delta, moved[sub.output] = self.chain(sub.inputs[0], sub.sites, ins_d[0], ins_e[0])
                added[sub.output] = ins_e[0].times(sub.factor) + delta
                continue
            delta = self.local(sub, ins_d, ins_e)
            weights = sub.weights or (sub.factor,)
            moved[sub.output] = _combined(sub.kind, [d.times(w) for d, w in zip(ins_d, weights, strict=False)])
            added[sub.output] = _combined(sub.kind, [e.times(w) for e, w in zip(ins_e, weights, strict=False)]) + delta
        return added.get(ins.output, INFINITE)

    def run(self) -> Affine:
        plan = self.plan
        if plan.normalised:  # (x - mean) / std in float32: two roundings of each entry, relative to the result
            size = Affine(self.reference.get(plan.input, math.inf), plan.scale)
            self.errors[plan.input] = size.times(gamma(2, plan.unit))
        else:
            self.errors[plan.input] = ZERO
        for ins in plan.instructions:
            deviations = [Affine(0.0, _scale(plan.lipschitz.get(v, math.inf), plan.scale)) for v in ins.inputs]
            ins_e = [self.errors.get(v, INFINITE) for v in ins.inputs]
            delta = self.local(ins, deviations, ins_e)
            weights = ins.weights or (ins.factor,) * len(ins_e)
            weighted = [e.times(w) for e, w in zip(ins_e, weights, strict=False)]
            self.errors[ins.output] = _combined(ins.kind, weighted) + delta
        result = self.errors.get(plan.output, INFINITE if plan.output_bounded else ZERO)
        return Affine(result.base * (1 + NORM_SLACK), result.slope * (1 + NORM_SLACK))


def _combined(kind: InstructionKind, items: list[Affine]) -> Affine:
    """Errors (or deviations) of a step's output from its inputs' (already weighted): summed for sums and
    single-input steps, combined in L2 for concatenations and maxima."""
    if kind in (InstructionKind.CONCAT, InstructionKind.MAX):
        return Affine.norm(items)
    total = ZERO
    for item in items:
        total = total + item
    return total


class _Compiler:
    """Turns steps into instructions, computing each node's norms once."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.needed: set[str] = set()

    def numel(self, value: str) -> int:
        return math.prod(self.graph.value_shapes.get(value, ()))

    def sites(self, parts: Sequence[Part]) -> tuple[Site, ...] | None:
        """The chain's sites; None when a node's rounding is unknown (or the chain names no node at all)."""
        if not parts:
            return None
        out: list[Site] = []
        pending: list[LinearOperator] = []
        for part in parts:
            r = part.rounding
            if r is None or r.abs_op is None:
                return None
            pending.append(r.abs_op)
            if part.operator is not None and isinstance(part.operator.structure, STRUCTURAL):  # a cheap bound
                norm = upper_bound(part.operator).value
            else:
                norm = nonnegative_norm(r.abs_op)  # ||A|| <= || |A| ||
            rounds = not r.exact
            abs_norm = 0.0
            if rounds:
                composed = pending[0]
                for op in pending[1:]:
                    composed = composed.then(op)
                abs_norm = nonnegative_norm(composed)
            rebase = rounds or r.affine
            if rebase:
                pending = []
            out.append(Site(part.output, norm, rounds, rebase, r.terms, abs_norm, r.offset, r.relative, r.absolute,
                            self.numel(part.output), r.fixed))
            self.needed.add(part.output)
        return tuple(out)

    def instruction(self, step: Step, factor: float) -> Instruction:
        """One step as an instruction; ``factor`` is its Lipschitz bound (sound, or a cheap bound inside a
        pattern)."""
        inputs, out = tuple(step.inputs), step.output
        self.needed.update(inputs)
        self.needed.add(out)
        match step.details:
            case Combination(mode=mode, weights=weights, count=count, offset=offset, rounding=r):
                # a pattern computed as a combination may round (an L2-norm combination)
                sites = (self.rounding_site(out, r),) if r is not None and not r.exact else ()
                return Instruction(COMBINATION_KINDS[mode], inputs, out, weights=tuple(weights), count=count,
                                   offset=offset, sites=sites)
            case Region(substeps=substeps) | Pattern(substeps=substeps) if substeps:
                return self.block(step, factor, substeps)  # a pattern or a linear region: its own steps
            case Linear():
                chain = self.sites(step.parts)
                return Instruction(InstructionKind.LINEAR, inputs, out, factor, sites=chain or (),
                                   known=chain is not None)
            case Rule():
                r = step.parts[0].rounding if step.parts else None
                if r is None:
                    return Instruction(InstructionKind.RULE, inputs, out, factor, known=False)
                return Instruction(InstructionKind.RULE, inputs, out, factor, sites=(self.rounding_site(out, r),))
            case Pattern(rounding=r) if r is not None:
                return Instruction(InstructionKind.PATTERN, inputs, out, factor, sites=(self.rounding_site(out, r),))
        return Instruction(InstructionKind.UNKNOWN, inputs, out, factor, known=False)

    def block(self, step: Step, factor: float, substeps: Sequence[Step]) -> Instruction:
        """A pattern or a linear region as its own steps, each with a cheap factor (its rule's constant, or the
        product of its chain's norms)."""
        inner = []
        for sub in substeps:
            cheap = sub.details.constant if isinstance(sub.details, Rule) else 0.0
            if isinstance(sub.details, Linear):
                sites = self.sites(sub.parts)
                cheap = math.prod(s.norm for s in sites) if sites else math.inf
            inner.append(self.instruction(sub, cheap))
        return Instruction(InstructionKind.BLOCK, tuple(step.inputs), step.output, factor, inner=tuple(inner),
                           known=all(i.known for i in inner))

    def rounding_site(self, out: str, r: Rounding) -> Site:
        """A nonlinear node's or pattern's own rounding (relative and absolute terms only)."""
        return Site(out, 1.0, not r.exact, True, 0, 0.0, 0.0, r.relative, r.absolute, self.numel(out), r.fixed)


def reference_norms(graph: Graph, point: torch.Tensor) -> dict[str, float]:
    """||v(c)|| for every per-sample value, from one float64 run of the graph at the point c (batch of 1)."""
    batch = graph.fixed_batch or 1
    module = GraphModule(graph).to(torch.float64)
    with torch.no_grad():
        values = module.run_all(point.to(torch.float64).expand((batch,) + tuple(point.shape[1:])).contiguous())
    norms = {}
    for name, shape in graph.value_shapes.items():
        value = values.get(name)
        if value is not None and value.is_floating_point() and tuple(value.shape[1:]) == tuple(shape):
            norms[name] = float(value[0].norm())
    return norms


def plan(graph: Graph, steps: Sequence[Step], bounds: Mapping[str, float], *, factors: Mapping[str, float],
         dtype: torch.dtype = torch.float32, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None) -> ErrorPlan:
    """Compile the error analysis of ``steps`` (from ``propagate``, with each step's bound in ``factors`` by its
    output: ``Propagation.step_factors``) with the value ``bounds``; ``mean``/``std`` is lipcert's normalisation
    of the input."""
    compiler = _Compiler(graph)
    instructions = tuple(compiler.instruction(s, factors.get(s.output, math.inf)) for s in steps)
    point = torch.zeros((1,) + tuple(graph.input_shape), dtype=torch.float64)
    scale = 1.0
    if std:
        view = (1, -1) + (1,) * (len(graph.input_shape) - 1)
        point = (point - torch.tensor(mean, dtype=torch.float64).reshape(view)) / torch.tensor(
            std, dtype=torch.float64).reshape(view)
        scale = 1.0 / min(std) * (1 + 1e-12)
    return ErrorPlan(instructions=instructions, lipschitz=dict(bounds), input=graph.input_name,
                     output=graph.output, output_bounded=graph.output in bounds, scale=scale,
                     unit=UNIT_ROUNDOFF[dtype], normalised=bool(std), reference=reference_norms(graph, point),
                     needed=tuple(sorted(compiler.needed | {graph.input_name})))
