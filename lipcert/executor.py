"""Run a model graph in torch on any device, in float32 or float64, with autograd."""

from __future__ import annotations

import torch

from .graph import Graph
from .ops import REGISTRY, RunContext


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

    def constants(self) -> dict[str, torch.Tensor]:
        """All parameters by their graph names, float ones in the module's current dtype and device."""
        values = dict(self._fixed)
        for i, name in enumerate(self._float_names):
            values[name] = getattr(self, f"p{i}")
        return values

    def run_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value of the graph for input ``x`` (the input, the parameters and each node output)."""
        ctx = RunContext(x.dtype)
        env = self.constants()
        env[self.graph.input_name] = x
        for node in self.graph.nodes:
            args = []
            for name in node.inputs:
                value = env[name] if name else None
                if value is not None and value.is_floating_point() and value.device != x.device:
                    value = value.to(x.device)
                args.append(value)
            outs = REGISTRY[node.op].run(node, args, ctx)
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fixed = self.graph.fixed_batch
        if fixed is not None and x.shape[0] != fixed:
            if x.shape[0] % fixed:
                raise ValueError(f"this model runs in batches of exactly {fixed}")
            return torch.cat([self.forward(chunk) for chunk in torch.split(x, fixed)])
        return self.run_all(x)[self.graph.output]
