"""The cross-check of lipcert's executor against onnxruntime cannot be hidden: every intermediate value is
compared, entry by entry within its own magnitude, at points in [0, 1], on balls around them and far outside,
at load and on a report's own data; a mismatch names the first node that differs.

Each test gives one operator a meaning other than the specification's (monkeypatched ``run``) and checks that the
cross-check finds it where the old output-only comparison (relative to the largest output) could not.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lipcert
from lipcert.errors import ModelError
from lipcert.graph.ops import REGISTRY
from lipcert.model import crosscheck as cc
from lipcert.model.onnx_loader import graph_from_onnx

from .conftest import SAMPLES

DIGITS_DENSE, DIGITS_TEST = SAMPLES / "digits_dense.onnx", SAMPLES / "digits_test.npz"


def _flat_model(nodes: list, inputs: int, outputs: int, inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """An opset-13 model from ``nodes``, its input ``x`` (N, inputs) and output ``y`` (N, outputs) float."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _hidden_behind_a_large_logit() -> onnx.ModelProto:
    """x (N, 6) -> reversed by Slice(step -1) -> Gemm to 2 logits, then a constant logit of 1e6 appended: a
    wrong slice changes the first two logits by O(1), far below 1e-4 of the largest output."""
    rng = np.random.default_rng(0)
    inits = {"s": np.array([-1], np.int64), "e": np.array([-2 ** 63], np.int64), "a": np.array([1], np.int64),
             "st": np.array([-1], np.int64), "w": rng.standard_normal((6, 2)).astype(np.float32),
             "zero": np.zeros((1, 1), np.float32), "big": np.full((1, 1), 1e6, np.float32),
             "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["r"], name="reverse"),
             helper.make_node("MatMul", ["r", "w"], ["z"], name="head"),
             helper.make_node("ReduceSum", ["z", "axes"], ["t"], name="total", keepdims=1),
             helper.make_node("Mul", ["t", "zero"], ["nothing"], name="scale"),
             helper.make_node("Add", ["nothing", "big"], ["huge"], name="constant"),
             helper.make_node("Concat", ["z", "huge"], ["y"], name="logits", axis=1)]
    return _flat_model(nodes, 6, 3, inits)


def test_a_difference_hidden_behind_a_large_logit_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = graph_from_onnx(_hidden_behind_a_large_logit(), "hidden.onnx")
    assert cc.crosscheck(graph).values >= 5  # every value compared, and they agree

    slice_op = type(REGISTRY["Slice"])
    monkeypatch.setattr(slice_op, "run", lambda self, node, inputs, ctx: [inputs[0]])  # forgets to reverse
    points = cc.probe_points(graph)
    mine = lipcert.graph.executor.GraphModule(graph)(points[0][1]).detach().numpy()
    theirs = cc.ort_session(graph.onnx_model).run(None, {"x": points[0][1].numpy()})[0]
    rel = np.abs(mine - theirs).max() / np.abs(theirs).max()
    assert 0 < rel < cc.DEFAULT_RTOL  # what the output-only comparison saw: nothing
    with pytest.raises(ModelError, match=r"node 'reverse' \(Slice\) is the first to differ from onnxruntime at "
                                         r"random inputs in \[0, 1\]: its output 'r' is "):
        cc.crosscheck(graph)


def _relu_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="act")]
    return _flat_model(nodes, 8, 8)


def test_a_difference_only_far_outside_the_data_range_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Relu that saturates at 5 agrees with onnxruntime on [0, 1] and on balls of radius 1 around it."""
    graph = graph_from_onnx(_relu_model(), "relu.onnx")
    monkeypatch.setattr(type(REGISTRY["Relu"]), "fn", lambda self, node, x: x.clamp(0.0, 5.0))
    with pytest.raises(ModelError, match=r"node 'act' \(Relu\) is the first to differ from onnxruntime at points "
                                         r"in \[-10, 10\]"):
        cc.crosscheck(graph)


def test_a_folded_constant_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A constant lipcert computes at load (a Range folded into a parameter) is compared with onnxruntime's."""
    inits = {"start": np.array(0, np.int64), "limit": np.array(8, np.int64), "delta": np.array(1, np.int64)}
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["idx"], name="positions"),
             helper.make_node("Gather", ["x", "idx"], ["y"], name="pick", axis=1)]
    model = _flat_model(nodes, 8, 8, inits)
    range_op = type(REGISTRY["Range"])
    original = range_op.run
    monkeypatch.setattr(range_op, "run", lambda self, node, inputs, ctx: [original(self, node, inputs, ctx)[0].flip(0)])
    graph = graph_from_onnx(model, "range.onnx")
    assert "idx" in graph.params
    with pytest.raises(ModelError, match=r"the constant 'idx' that lipcert folded from node 'positions' \(Range\)"):
        cc.crosscheck(graph)


def test_tolerances_are_exact_for_copies_and_scaled_for_accumulations() -> None:
    """A copy must match bit for bit; a product's tolerance follows |W| |x| of each entry, not the tensor's
    largest value."""
    from lipcert.graph.core import Node

    copy = Node("t", "Transpose", ["x"], ["y"], {"perm": [0, 2, 1]})
    x = torch.randn(2, 3, 4)
    assert not cc.tolerance(copy, [x], x.transpose(1, 2).numpy(), 0).any()
    gemm = Node("g", "MatMul", ["x", "w"], ["y"])
    w = torch.tensor([[1.0, 0.0], [0.0, 1e6]])
    a = torch.tensor([[1.0, 1.0]])
    tol = cc.tolerance(gemm, [a, w], (a @ w).numpy(), 0)
    assert tol[0, 0] < 1e-5 < tol[0, 1]


