"""The executor means what the ONNX specification means: ONNX's own node test cases, every attribute of every
registered operator in opsets 11 to 28, and the forms where runtimes disagree.

1. Every case of ``onnx.backend.test.case.node`` whose operators are all registered runs through lipcert at two
   levels (``tests/onnx_spec/cases.py``): each node through its registry entry, and the case as a model under
   lipcert's contract. A case that does not match is listed, with its reason, in ``tests/onnx_spec/not_run.toml``;
   any other outcome fails, and so does a listed case that now passes.
2. Every attribute that an operator's schema has in opsets 11 to 28 is implemented or refused by name, and a
   node with any other attribute is refused at load with a one-line error naming the node and the attribute.
3. Slicing and top-k agree with onnxruntime in every form lipcert accepts; the forms runtimes read differently
   (an INT_MAX end with a negative step, unsorted top-k) are refused.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert.errors import ModelError
from lipcert.graph.core import Node
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.model.onnx_loader import MAX_OPSET, MIN_OPSET, graph_from_onnx

from .onnx_spec.cases import LEVELS, RUNNERS, read_list, registered_cases


def _reason(text: str) -> str:
    """A refusal's message without the text of a torch exception it quotes (which torch versions word
    differently)."""
    return re.split(r"\b[A-Z]\w*Error: ", text)[0].strip()


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_onnx_node_cases(level: str) -> None:
    """Every registered-operator case passes, or is refused or skipped exactly as listed, with its reason."""
    listed = read_list()[level]
    cases = registered_cases()
    assert len(cases) > 500, "onnx's node test cases were not found"
    problems = []
    counts = {"pass": 0, "refused": 0, "skipped": 0}
    for case in cases:
        outcome = RUNNERS[level](case)
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        entry = listed.pop(case.name, None)
        if outcome.status == "pass":
            if entry is not None:
                problems.append(f"{case.name}: passes now; remove it from not_run.toml")
            continue
        if outcome.status not in ("refused", "skipped"):
            problems.append(f"{case.name}: {outcome.status}: {outcome.detail}")
        elif entry is None:
            problems.append(f"{case.name}: {outcome.status} but not listed: {outcome.detail}")
        else:
            status, _, reason = entry.partition(": ")
            if status != outcome.status or _reason(reason) != _reason(outcome.detail):
                problems.append(f"{case.name}: listed as {entry!r}, but {outcome.status}: {outcome.detail}")
    problems += [f"{name}: listed but no longer an ONNX case of a registered operator" for name in listed]
    assert not problems, f"{len(problems)} cases differ ({counts}):\n" + "\n".join(problems[:40])
    assert counts["pass"] > counts["refused"] + counts["skipped"] or level == "model"


def test_every_registered_operator_has_cases_or_is_named() -> None:
    """ONNX has cases for every registered operator but those named here (checked by tests/test_ops_conformance.py
    against onnxruntime instead)."""
    covered = {n.op_type for c in registered_cases() for n in c.model.graph.node}
    assert sorted(set(REGISTRY) - covered) == ["GlobalLpPool"]


def _schema_attributes(op: str) -> dict[int, set[str]]:
    found = {}
    for opset in range(MIN_OPSET, MAX_OPSET + 1):
        try:
            schema = onnx.defs.get_schema(op, opset)
        except onnx.defs.SchemaError:
            continue
        found[opset] = set(schema.attributes)
    return found


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_every_attribute_is_implemented_or_refused(op: str) -> None:
    entry = REGISTRY[op]
    per_opset = _schema_attributes(op)
    assert per_opset, f"{op} has no schema in opsets {MIN_OPSET} to {MAX_OPSET}"
    known = set().union(*per_opset.values())
    declared = set(entry.attributes) | set(entry.refused)
    assert not set(entry.attributes) & set(entry.refused)
    missing = {opset: sorted(a - declared) for opset, a in per_opset.items() if a - declared}
    assert not missing, f"{op}: attributes neither implemented nor refused: {missing}"
    assert declared <= known, f"{op} declares attributes no schema has: {sorted(declared - known)}"


def _model(nodes, inits=(), shape=(3,), opset=17, outputs=(("y", TensorProto.FLOAT),)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])
    outs = [helper.make_tensor_value_info(o, t, None) for o, t in outputs]
    graph = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def test_unknown_and_refused_attributes_are_one_line_errors() -> None:
    unknown = _model([helper.make_node("Relu", ["x"], ["y"], name="act", alpha=0.5)])
    with pytest.raises(ModelError, match=r"node 'act' \(Relu\): attribute 'alpha' is not an attribute of Relu"):
        graph_from_onnx(unknown, "m.onnx")
    sparse = helper.make_node("Constant", [], ["c"], name="k", value_string="text")
    refused = _model([sparse, helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(ModelError, match=r"node 'k' \(Constant\): attribute 'value_string' is not supported"):
        graph_from_onnx(refused, "m.onnx")


def test_an_attribute_its_opset_lacks_is_refused() -> None:
    """ReduceSum took its axes as an attribute until opset 12 and as an input from 13: the attribute in an
    opset-13 model is refused (onnxruntime refuses the model too), and accepted at opset 11."""
    node = helper.make_node("ReduceSum", ["x"], ["y"], name="total", axes=[1], keepdims=1)
    with pytest.raises(ModelError, match=r"node 'total' \(ReduceSum\): attribute 'axes' is not an attribute of "
                                         r"ReduceSum in opset 13"):
        graph_from_onnx(_model([node], opset=13), "m.onnx")
    assert graph_from_onnx(_model([node], opset=11), "m.onnx").output == "y"


# ------------------------------------------------------------------------------------------ runtime forms

I32, I64 = 2 ** 31 - 1, 2 ** 63 - 1
EDGES = [0, 1, 2, 4, 5, 6, -1, -2, -5, -6, -7, 100, -100, I32, -I32 - 1, I64, -I64 - 1]


def _ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _slice_model(start: int, end: int, step: int) -> onnx.ModelProto:
    inits = [("s", [start]), ("e", [end]), ("a", [1]), ("st", [step])]
    return _model([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"], name="cut")],
                  [(k, np.array(v, dtype=np.int64)) for k, v in inits], shape=(5,))


def test_slice_agrees_with_onnxruntime_in_every_form_it_accepts() -> None:
    """Starts, ends and steps of every sign and range (INT_MIN and INT_MAX of both widths included): lipcert's
    Slice gives onnxruntime's result, or refuses the form with a one-line error naming the node."""
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    refused = 0
    for start in EDGES:
        for end in EDGES:
            for step in (1, 2, 3, -1, -2, -3):
                node = Node("cut", "Slice", ["x", "s", "e", "a", "st"], ["y"])
                args = [torch.from_numpy(x)] + [torch.tensor([v]) for v in (start, end, 1, step)]
                try:
                    mine = REGISTRY["Slice"].run(node, args, RunContext())[0].numpy()
                except ModelError as exc:
                    assert "node 'cut' (Slice)" in str(exc) and step < 0 and end in (I32, I64)
                    refused += 1
                    continue
                theirs = _ort(_slice_model(start, end, step), x)[0]
                assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (start, end, step)
    assert refused == 2 * len(EDGES) * 3  # exactly the INT_MAX ends with a negative step


