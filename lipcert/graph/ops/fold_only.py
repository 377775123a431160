"""Operators lipcert never runs nor bounds itself, which onnx's reference evaluator may run while lipcert folds
constants (``lipcert.model.onnx_loader``): each is described once here, by its name and its size rule, so that
the loader can refuse an oversized constant before computing it. A registered operator (``base.REGISTRY``)
states its size rule on its own class instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from lipcert.graph.ops.sizes import BROADCAST, GATHER_ND, MATMUL, SHRINKING, SizeRule


@dataclass(frozen=True)
class FoldOnly:
    """A standard operator that only constant folding runs: its ONNX name and its size rule (``sizes``)."""

    name: str
    size: SizeRule


#: the fold-only operators, by ONNX name
FOLD_ONLY: dict[str, FoldOnly] = {op.name: op for op in (
    FoldOnly("Acos", SHRINKING), FoldOnly("Acosh", SHRINKING), FoldOnly("ArgMin", SHRINKING),
    FoldOnly("Asin", SHRINKING), FoldOnly("Asinh", SHRINKING),
    FoldOnly("Atanh", SHRINKING), FoldOnly("BitShift", BROADCAST), FoldOnly("BitwiseAnd", BROADCAST),
    FoldOnly("BitwiseNot", SHRINKING), FoldOnly("BitwiseOr", BROADCAST), FoldOnly("BitwiseXor", BROADCAST),
    FoldOnly("CastLike", SHRINKING), FoldOnly("Ceil", SHRINKING), FoldOnly("Celu", SHRINKING),
    FoldOnly("Compress", SHRINKING), FoldOnly("Cos", SHRINKING), FoldOnly("Cosh", SHRINKING),
    FoldOnly("CumSum", SHRINKING), FoldOnly("Det", SHRINKING), FoldOnly("Erf", SHRINKING),
    FoldOnly("EyeLike", SHRINKING),
    FoldOnly("GatherND", GATHER_ND), FoldOnly("Gelu", SHRINKING),
    FoldOnly("GroupNormalization", SHRINKING), FoldOnly("HardSigmoid", SHRINKING),
    FoldOnly("HardSwish", SHRINKING), FoldOnly("Hardmax", SHRINKING), FoldOnly("InstanceNormalization", BROADCAST),
    FoldOnly("IsInf", SHRINKING), FoldOnly("LayerNormalization", SHRINKING),
    FoldOnly("LpNormalization", SHRINKING), FoldOnly("MatMulInteger", MATMUL),
    FoldOnly("MeanVarianceNormalization", SHRINKING), FoldOnly("Mish", SHRINKING), FoldOnly("Mod", BROADCAST),
    FoldOnly("NonMaxSuppression", SHRINKING), FoldOnly("ReduceL1", SHRINKING), FoldOnly("ReduceLogSum", SHRINKING),
    FoldOnly("ReduceLogSumExp", SHRINKING), FoldOnly("ReduceProd", SHRINKING),
    FoldOnly("ReduceSumSquare", SHRINKING), FoldOnly("ReverseSequence", SHRINKING), FoldOnly("Round", SHRINKING),
    FoldOnly("Scatter", SHRINKING), FoldOnly("ScatterElements", SHRINKING), FoldOnly("ScatterND", SHRINKING),
    FoldOnly("Selu", SHRINKING), FoldOnly("Shrink", SHRINKING), FoldOnly("Sin", SHRINKING),
    FoldOnly("Sinh", SHRINKING), FoldOnly("Softsign", SHRINKING), FoldOnly("Tan", SHRINKING),
    FoldOnly("ThresholdedRelu", SHRINKING), FoldOnly("Trilu", SHRINKING), FoldOnly("Unique", SHRINKING),
    FoldOnly("Xor", BROADCAST),
)}
