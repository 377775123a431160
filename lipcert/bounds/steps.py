"""Decompose a model graph into steps whose Lipschitz constants lipcert can bound.

A step maps one or more data-dependent values to one value: a fused chain of linear operators, a
nonlinear operator with a registry rule, a recognised pattern (``patterns``), a combination of branches
(sum, concatenation, elementwise max/min), or a node with no rule. ``verify`` bounds each step and
propagates the bounds from the input to the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipcert.bounds.kinds import Combination, Details, Linear, NoRule, Pattern, Rule
from lipcert.errors import ModelError
from lipcert.graph.core import Graph, Node
from lipcert.graph.executor import GraphModule
from lipcert.graph.linop import LinearOperator
from lipcert.graph.ops import REGISTRY, Op
from lipcert.graph.ops.base import CombinationMode, Rounding
from lipcert.graph.ops.elementwise import broadcast_norm
from lipcert.model.fold import data_dependent


@dataclass
class Part:
    """One node's share of a step, for the float error analysis (``rounding``): its linear map (None for a
    nonlinear rule), how its float evaluation errs (None: unknown), and the value it produces."""

    operator: LinearOperator | None
    rounding: Rounding | None
    output: str


def absolute_chain(parts: list[Part]) -> tuple[LinearOperator, int] | None:
    """The map |A_k| ... |A_1| of a chain of linear parts and its accumulations T (each part's terms plus 4), so
    that its float64 evaluation errs by at most gamma_T times that map's output (Higham 3.5); None when a part's
    float evaluation is unknown (no absolute map), or for no part."""
    roundings = [p.rounding for p in parts]
    maps = [r.abs_op for r in roundings if r is not None and r.abs_op is not None]
    if not maps or len(maps) < len(roundings):
        return None
    absolute = maps[0]
    for abs_op in maps[1:]:
        absolute = absolute.then(abs_op)
    return absolute, sum(r.terms + 4 for r in roundings if r is not None)


@dataclass
class Step:
    """One piece of the network: ``output = f(inputs)`` with a way to bound the Lipschitz constant of f."""

    details: Details  # what its kind carries (``kinds``)
    label: str
    nodes: list[str]
    inputs: list[str]
    output: str
    reason: str = ""
    #: why a pattern that recognised this step's form did not prove it (also at the end of ``reason``)
    near_miss: str = ""
    #: the nodes of a linear chain or rule in order, for the float error analysis
    parts: list[Part] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The kind's printed name: "linear", "rule", "pattern", "sum", "concat", "max" or ``NO_RULE``."""
        return self.details.kind

    @property
    def linear(self) -> LinearOperator:
        """The operator of a linear step (a chain or a region)."""
        if not isinstance(self.details, Linear):
            raise TypeError(f"step {self.label!r} ({self.kind}) has no linear operator")
        return self.details.operator


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
        #: why a pattern that recognised a node's form did not prove it, by the node (added to its step's reason)
        self.near_misses: dict[str, str] = {}

    def only_user(self, value: str, node: Node) -> bool:
        """True when ``node`` is the only reader of ``value`` and it is not a graph output."""
        users = self.users.get(value, [])
        return len(users) == 1 and users[0] is node and value not in self.graph.outputs

    def shape(self, value: str) -> tuple[int, ...] | None:
        return self.graph.value_shapes.get(value)

    def known_shape(self, value: str) -> tuple[int, ...]:
        """The per-sample shape of a value the caller has checked is known."""
        shape = self.shape(value)
        if shape is None:
            raise ModelError(f"the shape of {value!r} is unknown")
        return tuple(shape)

    def const_inputs(self, node: Node) -> list[torch.Tensor | None]:
        return [None if (not n or n in self.data) else self.consts.get(n) for n in node.inputs]

    def data_inputs(self, node: Node) -> list[int]:
        return [i for i, n in enumerate(node.inputs) if n and n in self.data]


def repetitions(in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None) -> int | None:
    """How many times broadcasting repeats each entry of ``in_shape`` in ``out_shape``; None if it does not
    broadcast to it. (Numpy broadcasting copies every entry the same number of times: out / in.)"""
    if in_shape is None or out_shape is None:
        return None
    try:
        if tuple(torch.broadcast_shapes(tuple(in_shape), tuple(out_shape))) != tuple(out_shape):
            return None
    except RuntimeError:
        return None
    n_in = math.prod(in_shape)
    return math.prod(out_shape) // n_in if n_in else None


def _combine_step(ctx: Context, node: Node, op: Op, data_idx: list[int], out: str) -> Step | None:
    """A sum, concatenation or elementwise max of several data inputs (``op.combination``), each weighted by its
    broadcast repetitions (and divided as ``op.linear_combination`` divides, 1/count for Mean); None when a shape
    is unknown or an input does not broadcast. A linear combination keeps the signs of its data inputs."""
    mode = op.combination
    if mode is None:
        return None
    out_shape = ctx.shape(out)
    weights = []
    for i in data_idx:
        k = 1 if mode is CombinationMode.CONCAT else repetitions(ctx.shape(node.inputs[i]), out_shape)
        if k is None or (mode is CombinationMode.CONCAT and ctx.shape(node.inputs[i]) is None):
            return None
        weights.append(math.sqrt(k))
    count = sum(1 for name in node.inputs if name)
    summed = op.linear_combination(count)
    if summed is not None:
        weights = [w / summed.divisor for w in weights]
    consts = [c for i, c in enumerate(ctx.const_inputs(node)) if c is not None and i not in data_idx]
    # a sum's out_shape is known: each data input broadcasts to it (``repetitions``)
    offset = (math.fsum(broadcast_norm(c, out_shape) for c in consts)
              if mode is CombinationMode.SUM and out_shape is not None else 0.0)
    axis = None
    if mode is CombinationMode.CONCAT and out_shape is not None:
        axis = int(node.attr("axis", 0))
        axis = axis + len(out_shape) + 1 if axis < 0 else axis
    details = Combination(mode, weights, count, offset, node_op=True, axis=axis,
                          signs=None if summed is None else tuple(summed.signs[i] for i in data_idx),
                          divisor=1 if summed is None else summed.divisor)
    return Step(details, node.op, [node.name], [node.inputs[i] for i in data_idx], out, reason=op.combination_reason)


def node_step(ctx: Context, node: Node) -> list[Step]:
    """Steps for one unclaimed node that reads data-dependent values."""
    op = REGISTRY[node.op]
    data_idx = ctx.data_inputs(node)
    consts = ctx.const_inputs(node)
    steps: list[Step] = []
    live = [(k, o) for k, o in enumerate(node.outputs)
            if o and o in ctx.data and (o in ctx.users or o in ctx.graph.outputs)]
    if len(data_idx) == 1:
        var = data_idx[0]
        src = node.inputs[var]
        in_shape = ctx.shape(src)
        for k, out in live:
            out_shape = ctx.shape(out)
            operator, rule = None, None
            if in_shape is not None and out_shape is not None:
                operator = op.linear(node, consts, var, in_shape, out_shape, output=k)
                if operator is None and k == 0:
                    rule = op.lipschitz(node, consts, var, in_shape, out_shape)
                if operator is not None or rule is not None:
                    part = Part(operator, op.rounding(node, consts, var, in_shape, out_shape, k), out)
            if operator is not None:
                steps.append(Step(Linear(operator), node.op, [node.name], [src], out, parts=[part]))
            elif rule is not None:
                steps.append(Step(Rule(rule.constant), node.op, [node.name], [src], out, reason=rule.reason,
                                  parts=[part]))
            else:
                steps.append(Step(NoRule(), node.op, [node.name], [src], out,
                                  reason=f"no Lipschitz rule for {node.op} (output {k})"))
        return steps
    for k, out in live:
        step = _combine_step(ctx, node, op, data_idx, out) if op.combination is not None and k == 0 else None
        steps.append(step or Step(NoRule(), node.op, [node.name], [node.inputs[i] for i in data_idx], out,
                                  reason=f"no Lipschitz rule for {node.op} of {len(data_idx)} data-dependent "
                                         "inputs"))
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
        if isinstance(s.details, Linear):
            prev = tail.get(s.inputs[0])
            if prev is not None and isinstance(prev.details, Linear) and readers.get(prev.output, 0) == 1 \
                    and prev.output not in ctx.graph.outputs:
                prev.details.operator = prev.details.operator.then(s.details.operator)
                prev.nodes += s.nodes
                prev.parts += s.parts
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


def claim_error(ctx: Context, step: Step) -> str | None:
    """Why a pattern's step may not claim its nodes, or None when it may.

    A pattern's function must be a function of its declared inputs alone, and it must account for every
    value its nodes produce: (1) no node is claimed twice; (2) a declared input is not produced inside the
    pattern; (3) every data-dependent value a claimed node reads is a declared input, produced by a claimed
    node, or produced from those by a node the pattern only re-reads (``Pattern.reads``); (4) every output
    of a claimed node that anything reads outside the pattern is the step's output; (5) the step's output
    is produced by a claimed node."""
    nodes = set(step.nodes)
    if nodes & ctx.claimed:
        return f"nodes {sorted(nodes & ctx.claimed)} are claimed by another pattern"
    produced = {o for n in ctx.graph.nodes if n.name in nodes for o in n.outputs if o}
    if set(step.inputs) & produced:
        return "a declared input is produced inside the pattern"
    if step.output not in produced:
        return "the output is not produced by the pattern"
    available = set(step.inputs)
    borrowed = set(step.details.reads if isinstance(step.details, Pattern) else ())
    for node in ctx.graph.nodes:
        if node.name not in nodes and node.name not in borrowed:
            continue
        missing = [v for v in node.inputs if v and v in ctx.data and v not in available]
        if missing:
            return f"node {node.name!r} reads {missing[0]!r}, which is not computed from the declared inputs"
        available.update(o for o in node.outputs if o)
        if node.name in borrowed:
            continue
        for o in node.outputs:
            if not o or o == step.output:
                continue
            outside = [u.name for u in ctx.users.get(o, []) if u.name not in nodes]
            if outside or o in ctx.graph.outputs:
                return f"value {o!r} of node {node.name!r} is also read outside the pattern"
    return None