def test_slice_that_runtimes_read_differently_is_refused_at_load() -> None:
    with pytest.raises(ModelError, match=r"node 'cut' \(Slice\): end 2147483647 with the negative step -1"):
        graph_from_onnx(_slice_model(-1, I32, -1), "m.onnx")


def _topk_model(k: int, sorted_: int, largest: int = 1) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["y", "i"], name="top", axis=-1, sorted=sorted_, largest=largest)
    return _model([node], [("k", np.array([k], dtype=np.int64))], shape=(10,),
                  outputs=(("y", TensorProto.FLOAT), ("i", TensorProto.INT64)))


@pytest.mark.parametrize("largest", [0, 1])
def test_topk_values_and_tie_order_agree_with_onnxruntime(largest: int) -> None:
    x = np.array([[1, 2, 2, 1, 2, 0, 3, 3, 1, 0], [5, 4, 3, 2, 1, 1, 2, 3, 4, 5]], dtype=np.float32)
    node = Node("top", "TopK", ["x", "k"], ["y", "i"], {"axis": -1, "sorted": 1, "largest": largest})
    for k in range(0, 11):
        mine = REGISTRY["TopK"].run(node, [torch.from_numpy(x), torch.tensor([k])], RunContext())
        theirs = _ort(_topk_model(k, 1, largest), x)
        assert np.array_equal(mine[0].numpy(), theirs[0]) and np.array_equal(mine[1].numpy(), theirs[1]), k


def test_unsorted_topk_is_refused_unless_one_entry() -> None:
    """onnxruntime returns sorted=0 results in its own order (discontinuous in x): refused for k > 1."""
    x = np.array([[1, 5, 3, 4, 2, 0, 7, 6, 9, 8]], dtype=np.float32)
    assert not np.array_equal(_ort(_topk_model(3, 0), x)[0], np.sort(x)[:, ::-1][:, :3])
    with pytest.raises(ModelError, match=r"node 'top' \(TopK\): sorted=0 with k = 3"):
        graph_from_onnx(_topk_model(3, 0), "m.onnx")
    graph = graph_from_onnx(_topk_model(1, 0), "m.onnx")
    assert graph.output == "y"
