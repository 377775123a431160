"""Empirical network-level LOWER bounds on the Lipschitz constant, each backed by a real pair of inputs.

Two searches: power iteration on J^T J through autograd at sample points (the local Jacobian norm), and
gradient ascent on ||f(x) - f(x')|| / ||x - x'|| over pairs. Every reported value is the ratio measured on
an actual pair of inputs in float64, so it is a true lower bound of the Lipschitz constant, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .executor import GraphModule

#: the step of the secant that turns a Jacobian direction into a measured pair
SECANT_STEP = 1e-4


@dataclass
class LowerBound:
    """The largest measured ratio ||f(x) - f(x')|| / ||x - x'|| and how it was found."""

    value: float
    method: str
    points: int


def _ratio(module: GraphModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        num = (module(x) - module(y)).flatten(1).norm(dim=1)
        den = (x - y).flatten(1).norm(dim=1)
    return num / den.clamp_min(1e-300)


def jacobian_lower_bound(module: GraphModule, x: torch.Tensor, iters: int = 30, seed: int = 0) -> LowerBound:
    """Power iteration on the Jacobian at each point, then the secant ratio along the found direction."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / v.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
    for _ in range(iters):
        _, jv = torch.autograd.functional.jvp(module, x, v)
        _, jtjv = torch.autograd.functional.vjp(module, x, jv)
        norm = jtjv.flatten(1).norm(dim=1).clamp_min(1e-300)
        v = jtjv / norm.reshape(-1, *([1] * (x.dim() - 1)))
    ratios = _ratio(module, x + SECANT_STEP * v, x)
    return LowerBound(float(ratios.max()), "Jacobian power iteration + secant", int(x.shape[0]))


def pair_ascent_lower_bound(module: GraphModule, x: torch.Tensor, steps: int = 60, seed: int = 0,
                            radius: float = 0.05) -> LowerBound:
    """Gradient ascent on the ratio over pairs (x, x') started near the given points."""
    gen = torch.Generator().manual_seed(seed)
    a = x.clone().requires_grad_(True)
    b = (x + radius * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=radius / 10)
    for _ in range(steps):
        opt.zero_grad()
        num = (module(a) - module(b)).flatten(1).norm(dim=1)
        den = (a - b).flatten(1).norm(dim=1).clamp_min(1e-12)
        (-(num / den).sum()).backward()
        opt.step()
    ratios = _ratio(module, a.detach(), b.detach())
    return LowerBound(float(ratios.max()), "pair gradient ascent", int(x.shape[0]))


def network_lower_bound(module: GraphModule, x: torch.Tensor, seed: int = 0) -> LowerBound:
    """The better of the two searches, run in float64 on the module's device."""
    jac = jacobian_lower_bound(module, x, seed=seed)
    pair = pair_ascent_lower_bound(module, x, seed=seed)
    return jac if jac.value >= pair.value else pair
