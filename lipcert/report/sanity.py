"""Warnings about a run that cannot certify anything as asked: a model whose output squashes its logits, and radii
beyond the largest distance between two inputs. Each is a note of the report (and of the progress, at once)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lipcert.graph.core import Graph

#: operators that squash logits into probabilities (or shift them by a sample-dependent amount), which a model's
#: output should not come from: lipcert certifies the margins between the outputs
SQUASHING = ("Softmax", "LogSoftmax", "Sigmoid")
#: operators that only move values around, looked through to find where the output comes from
SHAPE_ONLY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def output_note(graph: Graph, bound: float) -> str | None:
    """A warning when the model's output comes from a squashing operator, suggesting to certify the logits."""
    producers = graph.producers()
    node = producers.get(graph.output)
    while node is not None and node.op in SHAPE_ONLY and node.inputs:
        node = producers.get(node.inputs[0])
    if node is None or node.op not in SQUASHING:
        return None
    effect = ("lipcert has no Lipschitz rule for it, so the bound is inf and nothing is certified"
              if not math.isfinite(bound) else "the radii certified from its outputs are far smaller than the "
                                                 "logits' would give")
    if node.op == "Sigmoid" and math.prod(graph.value_shapes.get(graph.output, (2,))) == 1:
        effect += ", and a one-output model's class is the sign of its output, which Sigmoid makes always positive"
    return (f"OUTPUT SQUASHED: the model's output comes from {node.op} (node {node.name!r}): {effect}; certify "
            f"the logits instead: export the model without its final {node.op}")


def diameter(norm: str, sample_shape: Sequence[int]) -> float:
    """The largest distance between two inputs in [0, 1]^d (the pixel space every dataset is read into, before
    any normalisation): sqrt(d) in L2, 1 in L-infinity."""
    return 1.0 if norm == "linf" else math.sqrt(math.prod(sample_shape))


def radius_note(radii: Sequence[tuple[str, float]], norm: str, sample_shape: Sequence[int]) -> str | None:
    """A warning when a requested radius is beyond the inputs' diameter (``36`` for ``36/255``): no sample can be
    certified there, whatever the model."""
    largest = diameter(norm, sample_shape)
    beyond = [(label, value) for label, value in radii if value > largest]
    if not beyond:
        return None
    labels = ", ".join(label for label, _ in beyond)
    hint = "; radii are in pixel values scaled to [0, 1]: did you mean " + ", ".join(
        f"{label}/255" for label, _ in beyond) + "?" if all(value > 1 for _, value in beyond) else ""
    name = "L-infinity" if norm == "linf" else "L2"
    return (f"RADIUS BEYOND THE DATA: eps {labels} is larger than the largest {name} distance between two inputs in "
            f"[0, 1]^{math.prod(sample_shape)} ({largest:.4g}), so nothing can be certified there{hint}")
