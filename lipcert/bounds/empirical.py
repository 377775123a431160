"""Empirical network-level LOWER bounds on the Lipschitz constant, each backed by a real pair of inputs.

Two searches: power iteration on J^T J through autograd at sample points (the local Jacobian norm), and
gradient ascent on ||f(x) - f(x')|| / ||x - x'|| over pairs. Every reported value is the ratio measured on
an actual pair of inputs in float64, so it is a true lower bound of the Lipschitz constant, never a guess.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lipcert.graph.executor import GraphModule
from lipcert.progress import StepCallback

#: the step of the secant that turns a Jacobian direction into a measured pair
SECANT_STEP = 1e-4


@dataclass
class LowerBound:
    """The largest measured ratio ||f(x) - f(x')|| / ||x - x'|| and how it was found."""

    value: float
    method: str
    points: int
    steps: int = 0  # search steps taken
    stopped: bool = False  # the time budget ran out before every step was taken
    pair: tuple[torch.Tensor, torch.Tensor] | None = None  # the two inputs (one sample each) of ``value``


class Deadline:
    """A time budget shared by the searches (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() >= self.end


def _rows(values: torch.Tensor) -> torch.Tensor:
    """One row per sample, whatever the value's rank (a one-logit model may give shape (N,))."""
    return values.reshape(values.shape[0], -1)


def _ratio(module: GraphModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        num = _rows(module(x) - module(y)).norm(dim=1)
        den = _rows(x - y).norm(dim=1)
    return num / den.clamp_min(1e-300)


def jacobian_lower_bound(module: GraphModule, x: torch.Tensor, iters: int = 30, seed: int = 0,
                         deadline: Deadline | None = None, progress: StepCallback | None = None) -> LowerBound:
    """Power iteration on the Jacobian at each point, then the secant ratio along the found direction."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    v = v / v.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
    done = 0
    for done in range(1, iters + 1):
        _, jv = torch.autograd.functional.jvp(module, x, v)
        _, jtjv = torch.autograd.functional.vjp(module, x, jv)
        norm = _rows(jtjv).norm(dim=1).clamp_min(1e-300)
        v = jtjv / norm.reshape(-1, *([1] * (x.dim() - 1)))
        if progress:
            progress("empirical search: Jacobian power iteration", done, iters, "iterations")
        if deadline is not None and deadline.passed():
            break
    moved = x + SECANT_STEP * v
    ratios = _ratio(module, moved, x)
    best = int(ratios.argmax())
    return LowerBound(float(ratios[best]), "Jacobian power iteration + secant", int(x.shape[0]), done, done < iters,
                      (moved[best:best + 1], x[best:best + 1]))


def pair_ascent_lower_bound(module: GraphModule, x: torch.Tensor, steps: int = 60, seed: int = 0,
                            radius: float = 0.05, deadline: Deadline | None = None,
                            progress: StepCallback | None = None) -> LowerBound:
    """Gradient ascent on the ratio over pairs (x, x') started near the given points; the best pair seen."""
    gen = torch.Generator().manual_seed(seed)
    a = x.clone().requires_grad_(True)
    b = (x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=radius / 10)
    best, pair = _best_pair(module, a.detach(), b.detach())
    taken = 0
    for taken in range(1, steps + 1):
        opt.zero_grad()
        num = _rows(module(a) - module(b)).norm(dim=1)
        den = _rows(a - b).norm(dim=1).clamp_min(1e-12)
        (-(num / den).sum()).backward()
        opt.step()
        if progress:
            progress("empirical search: pair gradient ascent", taken, steps, "steps")
        if taken % 10 == 0 or taken == steps or (deadline is not None and deadline.passed()):
            value, found = _best_pair(module, a.detach(), b.detach())
            if value > best:
                best, pair = value, found
        if deadline is not None and deadline.passed():
            break
    return LowerBound(best, "pair gradient ascent", int(x.shape[0]), taken, taken < steps, pair)


def _best_pair(module: GraphModule, a: torch.Tensor,
               b: torch.Tensor) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """The largest ratio over the pairs (a[i], b[i]), and that pair (copies, one sample each)."""
    ratios = _ratio(module, a, b)
    i = int(ratios.argmax())
    return float(ratios[i]), (a[i:i + 1].clone(), b[i:i + 1].clone())


def network_lower_bound(module: GraphModule, x: torch.Tensor, seed: int = 0, budget: float | None = None,
                        progress: StepCallback | None = None) -> LowerBound:
    """The better of the two searches, run in float64 on the module's device within ``budget`` seconds
    (the second search gets what the first leaves); each keeps the best ratio it measured."""
    deadline = Deadline(budget)
    jac = jacobian_lower_bound(module, x, seed=seed, deadline=deadline, progress=progress)
    if deadline.passed():
        return jac
    pair = pair_ascent_lower_bound(module, x, seed=seed, deadline=deadline, progress=progress)
    best = jac if jac.value >= pair.value else pair
    return LowerBound(best.value, best.method, best.points, jac.steps + pair.steps, jac.stopped or pair.stopped,
                      best.pair)
