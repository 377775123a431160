"""The whole decomposition of a graph into bounded steps: patterns first, one step per node, linear regions and fused
chains."""

from __future__ import annotations

from lipcert.bounds.steps import Context, Step, claim_error, fuse_chains, node_step
from lipcert.graph.core import Graph


def decompose(graph: Graph) -> list[Step]:
    """The graph as a topologically ordered list of steps (patterns first, then node by node).

    A pattern is accepted only when ``claim_error`` finds nothing wrong with what it claims."""
    from lipcert.bounds.patterns import PATTERNS

    ctx = Context(graph)
    steps: list[Step] = []
    for node in reversed(graph.nodes):
        if node.name in ctx.claimed or not ctx.data_inputs(node):
            continue
        for pattern in PATTERNS:
            step = pattern(ctx, node)
            if step is not None and claim_error(ctx, step) is None:
                ctx.claimed.update(step.nodes)
                steps.append(step)
                break
    for node in graph.nodes:
        if node.name not in ctx.claimed and ctx.data_inputs(node):
            for step in node_step(ctx, node):
                if node.name in ctx.near_misses:  # the pattern that recognised it says why it did not prove it
                    step.near_miss = ctx.near_misses[node.name]
                    step.reason = f"{step.reason}; {step.near_miss}" if step.reason else step.near_miss
                steps.append(step)
    position = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs}
    steps.sort(key=lambda s: position[s.output])
    from lipcert.bounds.regions import merge_regions

    return merge_regions(ctx, fuse_chains(ctx, steps))