def test_report_compares_its_own_data_and_balls(monkeypatch: pytest.MonkeyPatch) -> None:
    """``certify`` checks the executor on the first samples of its data and on their certified balls; a
    divergence there stops the run with a ModelError, and a clean run records what the check cost."""
    graph = lipcert.load_model(DIGITS_DENSE)
    report = lipcert.certify(graph, DIGITS_TEST, attack=False)
    assert report.timings.crosscheck_seconds > 0

    reduce_max = type(REGISTRY["ReduceMax"])
    monkeypatch.setattr(reduce_max, "reduce", lambda self, x, axes, keep: torch.amax(x, dim=axes, keepdim=keep) + 1e-3)
    with pytest.raises(ModelError, match=r"\(ReduceMax\) is the first to differ from onnxruntime at the data's "
                                         "first samples"):
        lipcert.certify(graph, DIGITS_TEST, attack=False, backend="onnxruntime")


def _quotient_model() -> onnx.ModelProto:
    """x (N, 4) -> its first half divided by its second, NaN replaced by 0 (as dynamo's atan2 does): 0 / 0 is NaN
    in both runtimes at zero inputs."""
    inits = {"half": np.array([2, 2], np.int64), "zero": np.zeros((), np.float32)}
    nodes = [helper.make_node("Split", ["x", "half"], ["a", "b"], name="halves", axis=1),
             helper.make_node("Div", ["a", "b"], ["q"], name="quotient"),
             helper.make_node("IsNaN", ["q"], ["nan"], name="test"),
             helper.make_node("Where", ["nan", "zero", "q"], ["clean"], name="guard"),
             helper.make_node("Concat", ["clean", "a"], ["y"], name="out", axis=1)]
    return _flat_model(nodes, 4, 4, inits)


def test_nan_matches_nan_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN both runtimes compute (0 / 0) is no difference; a finite value where onnxruntime has NaN is one."""
    graph = graph_from_onnx(_quotient_model(), "quotient.onnx")
    zeros = torch.zeros((3, 4))
    zeros[1] = torch.tensor([1.0, 0.0, 2.0, 0.5])
    assert cc.check_points(graph, [("zero inputs", zeros)]).values >= 3
    div = type(REGISTRY["Div"])
    original = div.run
    monkeypatch.setattr(div, "run", lambda self, node, inputs, ctx: [original(self, node, inputs, ctx)[0].nan_to_num()])
    with pytest.raises(ModelError, match=r"node 'quotient' \(Div\) is the first to differ from onnxruntime at zero "
                                         r"inputs: its output 'q' is 0 at entry \(0, 0\) where onnxruntime gives nan"):
        cc.check_points(graph, [("zero inputs", zeros)])


def _scaled_weight_model() -> onnx.ModelProto:
    """x (N, 4) @ (w * 3): a weight computed at run time from a constant (a constant subgraph lipcert folds)."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    inits = {"w": w, "three": np.array(3.0, np.float32)}
    nodes = [helper.make_node("Mul", ["w", "three"], ["weight"], name="compose"),
             helper.make_node("MatMul", ["x", "weight"], ["y"], name="dense")]
    return _flat_model(nodes, 4, 3, inits)


@pytest.mark.parametrize("shift", [1e-4, 1e-2])
def test_a_folded_constant_off_by_summation_order_is_taken_from_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                                                             shift: float) -> None:
    """lipcert folding a run-time weight a few ulps of its largest entry away from onnxruntime (as two orders of
    summation of an ill-conditioned kernel composition do) takes onnxruntime's values, which the deployed model
    runs, and says so; a larger difference is still a mismatch."""
    mul = type(REGISTRY["Mul"])
    original = mul.run
    monkeypatch.setattr(mul, "run", lambda self, node, inputs, ctx: [
        original(self, node, inputs, ctx)[0] + shift * float(inputs[0].abs().max()) * (node.name == "compose")])
    graph = graph_from_onnx(_scaled_weight_model(), "scaled.onnx")
    ours = graph.params["weight"].clone()
    if shift > cc.ADOPT_TOLERANCE:
        with pytest.raises(ModelError, match=r"the constant 'weight' that lipcert folded from node 'compose' \(Mul\)"):
            cc.crosscheck(graph)
        return
    cc.crosscheck(graph)
    expected = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * np.float32(3.0)
    assert not torch.equal(ours, graph.params["weight"])
    assert np.array_equal(graph.params["weight"].numpy(), expected)
    assert any("'weight'" in note and "taken from onnxruntime" in note for note in graph.notes)


def test_a_report_on_a_model_loaded_unchecked_stops_where_onnxruntime_folds_another_constant(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Loaded without its cross-check, lipcert's own folded weight is what the bound is computed on: when the report's
    cross-check finds onnxruntime computing another one, the run stops rather than certify the
    deployed model with a bound on other weights."""
    mul = type(REGISTRY["Mul"])
    original = mul.run
    monkeypatch.setattr(mul, "run", lambda self, node, inputs, ctx: [
        original(self, node, inputs, ctx)[0] + 1e-4 * float(inputs[0].abs().max()) * (node.name == "compose")])
    path = tmp_path / "scaled.onnx"
    onnx.save(_scaled_weight_model(), path)
    graph = lipcert.load_model(path, check=False)
    x = np.random.default_rng(1).random((8, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(8, dtype=np.int64))
    with pytest.raises(ModelError, match=r"onnxruntime computes the folded constant\(s\) weight differently"):
        lipcert.certify(graph, str(tmp_path / "d.npz"), eps="0.1", attack=False, backend="onnxruntime")
    assert lipcert.load_model(path).crosscheck.adopted == ["weight"]  # checked at load: onnxruntime's values
