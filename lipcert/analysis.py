"""Decompose a model graph into steps whose Lipschitz constants lipcert can bound.

A step maps one or more data-dependent values to one value: a fused chain of linear operators, a
nonlinear operator with a registry rule, a recognised pattern (``patterns``), a combination of branches
(sum, concatenation, elementwise max/min), or a node with no rule. ``verify`` bounds each step and
propagates the bounds from the input to the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .executor import GraphModule
from .fold import data_dependent
from .graph import Graph, Node
from .linop import LinearOperator
from .ops import REGISTRY

COMBINE = {"Add": "sum", "Sub": "sum", "Sum": "sum", "Concat": "concat", "Max": "max", "Min": "max"}


@dataclass
class Step:
    """One piece of the network: ``output = f(inputs)`` with a way to bound the Lipschitz constant of f."""

    kind: str  # "linear" | "rule" | "pattern" | "sum" | "concat" | "max" | "none"
    label: str
    nodes: list[str]
    inputs: list[str]
    output: str
    operator: LinearOperator | None = None
    constant: float | None = None
    reason: str = ""
    details: dict = field(default_factory=dict)


class Context:
    """What analyses need: the graph, data-dependent values, constant values at batch 1, value users."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.data = data_dependent(graph)
        with torch.no_grad():
            env = GraphModule(graph).run_all(torch.zeros((1,) + graph.input_shape))
        self.consts = {k: v for k, v in env.items() if k not in self.data}
        self.producer = graph.producers()
        self.users = graph.consumers()
        self.claimed: set[str] = set()

    def only_user(self, value: str, node: Node) -> bool:
        """True when ``node`` is the only reader of ``value`` and it is not a graph output."""
        users = self.users.get(value, [])
        return len(users) == 1 and users[0] is node and value not in self.graph.outputs

    def shape(self, value: str) -> tuple[int, ...] | None:
        return self.graph.value_shapes.get(value)

    def const_inputs(self, node: Node) -> list[torch.Tensor | None]:
        return [None if (not n or n in self.data) else self.consts.get(n) for n in node.inputs]

    def data_inputs(self, node: Node) -> list[int]:
        return [i for i, n in enumerate(node.inputs) if n and n in self.data]


def node_step(ctx: Context, node: Node) -> list[Step]:
    """Steps for one unclaimed node that reads data-dependent values."""
    op = REGISTRY[node.op]
    data_idx = ctx.data_inputs(node)
    consts = ctx.const_inputs(node)
    steps: list[Step] = []
    live = [(k, o) for k, o in enumerate(node.outputs) if o and o in ctx.data and (o in ctx.users or o in ctx.graph.outputs)]
    if len(data_idx) == 1:
        var = data_idx[0]
        src = node.inputs[var]
        in_shape = ctx.shape(src)
        for k, out in live:
            out_shape = ctx.shape(out)
            operator = None
            if in_shape is not None and out_shape is not None:
                operator = op.linear(node, consts, var, in_shape, out_shape, output=k)
            if operator is not None:
                steps.append(Step("linear", node.op, [node.name], [src], out, operator=operator))
                continue
            rule = op.lipschitz(node, consts, var, in_shape) if (in_shape is not None and k == 0) else None
            if rule is not None:
                steps.append(Step("rule", node.op, [node.name], [src], out, constant=rule.constant,
                                  reason=rule.reason))
            else:
                steps.append(Step("none", node.op, [node.name], [src], out,
                                  reason=f"no Lipschitz rule for {node.op} (output {k})"))
        return steps
    kind = COMBINE.get(node.op)
    for k, out in live:
        if kind is None or k:
            steps.append(Step("none", node.op, [node.name], [node.inputs[i] for i in data_idx], out,
                              reason=f"no Lipschitz rule for {node.op} of {len(data_idx)} data-dependent inputs"))
        else:
            reasons = {"sum": "L(f + g) <= L(f) + L(g)", "concat": "L([f; g]) <= sqrt(L(f)^2 + L(g)^2)",
                       "max": "|max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|): sqrt(L(a)^2 + L(b)^2)"}
            steps.append(Step(kind, node.op, [node.name], [node.inputs[i] for i in data_idx], out,
                              reason=reasons[kind]))
    return steps


def fuse_chains(ctx: Context, steps: list[Step]) -> list[Step]:
    """Merge chains of linear steps (each intermediate value read by the next step only) into one step."""
    readers: dict[str, int] = {}
    for s in steps:
        for i in s.inputs:
            readers[i] = readers.get(i, 0) + 1
    out: list[Step] = []
    tail: dict[str, Step] = {}
    for s in steps:
        if s.kind == "linear":
            prev = tail.get(s.inputs[0])
            if prev is not None and readers.get(prev.output, 0) == 1 and prev.output not in ctx.graph.outputs:
                prev.operator = prev.operator.then(s.operator)
                prev.nodes += s.nodes
                prev.label = f"{prev.label}+{s.label}"
                del tail[prev.output]
                prev.output = s.output
                tail[s.output] = prev
                continue
            out.append(s)
            tail[s.output] = s
        else:
            out.append(s)
    return out


def decompose(graph: Graph) -> list[Step]:
    """The graph as a topologically ordered list of steps (patterns first, then node by node)."""
    from .patterns import PATTERNS

    ctx = Context(graph)
    steps: list[Step] = []
    for node in reversed(graph.nodes):
        if node.name in ctx.claimed or not ctx.data_inputs(node):
            continue
        for pattern in PATTERNS:
            step = pattern(ctx, node)
            if step is not None:
                ctx.claimed.update(step.nodes)
                steps.append(step)
                break
    for node in graph.nodes:
        if node.name not in ctx.claimed and ctx.data_inputs(node):
            steps.extend(node_step(ctx, node))
    position = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs}
    steps.sort(key=lambda s: position[s.output])
    return fuse_chains(ctx, steps)
