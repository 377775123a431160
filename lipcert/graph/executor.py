"""Run a model graph in torch on any device, in float32 or float64, with autograd."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from lipcert.graph.core import Graph
from lipcert.graph.ops import REGISTRY, RunContext


class GraphModule(torch.nn.Module):
    """A torch module that executes a ``Graph``; ``.to(device, dtype)`` moves its float parameters."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self._float_names: list[str] = []
        self._fixed: dict[str, torch.Tensor] = {}
        for name, tensor in graph.params.items():
            if tensor.is_floating_point():
                self.register_buffer(f"p{len(self._float_names)}", tensor.clone())
                self._float_names.append(name)
            else:
                self._fixed[name] = tensor
        last_use = {name: i for i, node in enumerate(graph.nodes) for name in node.inputs if name}
        self._release: list[list[str]] = [[] for _ in graph.nodes]  # values no later node reads, per node
        for name, i in last_use.items():
            if name not in graph.params and name != graph.output:
                self._release[i].append(name)

    def constants(self) -> dict[str, torch.Tensor]:
        """All parameters by their graph names, float ones in the module's current dtype and device."""
        values = dict(self._fixed)
        for i, name in enumerate(self._float_names):
            values[name] = getattr(self, f"p{i}")
        return values

    def run_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value of the graph for input ``x`` (the input, the parameters and each node output)."""
        return self._run(x, keep=True)

    def _run(self, x: torch.Tensor, keep: bool,
             observe: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """Run the nodes in order; unless ``keep``, drop each value after its last reader, so that memory
        is reused as in an ordinary module instead of holding every activation of the batch at once.
        ``observe(name, value)`` sees the input and every node output as it is computed."""
        ctx = RunContext(x.dtype)
        env = self.constants()
        env[self.graph.input_name] = x
        if observe is not None:
            observe(self.graph.input_name, x)
        for i, node in enumerate(self.graph.nodes):
            args = []
            for name in node.inputs:
                value = env[name] if name else None
                if value is not None and value.is_floating_point() and value.device != x.device:
                    value = value.to(x.device)
                args.append(value)
            outs = REGISTRY[node.op].run(node, args, ctx)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = value
                    if observe is not None:
                        observe(name, value)
            if not keep:
                for name in self._release[i]:
                    env.pop(name, None)
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_fixed_batches(lambda chunk: self._run(chunk, keep=False)[self.graph.output], x,
                                self.graph.fixed_batch)

    def forward_norms(self, x: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output, and the per-sample float64 L2 norm of each value in ``names`` (on the CPU), taken as
        the values are computed."""
        found: dict[str, list[torch.Tensor]] = {}

        def observe(name: str, value: torch.Tensor) -> None:
            if name in names and value.is_floating_point() and value.dim() >= 1:
                flat = value.detach().reshape(value.shape[0], -1).double()
                found.setdefault(name, []).append(torch.linalg.vector_norm(flat, dim=1).cpu())

        out = in_fixed_batches(lambda chunk: self._run(chunk, keep=False, observe=observe)[self.graph.output], x,
                               self.graph.fixed_batch)
        return out, {name: torch.cat(parts)[: x.shape[0]] for name, parts in found.items()}


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Run float32 matrix products and convolutions in float32, not TF32 (torch's GPU default for
    convolutions): the float error allowance of certificates assumes float32 arithmetic."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def in_fixed_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     fixed: int | None) -> torch.Tensor:
    """Run ``fn`` on chunks of exactly ``fixed`` samples (the last one padded with zeros, its padding dropped),
    for models exported with a fixed batch size."""
    if fixed is None or x.shape[0] == fixed:
        return fn(x)
    outs = []
    for chunk in torch.split(x, fixed):
        n = chunk.shape[0]
        if n < fixed:
            chunk = torch.cat([chunk, chunk.new_zeros((fixed - n,) + tuple(chunk.shape[1:]))])
        outs.append(fn(chunk)[:n])
    return torch.cat(outs)
