"""Ground-truth oracles for lipcert's soundness, computed independently of lipcert's bounds.

Everything here is measured on the exact function the model file defines: lipcert's float64 executor (each
operator run through ``lipcert.graph.ops.REGISTRY[op].run``, which ``tests/test_ops_conformance.py`` checks against
onnxruntime), and onnxruntime's float32 session as the deployed function. A measured Jacobian norm or secant
ratio is a true lower bound on a Lipschitz constant, so it can prove an upper bound wrong:

1. ``check_steps``: every step lipcert cuts the graph into is run on its own, its input value(s) injected (the
   producers of an injected value are not allowed to overwrite it) and the network input held fixed. The
   spectral norm of its dense Jacobian at many points (power iteration for large steps) must not exceed the
   row's upper bound, and its output must not move when only the network input moves (a step that secretly
   reads another value). Sum steps need ||d out / d input_i|| <= w_i for each input, concat and max steps
   ||[d out / d input_i / w_i]|| <= 1 (w_i the step's input weights, ``Combination.weights``).
2. ``check_values_and_network``: every value with a bound (``Propagation.bounds``, and every value a step reads:
   a value missing from the bounds is propagated as a constant, bound 0) bounds the Jacobian of that value
   with respect to the network input; ``Propagation.upper`` bounds the logits' Jacobian norms at points inside
   and outside [0, 1] (and at points that open gated branches) and the secant ratio of a pair gradient ascent.
3. ``check_verify``: ``verify(graph, bound=c)`` must not prove a claim ``c`` below a measured ratio, nor raise.
4. ``check_report``: ``lipcert.certify`` on a small dataset labelled by the model itself; each certified point
   (float32-safe radius) is attacked by PGD (float64, margin loss, restarts, a bisection) and by a random
   search of the float32 onnxruntime function (random directions at 0.999 r and small scales, a line along the
   gradient, to catch rounding flips); an adversarial example confirmed by onnxruntime closer than the
   certified radius fails. On a model with one logit (a binary classifier) lipcert's own PGD runs too, with its
   one-logit margin, and a violation it reports fails as well. Each exact radius is attacked by PGD on the
   exact function too; it fails when the float64 margin inside it goes beyond the float error of the deployed
   logits at the sample (what an exact radius ignores by definition).

A model that lipcert refuses with a ``LipcertError`` is "refused"; any other exception is a failure. Between
float types, Cast is run as the identity (the real-number function); onnxruntime's float32 session is what
the report oracle confirms adversarial examples with.
"""

from __future__ import annotations

import math
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from lipcert.bounds.kinds import Combination, NoRule
from lipcert.certification.attack import AttackConfig
from lipcert.errors import LipcertError
from lipcert.graph.core import Graph
from lipcert.graph.ops import REGISTRY, RunContext

from .build import ort_session

#: counts shown in the pytest terminal summary
STATS: Counter = Counter()
RTOL = 1e-6  # relative slack of every bound comparison (float64 Jacobians of float32 weights)
ATOL = 1e-9
F64 = torch.float64
FLOAT_TYPES = {1, 10, 11, 16}  # ONNX float, float16, double, bfloat16


@dataclass
class Effort:
    """How hard the oracles search (the ``ci`` profile keeps each model to about a second)."""

    step_points: int = 3  # network points whose step inputs are used (plus perturbed and wide ones)
    net_points: int = 6
    ascent_steps: int = 30
    ascent_pairs: int = 6
    samples: int = 16  # dataset size for the report oracle
    pgd_steps: int = 40
    pgd_restarts: int = 3
    directions: int = 96  # random directions per certified point (onnxruntime search)
    line_points: int = 48
    verify: bool = True
    local_every: int = 3  # the report oracle certifies with local certificates on every n-th model (by seed)


CI = Effort()
LONG = Effort(step_points=5, net_points=10, ascent_steps=80, ascent_pairs=12, samples=32, pgd_steps=150,
              pgd_restarts=6, directions=512, line_points=128, local_every=1)


@dataclass
class Outcome:
    """What the oracles found on one model."""

    refused: str | None = None
    failures: list[str] = field(default_factory=list)
    steps: int = 0
    attacked: int = 0
    upper: float = math.nan
    lower: float = 0.0

    def fail(self, oracle: str, message: str) -> None:
        self.failures.append(f"[{oracle}] {message}")


# ---------------------------------------------------------------------------------------------- executor


