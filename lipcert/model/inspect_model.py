"""A structured summary of a loaded model: its nodes, their shapes and parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lipcert.graph.core import Graph


@dataclass
class NodeSummary:
    name: str
    op: str
    inputs: list[str]
    input_shapes: list[list[int] | None]
    output_shapes: list[list[int] | None]
    parameters: int


@dataclass
class ModelSummary:
    """What ``lipcert inspect`` shows: per-node rows, totals and the input."""

    source: str
    input_name: str
    input_shape: list[int]
    fixed_batch: int | None
    outputs: list[str]
    nodes: list[NodeSummary]
    parameters: int
    op_counts: dict[str, int]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    crosscheck: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_model(graph: Graph) -> ModelSummary:
    """Summarise a graph; shapes are per sample (the batch dimension left out)."""

    def shape(name: str) -> list[int] | None:
        if name in graph.value_shapes:
            return list(graph.value_shapes[name])
        if name in graph.params:
            return list(graph.params[name].shape)
        return None

    rows: list[NodeSummary] = []
    counts: dict[str, int] = {}
    for node in graph.nodes:
        params = sum(int(graph.params[i].numel()) for i in node.inputs
                     if i in graph.params and graph.params[i].is_floating_point())
        rows.append(NodeSummary(node.name, node.op, [i for i in node.inputs if i],
                                [shape(i) for i in node.inputs if i], [shape(o) for o in node.outputs if o],
                                params))
        counts[node.op] = counts.get(node.op, 0) + 1
    return ModelSummary(
        source=graph.source, input_name=graph.input_name, input_shape=list(graph.input_shape),
        fixed_batch=graph.fixed_batch, outputs=list(graph.outputs), nodes=rows,
        parameters=graph.num_parameters, op_counts=counts, metadata=dict(graph.metadata),
        notes=list(graph.notes), crosscheck=graph.crosscheck.to_dict() if graph.crosscheck else None)
