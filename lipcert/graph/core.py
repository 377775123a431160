"""The one model graph that every loader produces and every analysis reads.

Nodes are ONNX operators (op type, named inputs and outputs, python-valued attributes); constant tensors
live in ``Graph.params`` as torch tensors. The graph has one input whose batch dimension is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lipcert.errors import ModelError


@dataclass
class Node:
    """One operator application: ``outputs = op(inputs; attrs)``. Empty input names are absent optionals."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass
class Graph:
    """A model: topologically ordered nodes, constant parameters, one input and its per-sample shape."""

    nodes: list[Node]
    params: dict[str, torch.Tensor]
    input_name: str
    input_shape: tuple[int, ...]
    outputs: list[str]
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    #: per-sample shape of every value that carries the batch on axis 0 (filled by ``fold``)
    value_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: a batch size the model is fixed to (None when the batch dimension is free)
    fixed_batch: int | None = None
    #: the ONNX model the graph came from (functions inlined), or one built from it, for onnxruntime
    onnx_model: Any = None
    #: facts about how the model was loaded that outputs must state (e.g. that user code ran)
    notes: list[str] = field(default_factory=list)
    #: the onnxruntime comparison made after loading (``lipcert.model.crosscheck.CrossCheck``), if any
    crosscheck: Any = None

    @property
    def output(self) -> str:
        return self.outputs[0]

    @property
    def num_parameters(self) -> int:
        return sum(int(t.numel()) for t in self.params.values() if t.is_floating_point())

    def producers(self) -> dict[str, Node]:
        """Map each value name to the node that produces it."""
        return {out: node for node in self.nodes for out in node.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        """Map each value name to the nodes that read it."""
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def claimed_lipschitz(self) -> float | None:
        """The Lipschitz bound the model declares in its metadata, if any."""
        text = self.metadata.get("lipcert.claimed_lipschitz")
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ModelError(f"metadata lipcert.claimed_lipschitz={text!r} is not a number",
                             source=self.source) from None
        if not math.isfinite(value) or value <= 0:
            raise ModelError(f"metadata lipcert.claimed_lipschitz={text!r} must be a positive number",
                             source=self.source)
        return value


def toposort(nodes: list[Node], available: set[str], source: str) -> list[Node]:
    """Order nodes so each runs after its inputs; a cycle or a missing input is a ModelError."""
    produced = {out: i for i, n in enumerate(nodes) for out in n.outputs if out}
    for node in nodes:
        for name in node.inputs:
            if name and name not in available and name not in produced:
                raise ModelError(f"node {node.name!r} ({node.op}) reads {name!r}, which nothing produces",
                                 source=source)
    order: list[Node] = []
    state = [0] * len(nodes)  # 0 new, 1 on stack, 2 done
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            i, k = stack.pop()
            deps = [produced[n] for n in nodes[i].inputs if n and n not in available]
            if k < len(deps):
                stack.append((i, k + 1))
                j = deps[k]
                if state[j] == 1:
                    raise ModelError(f"the graph has a cycle through node {nodes[j].name!r}", source=source)
                if state[j] == 0:
                    state[j] = 1
                    stack.append((j, 0))
            else:
                state[i] = 2
                order.append(nodes[i])
    return order


def prune(graph: Graph) -> Graph:
    """Drop nodes and parameters that do not contribute to the graph's outputs."""
    needed = set(graph.outputs)
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs):
            kept.append(node)
            needed.update(n for n in node.inputs if n)
    kept.reverse()
    graph.nodes = kept
    graph.params = {k: v for k, v in graph.params.items() if k in needed}
    return graph
