"""The resource budget of one node, before it runs: its size rule (``Op.size`` of a registered operator,
``FoldOnly.size`` of one that only constant folding runs) checked against ``lipcert.limits``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lipcert.errors import ModelError
from lipcert.graph.ops import REGISTRY
from lipcert.graph.ops.fold_only import FOLD_ONLY
from lipcert.graph.ops.sizes import Bounds, SizeRule
from lipcert.limits import TOTAL_FACTOR, UNBOUNDED, WORK_FACTOR


def size_rule(op: str) -> SizeRule | None:
    """The size rule of an operator, registered or fold-only; None for one lipcert does not know."""
    entry = REGISTRY.get(op)
    if entry is not None:
        return entry.size
    fold_only = FOLD_ONLY.get(op)
    return None if fold_only is None else fold_only.size


def node_bounds(op: str, attrs: dict[str, Any], inputs: Sequence[Any], name: str = "?") -> Bounds | None:
    """(elements, multiply-adds): upper bounds of the largest value or buffer a node allocates and of its
    arithmetic, from its inputs before it runs; None for an op without a size rule (the caller then relies on
    other means)."""
    rule = size_rule(op)
    return None if rule is None else rule.bound(attrs, inputs, name)


def check_node(node: Any, inputs: Sequence[Any], limit: int, source: str | None = None,
               live: int = 0) -> int:
    """Refuse to run ``node`` (with ``.name``, ``.op``, ``.attrs``) when it could allocate more than ``limit``
    elements, bring the values held at once (``live`` before it) above ``TOTAL_FACTOR * limit``, or need more
    than ``WORK_FACTOR * limit`` multiply-adds. Returns the predicted output size (0 when unknown)."""
    try:
        bounds = node_bounds(node.op, node.attrs, inputs, node.name)
    except (TypeError, ValueError, OverflowError, IndexError, RuntimeError, AttributeError):
        bounds = None  # malformed attributes: the op itself reports them when it runs
    if bounds is None:
        return 0
    size, work = bounds
    where = f"node {node.name!r} ({node.op})"
    if size > limit:
        text = "more than 10**60" if size >= UNBOUNDED else f"{size:,}"
        raise ModelError(f"{where} would allocate {text} elements, more than the limit of {limit:,} "
                         "(max_elements; raise it)", source=source, parameter="max_elements")
    if live + size > TOTAL_FACTOR * limit:
        raise ModelError(f"{where} would bring the values held while folding the graph to {live + size:,} "
                         f"elements, more than {TOTAL_FACTOR} x the limit of {limit:,} (max_elements)", source=source,
                         parameter="max_elements")
    if work > WORK_FACTOR * limit:
        raise ModelError(f"{where} would need {work:,} multiply-adds, more than {WORK_FACTOR} x the limit of "
                         f"{limit:,} (max_elements)", source=source, parameter="max_elements")
    return size
