"""The operator registry (see ``base``); importing this package registers every supported operator."""

from lipcert.graph.ops import elementwise, linear_layers, pooling, tensor  # noqa: F401  (registration side effect)
from lipcert.graph.ops.base import REGISTRY, LipschitzRule, Op, RunContext

__all__ = ["REGISTRY", "LipschitzRule", "Op", "RunContext"]
