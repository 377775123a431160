"""``lipcert verify``: is the exported model really L-Lipschitz (L2 to L2), and if not, where does it break?

Each step of the network (see ``decompose``) gets a sound upper bound on its exact operator (``spectral``)
and, for linear steps, a power-iteration lower estimate; the upper bounds propagate over the graph into
the network bound. An empirical network lower bound (``empirical``) can prove a claim false on its own.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lipcert.bounds.empirical import network_lower_bound
from lipcert.bounds.propagate import check_network, propagate
from lipcert.bounds.results import DEFAULT_TOL, NO_RULE, SCHEMA, VIOLATED, VerifyResult, status_of
from lipcert.bounds.witness import find_witness
from lipcert.device import resolve_device
from lipcert.errors import ConfigError
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule
from lipcert.progress import StepCallback
from lipcert.version import __version__


def default_budget(device: str) -> float:
    """Seconds the empirical network search may take by default: it stops early on small models."""
    return 20.0 if str(device).startswith("cuda") else 60.0


def verify(graph: Graph, bound: float | None = None, *, tol: float = DEFAULT_TOL, device: str = "auto",
           seed: int = 0, points: torch.Tensor | None = None, empirical: bool = True,
           empirical_budget: float | None = -1.0, progress: StepCallback | None = None,
           witness: str | Path | None = None) -> VerifyResult:
    """Check the model's Lipschitz claim: ``bound`` if given, else its metadata claim, else 1.

    The empirical network search stops after ``empirical_budget`` seconds keeping the best pair found (the
    default, -1, means ``default_budget(device)``; None means no limit). ``progress(phase, done, total)`` is
    called as layer bounds and search steps complete. ``device`` ``auto`` is the GPU when there is one. With
    ``witness`` (a .npz path), a violated claim's pair of inputs is measured in onnxruntime and written there
    when onnxruntime confirms it (``result.witness`` says what was found).

    Example::

        graph = lipcert.load_model("sample_models/digits_broken.onnx")
        result = lipcert.verify(graph)
        print(result.status, [layer.name for layer in result.breaking_layers])
    """
    start = time.perf_counter()
    device = resolve_device(device)
    if bound is not None:
        claim, source = float(bound), "bound"
    elif (claimed := graph.claimed_lipschitz()) is not None:
        claim, source = claimed, "model metadata"
    else:
        claim, source = 1.0, "default"
    if not math.isfinite(claim) or claim <= 0:
        raise ConfigError(f"bound must be a positive number, got {claim}", parameter="bound")
    if tol < 0:
        raise ConfigError(f"tol must be non-negative, got {tol}", parameter="tol")
    if empirical_budget is not None and empirical_budget == -1.0:
        empirical_budget = default_budget(device)
    if empirical_budget is not None and not (math.isfinite(empirical_budget) and empirical_budget > 0):
        raise ConfigError(f"empirical_budget must be a positive number of seconds, got {empirical_budget}",
                          parameter="empirical_budget")
    prop = propagate(graph, claim, tol, device, seed, progress=progress)
    layers, upper = prop.layers, prop.upper
    module = GraphModule(graph).to(device=device, dtype=torch.float64)
    lower, lower_method, steps, stopped, pair = 0.0, "not run", 0, False, None
    if empirical:
        if points is None:
            gen = torch.Generator().manual_seed(seed)
            points = torch.rand((16,) + graph.input_shape, generator=gen)
        found = network_lower_bound(module, points.to(device=device, dtype=torch.float64), seed=seed,
                                    budget=empirical_budget, progress=progress)
        lower, steps, stopped, pair = found.value, found.steps, found.stopped, found.pair
        lower_method = f"{found.method} ({found.points} points" + (
            f", stopped by the {empirical_budget:g} s budget)" if stopped else ")")
        check_network(lower, upper, lower_method)
    status = status_of(lower, upper, claim, tol)
    notes = list(graph.notes)
    evidence = None
    if witness is not None:
        evidence, note = _witness(graph, pair if status == VIOLATED else None, claim, tol, witness)
        notes += [note] if note else []
    top = sorted(((f, n) for f, n in prop.factors if f > 1.0 + tol), key=lambda t: -t[0])[:5]
    return VerifyResult(
        schema=SCHEMA, lipcert_version=__version__, model=graph.source, claimed=claim, claim_source=source,
        tol=tol, device=str(device), seed=seed, layers=layers, network_upper=upper, network_lower=lower,
        network_lower_method=lower_method, empirical_budget=empirical_budget if empirical else None,
        network_lower_steps=steps, network_lower_stopped=stopped, status=status,
        top_contributors=[{"layer": n, "factor": f} for f, n in top],
        no_rule=[row.name for row in layers if row.status == NO_RULE], combinations=prop.combinations,
        notes=notes, seconds=time.perf_counter() - start, witness=evidence, near_misses=prop.near_misses)


def _witness(graph: Graph, pair: tuple[torch.Tensor, torch.Tensor] | None, claim: float, tol: float,
             path: str | Path) -> tuple[dict | None, str]:
    """The witness of a violated claim written to ``path`` when onnxruntime confirms it; its summary and a note
    when nothing is written."""
    if pair is None:
        return None, f"no witness written to {path}: the claim is not violated"
    found = find_witness(graph, pair, claim, tol)
    if not found.confirmed:
        return found.summary(None), (f"no witness written to {path}: onnxruntime measures a ratio of "
                                     f"{found.ratio:.6g} on the float32 pair, not above the claim {claim:g}")
    found.save(path)
    return found.summary(str(path)), ""