class Injector:
    """Runs a loaded graph in float64 with chosen values injected: nodes never overwrite an injected value."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.consts = {k: (v.to(F64) if v.is_floating_point() else v) for k, v in graph.params.items()}
        self.producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}

    def needed(self, outputs: Sequence[str], stop: Sequence[str] = ()) -> list[int]:
        """Indices of the nodes that ``outputs`` depend on, not looking above the ``stop`` values."""
        keep: set[int] = set()
        todo = [o for o in outputs if o not in stop]
        seen = set(todo) | set(stop)
        while todo:
            name = todo.pop()
            i = self.producer.get(name)
            if i is None or i in keep:
                continue
            keep.add(i)
            for inp in self.graph.nodes[i].inputs:
                if inp and inp not in seen:
                    seen.add(inp)
                    todo.append(inp)
        return sorted(keep)

    def run(self, x: torch.Tensor, inject: dict[str, torch.Tensor] | None = None,
            nodes: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        inject = inject or {}
        ctx = RunContext(F64)
        env: dict[str, torch.Tensor] = dict(self.consts)
        env[self.graph.input_name] = x
        env.update(inject)
        order = range(len(self.graph.nodes)) if nodes is None else nodes
        for i in order:
            node = self.graph.nodes[i]
            args = [env[n] if n else None for n in node.inputs]
            if node.op == "Cast" and int(node.attr("to", 1)) in FLOAT_TYPES and args[0].is_floating_point():
                outs = [args[0].to(F64)]  # between float types Cast is the identity of the real-number function
            else:
                outs = REGISTRY[node.op].run(node, args, ctx)
            for name, value in zip(node.outputs, outs):
                if name and name not in inject:
                    env[name] = value
        return env


def jacobians(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], v: torch.Tensor,
              aux: torch.Tensor, out_numel: int) -> torch.Tensor:
    """Dense Jacobians (P, out, in) of a batch-independent ``fn(v, aux)`` at the P points ``v`` (aux is
    carried along unchanged), by forward mode over the inputs or reverse mode over the outputs."""
    n_in = v[0].numel()
    if n_in <= out_numel:
        try:
            return _forward_jac(fn, v, aux)
        except (NotImplementedError, RuntimeError):
            pass
    return _reverse_jac(fn, v, aux, out_numel)


def _forward_jac(fn, v, aux):
    p, n = v.shape[0], v[0].numel()
    chunks = []
    per = max(1, 8192 // max(1, n))
    for s in range(0, p, per):
        vv, aa = v[s:s + per], aux[s:s + per]
        q = vv.shape[0]
        base = vv.repeat_interleave(n, dim=0)
        tangent = torch.eye(n, dtype=F64).repeat(q, 1).reshape(base.shape)
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(base, tangent), aa.repeat_interleave(n, dim=0))
            tan = fwAD.unpack_dual(out).tangent
        m = out[0].numel() if out.dim() else 1
        if tan is None:
            tan = torch.zeros(q * n, m, dtype=F64)
        chunks.append(tan.reshape(q, n, m).transpose(1, 2).detach())
    return torch.cat(chunks)


def _reverse_jac(fn, v, aux, m):
    p = v.shape[0]
    chunks = []
    per = max(1, 8192 // max(1, m))
    for s in range(0, p, per):
        vv, aa = v[s:s + per], aux[s:s + per]
        q = vv.shape[0]
        base = vv.repeat_interleave(m, dim=0).detach().requires_grad_(True)
        with torch.enable_grad():
            out = fn(base, aa.repeat_interleave(m, dim=0))
            if not out.requires_grad:
                chunks.append(torch.zeros(q, m, vv[0].numel(), dtype=F64))
                continue
            cot = torch.eye(m, dtype=F64).repeat(q, 1).reshape(out.shape)
            (grad,) = torch.autograd.grad(out, base, grad_outputs=cot, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(base)
        chunks.append(grad.reshape(q, m, -1).detach())
    return torch.cat(chunks)


#: above this many Jacobian entries (over all points) a step's norm is estimated by power iteration instead
DENSE_LIMIT = 4_000_000


def power_norms(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], v: torch.Tensor, aux: torch.Tensor,
                iterations: int = 60, seed: int = 0) -> torch.Tensor:
    """||J(v_p)|| from below for each point p, by power iteration on J^T J (forward mode for J u, reverse mode
    for J^T w): every value is a measured ratio ||J u|| / ||u||, so a true lower bound."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(v.shape, generator=gen, dtype=F64)
    best = torch.zeros(v.shape[0], dtype=F64)
    base = v.detach().requires_grad_(True)
    for _ in range(iterations):
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-300).reshape((-1,) + (1,) * (u.dim() - 1))
        with fwAD.dual_level():
            tan = fwAD.unpack_dual(fn(fwAD.make_dual(v, u), aux)).tangent
        if tan is None:
            return best
        ju = tan.reshape(v.shape[0], -1).detach()
        best = torch.maximum(best, torch.nan_to_num(ju.norm(dim=1), nan=0.0))
        with torch.enable_grad():
            out = fn(base, aux).reshape(v.shape[0], -1)
            (grad,) = torch.autograd.grad(out, base, grad_outputs=ju, allow_unused=True)
        if grad is None:
            return best
        u = torch.nan_to_num(grad.detach())
    return best


