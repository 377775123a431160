"""Load-time simplification: fold constants and the shape plumbing that exporters emit, find value shapes.

A value is *data-dependent* when it depends on the input's values; ``Shape`` cuts that dependency (it
reads only the input's size). Data-independent values are folded to constants when they come out the same
for two batch sizes (they then depend only on the per-sample input size, which is fixed at load time).
The same two runs give the per-sample shape of every data-dependent value.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from lipcert.errors import ModelError
from lipcert.graph.core import Graph, prune
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY

PROBE_BATCHES = (1, 2)


def data_dependent(graph: Graph) -> set[str]:
    """Names of values that depend on the input's values (not only on its size, ``Op.shape_only``)."""
    tainted = {graph.input_name}
    for node in graph.nodes:
        entry = REGISTRY.get(node.op)
        if entry is not None and entry.shape_only:
            continue
        if any(name in tainted for name in node.inputs if name):
            tainted.update(o for o in node.outputs if o)
    return tainted


@overload
def _probe(graph: Graph, batch: int, may_fail: Literal[False]) -> dict[str, torch.Tensor]: ...
@overload
def _probe(graph: Graph, batch: int, may_fail: Literal[True]) -> dict[str, torch.Tensor] | None: ...
def _probe(graph: Graph, batch: int, may_fail: bool) -> dict[str, torch.Tensor] | None:
    """Every value at batch size ``batch``. A failure other than a ``ModelError`` is refused naming the input
    shape, or gives None where the run ``may_fail`` (the second batch size)."""
    x = torch.zeros((batch,) + graph.input_shape, dtype=torch.float32)
    try:
        with torch.no_grad():
            return GraphModule(graph).run_all(x)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a probe failure is a property of the model, reported below
        if not may_fail:
            raise ModelError(f"the model cannot run on input shape (N, {', '.join(map(str, graph.input_shape))}): "
                             f"{type(exc).__name__}: {exc}", source=graph.source) from None
        return None


def fold(graph: Graph) -> Graph:
    """Fold constant and size-only subgraphs into parameters, then record per-sample value shapes."""
    tainted = data_dependent(graph)
    one = _probe(graph, PROBE_BATCHES[0], may_fail=False)
    two = _probe(graph, PROBE_BATCHES[1], may_fail=True)
    out_name = graph.output
    if two is None or two[out_name].shape[:1] != (2,):
        declared = one[out_name].shape[0] if one[out_name].dim() else 1
        graph.fixed_batch = int(declared) if declared else 1
        two = None
    constants: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        for name in node.outputs:
            if not name or name in tainted:
                continue
            value = one[name]
            if two is not None and (value.shape != two[name].shape or not torch.equal(value, two[name])):
                continue
            constants[name] = value.detach().clone()
    graph.nodes = [n for n in graph.nodes if not all((o in constants or not o) for o in n.outputs)]
    graph.params.update(constants)
    graph = prune(graph)
    graph.value_shapes = {}
    for name in tainted:
        if name not in one:
            continue
        s1 = tuple(one[name].shape)
        if two is None:
            if s1[:1] == (graph.fixed_batch or 1,):
                graph.value_shapes[name] = s1[1:]
            continue
        s2 = tuple(two[name].shape)
        if len(s1) == len(s2) and s1 and s1[0] == 1 and s2[0] == 2 and s1[1:] == s2[1:]:
            graph.value_shapes[name] = s1[1:]
    return graph


#: relative difference allowed between a sample's output alone and in a batch (float64 runs: rounding only)
PER_SAMPLE_RTOL = 1e-6


def check_per_sample(graph: Graph, samples: int = 3, seed: int = 0) -> None:
    """Refuse a model whose output is not a float tensor, or whose output for one sample depends on the other
    samples of its batch (a slice or sort along the batch axis, a constant computed from the batch size):
    lipcert's bounds and certificates are about one sample's function. Each sample of a random batch, inside and
    outside [0, 1], is run alone (in float64) and compared with its row of the batch."""
    batch = graph.fixed_batch or samples
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch,) + tuple(graph.input_shape), generator=gen, dtype=torch.float64) * 2 - 0.5
    module = GraphModule(graph).to(torch.float64)
    try:
        with torch.no_grad():
            together = module(x)
            if not together.is_floating_point():
                raise ModelError(f"the output {graph.output!r} has type {str(together.dtype).replace('torch.', '')}; "
                                 "lipcert certifies models whose output is a float tensor (logits)",
                                 source=graph.source)
            if batch < 2:
                return
            alone = [module(x[i:i + 1]) for i in range(batch)]
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that runs at batch 1 and 2 but not here is refused
        raise ModelError(f"the model cannot run on a batch of {batch}: {type(exc).__name__}: {exc}",
                         source=graph.source) from None
    together = together.double()
    finite = together[torch.isfinite(together)]
    scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
    for i, single in enumerate(alone):
        if single.shape[1:] != together.shape[1:]:
            gap = math.inf
        else:
            a, b = single[0].double(), together[i].double()
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities and NaNs agree
            gap = float(torch.where(same, torch.zeros_like(a), a - b).abs().max()) if a.numel() else 0.0
        if not gap <= PER_SAMPLE_RTOL * scale:
            raise ModelError(f"the output of sample {i} of a batch of {batch} differs from its output alone (by "
                             f"{gap:.3g}): the model mixes samples or depends on the batch size, and lipcert "
                             "certifies models that map each sample on its own", source=graph.source)
