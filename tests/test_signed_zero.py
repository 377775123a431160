"""``never_negative_zero``: what it proves holds in onnxruntime on inputs full of signed zeros, and what it refuses
does give -0.0 there (or may, by the runtime's order of summation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lipcert.bounds.decompose import decompose
from lipcert.bounds.signed_zero import never_negative_zero
from lipcert.bounds.steps import Context
from lipcert.bounds.verify import verify
from lipcert.graph.executor import GraphModule
from lipcert.model.onnx_loader import graph_from_onnx

from .soundness.build import Builder
from .soundness.generator import householder_order2

SHAPE = (2, 2, 2)


def _negative_zeros(values: np.ndarray) -> int:
    return int(((values == 0) & np.signbit(values)).sum())


def _inputs() -> np.ndarray:
    """Every input of entries in {-0.0, +0.0, 1, -1} over a (2, 2, 2) sample, 4^8 of them (the ways a sum of
    products can come out as an exact zero)."""
    grid = np.array(np.meshgrid(*[np.array([-0.0, 0.0, 1.0, -1.0], np.float32)] * 8, indexing="ij"))
    return grid.reshape(8, -1).T.reshape((-1,) + SHAPE).copy()


def _conv(b: Builder, v: str, bias: np.ndarray | None) -> str:
    w = b.const(-np.abs(np.random.default_rng(0).standard_normal((2, 2, 1, 1))).astype(np.float32))
    return b.node("Conv", [v, w] + ([b.const(bias.astype(np.float32))] if bias is not None else []))


#: name -> (the graph from the input, whether it is proven never -0.0, whether onnxruntime gives -0.0 on ``_inputs``)
CASES: dict[str, tuple[Callable[[Builder, str], str], bool, bool]] = {
    "input": (lambda b, v: b.node("Identity", [v]), False, True),
    "add_plus_zero": (lambda b, v: b.node("Add", [v, b.const(np.zeros(SHAPE, np.float32))]), True, False),
    "add_minus_zero": (lambda b, v: b.node("Add", [v, b.const(np.full(SHAPE, -0.0, np.float32))]), False, True),
    "add_const_first": (lambda b, v: b.node("Add", [b.const(np.float32(0.5)), v]), True, False),
    "sub_nonzero": (lambda b, v: b.node("Sub", [v, b.const(np.float32(0.25))]), True, False),
    "sub_plus_zero": (lambda b, v: b.node("Sub", [v, b.const(np.float32(0.0))]), False, True),
    "sub_minus_zero": (lambda b, v: b.node("Sub", [v, b.const(np.float32(-0.0))]), True, False),
    "neg": (lambda b, v: b.node("Neg", [b.node("Add", [v, b.const(np.float32(0.0))])]), False, True),
    "mul_negative": (lambda b, v: b.node("Mul", [b.node("Add", [v, b.const(np.float32(0.0))]),
                                                  b.const(np.float32(-2.0))]), False, True),
    # both runtimes start their sums at +0.0, which the ONNX specification does not promise
    "conv_no_bias": (lambda b, v: _conv(b, b.node("Add", [v, b.const(np.float32(0.0))]), None), False, False),
    "conv_bias": (lambda b, v: _conv(b, v, np.array([0.5, -0.25])), True, False),
    "conv_zero_bias": (lambda b, v: _conv(b, v, np.array([0.5, 0.0])), False, False),
    "copies": (lambda b, v: b.node("Transpose", [b.node("Concat", b.split(
        b.node("Add", [v, b.const(np.float32(1.0))]), 1, [1, 1], 2)[::-1], axis=1)], perm=[0, 2, 1, 3]), True, False),
    "gather": (lambda b, v: b.node("Gather", [b.node("Add", [v, b.const(np.float32(1.0))]),
                                              b.const(np.array([1, 0], np.int64), np.int64)], axis=1), True, False),
    "residual": (lambda b, v: b.node("Add", [b.node("Mul", [v, b.const(np.float32(-1.0))]),
                                             _conv(b, v, np.array([0.5, 0.5]))]), True, False),
    "gemm_beta": (lambda b, v: b.node("Gemm", [b.node("Flatten", [v], axis=1), b.const(-np.ones((8, 3), np.float32)),
                                               b.const(np.ones(3, np.float32))], beta=-1.0), True, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_is_proven_never_gives_negative_zero(case: str) -> None:
    build, proven, seen = CASES[case]
    b = Builder(SHAPE)
    model = b.model(build(b, "input"))
    graph = graph_from_onnx(model, "built")
    why = never_negative_zero(Context(graph), graph.output)
    assert (why is None) == proven, why
    x = _inputs()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    deployed = session.run(None, {"input": x})[0]
    with torch.no_grad():
        ours = GraphModule(graph).to(torch.float64)(torch.from_numpy(x).double()).numpy()
    assert (_negative_zeros(deployed) > 0, _negative_zeros(ours) > 0) == (seen, seen)
    if not proven:
        assert why is not None and ("may give -0.0" in why or "graph input" in why)


def test_householder_by_angle_is_refused_where_its_x_may_be_negative_zero() -> None:
    """The exported atan2 turns x = -0.0 by half a turn: reading the input (or a value plus -0.0) the block jumps in
    onnxruntime between x = -0.0 and x = +0.0, and lipcert says no rule, naming -0.0 on the row and in ``why``; plus
    +0.0, it is proven."""
    theta = np.random.default_rng(3).uniform(0.05, np.pi, (3, 4))
    for zero, proven in [(None, False), (-0.0, False), (0.0, True)]:  # a jump where not proven
        b = Builder((8,))
        source = "input" if zero is None else b.node("Add", ["input", b.const(np.full(8, zero, np.float32))])
        x, y = b.split(source, 1, [4, 4], 2)
        model = b.model(householder_order2(b, x, y, 1, theta, "ok"))
        graph = graph_from_onnx(model, "built")
        (step,) = [s for s in decompose(graph) if s.label.startswith("HouseHolder by angle")]
        assert (step.kind == "pattern") == proven, step.reason
        if not proven:
            assert "-0.0" in step.reason and step.reason.startswith("no rule")
            assert "is not proven never -0.0" in verify(graph, empirical=False).why  # the verdict names it too
        z = np.zeros((2, 8), np.float32)
        z[:, 4:] = -np.linspace(0.5, 2.0, 4, dtype=np.float32)
        z[0, :4] = -0.0  # x = -0.0 in the first row, +0.0 in the second
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        negative, positive = session.run(None, {"input": z})[0]
        jumped = float(np.abs(negative - positive).max())
        assert (jumped > 0.1) == (not proven), jumped


@pytest.mark.parametrize("fill, proven", [(-0.0, False), (0.5, True)])
def test_a_copy_of_a_constant_is_checked_too(fill: float, proven: bool) -> None:
    """Concat(x + 0.0, c) at a fixed batch of 1: its entries copied from the constant c are -0.0 when c holds it
    (onnxruntime shows them), so only a c without -0.0 is proven."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.full((1,) + SHAPE, fill, np.float32), "c")]
    nodes = [helper.make_node("Add", ["input", "zero"], ["shifted"], name="shift"),
             helper.make_node("Concat", ["shifted", "c"], ["logits"], name="join", axis=1)]
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("input", (1,) + SHAPE), ("logits", (1, 4, 2, 2)))]
    graph_proto = helper.make_graph(nodes, "g", values[:1], values[1:], inits)
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    graph = graph_from_onnx(model, "concat.onnx")
    why = never_negative_zero(Context(graph), graph.output)
    assert (why is None) == proven, why
    if not proven:
        assert why is not None and "copies a constant 'c'" in why
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    deployed = session.run(None, {"input": np.full((1,) + SHAPE, -0.0, np.float32)})[0]
    assert (_negative_zeros(deployed) > 0) == (not proven)