def spectral_norms(jac: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each Jacobian; NaN where the Jacobian is not finite (a kink: skipped)."""
    jac = jac.to(F64)
    finite = torch.isfinite(jac).flatten(1).all(dim=1)
    out = torch.full((jac.shape[0],), math.nan, dtype=F64)
    if finite.any():
        out[finite] = torch.linalg.matrix_norm(jac[finite], ord=2)
    return out


def _exceeds(measured: float, bound: float) -> bool:
    return math.isfinite(measured) and measured > bound * (1 + RTOL) + ATOL


# ---------------------------------------------------------------------------------------------- points


def network_points(graph: Graph, inj: Injector, count: int, seed: int) -> torch.Tensor:
    """Inputs inside and outside [0, 1], plus points found to open Relu gates closed on all of them."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.input_shape
    k = max(1, count // 3)
    pts = [torch.rand((k,) + shape, generator=gen, dtype=F64),
           torch.rand((k,) + shape, generator=gen, dtype=F64) * 7 - 3,
           torch.randn((max(1, count - 2 * k),) + shape, generator=gen, dtype=F64) * 10]
    base = torch.cat(pts)
    return torch.cat([base, gate_points(graph, inj, base, gen)])


GATES = ("Relu", "LeakyRelu", "Clip", "MaxPool", "Max", "Min", "Abs", "Elu")


def gate_points(graph: Graph, inj: Injector, base: torch.Tensor, gen: torch.Generator,
                limit: int = 3) -> torch.Tensor:
    """For a Relu (or similar) whose input is negative at every base point: ascend its input's largest entry."""
    found = []
    try:
        with torch.no_grad():
            env = inj.run(base)
    except Exception:  # noqa: BLE001 - wide points may overflow: no gates then
        return base[:0]
    for node in graph.nodes:
        if node.op not in ("Relu", "LeakyRelu", "Elu") or len(found) >= limit:
            continue
        pre = env.get(node.inputs[0])
        if pre is None or not pre.is_floating_point() or pre.shape[:1] != base.shape[:1]:
            continue
        if bool((pre.flatten(1).amax(dim=1) > 0).any()):
            continue
        x = base[:1].clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.5)
        nodes = inj.needed([node.inputs[0]])
        for _ in range(40):
            with torch.enable_grad():
                value = inj.run(x, nodes=nodes)[node.inputs[0]]
                loss = -value.flatten(1).amax(dim=1).sum()
            if -float(loss.detach()) > 0.5 or not loss.requires_grad:
                break  # open, or constant in the input (no point opens it)
            opt.zero_grad()
            loss.backward()
            opt.step()
        found.append(x.detach() + 0.01 * torch.randn(x.shape, generator=gen, dtype=F64))
    return torch.cat(found) if found else base[:0]


# ---------------------------------------------------------------------------------------------- oracle 1


def check_steps(graph: Graph, prop, inj: Injector, points: torch.Tensor, effort: Effort, out: Outcome,
                seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        env = inj.run(points)
    usable = torch.ones(points.shape[0], dtype=torch.bool)
    rows = iter(prop.layers)
    for step in prop.steps:
        row = None if isinstance(step.details, Combination) else next(rows, None)
        out.steps += 1
        STATS["steps"] += 1
        if isinstance(step.details, NoRule):
            continue
        names = list(dict.fromkeys(step.inputs))
        nodes = inj.needed([step.output], stop=names)
        if not nodes:
            continue
        values = [env[n] for n in names]
        if any(not v.is_floating_point() for v in values):
            continue
        sizes = [v[0].numel() for v in values]
        shapes = [tuple(v.shape[1:]) for v in values]
        flat = torch.cat([v.flatten(1) for v in values], dim=1)
        ok = torch.isfinite(flat).all(dim=1) & usable
        idx = torch.nonzero(ok).flatten()[: effort.step_points]
        if idx.numel() == 0:
            continue
        base, xs = flat[idx], points[idx]
        scale = float(base.abs().max()) + 1.0
        extra = [base + 0.05 * scale * torch.randn(base.shape, generator=gen, dtype=F64),
                 3.0 * scale * torch.randn(base[:2].shape, generator=gen, dtype=F64),
                 torch.randn(base[:1].shape, generator=gen, dtype=F64)]
        vs = torch.cat([base] + extra)
        ax = torch.cat([xs, xs, xs[:2][: extra[1].shape[0]], xs[:1]])

        def fn(v: torch.Tensor, x: torch.Tensor, names=names, sizes=sizes, shapes=shapes, nodes=nodes,
               output=step.output) -> torch.Tensor:
            parts = torch.split(v, sizes, dim=1)
            inject = {n: p.reshape((v.shape[0],) + s) for n, p, s in zip(names, parts, shapes)}
            return inj.run(x, inject, nodes)[output].reshape(v.shape[0], -1)

        try:
            with torch.no_grad():
                y = fn(vs, ax)
        except Exception as exc:  # noqa: BLE001
            out.fail("step", f"step {step.label} ({step.nodes[0]}) cannot be re-run with its input injected: "
                             f"{type(exc).__name__}: {exc}")
            continue
        if not y.is_floating_point():
            continue
        # independence: hold the injected inputs, move the network input
        if points.shape[0] > 1:
            other = ax.roll(1, dims=0) if ax.shape[0] > 1 else ax
            other = other + 0.3 * torch.randn(other.shape, generator=gen, dtype=F64)
            with torch.no_grad():
                y2 = fn(vs, other)
            fin = torch.isfinite(y).all(dim=1) & torch.isfinite(y2).all(dim=1)
            if fin.any():
                diff = float((y[fin] - y2[fin]).abs().max())
                if diff > 1e-9 * (1 + float(y[fin].abs().max())):
                    out.fail("independence", f"step {step.kind} {step.label!r} (nodes {step.nodes}) from "
                                             f"{step.inputs} to {step.output!r} changes by {diff:.3g} when only "
                                             "the network input changes: it reads a value it does not declare")
        if vs.shape[0] * vs[0].numel() * y.shape[1] > DENSE_LIMIT:  # a large step: power iteration per point
            if isinstance(step.details, Combination) or len(names) != 1:
                continue
            upper = math.inf if row is None or row.upper is None else float(row.upper)
            worst = float(power_norms(fn, vs, ax, seed=seed).max())
            if math.isfinite(upper) and _exceeds(worst, upper):
                out.fail("row", f"row {row.name!r} ({step.kind} {row.op}, nodes {step.nodes}): upper bound "
                                f"{upper:.9g} ({row.upper_method}) but power iteration on the step's Jacobian "
                                f"measures {worst:.9g}")
            continue
        jac = jacobians(fn, vs, ax, y.shape[1])
        if isinstance(step.details, Combination):
            if math.isfinite(prop.bounds.get(step.output, math.inf)):  # an infinite bound is sound anyway
                check_combination(step, names, sizes, jac, out)
            continue
        upper = math.inf if row is None or row.upper is None else float(row.upper)
        norms = spectral_norms(jac).numpy()
        worst = float(np.nanmax(norms, initial=0.0))
        if math.isfinite(upper) and _exceeds(worst, upper):
            out.fail("row", f"row {row.name!r} ({step.kind} {row.op}, nodes {step.nodes}): upper bound {upper:.9g} "
                            f"({row.upper_method}) but the step's Jacobian has norm {worst:.9g}")


def check_combination(step, names: list[str], sizes: list[int], jac: torch.Tensor, out: Outcome) -> None:
    """A sum step bounds its output by sum_i w_i L(input_i), concat and max by sqrt(sum_i (w_i L(input_i))^2),
    with w_i the step's input weights (``Combination.weights``). Sound for arbitrary inputs iff
    ||d out / d input_i|| <= w_i (sum), or the Jacobian with block i divided by w_i has norm <= 1 (concat, max);
    an input read twice counts its weights together."""
    weights = list(step.details.weights)
    per_name: dict[str, list[float]] = {}
    for name, w in zip(step.inputs, weights):
        per_name.setdefault(name, []).append(float(w))
    blocks = torch.split(jac, sizes, dim=2)
    if step.kind == "sum":
        for n, b in zip(names, blocks):
            allowed = math.fsum(abs(w) for w in per_name[n])
            worst = float(np.nanmax(spectral_norms(b).numpy(), initial=0.0))
            if _exceeds(worst, allowed):
                out.fail("combination", f"{step.label} step {step.nodes[0]!r}: ||d out / d {n}|| = {worst:.6g} > "
                                        f"{allowed:.6g} (the weight the sum rule gives it), so the bound "
                                        f"sum w_i L(input_i) does not hold (inputs {step.inputs}, output "
                                        f"{step.output!r})")
        return
    scaled = []
    for n, b in zip(names, blocks):
        c = math.sqrt(math.fsum(w * w for w in per_name[n]))
        scaled.append(b / c if c > 0 else b * math.inf)
    worst = float(np.nanmax(spectral_norms(torch.cat(scaled, dim=2)).numpy(), initial=0.0))
    if _exceeds(worst, 1.0):
        out.fail("combination", f"{step.kind} step {step.label} {step.nodes[0]!r}: the Jacobian, each input's block "
                                f"divided by its weight, has norm {worst:.6g} > 1, so sqrt(sum (w_i L_i)^2) does "
                                f"not hold (inputs {step.inputs}, weights {weights}, output {step.output!r})")


# ---------------------------------------------------------------------------------------------- oracles 2, 3


def value_jacobians(graph: Graph, inj: Injector, points: torch.Tensor,
                    names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Jacobians (P, numel, d) of every named value with respect to the network input."""
    d = math.prod(graph.input_shape)
    p = points.shape[0]
    result: dict[str, torch.Tensor] = {}
    if d > 512:  # a large input: only the logits (few), by reverse mode
        names = [graph.output]
        nodes = inj.needed(names)
        k = math.prod(graph.value_shapes.get(graph.output, (1,)))
        result[graph.output] = _reverse_jac(lambda x, _a: inj.run(x, nodes=nodes)[graph.output].reshape(x.shape[0], -1),
                                            points, points, k)
        return result
    try:
        base = points.repeat_interleave(d, dim=0)
        tangent = torch.eye(d, dtype=F64).repeat(p, 1).reshape(base.shape)
        with fwAD.dual_level():
            env = inj.run(fwAD.make_dual(base, tangent))
            for n in names:
                value = env.get(n)
                if value is None or not value.is_floating_point():
                    continue
                tan = fwAD.unpack_dual(value).tangent
                m = value[0].numel() if value.dim() else 1
                tan = torch.zeros(p * d, m, dtype=F64) if tan is None else tan.reshape(p * d, m)
                result[n] = tan.reshape(p, d, m).transpose(1, 2).detach()
        return result
    except (NotImplementedError, RuntimeError):
        pass
    for n in names:
        nodes = inj.needed([n])
        with torch.no_grad():
            sample = inj.run(points[:1], nodes=nodes).get(n)
        if sample is None or not sample.is_floating_point():
            continue
        result[n] = _reverse_jac(lambda x, _a, n=n, nodes=nodes: inj.run(x, nodes=nodes)[n].reshape(x.shape[0], -1),
                                 points, points, sample[0].numel())
    return result


def pair_ascent(graph: Graph, inj: Injector, starts: torch.Tensor, steps: int, seed: int) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| found by Adam over pairs started at ``starts`` (a true lower bound)."""
    if steps <= 0 or starts.shape[0] == 0:
        return 0.0
    gen = torch.Generator().manual_seed(seed + 7)
    nodes = inj.needed([graph.output])
    x = starts.clone().requires_grad_(True)
    y = (starts + 0.05 * torch.randn(starts.shape, generator=gen, dtype=F64)).requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=0.02)
    best = 0.0
    for _ in range(steps):
        with torch.enable_grad():
            fx = inj.run(x, nodes=nodes)[graph.output].reshape(x.shape[0], -1)  # (N,) for some one-logit models
            fy = inj.run(y, nodes=nodes)[graph.output].reshape(y.shape[0], -1)
            num = (fx - fy).norm(dim=1)
            den = (x - y).flatten(1).norm(dim=1).clamp_min(1e-12)
            ratio = num / den
        fin = torch.isfinite(ratio) & (den > 1e-9)
        if fin.any():
            best = max(best, float(ratio.detach()[fin].max()))
        opt.zero_grad()
        (-ratio[fin].sum()).backward() if fin.any() else None
        opt.step()
    return best


def check_values_and_network(graph: Graph, prop, inj: Injector, points: torch.Tensor, effort: Effort,
                             out: Outcome, seed: int) -> float:
    """Oracles 2 and 3 (bounds of values and of the network); returns the best measured network ratio."""
    names = {graph.output} | set(prop.bounds)
    for step in prop.steps:
        names.update(step.inputs)
        names.add(step.output)
    names.discard(graph.input_name)
    jacs = value_jacobians(graph, inj, points, sorted(names))
    for n, jac in sorted(jacs.items()):
        bound = prop.bounds.get(n, 0.0)
        STATS["values"] += 1
        norms = spectral_norms(jac).numpy()
        worst = float(np.nanmax(norms, initial=0.0))
        if n == graph.output:
            out.lower = max(out.lower, worst)
        if math.isfinite(bound) and _exceeds(worst, bound):
            where = "missing from Propagation.bounds (propagated as a constant, bound 0)" \
                if n not in prop.bounds else f"bound {bound:.9g}"
            at = int(np.nanargmax(norms))
            out.fail("value", f"value {n!r}: {where}, but its Jacobian w.r.t. the input has norm {worst:.9g} at "
                              f"point {at} (|x|max {float(points[at].abs().max()):.3g})")
    # network: pair ascent from the points with the largest Jacobian norms
    jac = jacs.get(graph.output)
    if jac is not None:
        norms = torch.nan_to_num(spectral_norms(jac), nan=-1.0)
        order = torch.argsort(norms, descending=True)[: effort.ascent_pairs]
        try:
            ratio = pair_ascent(graph, inj, points[order], effort.ascent_steps, seed)
        except Exception:  # noqa: BLE001 - a pair ascent that overflows proves nothing
            ratio = 0.0
        out.lower = max(out.lower, ratio)
        upper = prop.upper
        if math.isfinite(upper) and _exceeds(ratio, upper):
            out.fail("network", f"network upper bound {upper:.9g} but a pair of inputs moves the logits "
                                f"{ratio:.9g} times their distance")
        if math.isfinite(upper) and _exceeds(out.lower, upper) and not any(f.startswith("[value] value "
                                                                                        f"{graph.output!r}")
                                                                           for f in out.failures):
            out.fail("network", f"network upper bound {upper:.9g} but a Jacobian of the logits has norm "
                                f"{out.lower:.9g}")
    return out.lower


def check_verify(graph: Graph, measured: float, out: Outcome, seed: int) -> None:
    """verify(graph, bound=c) with c just below a measured ratio must not say proven, nor raise."""
    from lipcert.bounds.verify import verify

    if not measured > 1e-6:
        return
    claim = measured / (1 + 3e-5)
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand((4,) + graph.input_shape, generator=gen)
    try:
        result = verify(graph, bound=claim, points=pts)
    except LipcertError as exc:
        out.fail("verify", f"verify raised a LipcertError on a loaded model: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - RuntimeError is lipcert's own self-check firing
        out.fail("verify", f"verify(bound={claim:.9g}) raised {type(exc).__name__}: {str(exc)[:300]}")
        return
    if result.status == "proven":
        out.fail("verify", f"verify proves the claim {claim:.9g} (network_upper {result.network_upper:.9g}) but a "
                           f"measured ratio is {measured:.9g}")


# ---------------------------------------------------------------------------------------------- oracle 4


def _predict(logits: np.ndarray) -> np.ndarray:
    return (logits[:, 0] > 0).astype(np.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)


def _margin_loss(z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Positive exactly when ``cls`` is not the prediction (binary: the sign of the one logit)."""
    if z.shape[1] == 1:
        s = z[:, 0]
        return torch.where(cls == 1, -s, s)
    own = z.gather(1, cls[:, None])[:, 0]
    other = z.scatter(1, cls[:, None], -math.inf).amax(dim=1)
    return other - own


def _project(x0: torch.Tensor, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    delta = (x - x0).flatten(1)
    norm = delta.norm(dim=1, keepdim=True).clamp_min(1e-30)
    factor = torch.clamp(radius[:, None] / norm, max=1.0)
    return (x0 + (delta * factor).reshape(x.shape)).clamp(0.0, 1.0)


def _attack_exact(report, x: torch.Tensor, margin: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  effort: Effort, gen: torch.Generator, out: Outcome) -> None:
    """The exact radii against the exact function: PGD (float64, margin loss) inside 0.999 of each exact radius.
    An exact radius takes the deployed logits as exact, so at the sample the exact margin may be below the
    deployed one by the float error there, sqrt(2) (error_base + error_slope ||x||) (the report's zero-image
    bound): a point inside the radius breaks it only when its float64 margin is beyond that."""
    radii = report.samples.exact_radii
    if radii is None:
        out.fail("report", "the report has no exact radii")
        return
    radii = radii.double()
    todo = torch.nonzero(radii > 0).flatten()
    if todo.numel() == 0:
        return
    x0, cls = x[todo], report.samples.predictions.long()[todo]
    ball = 0.999 * radii[todo].clamp(max=1e6)
    b = report.bound
    tolerance = math.sqrt(2) * (b.error_base + b.error_slope * x0.flatten(1).norm(dim=1)) * (1 + 1e-6) + 1e-12
    view = (-1,) + (1,) * (x0.dim() - 1)
    for restart in range(effort.pgd_restarts):
        noise = torch.randn(x0.shape, generator=gen, dtype=F64)
        noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(view)
        xa = _project(x0, x0 + noise * (ball * (0.5 if restart else 0.0)).reshape(view), ball).requires_grad_(True)
        alpha = (2.5 * ball / effort.pgd_steps).reshape(view)
        best = torch.full((x0.shape[0],), -math.inf, dtype=F64)
        for _ in range(effort.pgd_steps):
            with torch.enable_grad():
                loss = margin(xa, cls)
                (grad,) = torch.autograd.grad(loss.sum(), xa)
            with torch.no_grad():
                best = torch.maximum(best, loss.detach())
                g = grad.flatten(1)
                g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
                xa = _project(x0, xa + alpha * g.reshape(xa.shape), ball).requires_grad_(True)
        broken = torch.nonzero(best > tolerance).flatten()
        if broken.numel():
            i = int(broken[0])
            out.fail("report", f"{broken.numel()} of {todo.numel()} exact radii broken by PGD on the exact function "
                               f"(float64 margin {float(best[i]):.6g} beyond the tolerance {float(tolerance[i]):.3g}); "
                               f"sample {int(todo[i])}: exact radius {float(radii[todo[i]]):.6g}")
            return


def check_report(graph: Graph, path: Path, inj: Injector, effort: Effort, out: Outcome, seed: int,
                 backend: str = "onnxruntime", data: np.ndarray | None = None) -> None:
    import lipcert

    session = ort_session(str(path))

    def deployed(x: np.ndarray) -> np.ndarray:
        outs = []
        for s in range(0, x.shape[0], 4096):
            outs.append(session.run(None, {graph.input_name: x[s:s + 4096].astype(np.float32)})[0])
        return np.concatenate(outs).reshape(x.shape[0], -1)

    gen = torch.Generator().manual_seed(seed + 11)
    x = torch.rand((effort.samples,) + graph.input_shape, generator=gen).numpy().astype(np.float32)
    if data is not None:  # chosen points (in [0, 1]) first
        x = np.concatenate([np.asarray(data, np.float32).reshape((-1,) + graph.input_shape), x])
    logits = deployed(x)
    if not np.isfinite(logits).all():
        return
    y = _predict(logits)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npz"
        np.savez(data, x=x, y=y)
        layout = "NCHW" if len(graph.input_shape) == 3 else "auto"
        try:
            attack = AttackConfig(steps=max(10, effort.pgd_steps // 4), restarts=1) if logits.shape[1] == 1 else None
            local = seed % effort.local_every == 0
            report = lipcert.certify(graph, str(data), eps="0.03,0.1,0.3,1" if local else "0.1", attack=attack,
                                     device="cpu", backend=backend, layout=layout, local=local)
        except LipcertError as exc:
            out.fail("report", f"certify raised a LipcertError on a loaded model and a valid dataset: {exc}")
            return
        except Exception as exc:  # noqa: BLE001
            out.fail("report", f"certify raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
            return
    if report.attack and report.attack.violation_count:
        out.fail("report", f"lipcert's own PGD (one-logit margin) broke {report.attack.violation_count} certified "
                           f"point(s) inside their radius: {report.attack.violations[:3]}")
    radii = report.samples.radii.double()
    if local:  # the local radii are never below the others: attacking inside them covers both
        raised = report.samples.columns["local_radius"].double()
        if bool((raised < radii).any()):
            out.fail("report", "a local radius is below the float32-safe radius of its sample")
        STATS["local"] += int((raised > radii).sum())
        radii = torch.maximum(radii, raised)
    preds = report.samples.predictions.long()
    todo = torch.nonzero(radii > 0).flatten()
    if todo.numel() == 0:
        return
    STATS["certificates"] += int(todo.numel())
    out.attacked += int(todo.numel())
    x0 = torch.from_numpy(x[todo.numpy()]).double()
    cls = preds[todo]
    r = radii[todo]
    worst: dict[int, tuple[float, int]] = {}  # sample position -> (closest adversarial distance, its class)

    def confirm(pos: torch.Tensor, pts: torch.Tensor) -> None:
        """Run the candidates through onnxruntime (float32); keep the confirmed ones inside the radius."""
        if pts.shape[0] == 0:
            return
        p32 = pts.detach().numpy().astype(np.float32)
        pred = _predict(deployed(p32))
        dist = np.linalg.norm((p32.astype(np.float64) - x0[pos].numpy()).reshape(len(pos), -1), axis=1)
        for k in np.nonzero(pred != cls[pos].numpy())[0]:
            i = int(pos[k])
            if dist[k] < float(r[i]) and (i not in worst or dist[k] < worst[i][0]):
                worst[i] = (float(dist[k]), int(pred[k]))

    # PGD on the float64 executor, margin loss, inside 0.999 r and the box; then a bisection along the segment
    nodes = inj.needed([graph.output])

    def margin(xb: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        return _margin_loss(inj.run(xb, nodes=nodes)[graph.output].reshape(xb.shape[0], -1), cb)

    ball = 0.999 * r
    view = (-1,) + (1,) * (x0.dim() - 1)
    for restart in range(effort.pgd_restarts):
        noise = torch.randn(x0.shape, generator=gen, dtype=F64)
        noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(view)
        start = x0 + noise * (ball * (0.5 if restart else 0.0)).reshape(view)
        xa = _project(x0, start, ball).requires_grad_(True)
        alpha = (2.5 * ball / effort.pgd_steps).reshape(view)
        best = xa.detach().clone()
        best_loss = torch.full((x0.shape[0],), -math.inf, dtype=F64)
        for _ in range(effort.pgd_steps):
            with torch.enable_grad():
                loss = margin(xa, cls)
                (grad,) = torch.autograd.grad(loss.sum(), xa)
            with torch.no_grad():
                better = loss.detach() > best_loss
                best[better], best_loss[better] = xa.detach()[better], loss.detach()[better]
                g = grad.flatten(1)
                g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
                xa = _project(x0, xa + alpha * g.reshape(xa.shape), ball).requires_grad_(True)
        idx = torch.arange(x0.shape[0])
        confirm(idx, best)
        hit = best_loss > 0
        if hit.any():  # bisection on the segment x0 -> best: the closest flip along it
            lo, hi = torch.zeros(int(hit.sum()), dtype=F64), torch.ones(int(hit.sum()), dtype=F64)
            seg = (best - x0)[hit]
            for _ in range(20):
                mid = (lo + hi) / 2
                with torch.no_grad():
                    flipped = margin(x0[hit] + seg * mid.reshape(view), cls[hit]) > 0
                hi, lo = torch.where(flipped, mid, hi), torch.where(flipped, lo, mid)
            confirm(idx[hit], x0[hit] + seg * hi.reshape(view))
    # random search of the deployed float32 function: random directions at several scales, and the gradient line
    with torch.enable_grad():
        xg = x0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(margin(xg, cls).sum(), xg)
    gdir = grad.flatten(1)
    gdir = gdir / gdir.norm(dim=1, keepdim=True).clamp_min(1e-30)
    scales = torch.tensor([0.999, 0.99, 0.9, 0.5, 0.1, 1e-3], dtype=F64)
    for i in range(x0.shape[0]):
        d = torch.randn((effort.directions,) + tuple(x0.shape[1:]), generator=gen, dtype=F64).flatten(1)
        d = d / d.norm(dim=1, keepdim=True)
        steps = (d[:, None, :] * scales[None, :, None] * ball[i]).reshape(-1, d.shape[1])
        line = torch.linspace(0, 1, effort.line_points + 1, dtype=F64)[1:, None] * ball[i] * gdir[i][None, :]
        pts = x0[i].flatten()[None, :] + torch.cat([steps, line])
        pts = pts.clamp(0.0, 1.0).reshape((-1,) + tuple(x0.shape[1:]))
        confirm(torch.full((pts.shape[0],), i, dtype=torch.long), pts)
    _attack_exact(report, torch.from_numpy(x).double(), margin, effort, gen, out)
    if worst:
        ratios = sorted(((dist / float(r[i]), i, dist, c) for i, (dist, c) in worst.items()))
        examples = "; ".join(f"sample {int(todo[i])}: radius {float(r[i]):.6g} (class {int(cls[i])}), onnxruntime "
                             f"gives class {c} at distance {dist:.6g}" for _, i, dist, c in ratios[:3])
        out.fail("report", f"{len(worst)} of {len(todo)} certified points broken inside their radius (backend "
                           f"{backend}, bound {report.bound.value:.9g}, rule {report.bound.rule!r}); closest: "
                           f"{examples}")


# ---------------------------------------------------------------------------------------------- driver


def load(path: Path, out: Outcome) -> Graph | None:
    from lipcert.model.loader import load_model

    try:
        return load_model(path)
    except LipcertError as exc:
        out.refused = str(exc)
        STATS["refused"] += 1
        return None
    except Exception as exc:  # noqa: BLE001
        out.fail("internal", f"load_model raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        return None


def check_model(path: str | Path, *, effort: Effort = CI, seed: int = 0, steps: bool = True, values: bool = True,
                verify: bool | None = None, report: bool = True, backend: str = "onnxruntime",
                data: np.ndarray | None = None) -> Outcome:
    """Run every oracle on the model at ``path``; failures are collected in the outcome, never raised. ``data``:
    extra points in [0, 1] for the report's dataset (labelled by the model, like the random ones)."""
    from lipcert.bounds.propagate import propagate

    path = Path(path)
    out = Outcome()
    STATS["models"] += 1
    torch.manual_seed(seed)
    graph = load(path, out)
    if graph is None:
        return out
    try:
        prop = propagate(graph, lower_bounds=False)
    except LipcertError as exc:
        out.fail("internal", f"propagate raised a LipcertError on a loaded model: {exc}")
        return out
    except Exception as exc:  # noqa: BLE001
        out.fail("internal", f"propagate raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        return out
    out.upper = prop.upper
    inj = Injector(graph)
    points = network_points(graph, inj, effort.net_points, seed)
    if steps:
        check_steps(graph, prop, inj, points, effort, out, seed)
    measured = 0.0
    if values:
        measured = check_values_and_network(graph, prop, inj, points, effort, out, seed)
    if (effort.verify if verify is None else verify) and measured > 0:
        check_verify(graph, measured, out, seed)
    if report:
        check_report(graph, path, inj, effort, out, seed, backend, data)
    return out


def describe(outcome: Outcome) -> str:
    if outcome.refused:
        return f"refused: {outcome.refused}"
    return "\n".join(outcome.failures) or "ok"
