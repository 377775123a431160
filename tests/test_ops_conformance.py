"""Operator-by-operator conformance of lipcert's torch executor against onnxruntime (the reference).

Every operator in ``lipcert.graph.ops.REGISTRY`` is exercised by small ONNX models built with ``onnx.helper``:
one data input ``x`` with a symbolic batch dimension, constant operands as initializers, the attribute
variants real exporters produce, at several opsets. The executor must match onnxruntime (CPU, graph
optimisations off) within 1e-5 relative (to the largest reference entry) in float32, and the float64
executor must agree too. Features lipcert deliberately leaves out must fail to load with a ModelError
that names the node.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert.errors import ModelError
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY
from lipcert.model.onnx_loader import graph_from_onnx

from .conftest import ir_version, newest_opset

RTOL = 1e-5
I64_MAX = int(np.iinfo(np.int64).max)
I64_MIN = int(np.iinfo(np.int64).min)


NEWEST = newest_opset()
STANDARD = tuple(sorted({11, 13, 17, NEWEST}))


def since(first: int, last: int | None = None) -> tuple[int, ...]:
    """The standard opsets in [first, last], plus ``first`` itself (the opset that introduced a feature)."""
    last = NEWEST if last is None else last
    chosen = {o for o in STANDARD if first <= o <= last}
    if first <= last:
        chosen.add(first)
    return tuple(sorted(chosen))


# ---------------------------------------------------------------------------------------------- cases

_rng = np.random.default_rng(1234)


def w(*shape: int, scale: float = 1.0) -> np.ndarray:
    """A random float32 constant (weights, biases, operands)."""
    return (scale * _rng.standard_normal(shape)).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    """A random positive float32 constant."""
    return _rng.uniform(0.5, 2.0, shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def n(op: str, inputs, outputs="y", **attrs) -> onnx.NodeProto:
    """One ONNX node; ``outputs`` is a name or a list of names."""
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    return helper.make_node(op, list(inputs), outputs, **attrs)


@dataclass
class Case:
    """One conformance model: nodes, initializers, the per-sample input shape and the opsets to build."""

    name: str
    nodes: list
    shape: tuple[int, ...]
    inits: dict = field(default_factory=dict)
    opsets: tuple[int, ...] = STANDARD
    data: str = "normal"  # normal | positive | int | small-int | cast (see make_input)
    outputs: tuple[str, ...] = ("y",)

    @property
    def ops(self) -> set[str]:
        return {node.op_type for node in self.nodes}


def build(case: Case, opset: int) -> onnx.ModelProto:
    """The case as a checked ONNX model at ``opset`` with output types from shape inference."""
    nodes = []
    for i, node in enumerate(case.nodes):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.op_type.lower()}_{i}"
        nodes.append(copy)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *case.shape])
    outs = [onnx.ValueInfoProto(name=name) for name in case.outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in case.inits.items()]
    graph = helper.make_graph(nodes, case.name, [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version(opset), producer_name="lipcert-tests")
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    for out in checked.graph.output:  # the checker wants a shape where inference could not find the rank
        if not out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(checked, full_check=True)
    return model


def make_input(case: Case, batch: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(case.name.encode()) + batch)
    shape = (batch, *case.shape)
    if case.data == "positive":
        return rng.uniform(0.25, 2.0, shape).astype(np.float32)
    if case.data == "int":
        return rng.integers(-3, 4, shape).astype(np.float32)
    if case.data == "small-int":
        return rng.integers(0, 6, shape).astype(np.float32)
    if case.data == "cast":
        return rng.uniform(-4.0, 4.0, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


CASES: list[Case] = []


def case(*args, **kwargs) -> Case:
    c = Case(*args, **kwargs)
    assert c.name not in {o.name for o in CASES}, c.name
    CASES.append(c)
    return c


# Conv ------------------------------------------------------------------------------------------------
for name, attrs, wshape, bias in [
    ("2d-pads1-bias", dict(pads=[1, 1, 1, 1]), (6, 4, 3, 3), True),
    ("2d-nobias", {}, (6, 4, 3, 3), False),
    ("2d-kernel-shape-attr", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (6, 4, 3, 3), True),
    ("2d-stride2", dict(strides=[2, 2], pads=[1, 1, 1, 1]), (6, 4, 3, 3), True),
    ("2d-stride2-even-kernel", dict(strides=[2, 2]), (6, 4, 4, 4), True),
    ("2d-rect-kernel-strides", dict(strides=[1, 2], pads=[0, 1, 1, 0]), (5, 4, 2, 3), True),
    ("2d-dilation2", dict(dilations=[2, 2], pads=[2, 2, 2, 2]), (6, 4, 3, 3), True),
    ("2d-dilation2-stride2", dict(dilations=[2, 2], strides=[2, 2]), (6, 4, 3, 3), False),
    ("2d-group2", dict(group=2, pads=[1, 1, 1, 1]), (6, 2, 3, 3), True),
    ("2d-depthwise", dict(group=4, pads=[1, 1, 1, 1]), (4, 1, 3, 3), True),
    ("2d-depthwise-multiplier2", dict(group=4, strides=[2, 2]), (8, 1, 3, 3), False),
    ("2d-asym-pads", dict(pads=[0, 1, 2, 1]), (6, 4, 3, 3), True),
    ("2d-same-upper-stride2", dict(auto_pad="SAME_UPPER", strides=[2, 2]), (6, 4, 3, 3), True),
    ("2d-same-upper-k4", dict(auto_pad="SAME_UPPER"), (6, 4, 4, 4), True),
    ("2d-same-lower-stride2", dict(auto_pad="SAME_LOWER", strides=[2, 2]), (6, 4, 3, 3), True),
    ("2d-same-lower-k4", dict(auto_pad="SAME_LOWER"), (6, 4, 4, 4), False),
    ("2d-valid", dict(auto_pad="VALID", strides=[2, 2]), (6, 4, 3, 3), True),
]:
    inits = {"W": w(*wshape, scale=0.3)}
    if bias:
        inits["B"] = w(wshape[0])
    case(f"Conv-{name}", [n("Conv", ["x", "W", "B"] if bias else ["x", "W"], **attrs)], (4, 9, 9), inits)

for name, attrs, wshape, bias in [
    ("1d-pads", dict(pads=[1, 1]), (5, 4, 3), True),
    ("1d-stride2-asym-pads", dict(strides=[2], pads=[1, 2]), (5, 4, 3), True),
    ("1d-dilation2-group2", dict(dilations=[2], group=2), (6, 2, 3), False),
    ("1d-depthwise", dict(group=4, pads=[2, 2]), (4, 1, 5), True),
    ("1d-same-upper-stride2", dict(auto_pad="SAME_UPPER", strides=[2]), (5, 4, 4), True),
    ("1d-same-lower", dict(auto_pad="SAME_LOWER"), (5, 4, 4), False),
    ("1d-valid", dict(auto_pad="VALID"), (5, 4, 3), True),
]:
    inits = {"W": w(*wshape, scale=0.3)}
    if bias:
        inits["B"] = w(wshape[0])
    case(f"Conv-{name}", [n("Conv", ["x", "W", "B"] if bias else ["x", "W"], **attrs)], (4, 11), inits)

case("Conv-3d-stride2", [n("Conv", ["x", "W", "B"], strides=[2, 2, 2], pads=[1, 1, 1, 1, 1, 1])], (2, 5, 5, 5),
     {"W": w(3, 2, 3, 3, 3, scale=0.3), "B": w(3)}, opsets=(13,))

# ConvTranspose ---------------------------------------------------------------------------------------
for name, attrs, wshape, bias in [
    ("2d-basic", {}, (4, 3, 3, 3), True),
    ("2d-nobias", dict(pads=[1, 1, 1, 1]), (4, 3, 3, 3), False),
    ("2d-stride2", dict(strides=[2, 2]), (4, 3, 3, 3), True),
    ("2d-stride2-pads", dict(strides=[2, 2], pads=[1, 1, 1, 1]), (4, 3, 3, 3), True),
    ("2d-stride2-output-padding", dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), (4, 3, 3, 3),
     True),
    ("2d-stride2-k4-pads1", dict(strides=[2, 2], pads=[1, 1, 1, 1]), (4, 3, 4, 4), True),
    ("2d-asym-pads", dict(pads=[0, 1, 1, 2]), (4, 3, 3, 3), True),
    ("2d-asym-pads-stride2", dict(strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0]), (4, 3, 3, 3),
     False),
    ("2d-group2", dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1]), (4, 2, 3, 3), True),
    ("2d-depthwise", dict(group=4, strides=[2, 2]), (4, 1, 2, 2), True),
    ("2d-dilation2", dict(dilations=[2, 2], pads=[1, 1, 1, 1]), (4, 3, 3, 3), True),
    ("2d-output-shape-odd-total", dict(strides=[2, 2], output_shape=[10, 10]), (4, 3, 3, 3), True),
    ("2d-output-shape-even-total", dict(strides=[2, 2], output_shape=[9, 9]), (4, 3, 3, 3), True),
    ("2d-output-shape-rect", dict(strides=[2, 1], output_shape=[10, 6]), (4, 3, 3, 3), True),
    ("2d-same-upper-stride2", dict(auto_pad="SAME_UPPER", strides=[2, 2]), (4, 3, 3, 3), True),
    ("2d-same-lower-stride2", dict(auto_pad="SAME_LOWER", strides=[2, 2]), (4, 3, 3, 3), True),
    ("2d-valid", dict(auto_pad="VALID", strides=[2, 2]), (4, 3, 3, 3), True),
]:
    inits = {"W": w(*wshape, scale=0.3)}
    if bias:
        inits["B"] = w(wshape[1] * attrs.get("group", 1))
    case(f"ConvTranspose-{name}", [n("ConvTranspose", ["x", "W", "B"] if bias else ["x", "W"], **attrs)],
         (4, 5, 5), inits)

for name, attrs, wshape in [
    ("1d-stride2-pads", dict(strides=[2], pads=[1, 1], output_padding=[1]), (4, 3, 4)),
    ("1d-group2-asym", dict(group=2, pads=[0, 2]), (4, 2, 3)),
    ("1d-output-shape", dict(strides=[3], output_shape=[16]), (4, 3, 3)),
]:
    case(f"ConvTranspose-{name}", [n("ConvTranspose", ["x", "W", "B"], **attrs)], (4, 6),
         {"W": w(*wshape, scale=0.3), "B": w(wshape[1] * attrs.get("group", 1))})

# Gemm and MatMul -------------------------------------------------------------------------------------
case("Gemm-plain-bias", [n("Gemm", ["x", "W", "C"])], (12,), {"W": w(12, 5), "C": w(5)})
case("Gemm-transB", [n("Gemm", ["x", "W", "C"], transB=1)], (12,), {"W": w(5, 12), "C": w(5)})
case("Gemm-alpha-beta", [n("Gemm", ["x", "W", "C"], transB=1, alpha=0.5, beta=2.0)], (12,),
     {"W": w(5, 12), "C": w(1, 5)})
case("Gemm-scalar-C", [n("Gemm", ["x", "W", "C"], beta=-1.5)], (12,), {"W": w(12, 5), "C": f32([0.75])})
case("Gemm-no-C", [n("Gemm", ["x", "W"], transB=1, alpha=2.0)], (12,), {"W": w(5, 12)})
case("Gemm-transA", [n("Transpose", ["x"], "xt", perm=[1, 0]), n("Gemm", ["xt", "W", "C"], transA=1)], (12,),
     {"W": w(12, 5), "C": w(5)})
case("Gemm-transA-transB", [n("Transpose", ["x"], "xt", perm=[1, 0]),
                            n("Gemm", ["xt", "W", "C"], transA=1, transB=1, alpha=0.25, beta=0.5)], (12,),
     {"W": w(5, 12), "C": w(5)})
case("MatMul-2d", [n("MatMul", ["x", "W"])], (12,), {"W": w(12, 5)})
case("MatMul-3d-input", [n("MatMul", ["x", "W"])], (4, 12), {"W": w(12, 5)})
case("MatMul-4d-broadcast-3d", [n("MatMul", ["x", "W"])], (3, 4, 6), {"W": w(3, 6, 5)})
case("MatMul-vector-right", [n("MatMul", ["x", "W"])], (4, 12), {"W": w(12)})
case("MatMul-const-left", [n("MatMul", ["W", "x"])], (4, 3), {"W": w(6, 4)})
case("MatMul-data-data", [n("Transpose", ["x"], "xt", perm=[0, 2, 1]), n("MatMul", ["x", "xt"])], (4, 3))

# Elementwise binary ----------------------------------------------------------------------------------
for op in ("Add", "Sub", "Mul", "Div"):
    data = "positive" if op == "Div" else "normal"
    operand = pos if op == "Div" else w
    case(f"{op}-const-right-channel", [n(op, ["x", "c"])], (3, 4, 4), {"c": operand(3, 1, 1)}, data=data)
    case(f"{op}-const-left-channel", [n(op, ["c", "x"])], (3, 4, 4), {"c": operand(3, 1, 1)}, data=data)
    case(f"{op}-const-scalar", [n(op, ["x", "c"])], (3, 4, 4), {"c": operand()}, data=data)
    case(f"{op}-const-left-last-axis", [n(op, ["c", "x"])], (3, 4, 4), {"c": operand(4)}, data=data)
    case(f"{op}-const-full-rank", [n(op, ["x", "c"])], (3, 4), {"c": operand(1, 3, 4)}, data=data)
    case(f"{op}-data-data", [n("Relu", ["x"], "r"), n(op, ["x", "r" if op != "Div" else "x"])], (3, 4),
         data=data)

# Elementwise unary -----------------------------------------------------------------------------------
for op, data, attrs in [
    ("Neg", "normal", {}), ("Abs", "normal", {}), ("Sign", "int", {}), ("Relu", "normal", {}),
    ("LeakyRelu", "normal", {}), ("LeakyRelu", "normal", dict(alpha=0.2)), ("Sigmoid", "normal", {}),
    ("Tanh", "normal", {}), ("Softplus", "normal", {}), ("Exp", "normal", {}), ("Sqrt", "positive", {}),
    ("Log", "positive", {}), ("Reciprocal", "positive", {}), ("Elu", "normal", {}),
    ("Elu", "normal", dict(alpha=0.5)), ("Identity", "normal", {}), ("Atan", "normal", {}), ("Floor", "cast", {}),
]:
    suffix = "-" + "-".join(f"{k}{v}" for k, v in attrs.items()) if attrs else ""
    case(f"{op}{suffix}", [n(op, ["x"], **attrs)], (3, 5), data=data)
case("Sign-normal", [n("Sign", ["x"])], (3, 5))
case("PRelu-channel", [n("PRelu", ["x", "s"])], (3, 4, 4), {"s": w(3, 1, 1)})
case("PRelu-scalar", [n("PRelu", ["x", "s"])], (3, 5), {"s": f32([0.25])})
case("PRelu-full", [n("PRelu", ["x", "s"])], (3, 5), {"s": w(3, 5)})

case("Pow-exponent-2", [n("Pow", ["x", "e"])], (3, 5), {"e": f32(2.0)})
case("Pow-exponent-0.5", [n("Pow", ["x", "e"])], (3, 5), {"e": f32(0.5)}, data="positive")
case("Pow-exponent-tensor", [n("Pow", ["x", "e"])], (3, 5), {"e": f32([[1.0], [2.0], [3.0]])})
case("Pow-int64-exponent", [n("Pow", ["x", "e"])], (3, 5), {"e": i64(2)}, opsets=since(13))
case("Pow-exponent-from-Constant", [n("Constant", [], "e", value=numpy_helper.from_array(f32(3.0))),
                                    n("Pow", ["x", "e"])], (3, 5))

case("Clip-min-max", [n("Clip", ["x", "lo", "hi"])], (3, 5), {"lo": f32(-0.5), "hi": f32(0.75)})
case("Clip-min-only", [n("Clip", ["x", "lo"])], (3, 5), {"lo": f32(-0.25)})
case("Clip-max-only", [n("Clip", ["x", "", "hi"])], (3, 5), {"hi": f32(0.5)})
case("Clip-relu6", [n("Clip", ["x", "lo", "hi"])], (3, 5), {"lo": f32(0.0), "hi": f32(6.0)}, data="cast")
case("Clip-no-bounds", [n("Clip", ["x"])], (3, 5))

for op in ("Max", "Min", "Sum", "Mean"):
    case(f"{op}-2-inputs", [n(op, ["x", "c"])], (3, 4), {"c": w(3, 1)})
    case(f"{op}-3-inputs", [n(op, ["x", "c", "d"])], (3, 4), {"c": w(4), "d": w(3, 1)})
    case(f"{op}-data-data", [n("Neg", ["x"], "m"), n(op, ["x", "m"])], (3, 4))
case("Sum-1-input", [n("Sum", ["x"])], (3, 4))

# Softmax ---------------------------------------------------------------------------------------------
for op in ("Softmax", "LogSoftmax"):
    case(f"{op}-2d-default", [n(op, ["x"])], (10,))
    case(f"{op}-2d-axis1", [n(op, ["x"], axis=1)], (10,))
    case(f"{op}-2d-axis-1", [n(op, ["x"], axis=-1)], (10,))
    case(f"{op}-4d-axis-1", [n(op, ["x"], axis=-1)], (3, 2, 4))
    case(f"{op}-4d-axis1-opset13", [n(op, ["x"], axis=1)], (3, 2, 4), opsets=since(13))
    case(f"{op}-4d-default-opset13", [n(op, ["x"])], (3, 2, 4), opsets=since(13))
    case(f"{op}-4d-axis1-opset11", [n(op, ["x"], axis=1)], (3, 2, 4), opsets=(11,))
    case(f"{op}-4d-default-opset11", [n(op, ["x"])], (3, 2, 4), opsets=(11,))
    case(f"{op}-4d-axis2-opset11", [n(op, ["x"], axis=2)], (3, 2, 4), opsets=(11,))

# Reductions ------------------------------------------------------------------------------------------
for op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceL2", "ReduceSum"):
    attr_opsets = since(11, 11) if op == "ReduceSum" else since(11, 17)
    input_opsets = since(13) if op == "ReduceSum" else since(18)
    for axes, keep in [([2, 3], 1), ([2, 3], 0), ([-1], 1), ([1], 0), ([1, -2], 0)]:
        label = f"axes{'_'.join(map(str, axes))}-keep{keep}"
        case(f"{op}-attr-{label}", [n(op, ["x"], axes=axes, keepdims=keep)], (3, 4, 5), opsets=attr_opsets)
        case(f"{op}-input-{label}", [n(op, ["x", "axes"], keepdims=keep)], (3, 4, 5), {"axes": i64(*axes)},
             opsets=input_opsets)
    case(f"{op}-attr-default-keepdims", [n(op, ["x"], axes=[1])], (3, 4, 5), opsets=attr_opsets)
    case(f"{op}-input-noop-empty-axes", [n(op, ["x"], noop_with_empty_axes=1)], (3, 4, 5), opsets=input_opsets)

# Selection and sorting -------------------------------------------------------------------------------
case("TopK-full-axis-last", [n("TopK", ["x", "k"], ["y", "i"])], (10,), {"k": i64(10)}, outputs=("y", "i"))
case("TopK-full-axis1", [n("TopK", ["x", "k"], ["y", "i"], axis=1)], (6, 4), {"k": i64(6)}, outputs=("y", "i"))
case("TopK-full-axis-1-3d", [n("TopK", ["x", "k"], ["y", "i"], axis=-1, largest=1)], (3, 5), {"k": i64(5)},
     outputs=("y", "i"))
case("TopK-k3-smallest", [n("TopK", ["x", "k"], ["y", "i"], largest=0)], (10,), {"k": i64(3)},
     outputs=("y", "i"))
case("TopK-k2-values-only", [n("TopK", ["x", "k"], ["y", "unused"], axis=1)], (6, 4), {"k": i64(2)})
case("ArgMax-axis1-keepdims", [n("ArgMax", ["x"], axis=1)], (10,))
case("ArgMax-axis1-no-keepdims", [n("ArgMax", ["x"], axis=1, keepdims=0)], (10,))
case("ArgMax-axis-1-3d", [n("ArgMax", ["x"], axis=-1, keepdims=0)], (3, 5))
case("ArgMax-ties-first", [n("ArgMax", ["x"], axis=1)], (10,), data="int")
case("ArgMax-ties-select-last", [n("ArgMax", ["x"], axis=1, select_last_index=1)], (10,), data="int",
     opsets=since(12))
case("TopK-ties-full-axis", [n("TopK", ["x", "k"], ["y", "i"])], (10,), {"k": i64(10)}, outputs=("y", "i"),
     data="int")
case("TopK-ties-smallest-k4", [n("TopK", ["x", "k"], ["y", "i"], largest=0)], (10,), {"k": i64(4)},
     outputs=("y", "i"), data="int")

# Rearrangements --------------------------------------------------------------------------------------
case("Concat-axis1", [n("Relu", ["x"], "r"), n("Concat", ["x", "r"], axis=1)], (3, 4))
case("Concat-axis-1-3-inputs", [n("Relu", ["x"], "r"), n("Neg", ["x"], "m"), n("Concat", ["x", "r", "m"], axis=-1)],
     (3, 4))
case("Concat-one-input", [n("Concat", ["x"], axis=1)], (3, 4))

case("Split-attr-uneven", [n("Split", ["x"], ["y", "z"], axis=1, split=[2, 4])], (6, 4), opsets=(11,),
     outputs=("y", "z"))
case("Split-equal-no-split", [n("Split", ["x"], ["y", "z", "u"], axis=1)], (6, 4), outputs=("y", "z", "u"),
     opsets=since(11, 17))
case("Split-input-uneven", [n("Split", ["x", "s"], ["y", "z", "u"], axis=1)], (6, 4), {"s": i64(1, 2, 3)},
     opsets=since(13), outputs=("y", "z", "u"))
case("Split-input-axis-1", [n("Split", ["x", "s"], ["y", "z"], axis=-1)], (6, 4), {"s": i64(3, 1)},
     opsets=since(13), outputs=("y", "z"))
case("Split-num-outputs-even", [n("Split", ["x"], ["y", "z"], axis=1, num_outputs=2)], (6, 4),
     opsets=since(18), outputs=("y", "z"))
case("Split-num-outputs-uneven", [n("Split", ["x"], ["y", "z", "u"], axis=1, num_outputs=3)], (7, 2),
     opsets=since(18), outputs=("y", "z", "u"))
case("Split-num-outputs-uneven-axis-1", [n("Split", ["x"], ["y", "z"], axis=-1, num_outputs=2)], (2, 5),
     opsets=since(18), outputs=("y", "z"))

for name, starts, ends, axes, steps in [
    ("axis1", [1], [5], [1], None),
    ("negative-starts-ends", [-3], [-1], [2], None),
    ("negative-axis", [1], [-1], [-1], None),
    ("step2", [0], [8], [2], [2]),
    ("step2-offset", [1], [I64_MAX], [1], [2]),
    ("step-1-reverse", [-1], [I64_MIN], [2], [-1]),
    ("step-1-partial", [5], [1], [1], [-1]),
    ("step-2", [7], [0], [2], [-2]),
    ("step-1-negative-start-end", [-2], [-6], [2], [-1]),
    ("step-1-start-int64-max", [I64_MAX], [I64_MIN], [1], [-1]),
    ("step-1-start-beyond", [100], [2], [2], [-1]),
    ("axes-omitted", [0, 1, 2], [I64_MAX, 5, 7], None, None),
    ("two-axes-steps", [0, 6], [6, 0], [1, 2], [3, -3]),
    ("clamped-ends", [2], [100], [1], None),
    ("empty-out-of-range", [-100], [3], [2], None),
]:
    ins = ["x", "starts", "ends"] + (["axes"] if axes is not None or steps is not None else [])
    inits = {"starts": i64(*starts), "ends": i64(*ends)}
    if axes is not None:
        inits["axes"] = i64(*axes)
    if steps is not None:
        inits["steps"] = i64(*steps)
        ins.append("steps")
    case(f"Slice-{name}", [n("Slice", ins)], (6, 8), inits)

for name, shape in [("0-minus1", [0, -1]), ("0-explicit", [0, 3, 16]), ("minus1-batch", [-1, 48]),
                    ("0-0-minus1", [0, 0, -1]), ("split-dims", [0, 12, 2, 2])]:
    case(f"Reshape-{name}", [n("Reshape", ["x", "s"])], (3, 4, 4), {"s": i64(*shape)})
case("Flatten-axis1", [n("Flatten", ["x"], axis=1)], (3, 4, 4))
case("Flatten-default-axis", [n("Flatten", ["x"])], (3, 4, 4))
case("Flatten-axis2-then-Reshape", [n("Flatten", ["x"], "f", axis=2), n("Reshape", ["f", "s"])], (3, 4, 4),
     {"s": i64(-1, 48)})
case("Flatten-axis-1-then-Reshape", [n("Flatten", ["x"], "f", axis=-1), n("Reshape", ["f", "s"])], (3, 4, 4),
     {"s": i64(-1, 3, 16)})
case("Transpose-nhwc", [n("Transpose", ["x"], perm=[0, 2, 3, 1])], (3, 4, 5))
case("Transpose-nchw", [n("Transpose", ["x"], perm=[0, 3, 1, 2])], (3, 4, 5))
case("Transpose-swap-last", [n("Transpose", ["x"], perm=[0, 1, 3, 2])], (3, 4, 5))
case("DepthToSpace-DCR", [n("DepthToSpace", ["x"], blocksize=2)], (8, 3, 5))
case("DepthToSpace-CRD", [n("DepthToSpace", ["x"], blocksize=2, mode="CRD")], (8, 3, 5))
case("SpaceToDepth", [n("SpaceToDepth", ["x"], blocksize=2)], (3, 4, 6))

for name, axes in [("axis1", [1]), ("axis-1", [-1]), ("two-axes", [1, 3])]:
    case(f"Squeeze-attr-{name}", [n("Squeeze", ["x"], axes=axes)], (1, 4, 1), opsets=(11,))
    case(f"Squeeze-input-{name}", [n("Squeeze", ["x", "a"])], (1, 4, 1), {"a": i64(*axes)}, opsets=since(13))
for name, axes in [("axis1", [1]), ("axis-1", [-1]), ("two-axes", [1, 3]), ("unsorted-negative", [-1, 1])]:
    case(f"Unsqueeze-attr-{name}", [n("Unsqueeze", ["x"], axes=axes)], (4, 3), opsets=(11,))
    case(f"Unsqueeze-input-{name}", [n("Unsqueeze", ["x", "a"])], (4, 3), {"a": i64(*axes)}, opsets=since(13))
case("Squeeze-no-axes-after-reduce", [n("ReduceMean", ["x"], "m", axes=[2, 3]), n("Squeeze", ["m"])], (4, 3, 3),
     opsets=(11,))

case("Identity-chain", [n("Identity", ["x"], "a"), n("Identity", ["a"])], (3, 4))
case("Dropout-opset11-ratio-attr", [n("Dropout", ["x"], ratio=0.3)], (3, 4), opsets=(11,))
# opset <= 11 leaves the inference-time mask unspecified (onnxruntime returns all false, later opsets all true)
case("Dropout-opset11-mask-unused", [n("Dropout", ["x"], ["y", "mask"])], (3, 4), opsets=(11,))
case("Dropout-ratio-input", [n("Dropout", ["x", "r"])], (3, 4), {"r": f32(0.3)}, opsets=since(13))
case("Dropout-training-false-mask", [n("Dropout", ["x", "r", "t"], ["y", "mask"])], (3, 4),
     {"r": f32(0.5), "t": np.array(False)}, opsets=since(13), outputs=("y", "mask"))

# Pad -------------------------------------------------------------------------------------------------
for name, pads, mode, value in [
    ("constant-zero", [0, 0, 1, 2, 0, 0, 2, 1], "constant", None),
    ("constant-value", [0, 0, 1, 2, 0, 0, 2, 1], "constant", 0.5),
    ("constant-channels", [0, 1, 0, 0, 0, 2, 0, 0], "constant", -1.0),
    ("constant-negative-crop", [0, 0, -1, 1, 0, 0, 1, -2], "constant", None),
    ("reflect", [0, 0, 1, 2, 0, 0, 2, 1], "reflect", None),
    ("reflect-last-axis", [0, 0, 0, 2, 0, 0, 0, 3], "reflect", None),
    ("edge", [0, 0, 1, 2, 0, 0, 2, 1], "edge", None),
    ("edge-channels", [0, 1, 1, 0, 0, 1, 0, 1], "edge", None),
]:
    ins, inits = ["x", "pads"], {"pads": i64(*pads)}
    if value is not None:
        ins.append("v")
        inits["v"] = f32(value)
    case(f"Pad-{name}", [n("Pad", ins, mode=mode)], (3, 4, 5), inits)
case("Pad-wrap", [n("Pad", ["x", "pads"], mode="wrap")], (3, 4, 5), {"pads": i64(0, 0, 1, 2, 0, 0, 2, 1)},
     opsets=since(19))
case("Pad-wrap-last-axis", [n("Pad", ["x", "pads"], mode="wrap")], (3, 4, 5), {"pads": i64(0, 0, 0, 3, 0, 0, 0, 1)},
     opsets=since(19))
case("Pad-axes-input-constant", [n("Pad", ["x", "pads", "v", "axes"])], (3, 4, 5),
     {"pads": i64(1, 2, 2, 1), "v": f32(0.25), "axes": i64(2, 3)}, opsets=since(18))
case("Pad-axes-input-negative", [n("Pad", ["x", "pads", "", "axes"], mode="reflect")], (3, 4, 5),
     {"pads": i64(2, 1), "axes": i64(-1)}, opsets=since(18))
case("Pad-axes-input-edge", [n("Pad", ["x", "pads", "", "axes"], mode="edge")], (3, 4, 5),
     {"pads": i64(1, 0, 0, 2), "axes": i64(-1, 2)}, opsets=since(18))
case("Pad-3d-input-reflect", [n("Pad", ["x", "pads"], mode="reflect")], (3, 6), {"pads": i64(0, 0, 2, 0, 0, 3)})

# Pooling ---------------------------------------------------------------------------------------------
for name, attrs in [
    ("k2-s2", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("k3-s1-pads-exclude", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    ("k3-s1-pads-include", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("k3-s2-overlap", dict(kernel_shape=[3, 3], strides=[2, 2])),
    ("k3-s2-ceil", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("k2-s2-ceil-odd", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("k3-s2-ceil-pads-exclude", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k3-s2-ceil-pads-include", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                      count_include_pad=1)),
    ("asym-pads-exclude", dict(kernel_shape=[3, 2], pads=[0, 1, 1, 0])),
    ("asym-pads-include", dict(kernel_shape=[3, 2], pads=[0, 1, 1, 0], count_include_pad=1)),
    ("same-upper-s2", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("same-lower-s2-include", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER",
                                   count_include_pad=1)),
    ("valid-s2", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID")),
]:
    case(f"AveragePool-{name}", [n("AveragePool", ["x"], **attrs)], (3, 7, 7))
case("AveragePool-1d-k3-s2-pads", [n("AveragePool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])], (3, 10))
case("AveragePool-1d-ceil-include", [n("AveragePool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 0],
                                       ceil_mode=1, count_include_pad=1)], (3, 10))
for name, attrs in [
    ("k3-s2-ceil-pads-overhang-exclude", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k3-s2-ceil-pads-overhang-include", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                              count_include_pad=1)),
    ("k2-s2-ceil-window-in-right-pad", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k2-s2-ceil-window-in-right-pad-include", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                                                    ceil_mode=1, count_include_pad=1)),
    ("k3-s3-ceil-no-pads", dict(kernel_shape=[3, 3], strides=[3, 3], ceil_mode=1)),
]:
    case(f"AveragePool-{name}", [n("AveragePool", ["x"], **attrs)], (2, 8, 5))
case("GlobalAveragePool-2d", [n("GlobalAveragePool", ["x"])], (3, 4, 5))
case("GlobalAveragePool-1d", [n("GlobalAveragePool", ["x"])], (3, 7))

for name, attrs in [
    ("k2-s2", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("k3-s1-pads", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    ("k3-s2-overlap-pads", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("asym-pads", dict(kernel_shape=[2, 3], pads=[1, 0, 0, 2])),
    ("dilation2", dict(kernel_shape=[2, 2], dilations=[2, 2])),
    ("dilation2-s2-pads", dict(kernel_shape=[3, 3], dilations=[2, 2], strides=[2, 2], pads=[2, 2, 2, 2])),
    ("k3-s2-ceil", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("k2-s2-ceil-odd", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("k3-s2-ceil-pads", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("same-upper-s2", dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("same-lower-k3", dict(kernel_shape=[3, 3], auto_pad="SAME_LOWER")),
    ("valid", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID")),
]:
    case(f"MaxPool-{name}", [n("MaxPool", ["x"], **attrs)], (3, 7, 7))
case("MaxPool-1d-k3-s2-pads", [n("MaxPool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])], (3, 10))
case("MaxPool-1d-ceil-dilation", [n("MaxPool", ["x"], kernel_shape=[2], strides=[2], dilations=[2], ceil_mode=1)],
     (3, 10))
case("MaxPool-negative-inputs-pads", [n("Neg", ["x"], "m"), n("Abs", ["m"], "a"), n("Neg", ["a"], "b"),
                                      n("MaxPool", ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], (2, 5, 5))
for name, attrs in [
    ("k3-s2-ceil-pads-overhang", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k2-s2-ceil-window-in-right-pad", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("k3-s3-ceil-no-pads", dict(kernel_shape=[3, 3], strides=[3, 3], ceil_mode=1)),
]:
    case(f"MaxPool-{name}", [n("MaxPool", ["x"], **attrs)], (2, 8, 5))
case("GlobalMaxPool-2d", [n("GlobalMaxPool", ["x"])], (3, 4, 5))
case("GlobalMaxPool-1d", [n("GlobalMaxPool", ["x"])], (3, 7))

for name, attrs in [
    ("p2-k2-s2", dict(kernel_shape=[2, 2], strides=[2, 2], p=2)),
    ("p1-k2-s2", dict(kernel_shape=[2, 2], strides=[2, 2], p=1)),
    ("default-p-k3", dict(kernel_shape=[3, 3])),
    ("p2-k3-s2-pads", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], p=2)),
    ("p2-asym-pads", dict(kernel_shape=[2, 2], pads=[0, 1, 1, 0], p=2)),
    ("p3-k2", dict(kernel_shape=[2, 2], p=3)),
]:
    case(f"LpPool-{name}", [n("LpPool", ["x"], **attrs)], (3, 6, 6))
case("LpPool-1d-p2", [n("LpPool", ["x"], kernel_shape=[3], strides=[2], p=2)], (3, 9))
case("LpPool-ceil-mode", [n("LpPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, p=2)], (3, 5, 5),
     opsets=since(18))
case("LpPool-ceil-window-in-right-pad", [n("LpPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                                          ceil_mode=1, p=2)], (2, 8, 5), opsets=since(18))
# onnxruntime implements GlobalLpPool only up to version 2 (opset 21); version 22 only widened the types
for name, attrs in [("p2", dict(p=2)), ("default", {}), ("p1", dict(p=1))]:
    case(f"GlobalLpPool-{name}", [n("GlobalLpPool", ["x"], **attrs)], (3, 4, 5), opsets=since(11, 21))

# Normalisation ---------------------------------------------------------------------------------------
for name, shape in [("4d", (3, 4, 4)), ("2d", (3,)), ("3d", (3, 5))]:
    case(f"BatchNormalization-{name}", [n("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], shape,
         {"s": w(3), "b": w(3), "m": w(3), "v": pos(3)}, opsets=since(15) + (11,))
case("BatchNormalization-default-eps", [n("BatchNormalization", ["x", "s", "b", "m", "v"], momentum=0.7)],
     (3, 4, 4), {"s": w(3), "b": w(3), "m": w(3), "v": pos(3)}, opsets=since(15))

# Casts and constants ---------------------------------------------------------------------------------
case("Cast-float-to-float", [n("Cast", ["x"], to=TensorProto.FLOAT)], (3, 4))
case("Cast-int64-and-back", [n("Cast", ["x"], "i", to=TensorProto.INT64), n("Cast", ["i"], to=TensorProto.FLOAT)],
     (3, 4), data="cast")
case("Cast-int32-and-back", [n("Cast", ["x"], "i", to=TensorProto.INT32), n("Cast", ["i"], to=TensorProto.FLOAT)],
     (3, 4), data="cast")
case("Cast-to-int64-output", [n("Cast", ["x"], to=TensorProto.INT64)], (3, 4), data="cast")
case("Cast-bool-and-back", [n("Cast", ["x"], "b", to=TensorProto.BOOL), n("Cast", ["b"], to=TensorProto.FLOAT)],
     (3, 4), data="int")
case("Cast-double-and-back", [n("Cast", ["x"], "d", to=TensorProto.DOUBLE), n("Cast", ["d"], to=TensorProto.FLOAT)],
     (3, 4))
case("Cast-float16-and-back-exact", [n("Cast", ["x"], "h", to=TensorProto.FLOAT16),
                                     n("Cast", ["h"], to=TensorProto.FLOAT)], (3, 4), data="int")
case("Div-int64-truncates", [n("Cast", ["x"], "i", to=TensorProto.INT64), n("Div", ["i", "d"], "q"),
                             n("Cast", ["q"], to=TensorProto.FLOAT)], (3, 4), {"d": i64(2)}, data="int")

case("Constant-value-tensor", [n("Constant", [], "c", value=numpy_helper.from_array(w(3, 1))), n("Add", ["x", "c"])],
     (3, 4))
case("Constant-value-float", [n("Constant", [], "c", value_float=0.125), n("Mul", ["x", "c"])], (3, 4),
     opsets=since(13))
case("Constant-value-floats", [n("Constant", [], "c", value_floats=[1.0, 2.0, -1.0, 0.5]), n("Mul", ["x", "c"])],
     (3, 4), opsets=since(13))
case("Constant-value-ints", [n("Constant", [], "s", value_ints=[0, -1]), n("Reshape", ["x", "s"])], (3, 4),
     opsets=since(13))
case("Constant-value-int", [n("Constant", [], "a", value_int=3), n("Cast", ["a"], "f", to=TensorProto.FLOAT),
                            n("Mul", ["x", "f"])], (3, 4), opsets=since(13))
case("Constant-int-tensor-as-shape", [n("Constant", [], "s", value=numpy_helper.from_array(i64(0, 12))),
                                      n("Reshape", ["x", "s"])], (3, 4))

# Shape plumbing --------------------------------------------------------------------------------------
case("Shape-start-end", [n("Shape", ["x"], "s", start=1, end=2), n("Concat", ["zero", "s", "minus1"], "t", axis=0),
                         n("Reshape", ["x", "t"])], (3, 4, 2), {"zero": i64(0), "minus1": i64(-1)}, opsets=since(15))
case("Shape-negative-start", [n("Shape", ["x"], "s", start=-1), n("Cast", ["s"], "f", to=TensorProto.FLOAT),
                              n("Mul", ["x", "f"])], (3, 4), opsets=since(15))
case("Shape-negative-start-end", [n("Shape", ["x"], "s", start=-2, end=-1), n("Cast", ["s"], "f", to=TensorProto.FLOAT),
                                  n("Mul", ["x", "f"])], (3, 4), opsets=since(15))
case("Shape-end-beyond-rank", [n("Shape", ["x"], "s", start=2, end=10), n("Cast", ["s"], "f", to=TensorProto.FLOAT),
                               n("Mul", ["x", "f"])], (3, 4), opsets=since(15))
case("Shape-full-then-Size", [n("Shape", ["x"], "s"), n("Size", ["s"], "k"),
                              n("Cast", ["k"], "f", to=TensorProto.FLOAT), n("Mul", ["x", "f"])], (3, 4))
case("Size-batch-dependent", [n("Size", ["x"], "k"), n("Cast", ["k"], "f", to=TensorProto.FLOAT),
                              n("Div", ["x", "f"])], (3, 4))
case("Gather-axis1-scalar", [n("Gather", ["x", "i"], axis=1)], (5, 6), {"i": i64(2).reshape(())})
case("Gather-axis1-1d", [n("Gather", ["x", "i"], axis=1)], (5, 6), {"i": i64(4, 0, 2)})
case("Gather-axis2-negative", [n("Gather", ["x", "i"], axis=2)], (5, 6), {"i": i64(-1, 0, -3)})
case("Gather-axis-1-2d-indices", [n("Gather", ["x", "i"], axis=-1)], (5, 6), {"i": i64(0, 1, 5, -2).reshape(2, 2)})
case("Gather-int32-indices", [n("Gather", ["x", "i"], axis=1)], (5, 6), {"i": np.array([3, -1], dtype=np.int32)})
case("Gather-axis0-embedding", [n("Cast", ["x"], "idx", to=TensorProto.INT64), n("Gather", ["table", "idx"], axis=0)],
     (3,), {"table": w(6, 4)}, data="small-int")
case("Gather-axis0-scalar-shape", [n("Shape", ["x"], "s"), n("Gather", ["s", "i"], "d"),
                                   n("Cast", ["d"], "f", to=TensorProto.FLOAT), n("Mul", ["x", "f"])], (3, 4),
     {"i": i64(-1).reshape(())})
case("Gather-axis0-1d-shape", [n("Shape", ["x"], "s"), n("Gather", ["s", "i"], "d"),
                               n("Concat", ["zero", "d", "minus1"], "t", axis=0), n("Reshape", ["x", "t"])], (3, 4, 2),
     {"i": i64(2, -3), "zero": i64(0), "minus1": i64(-1)})
case("ConstantOfShape-batch-shape-value", [n("Shape", ["x"], "s"),
                                           n("ConstantOfShape", ["s"], "c", value=numpy_helper.from_array(f32([0.5]))),
                                           n("Add", ["x", "c"])], (3, 4))
case("ConstantOfShape-default-value", [n("Shape", ["x"], "s"), n("ConstantOfShape", ["s"], "c"),
                                       n("Add", ["x", "c"])], (3, 4))
case("ConstantOfShape-int64-cast", [n("ConstantOfShape", ["s"], "c", value=numpy_helper.from_array(i64(3))),
                                    n("Cast", ["c"], "f", to=TensorProto.FLOAT), n("Mul", ["x", "f"])], (3, 4),
     {"s": i64(3, 4)})
case("Range-int-from-shape", [n("Shape", ["x"], "s"), n("Gather", ["s", "i"], "d"),
                              n("Range", ["zero", "d", "one"], "r"), n("Cast", ["r"], "f", to=TensorProto.FLOAT),
                              n("Add", ["x", "f"])], (3, 4),
     {"i": i64(2).reshape(()), "zero": i64(0).reshape(()), "one": i64(1).reshape(())})
case("Range-batch-dependent", [n("Shape", ["x"], "s"), n("Gather", ["s", "i"], "d"),
                               n("Range", ["zero", "d", "one"], "r"), n("Cast", ["r"], "f", to=TensorProto.FLOAT),
                               n("Unsqueeze", ["f", "ax"], "u"), n("Add", ["x", "u"])], (3, 4),
     {"i": i64(0).reshape(()), "zero": i64(0).reshape(()), "one": i64(1).reshape(()), "ax": i64(1, 2)},
     opsets=since(13))
case("Range-float", [n("Range", ["a", "b", "c"], "r"), n("Add", ["x", "r"])], (3, 4),
     {"a": f32(0.5), "b": f32(2.5), "c": f32(0.5)})
case("Range-negative-delta", [n("Range", ["a", "b", "c"], "r"), n("Cast", ["r"], "f", to=TensorProto.FLOAT),
                              n("Mul", ["x", "f"])], (3, 4),
     {"a": i64(4).reshape(()), "b": i64(0).reshape(()), "c": i64(-1).reshape(())})
case("Expand-data", [n("Expand", ["x", "s"])], (1, 4), {"s": i64(3, 4)})
case("Expand-data-full-shape", [n("Expand", ["x", "s"])], (1, 4), {"s": i64(1, 3, 1)})
case("Expand-const-to-batch-shape", [n("Shape", ["x"], "s"), n("Expand", ["c", "s"], "e"), n("Mul", ["x", "e"])],
     (3, 4), {"c": w(1, 4)})
case("Tile-repeats", [n("Tile", ["x", "r"])], (3, 4), {"r": i64(1, 2, 3)})
case("Tile-ones", [n("Tile", ["x", "r"])], (3, 4), {"r": i64(1, 1, 1)})

# Comparisons and logic -------------------------------------------------------------------------------
case("Where-relu-like", [n("Greater", ["x", "zero"], "c"), n("Where", ["c", "x", "zero"])], (3, 4), {"zero": f32(0.0)})
case("Where-const-branches", [n("Less", ["x", "t"], "c"), n("Where", ["c", "a", "x"])], (3, 4),
     {"t": w(4), "a": w(3, 1)})
case("Where-const-cond", [n("Where", ["c", "x", "a"])], (3, 4), {"c": np.array([True, False, True, False]),
                                                                 "a": f32(-2.0)})
case("Equal-float", [n("Equal", ["x", "c"])], (3, 4), {"c": f32([0.0, 1.0, -1.0, 2.0])}, data="int")
case("Equal-int64", [n("Cast", ["x"], "i", to=TensorProto.INT64), n("Equal", ["i", "c"])], (3, 4),
     {"c": i64(1)}, data="int")
case("Less-const-right", [n("Less", ["x", "c"])], (3, 4), {"c": w(3, 1)})
case("Less-const-left", [n("Less", ["c", "x"])], (3, 4), {"c": f32(0.0)})
case("Greater-const", [n("Greater", ["x", "c"])], (3, 4), {"c": w(4)})
case("Greater-data-data", [n("Neg", ["x"], "m"), n("Greater", ["x", "m"])], (3, 4))
case("LessOrEqual-const", [n("LessOrEqual", ["x", "c"])], (3, 4), {"c": f32([0.0, 1.0, -1.0, 2.0])}, data="int",
     opsets=since(12))
case("GreaterOrEqual-const-left", [n("GreaterOrEqual", ["c", "x"])], (3, 4), {"c": f32(0.0)}, data="int",
     opsets=since(12))
case("IsNaN-of-a-quotient", [n("Div", ["x", "x"], "q"), n("IsNaN", ["q"])], (3, 4), data="int")
case("GatherElements-permutation-expanded", [n("Shape", ["x"], "s"), n("Expand", ["i", "s"], "e"),
                                             n("GatherElements", ["x", "e"], axis=2)], (3, 4),
     {"i": np.tile(i64(3, 0, -2, 1), (1, 3, 1))})
case("GatherElements-negative-axis-repeats", [n("Shape", ["x"], "s"), n("Expand", ["i", "s"], "e"),
                                              n("GatherElements", ["x", "e"], axis=-2)], (3, 4),
     {"i": np.tile(i64(2, 2, 0, 1).reshape(1, 1, 4), (1, 3, 1))})
case("Not", [n("Greater", ["x", "c"], "g"), n("Not", ["g"])], (3, 4), {"c": f32(0.0)})
case("And", [n("Greater", ["x", "lo"], "a"), n("Less", ["x", "hi"], "b"), n("And", ["a", "b"])], (3, 4),
     {"lo": f32(-0.5), "hi": f32(0.5)})
case("Or", [n("Greater", ["x", "lo"], "a"), n("Less", ["x", "hi"], "b"), n("Or", ["a", "b"])], (3, 4),
     {"lo": f32(0.5), "hi": f32(-0.5)})
case("Not-cast-mask", [n("Equal", ["x", "c"], "e"), n("Not", ["e"], "ne"), n("Cast", ["ne"], "f", to=TensorProto.FLOAT),
                       n("Mul", ["x", "f"])], (3, 4), {"c": f32(1.0)}, data="int")


PARAMS = [pytest.param(c, opset, id=f"{c.name}-op{opset}") for c in CASES for opset in c.opsets]


# ------------------------------------------------------------------------------------------- checking

def reference_session(model: onnx.ModelProto):
    """onnxruntime on the CPU with graph optimisations off, on one thread that does not spin (so the
    idle thread pools of earlier sessions do not slow torch down)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _compare(ours: torch.Tensor, ref: np.ndarray, what: str, dtype: torch.dtype) -> None:
    mine = ours.detach().cpu().numpy()
    assert mine.shape == ref.shape, f"{what}: shape {mine.shape}, onnxruntime {ref.shape}"
    if ref.dtype.kind == "f":
        assert ours.is_floating_point(), f"{what}: dtype {ours.dtype}, onnxruntime {ref.dtype}"
        if ref.dtype == np.float32:
            assert ours.dtype == dtype, f"{what}: dtype {ours.dtype} in a {dtype} run"
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        diff = float(np.abs(mine.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
        assert diff <= RTOL * max(scale, 1e-30), (
            f"{what}: max difference {diff:.3g} > {RTOL:g} x max |reference| {scale:.3g}")
    else:
        assert mine.dtype == ref.dtype, f"{what}: dtype {mine.dtype}, onnxruntime {ref.dtype}"
        np.testing.assert_array_equal(mine, ref, err_msg=what)


def check_against_ort(model: onnx.ModelProto, name: str, inputs: list[np.ndarray]) -> None:
    """Load ``model`` into lipcert, run it in float32 and float64 on each input, compare with onnxruntime."""
    session = reference_session(model)
    outputs = [o.name for o in model.graph.output]
    graph = graph_from_onnx(model, name)
    modules = {dtype: GraphModule(graph).to(dtype) for dtype in (torch.float32, torch.float64)}
    for x in inputs:
        refs = session.run(outputs, {"x": x})
        for dtype, module in modules.items():
            xt = torch.from_numpy(x).to(dtype)
            with torch.no_grad():
                env = module.run_all(xt)
                first = module(xt)
            label = f"batch {x.shape[0]}, {str(dtype).removeprefix('torch.')}"
            _compare(first, refs[0], f"{outputs[0]} via forward ({label})", dtype)
            for out, ref in zip(outputs, refs):
                _compare(env[out], ref, f"{out} ({label})", dtype)


@pytest.mark.parametrize("case,opset", PARAMS)
def test_op_matches_onnxruntime(case: Case, opset: int) -> None:
    model = build(case, opset)
    check_against_ort(model, f"{case.name}-op{opset}", [make_input(case, 2)])


# Shape plumbing that depends on the batch -------------------------------------------------------------

def plumbing_model(opset: int, batch_dependent: bool) -> onnx.ModelProto:
    """x.view(x.size(0), -1) as the TorchScript exporter writes it, or x.view(-1, C*H*W) from Shape[1:]."""
    if batch_dependent:
        unsq = (n("Unsqueeze", ["n"], "n1", axes=[0]) if opset < 13 else n("Unsqueeze", ["n", "zero_axis"], "n1"))
        nodes = [n("Shape", ["x"], "s"), n("Gather", ["s", "i0"], "n", axis=0), unsq,
                 n("Concat", ["n1", "minus1"], "t", axis=0), n("Reshape", ["x", "t"], "r"),
                 n("Gemm", ["r", "W", "B"], "y", transB=1)]
    else:
        nodes = [n("Shape", ["x"], "s"), n("Slice", ["s", "one", "big"], "rest"),
                 n("Concat", ["minus1", "rest"], "t0", axis=0), n("Flatten", ["x"], "f"),
                 n("Reshape", ["f", "t0"], "back"), n("Relu", ["back"], "y")]
    inits = {"i0": i64(0).reshape(()), "zero_axis": i64(0), "minus1": i64(-1), "one": i64(1), "big": i64(I64_MAX),
             "W": w(5, 48, scale=0.2), "B": w(5)}
    used = {i for node in nodes for i in node.input}
    case_ = Case(f"plumbing-{'batch' if batch_dependent else 'static'}", nodes, (3, 4, 4),
                 {k: v for k, v in inits.items() if k in used})
    return build(case_, opset)


@pytest.mark.parametrize("opset", STANDARD, ids=lambda o: f"op{o}")
@pytest.mark.parametrize("batch_dependent", [True, False], ids=["batch-dependent", "per-sample"])
def test_shape_plumbing(batch_dependent: bool, opset: int) -> None:
    model = plumbing_model(opset, batch_dependent)
    graph = graph_from_onnx(model, "plumbing")
    assert graph.fixed_batch is None
    ops = {node.op for node in graph.nodes}
    if batch_dependent:
        assert {"Shape", "Gather", "Concat", "Reshape"} <= ops, f"batch plumbing was folded away: {ops}"
    else:
        assert "Shape" not in ops and "Concat" not in ops, f"per-sample plumbing was not folded: {ops}"
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((b, 3, 4, 4)).astype(np.float32) for b in (2, 5, 1)]
    check_against_ort(model, "plumbing", inputs)


def test_batch_dependent_constant_of_shape_and_expand() -> None:
    nodes = [n("Shape", ["x"], "s"), n("ConstantOfShape", ["s"], "c", value=numpy_helper.from_array(f32([2.0]))),
             n("Expand", ["b", "s"], "e"), n("Mul", ["x", "c"], "m"), n("Add", ["m", "e"])]
    model = build(Case("cos-expand", nodes, (3, 4), {"b": w(3, 1)}), 17)
    rng = np.random.default_rng(3)
    check_against_ort(model, "cos-expand", [rng.standard_normal((b, 3, 4)).astype(np.float32) for b in (2, 5)])


# Coverage and features left out on purpose -------------------------------------------------------------

def test_every_registered_operator_is_covered() -> None:
    covered = set().union(*(c.ops for c in CASES))
    missing = sorted(set(REGISTRY) - covered)
    assert not missing, f"operators without a conformance case: {missing}"


def test_every_opset_family_is_exercised() -> None:
    used = {opset for _, opset in (p.values for p in PARAMS)}
    assert set(STANDARD) <= used


UNSUPPORTED = [
    pytest.param(Case("maxpool-indices", [n("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])], (3, 4, 4),
                      outputs=("y", "idx")), 13, "maxpool_0", id="MaxPool-Indices-output"),
    pytest.param(Case("bn-training", [n("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"],
                                        training_mode=1)], (3, 4),
                      {"s": w(3), "b": w(3), "m": w(3), "v": pos(3)}), 15, "batchnormalization_0",
                 id="BatchNormalization-training-mode"),
    pytest.param(Case("pad-reflect-batch", [n("Pad", ["x", "pads"], mode="reflect")], (3, 4),
                      {"pads": i64(1, 0, 0, 1, 0, 0)}), 13, "pad_0", id="Pad-reflect-batch-axis"),
    pytest.param(Case("cast-string", [n("Cast", ["x"], to=TensorProto.STRING)], (3, 4)), 13, "cast_0",
                 id="Cast-to-string"),
    pytest.param(Case("dropout-training", [n("Dropout", ["x", "r", "t"])], (3, 4),
                      {"r": f32(0.5), "t": np.array(True)}), 13, "dropout_0", id="Dropout-training-mode"),
    pytest.param(Case("avgpool-dilated", [n("AveragePool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])],
                      (3, 6, 6)), 19, "averagepool_0", id="AveragePool-dilations"),
    pytest.param(Case("lppool-dilated", [n("LpPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])], (3, 6, 6)),
                 18, "lppool_0", id="LpPool-dilations"),
    pytest.param(Case("conv-4d", [n("Conv", ["x", "W"])], (2, 3, 3, 3, 3), {"W": w(2, 2, 2, 2, 2, 2)}), 13,
                 "conv_0", id="Conv-4-spatial-axes"),
]


@pytest.mark.parametrize("case,opset,node_name", UNSUPPORTED)
def test_unsupported_feature_is_a_model_error(case: Case, opset: int, node_name: str) -> None:
    model = build(case, opset)
    with pytest.raises(ModelError, match=node_name):
        graph_from_onnx(model, case.name)
