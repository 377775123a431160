"""lipcert's operators against onnxruntime over enumerated attribute and input forms.

lipcert proves facts about its own executor (``REGISTRY[op].run``); the deployed model is run by onnxruntime.
Each form below is a one-node model (an operator, its attributes, its inputs, an opset among 11, 13, 17, 18 and the
newest onnxruntime accepts), enumerated over the attribute values and input shapes the specification allows:
auto_pad with odd and even sizes, strides, dilations, asymmetric pads, negative axes and indices, pads larger
than their axis, every split form, casts between every held type, and so on. Each runs through its registry entry
(attributes decoded and checked by the loader, inputs held as the loader holds them) in float32 and float64, and
through onnxruntime on the CPU with graph optimisations off and on. Some forms, and small models of several
nodes, also run as models (``graph_from_onnx`` and ``GraphModule``).

Every form ends in one of three ways, counted per family (the totals are printed at the end of the run):

* matched: float outputs within ``RTOL`` of each entry's own magnitude (of the terms it sums, where they cancel:
  BatchNormalization), integer and boolean outputs and all shapes exactly;
* refused by lipcert: a one-line ``ModelError`` "node 'NAME' (OP): ..." whose reason the form names, for the
  forms where onnxruntime and the specification disagree or the specification leaves the result to the runtime
  (docs/verify.md, "Forms the specification leaves to the runtime");
* refused by onnxruntime (it raises at either optimisation level): skipped.

Anything else (a mismatch, a refusal the form does not name, a form lipcert should refuse but runs, any other
exception) fails the family's test, listing the forms.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert.errors import LipcertError, ModelError
from lipcert.graph.core import Node
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.model.onnx_loader import array_to_torch, graph_from_onnx, node_from_onnx

from .conftest import ir_version, newest_opset

#: float outputs: |ours - onnxruntime| <= RTOL * (|onnxruntime| + FLOOR), entry by entry
RTOL, FLOOR = 1e-5, 1e-6
NEWEST = newest_opset()
OPSETS = tuple(sorted({11, 13, 17, 18, NEWEST}))
LEVELS = {"optimisations off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "optimisations on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
#: ONNX element types of the numpy types the forms use
ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
        np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
        np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
        np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
        np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
#: operators whose inputs are all parameters (no data input): every input is an initializer
NO_DATA = {"Range", "ConstantOfShape", "Constant"}

#: (family, outcome) -> number of forms: outcome is matched, refused (by lipcert) or ort-refused
TALLY: Counter = Counter()


def tally_line() -> str:
    """The forms enumerated so far: matched, refused by lipcert, refused by onnxruntime (for the run's summary)."""
    total = Counter()
    for (_, outcome), count in TALLY.items():
        total[outcome] += count
    changed = total.pop("optimisations change the function", 0)
    return (f"{sum(total.values())} forms: {total['matched']} matched onnxruntime, {total['refused']} refused by "
            f"lipcert, {total['ort-refused']} refused by onnxruntime (skipped); {changed} models whose function "
            "onnxruntime's graph optimisations change")


# ------------------------------------------------------------------------------------------ building and running

@dataclass
class Form:
    """One single-node model: the operator, its inputs (None: an omitted optional input), attributes and opset,
    how many outputs it has, and, where lipcert must refuse it, a pattern of the reason it gives."""

    op: str
    inputs: tuple[np.ndarray | None, ...]
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1
    refused: str | None = None
    #: the absolute size of the terms an output entry sums, where they cancel: the tolerance is RTOL * (|entry| +
    #: floor) (two runtimes round the terms of x * f + b, or (x - m) f + b, differently)
    floor: float = FLOOR

    def __str__(self) -> str:
        shapes = ", ".join("-" if a is None else f"{a.dtype}{list(a.shape)}" for a in self.inputs)
        return f"{self.op}({shapes}) {self.attrs} opset {self.opset}"


def single_node(form: Form) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The form as a model, and its feeds: the first input is the graph input ``x`` (for operators with a data
    input), the others initializers, so that onnxruntime runs its constant-input code paths."""
    names, inputs, inits, feeds = [], [], [], {}
    for i, array in enumerate(form.inputs):
        if array is None:
            names.append("")
            continue
        name = "x" if i == 0 and form.op not in NO_DATA else f"c{i}"
        names.append(name)
        if name == "x":
            inputs.append(helper.make_tensor_value_info(name, ELEM[array.dtype], array.shape))
            feeds[name] = array
        else:
            inits.append(numpy_helper.from_array(array, name))
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(form.op, names, [f"y{k}" for k in range(form.outputs)], name="n", **form.attrs)
    graph = helper.make_graph([node], "form", inputs, [onnx.ValueInfoProto(name=f"y{k}") for k in range(form.outputs)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", form.opset)],
                              ir_version=ir_version(form.opset))
    return model, feeds


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """onnxruntime on the CPU, on one thread that does not spin (idle pools would slow torch down)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]] | None:
    """onnxruntime's outputs at each optimisation level, or None when it refuses the model at either."""
    try:
        return {label: session(model, level).run(None, feeds) for label, level in LEVELS.items()}
    except Exception:  # noqa: BLE001 - onnxruntime refusing a form is an outcome, not a failure
        return None


def run_registry(model: onnx.ModelProto, form: Form, dtype: torch.dtype) -> list[torch.Tensor]:
    """The node through its registry entry, attributes decoded as the loader decodes them, inputs held as the
    loader holds them (in float64 for a float64 run)."""
    node = node_from_onnx(model.graph.node[0], 0, "forms", opset=form.opset)
    args = []
    for array in form.inputs:
        tensor = None if array is None else array_to_torch(array)
        if tensor is not None and tensor.is_floating_point() and dtype == torch.float64:
            tensor = tensor.double()
        args.append(tensor)
    with torch.no_grad():
        return REGISTRY[node.op].run(node, args, RunContext(dtype))


def differs(ours: torch.Tensor, ref: np.ndarray, dtype: torch.dtype = torch.float32, loose: bool = False,
            floor: float = FLOOR) -> str:
    """Empty when ``ours`` is onnxruntime's ``ref``: the same shape; floats (half types as lipcert holds them) within
    RTOL of each entry (``loose``: of the largest entry, for float64 runs against float32), NaN and infinities
    alike; integers and booleans exactly, in the type lipcert holds them in. Else what differs."""
    mine = ours.detach().cpu()
    if ref.dtype == ml_dtypes.bfloat16:
        ref = ref.astype(np.float32)
    if tuple(mine.shape) != ref.shape:
        return f"shape {tuple(mine.shape)}, onnxruntime {ref.shape}"
    if ref.dtype.kind != "f":
        held = array_to_torch(ref)
        if mine.dtype != held.dtype:
            return f"type {mine.dtype}, onnxruntime {ref.dtype}"
        return "" if torch.equal(mine, held) else f"values {mine.reshape(-1)[:8].tolist()}, onnxruntime " \
                                                  f"{held.reshape(-1)[:8].tolist()}"
    if not mine.is_floating_point():
        return f"type {mine.dtype}, onnxruntime {ref.dtype}"
    want = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): dtype}.get(ref.dtype, dtype)
    if mine.dtype != want:
        return f"type {mine.dtype} in a {dtype} run, onnxruntime {ref.dtype}"
    a, b = mine.double().numpy(), ref.astype(np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return "NaN in different places"
    finite = np.isfinite(b) & ~np.isnan(a)
    if not np.array_equal(a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)]):
        return "infinities differ"
    scale = float(np.abs(b[finite]).max()) if loose and finite.any() else 0.0
    error = np.abs(a[finite] - b[finite])
    allowed = RTOL * (np.abs(b[finite]) + max(floor, scale))
    if (error > allowed).any():
        i = int(np.argmax(error - allowed))
        return f"{a[finite][i]!r} where onnxruntime has {b[finite][i]!r}"
    return ""


def refusal(exc: LipcertError, node: str, op: str, expected: str | None) -> str:
    """Empty when ``exc`` is the refusal the form names: one line, naming the node, with the expected reason."""
    text = exc.text
    if not text.startswith(f"node '{node}' ({op}): "):
        return f"refused without naming the node: {text}"
    if expected is None:
        return f"refused: {text}"
    return "" if re.search(expected, text) else f"refused for another reason: {text}"


def check_form(form: Form, float64: bool = True) -> tuple[str, str]:
    """(outcome, problem): run the form through onnxruntime and lipcert and compare (see the module docstring)."""
    model, feeds = single_node(form)
    refs = reference(model, feeds)
    if refs is None:
        return "ort-refused", ""
    try:
        ours = run_registry(model, form, torch.float32)
    except ModelError as exc:
        return "refused", refusal(exc, "n", form.op, form.refused)
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug in lipcert
        return "error", f"{type(exc).__name__}: {exc}"
    if form.refused is not None:
        return "matched", f"ran, but should be refused ({form.refused})"
    for label, outs in refs.items():
        for k, (mine, ref) in enumerate(zip(ours, outs)):
            problem = differs(mine, ref, floor=form.floor)
            if problem:
                return "mismatch", f"output {k} against onnxruntime ({label}): {problem}"
    if float64 and any(a is not None and a.dtype.kind == "f" for a in form.inputs):  # constants are float32
        for k, (mine, ref) in enumerate(zip(run_registry(model, form, torch.float64), refs["optimisations off"])):
            problem = differs(mine, ref, torch.float64, loose=True)
            if problem:
                return "mismatch", f"output {k} of the float64 run: {problem}"
    return "matched", ""


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on these tiny tensors, waking its thread pool after each onnxruntime session costs
    milliseconds per operator."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_family(family: str, forms: Iterable[Form], float64: bool = True) -> Counter:
    """Check every form, count the outcomes under ``family`` and fail listing the forms that went wrong."""
    problems, counts = [], Counter()
    with one_torch_thread():
        for form in forms:
            outcome, problem = check_form(form, float64)
            counts[outcome] += 1
            if problem:
                problems.append(f"{form}: {problem}")
    TALLY.update({(family, outcome): count for outcome, count in counts.items()})
    assert not problems, f"{len(problems)} of {sum(counts.values())} {family} forms went wrong:\n" + \
        "\n".join(problems[:30])
    assert counts["matched"], f"no {family} form ran on both sides: {dict(counts)}"
    return counts


# ------------------------------------------------------------------------------------------ models of several nodes

@dataclass
class Net:
    """A small model: one float32 input ``x`` (axis 0 a free batch axis) and output ``y``, run as lipcert runs a
    model. ``optimiser_differs``: onnxruntime's graph optimisations change what it computes (see
    ``test_onnxruntime_optimisations_that_change_the_function``), so only the unoptimised run is compared."""

    name: str
    nodes: list
    x: np.ndarray
    inits: dict = field(default_factory=dict)
    opset: int = 17
    refused: str | None = None
    optimiser_differs: bool = False
    #: compare the float64 run too (not for casts to half types, which a float64 run keeps exact)
    float64: bool = True

    def model(self) -> onnx.ModelProto:
        nodes = [onnx.NodeProto() for _ in self.nodes]
        for i, (copy, node) in enumerate(zip(nodes, self.nodes)):
            copy.CopyFrom(node)
            copy.name = copy.name or f"{node.op_type.lower()}_{i}"
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *self.x.shape[1:]])
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in self.inits.items()]
        graph = helper.make_graph(nodes, self.name, [x], [onnx.ValueInfoProto(name="y")], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                 ir_version=ir_version(self.opset))


def check_net(net: Net) -> tuple[str, str]:
    """(outcome, problem) for a model: loaded by ``graph_from_onnx``, run by ``GraphModule`` in float32 and
    float64, compared with onnxruntime as ``check_form`` compares."""
    model = net.model()
    refs = reference(model, {"x": net.x})
    if refs is None:
        return "ort-refused", ""
    try:
        graph = graph_from_onnx(model, net.name)
        module = GraphModule(graph)
        with torch.no_grad():
            ours = module(torch.from_numpy(net.x))
            wide = module.to(torch.float64)(torch.from_numpy(net.x).double())
    except ModelError as exc:
        node = next((n.name for n in model.graph.node if exc.text.startswith(f"node '{n.name}'")), "?")
        op = next((n.op_type for n in model.graph.node if n.name == node), "?")
        return "refused", refusal(exc, node, op, net.refused)
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug in lipcert
        return "error", f"{type(exc).__name__}: {exc}"
    if net.refused is not None:
        return "matched", f"ran, but should be refused ({net.refused})"
    for label, outs in refs.items():
        if net.optimiser_differs and label == "optimisations on":
            continue
        problem = differs(ours, outs[0])
        if problem:
            return "mismatch", f"against onnxruntime ({label}): {problem}"
    problem = differs(wide, refs["optimisations off"][0], torch.float64, loose=True) if net.float64 else ""
    return ("mismatch", f"float64 run: {problem}") if problem else ("matched", "")


def check_nets(family: str, nets: Iterable[Net]) -> Counter:
    """``check_family`` for models."""
    problems, counts = [], Counter()
    with one_torch_thread():
        for net in nets:
            outcome, problem = check_net(net)
            counts[outcome] += 1
            if problem:
                problems.append(f"{net.name} (opset {net.opset}): {problem}")
    TALLY.update({(family, outcome): count for outcome, count in counts.items()})
    assert not problems, f"{len(problems)} of {sum(counts.values())} {family} models went wrong:\n" + \
        "\n".join(problems[:30])
    assert counts["matched"], f"no {family} model ran on both sides: {dict(counts)}"
    return counts


# ------------------------------------------------------------------------------------------ data

@cache
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def grid(*shape: int, seed: int = 0, low: int = -8, high: int = 8) -> np.ndarray:
    """float32 multiples of 1/4 in [low/4, high/4]: sums and products of a few of them are exact in float32, so
    that every runtime's order of accumulation gives the same value."""
    return (np.random.default_rng(seed).integers(low, high + 1, shape) / 4).astype(np.float32)


def whole(*shape: int, seed: int = 0, low: int = -3, high: int = 3) -> np.ndarray:
    """float32 small integers (weights): exact products and sums."""
    return np.random.default_rng(seed).integers(low, high + 1, shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(value) -> np.ndarray:
    return np.array(value, dtype=np.float32)


N = helper.make_node


# ------------------------------------------------------------------------------------------ Pad

PAD_PAIRS = [(0, 0), (1, 0), (0, 2), (2, 3), (-1, 0), (0, -2), (-1, 2), (2, -1), (3, 0), (0, 4), (5, 5), (-4, 1),
             (1, -4), (-3, -1), (-2, -2), (-5, 3)]


def pad_refusal(mode: str, shape: tuple[int, ...], pads: list[int]) -> str | None:
    """The reason lipcert refuses a Pad form (``None``: it runs it): reflect, edge and wrap pads of axis 0 (the batch
    axis of a model: they would copy samples into other samples), crops that leave nothing, and an axis cropped at
    one end and padded at the other where the order of the two matters (wrap; reflect further than what
    remains), which the specification does not settle."""
    rank = len(shape)
    if mode != "constant" and (pads[0] or pads[rank]):
        return "padding of axis 0 is not supported"
    for axis, n in enumerate(shape):
        begin, end = pads[axis], pads[axis + rank]
        if mode == "constant":
            if n + begin + end < 0:
                return "remove more than"
            continue
        kept, grow = n - max(0, -begin) - max(0, -end), max(0, begin) + max(0, end)
        if kept < 0 or (kept == 0 and grow):
            return "leave no entry to pad from"
        mixed = min(begin, end) < 0 < max(begin, end)
        if mixed and (mode == "wrap" or (mode == "reflect" and grow >= kept)):
            return "remove entries at one end and pad the other"
    return None


def pad_forms() -> Iterator[Form]:
    """Every mode; pads of zero, positive, negative and beyond-the-axis widths on each axis of a 3-D tensor, on
    inner axes of a 5-D one, and on several axes at once; the value input present, absent and empty; the axes
    input (opset 18) with negative, unsorted and partial axes."""
    x = grid(2, 3, 4, seed=1)
    for opset, mode in itertools.product((11, 13, NEWEST), ("constant", "reflect", "edge", "wrap")):
        for axis, (begin, end) in itertools.product(range(3), PAD_PAIRS):
            pads = [0] * 6
            pads[axis], pads[axis + 3] = begin, end
            value = (f32(2.5),) if mode == "constant" and begin % 2 else ()
            yield Form("Pad", (x, i64(*pads)) + value, {"mode": mode}, opset,
                       refused=pad_refusal(mode, x.shape, pads))
        for pads in ([1, 2, 0, 0, 1, 3], [-1, 1, 2, 1, -2, 0], [2, 0, -1, 0, 3, 1], [1, 1, 1, 1, 1, 1]):
            yield Form("Pad", (x, i64(*pads)), {"mode": mode}, opset, refused=pad_refusal(mode, x.shape, pads))
        x5 = grid(1, 2, 3, 2, 3, seed=2)
        for pads in ([0, 1, 0, 0, 0, 0, 2, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 2, 0, 0, 0, 1, 1],
                     [0, 1, 1, 1, 1, 0, 1, 1, 1, 1]):
            yield Form("Pad", (x5, i64(*pads)), {"mode": mode}, opset, refused=pad_refusal(mode, x5.shape, pads))
    for opset in (13, NEWEST):
        yield Form("Pad", (x, i64(0, 1, 1, 0, 1, 1), np.zeros(0, np.float32)), {}, opset)  # an empty value
        yield Form("Pad", (x, i64(0, 1, 1, 0, 1, 1), None), {}, opset)
        ints = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
        yield Form("Pad", (ints, i64(0, 1, 1, 0, 1, 1), np.array(-7, np.int64)), {}, opset)
        yield Form("Pad", (ints, i64(0, 2, 1, 0, 1, 2)), {"mode": "reflect"}, opset)
    for opset, mode in itertools.product((18, NEWEST), ("constant", "reflect", "edge", "wrap")):
        for axes, pads in [([2], [1, 2]), ([-1], [2, 1]), ([1, 2], [1, 0, 0, 2]), ([2, 1], [0, 1, 2, 0]),
                           ([-1, -2], [1, 1, 1, 1]), ([0, -1], [1, 0, 0, 1]), ([1], [-1, 2]), ([2], [5, 6])]:
            full = [0] * 6
            for i, a in enumerate(axes):
                full[a % 3], full[a % 3 + 3] = pads[i], pads[i + len(axes)]
            value = f32(-1.5) if mode == "constant" else None
            yield Form("Pad", (x, i64(*pads), value, i64(*axes)), {"mode": mode}, opset,
                       refused=pad_refusal(mode, x.shape, full))


def test_pad_forms() -> None:
    counts = check_family("Pad", pad_forms())
    assert counts["refused"] >= 6  # wrap pads that crop one end and pad the other


def test_pad_reflect_and_wrap_longer_than_the_axis_follow_numpy() -> None:
    """The specification describes the modes as numpy.pad's (its example 2 reflects 2 entries of a 2-entry axis):
    longer pads reflect and wrap again. onnxruntime refuses such reflect pads; lipcert follows numpy."""
    x = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    for mode, (begin, end) in itertools.product(("reflect", "wrap", "edge"), [(3, 0), (4, 5), (9, 2), (0, 11)]):
        node = Node("n", "Pad", ["x", "p"], ["y"], {"mode": mode})
        ours = REGISTRY["Pad"].run(node, [torch.from_numpy(x), torch.tensor([0, begin, 0, end])], RunContext())[0]
        assert np.array_equal(ours.numpy(), np.pad(x, [(0, 0), (begin, end)], mode=mode)), (mode, begin, end)
    single = REGISTRY["Pad"].run(Node("n", "Pad", ["x", "p"], ["y"], {"mode": "reflect"}),
                                 [torch.tensor([[5.0]]), torch.tensor([0, 2, 0, 1])], RunContext())[0]
    assert single.tolist() == [[5.0, 5.0, 5.0, 5.0]]  # numpy reflects a single entry onto itself


def test_pad_crop_beyond_the_axis_and_batch_axis_pads() -> None:
    """A constant pad whose crop exceeds its axis keeps the specification's size n + begin + end (torch's pad cannot
    run it); a constant pad of the batch axis runs but has no per-sample linear map or rule."""
    x = torch.arange(12.0).reshape(2, 3, 2)
    node = Node("n", "Pad", ["x", "p"], ["y"], {"mode": "constant"})
    assert REGISTRY["Pad"].run(node, [x, torch.tensor([0, -4, 0, 0, 1, 0])], RunContext())[0].shape == (2, 0, 2)
    assert REGISTRY["Pad"].run(node, [x, torch.tensor([0, -4, 0, 0, 3, 0]), torch.tensor(9.0)],
                               RunContext())[0].tolist() == [[[9.0, 9.0], [9.0, 9.0]]] * 2
    batch = [None, torch.tensor([1, 0, 0, 0, 0, 0])]
    assert REGISTRY["Pad"].run(node, [x] + batch[1:], RunContext())[0].shape == (3, 3, 2)
    assert REGISTRY["Pad"].linear(node, batch, 0, (3, 2), (3, 2)) is None
    assert REGISTRY["Pad"].lipschitz(node, batch, 0, (3, 2), (3, 2)) is None
    with pytest.raises(ModelError, match=r"^node 'n' \(Pad\): pads \(-5, 1\) remove more than the 3 entries"):
        REGISTRY["Pad"].run(Node("n", "Pad", ["x", "p"], ["y"]), [x, torch.tensor([0, -5, 0, 0, 1, 0])], RunContext())


def test_pad_that_runtimes_order_differently_is_refused_at_load() -> None:
    net = Net("wrap-crop", [N("Pad", ["x", "p"], ["y"], name="pad", mode="wrap")], grid(2, 3, 4),
              {"p": i64(0, 0, -1, 0, 0, 2)}, opset=NEWEST)
    with pytest.raises(ModelError, match=r"node 'pad' \(Pad\): wrap pads \(-1, 2\) on axis 2 of 4 entries remove"):
        graph_from_onnx(net.model(), "m.onnx")


# ------------------------------------------------------------------------------------------ convolutions

def conv_forms() -> Iterator[Form]:
    """Conv over auto_pad (NOTSET with symmetric and asymmetric pads, VALID, SAME_UPPER, SAME_LOWER), odd and even
    sizes, kernels 2 and 3, strides 1 to 3, dilations 1 and 2, groups 1 and 2, with and without bias; 1-D and
    3-D forms."""
    for opset, (h, w) in itertools.product((11, NEWEST), ((5, 6), (6, 7))):
        x = grid(1, 2, h, w, seed=h)
        for k, stride, dil, group in itertools.product((2, 3), (1, 2, 3), (1, 2), (1, 2)):
            weight, bias = whole(4, 2 // group, k, k, seed=k), whole(4, seed=3)
            for auto_pad, pads in [("NOTSET", [0, 0, 0, 0]), ("NOTSET", [1, 0, 0, 2]), ("VALID", None),
                                   ("SAME_UPPER", None), ("SAME_LOWER", None)]:
                attrs = {"strides": [stride, stride], "dilations": [dil, dil], "group": group, "auto_pad": auto_pad}
                if pads:
                    attrs["pads"] = pads
                yield Form("Conv", (x, weight, bias) if k == 3 else (x, weight), attrs, opset)
    for opset in (13, 18):
        x1 = grid(1, 2, 7, seed=4)
        for auto_pad, stride, dil in itertools.product(("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"), (1, 2), (1, 3)):
            attrs = {"auto_pad": auto_pad, "strides": [stride], "dilations": [dil]}
            if auto_pad == "NOTSET":
                attrs["pads"] = [2, 1]
            yield Form("Conv", (x1, whole(3, 2, 2, seed=5), whole(3, seed=6)), attrs, opset)
        x3 = grid(1, 2, 4, 3, 5, seed=7)
        for auto_pad in ("NOTSET", "SAME_UPPER", "SAME_LOWER"):
            attrs = {"auto_pad": auto_pad, "strides": [1, 2, 2]}
            if auto_pad == "NOTSET":
                attrs["pads"] = [1, 0, 1, 0, 1, 1]
            yield Form("Conv", (x3, whole(2, 1, 2, 2, 3, seed=8)), dict(attrs, group=2), opset)


def conv_transpose_refusal(auto_pad: str, spatial: tuple[int, ...], attrs: dict, kernel: int) -> str | None:
    """lipcert refuses an output larger than the full transposed convolution where onnxruntime and the
    specification place it differently: auto_pad SAME_* without output_shape (onnxruntime keeps the full size),
    and output_shape under SAME_UPPER (onnxruntime adds the zeros at the end, the specification at the start)."""
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    given = attrs.get("output_shape")
    if given is not None and auto_pad != "SAME_UPPER":
        return None
    for i, n in enumerate(spatial):
        stride, dil = attrs["strides"][i], attrs["dilations"][i]
        full = stride * (n - 1) + attrs.get("output_padding", [0] * len(spatial))[i] + (kernel - 1) * dil + 1
        if full < (given[i] if given is not None else n * stride):
            return "more than the .* of the full transposed convolution"
    return None


def conv_transpose_forms() -> Iterator[Form]:
    """ConvTranspose over the grid of ``conv_forms``, output_padding 0 and 1, and output_shape from two smaller to
    three larger than the full output (where the specification derives the pads from it)."""
    for opset, (h, w) in itertools.product((11, NEWEST), ((4, 5),)):
        x = grid(1, 2, h, w, seed=h)
        for k, stride, dil, group in itertools.product((2, 3), (1, 2, 3), (1, 2), (1, 2)):
            weight, bias = whole(2, 4 // group, k, k, seed=k), whole(4, seed=3)
            for auto_pad, pads in [("NOTSET", [0, 0, 0, 0]), ("NOTSET", [1, 0, 0, 2]), ("VALID", None),
                                   ("SAME_UPPER", None), ("SAME_LOWER", None)]:
                attrs = {"strides": [stride, stride], "dilations": [dil, dil], "group": group, "auto_pad": auto_pad}
                if pads:
                    attrs["pads"] = pads
                for extra in ([0, 0], [1, 0]):
                    form_attrs = dict(attrs, output_padding=extra)
                    yield Form("ConvTranspose", (x, weight, bias), form_attrs, opset,
                               refused=conv_transpose_refusal(auto_pad, (h, w), form_attrs, k))
                full = [stride * (n - 1) + (k - 1) * dil + 1 for n in (h, w)]
                for delta in (-2, -1, 0, 1, 3):
                    form_attrs = dict(attrs, output_shape=[f + delta for f in full])
                    yield Form("ConvTranspose", (x, weight), form_attrs, opset,
                               refused=conv_transpose_refusal(auto_pad, (h, w), form_attrs, k))
    x1 = grid(1, 2, 5, seed=9)
    for auto_pad, stride in itertools.product(("NOTSET", "SAME_UPPER", "SAME_LOWER"), (1, 2, 3)):
        attrs = {"auto_pad": auto_pad, "strides": [stride], "dilations": [1]}
        yield Form("ConvTranspose", (x1, whole(2, 3, 2, seed=10)), attrs, 17,
                   refused=conv_transpose_refusal(auto_pad, (5,), attrs, 2))


def test_conv_forms() -> None:
    check_family("Conv", conv_forms())


@pytest.mark.slow
def test_conv_transpose_forms() -> None:
    counts = check_family("ConvTranspose", conv_transpose_forms())
    assert counts["refused"] >= 20


def test_conv_transpose_outputs_where_onnxruntime_and_the_specification_disagree() -> None:
    """The two disagreements ``conv_transpose_refusal`` names, shown on onnxruntime itself, and refused at load."""
    x, weight = np.arange(1, 6, dtype=np.float32).reshape(1, 1, 5), np.array([[[1.0, 10.0]]], np.float32)
    same = Form("ConvTranspose", (x, weight), {"auto_pad": "SAME_UPPER", "strides": [3]})  # wants 15, full is 14
    model, feeds = single_node(same)
    assert session(model, LEVELS["optimisations off"]).run(None, feeds)[0].shape == (1, 1, 14)
    larger = Form("ConvTranspose", (x, weight), {"auto_pad": "SAME_UPPER", "strides": [2], "output_shape": [11]})
    model, feeds = single_node(larger)
    assert session(model, LEVELS["optimisations off"]).run(None, feeds)[0][0, 0, -1] == 0  # zeros at the end
    for form in (same, larger):
        with pytest.raises(ModelError, match=r"node 'n' \(ConvTranspose\): .*more than the 1[04] of the full"):
            run_registry(single_node(form)[0], form, torch.float32)


# ------------------------------------------------------------------------------------------ pooling

def pool_refusal(op: str, auto_pad: str, dil: int) -> str | None:
    """lipcert refuses dilated average and Lp pooling (not implemented), and SAME_* with dilations, where
    onnxruntime pads for the undilated window and the specification for the dilated one."""
    if dil != 1 and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return "undilated one"
    if dil != 1 and op != "MaxPool":
        return "dilated average or Lp pooling is not supported"
    return None


def pool_forms() -> Iterator[Form]:
    """AveragePool (count_include_pad 0 and 1), MaxPool and LpPool (p 1, 2, 3) over auto_pad, odd and even sizes,
    kernels 2 and 3, strides 1 to 3, dilations 1 and 2 (opset 19+ for average and Lp), symmetric and asymmetric
    pads, ceil_mode 0 and 1; 1-D forms."""
    for opset, (h, w) in itertools.product((11, NEWEST), ((5, 6), (6, 7))):
        x = grid(1, 2, h, w, seed=w)
        for k, stride, dil, ceil in itertools.product((2, 3), (1, 2, 3), (1, 2), (0, 1)):
            for auto_pad, pads in [("NOTSET", [0, 0, 0, 0]), ("NOTSET", [1, 0, 0, 1]), ("NOTSET", [1, 1, 1, 1]),
                                   ("VALID", None), ("SAME_UPPER", None), ("SAME_LOWER", None)]:
                attrs = {"kernel_shape": [k, k], "strides": [stride, stride], "auto_pad": auto_pad, "ceil_mode": ceil}
                if dil != 1:
                    attrs["dilations"] = [dil, dil]
                if pads:
                    attrs["pads"] = pads
                yield Form("MaxPool", (x,), attrs, opset, refused=pool_refusal("MaxPool", auto_pad, dil))
                for include in (0, 1):
                    yield Form("AveragePool", (x,), dict(attrs, count_include_pad=include), opset,
                               refused=pool_refusal("AveragePool", auto_pad, dil))
                yield Form("LpPool", (x,), dict(attrs, p=1 + (k + stride) % 3), opset,
                           refused=pool_refusal("LpPool", auto_pad, dil))
    x1 = grid(1, 2, 7, seed=11)
    for op, auto_pad, ceil in itertools.product(("MaxPool", "AveragePool", "LpPool"),
                                                ("NOTSET", "SAME_UPPER", "SAME_LOWER"), (0, 1)):
        attrs = {"kernel_shape": [3], "strides": [2], "auto_pad": auto_pad, "ceil_mode": ceil}
        if auto_pad == "NOTSET":
            attrs["pads"] = [0, 2]
        yield Form(op, (x1,), attrs, 18)


@pytest.mark.slow
def test_pool_forms() -> None:
    counts = check_family("Pooling", pool_forms())
    assert counts["refused"] >= 50


def test_same_padding_with_dilations_is_refused_in_pooling() -> None:
    """onnxruntime pads a dilated pooling window under auto_pad SAME_* as if it were not dilated; the specification
    pads for the dilated window (ceil(input / stride) outputs). Shown on onnxruntime, refused by lipcert."""
    form = Form("MaxPool", (grid(1, 1, 6, 6, seed=41),), {"kernel_shape": [3, 3], "dilations": [2, 2],
                                                         "auto_pad": "SAME_UPPER"}, 17)
    model, feeds = single_node(form)
    assert session(model, LEVELS["optimisations off"]).run(None, feeds)[0].shape != (1, 1, 6, 6)
    with pytest.raises(ModelError, match=r"^node 'n' \(MaxPool\): auto_pad SAME_UPPER with dilations \[2, 2\]"):
        run_registry(model, form, torch.float32)


def test_global_pool_forms() -> None:
    x = grid(2, 3, 4, 5, seed=12)
    forms = [Form(op, (x,), {}, opset) for op in ("GlobalAveragePool", "GlobalMaxPool") for opset in OPSETS]
    forms += [Form("GlobalLpPool", (x,), {} if p is None else {"p": p}, opset)
              for p in (None, 1, 2, 3) for opset in OPSETS]
    check_family("GlobalPool", forms)


# ------------------------------------------------------------------------------------------ shape plumbing

def plumbing_forms() -> Iterator[Form]:
    """Gather with negative and scalar indices on every axis; GatherElements on every axis; Split in every form;
    Squeeze/Unsqueeze with negative and unsorted axes; Expand; Tile; Flatten on every axis; Reshape with 0, -1 and
    allowzero; every Transpose; DepthToSpace/SpaceToDepth in both modes."""
    x = grid(2, 3, 4, seed=13)
    for opset in OPSETS:
        for axis in (-3, -2, -1, 0, 1, 2):
            for idx in (np.array(-1, np.int64), i64(0, -1, 1), i64(-2, 0).reshape(2, 1), np.array([1, -1], np.int32),
                        np.array(0, np.int32), np.zeros(0, np.int64)):
                yield Form("Gather", (x, idx), {"axis": axis}, opset)
        for axis in (-3, -2, -1, 0, 1, 2):  # GatherElements: negative indices, a shorter axis, int32 indices
            n = x.shape[axis]
            shape = list(x.shape)
            shape[axis] = 2
            idx = (np.arange(int(np.prod(shape))).reshape(shape) % (2 * n) - n).astype(np.int64)
            yield Form("GatherElements", (x, idx), {"axis": axis}, opset)
            yield Form("GatherElements", (x, idx.astype(np.int32)), {"axis": axis}, opset)
        for axis, outputs in itertools.product((-1, 0, 1, 2), (1, 2, 3)):
            n = x.shape[axis]
            yield Form("Split", (x,), {"axis": axis}, opset, outputs)  # equal parts (refused by ORT if uneven)
            if opset >= 18:
                yield Form("Split", (x,), {"axis": axis, "num_outputs": outputs}, opset, outputs)
            for sizes in itertools.product(range(n + 1), repeat=outputs):
                if sum(sizes) != n:
                    continue
                if opset >= 13:
                    yield Form("Split", (x, i64(*sizes)), {"axis": axis}, opset, outputs)
                else:
                    yield Form("Split", (x,), {"axis": axis, "split": list(sizes)}, opset, outputs)
        x7 = grid(2, 7, seed=14)
        if opset >= 18:
            for outputs in (2, 3, 4, 5):  # uneven: ceil(7 / n) each, the last smaller
                yield Form("Split", (x7,), {"axis": 1, "num_outputs": outputs}, opset, outputs)
        ones = x.reshape(2, 1, 3, 1, 4)
        for axes in ([1], [-2], [1, 3], [-4, -2], [3, 1], None, [0]):
            if opset >= 13:
                yield Form("Squeeze", (ones,) + (() if axes is None else (i64(*axes),)), {}, opset)
            else:
                yield Form("Squeeze", (ones,), {} if axes is None else {"axes": axes}, opset)
        for axes in ([0], [-1], [1, -1], [-1, 1], [4, 0], [2, 3], [-5], [1, 1]):
            if opset >= 13:
                yield Form("Unsqueeze", (x, i64(*axes)), {}, opset)
            else:
                yield Form("Unsqueeze", (x,), {"axes": axes}, opset)
        for shape in ([4], [3, 1], [1, 1, 1], [2, 1, 1, 4], [2, 3, 4], [1], [3, 2, 3, 4], [0, 1, 1], [2, 3, 5]):
            yield Form("Expand", (x, i64(*shape)), {}, opset)
        for shape in ([5, 1, 4], [2, 3, 4], [1, 3, 1, 1]):
            yield Form("Expand", (x[:1, :1], i64(*shape)), {}, opset)
        for repeats in ([1, 1, 1], [2, 1, 3], [0, 1, 1], [1, 2, 1]):
            yield Form("Tile", (x, i64(*repeats)), {}, opset)
        for axis in (-3, -2, -1, 0, 1, 2, 3):
            yield Form("Flatten", (x,), {"axis": axis}, opset)
        for shape in ([0, -1], [-1], [0, 0, -1], [0, 12], [4, 0, 3], [-1, 0], [2, 3, 2, 2], [0, 3, 0], [2, -1, 2],
                      [24], [-1, -1], [5, -1], [0, 0, 0, 0]):
            for allowzero in ((0, 1) if opset >= 14 else (None,)):
                bad = shape.count(-1) > 1 or (allowzero and 0 in shape and -1 in shape)
                yield Form("Reshape", (x, i64(*shape)), {} if allowzero is None else {"allowzero": allowzero},
                           opset, refused="is invalid" if bad else None)
        empty = np.zeros((2, 0, 3), np.float32)
        for shape in ([0, 3], [0, -1], [3, 0], [0, 0, 3], [-1, 0], [2, 0]):
            for allowzero in ((0, 1) if opset >= 14 else (None,)):
                bad = allowzero and 0 in shape and -1 in shape
                yield Form("Reshape", (empty, i64(*shape)), {} if allowzero is None else {"allowzero": allowzero},
                           opset, refused="is invalid" if bad else None)
        for perm in itertools.permutations(range(3)):
            yield Form("Transpose", (x,), {"perm": list(perm)}, opset)
        yield Form("Transpose", (x,), {}, opset)
        x4 = grid(2, 8, 2, 3, seed=15)
        for block, mode in itertools.product((1, 2), (None, "DCR", "CRD")):
            attrs = {"blocksize": block} if mode is None else {"blocksize": block, "mode": mode}
            yield Form("DepthToSpace", (x4,), attrs, opset)
            yield Form("SpaceToDepth", (x4.reshape(2, 2, 4, 6),), attrs, opset)


def test_plumbing_forms() -> None:
    check_family("Shape plumbing", plumbing_forms())


def test_reshape_with_0_and_minus_1_under_allowzero_is_refused() -> None:
    """The specification forbids a shape with both 0 and -1 when allowzero is set; onnxruntime runs it."""
    node = Node("r", "Reshape", ["x", "s"], ["y"], {"allowzero": 1})
    with pytest.raises(ModelError, match=r"^node 'r' \(Reshape\): shape \[0, -1\] is invalid"):
        REGISTRY["Reshape"].run(node, [torch.zeros(2, 0, 3), torch.tensor([0, -1])], RunContext())


# ------------------------------------------------------------------------------------------ selections and reductions

def reduction_forms() -> Iterator[Form]:
    """ArgMax with ties (first and last index), keepdims, negative axes; ReduceSum/Mean/Max/Min/L2 with axes as an
    input and as an attribute, negative and repeated-free axes, keepdims, noop_with_empty_axes, empty axes, and
    an input with an empty axis."""
    ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2], [0, 0, 0, 0]], np.float32)[None].repeat(2, 0)
    x = grid(2, 3, 4, seed=16)
    for opset in OPSETS:
        for axis, keep in itertools.product((-3, -1, 0, 1, 2), (0, 1)):
            for last in ((0, 1) if opset >= 12 else (0,)):
                yield Form("ArgMax", (ties,), {"axis": axis, "keepdims": keep, "select_last_index": last}, opset)
        yield Form("ArgMax", (ties,), {}, opset)
        for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2"):
            as_input = opset >= (13 if op == "ReduceSum" else 18)
            for data, axes, keep in itertools.product(
                    (x, np.zeros((2, 0, 3), np.float32)),
                    ([0], [-1], [1, 2], [-1, 0], [], None, [0, 1, 2], [2, -2]), (0, 1)):
                for noop in ((0, 1) if as_input else (None,)):
                    attrs = {"keepdims": keep}
                    if noop is not None:
                        attrs["noop_with_empty_axes"] = noop
                    if as_input:
                        inputs = (data,) if axes is None else (data, i64(*axes) if axes else np.zeros(0, np.int64))
                    else:
                        if axes == []:
                            continue
                        inputs = (data,)
                        if axes is not None:
                            attrs["axes"] = axes
                    yield Form(op, inputs, attrs, opset, refused=reduce_refusal(op, data.shape, axes, noop))


def reduce_refusal(op: str, shape: tuple[int, ...], axes: list[int] | None, noop: int | None) -> str | None:
    """lipcert refuses two reductions of a tensor with no entries: over negative axes (onnxruntime returns the
    input's shape), and the mean of no entries (undefined in the specification, 0 in onnxruntime)."""
    if math.prod(shape) or (not axes and noop):
        return None
    if axes and min(axes) < 0:
        return "over the negative axes"
    reduced = {a % len(shape) for a in axes} if axes else set(range(len(shape)))
    kept = math.prod(d for i, d in enumerate(shape) if i not in reduced)
    if op == "ReduceMean" and kept and any(shape[a] == 0 for a in reduced):
        return "the mean of no entries"
    return None


def test_reduction_forms() -> None:
    counts = check_family("ArgMax and Reduce", reduction_forms())
    assert counts["refused"] >= 30


def test_reductions_of_no_entries_where_runtimes_differ_are_refused() -> None:
    """A tensor with no entries: negative axes make onnxruntime return the input's shape, and the mean of no entries
    is undefined (onnxruntime: 0); the other empty reductions follow the specification (a sum of no entries is 0)."""
    empty = torch.zeros(2, 0, 3)
    mean, total = REGISTRY["ReduceMean"], REGISTRY["ReduceSum"]
    node = Node("r", "ReduceMean", ["x", "a"], ["y"], {"keepdims": 0})
    with pytest.raises(ModelError, match=r"^node 'r' \(ReduceMean\): the mean of no entries is left undefined"):
        mean.run(node, [empty, torch.tensor([1])], RunContext())
    assert mean.run(node, [empty, torch.tensor([2])], RunContext())[0].shape == (2, 0)
    node = Node("r", "ReduceSum", ["x", "a"], ["y"], {"keepdims": 0})
    assert total.run(node, [empty, torch.tensor([1])], RunContext())[0].tolist() == [[0.0] * 3] * 2
    with pytest.raises(ModelError, match=r"^node 'r' \(ReduceSum\): reduces a tensor with no entries .* negative"):
        total.run(node, [empty, torch.tensor([-1])], RunContext())
    assert total.run(node, [torch.ones(2, 3), torch.tensor([-1])], RunContext())[0].tolist() == [3.0, 3.0]


def topk_and_misc_forms() -> Iterator[Form]:
    """TopK over k, axis and largest (sorted); Concat on every axis; Shape with start and end; Size;
    ConstantOfShape with every value type; Constant in each form; Dropout's ratio, seed and training mode;
    Max/Min/Sum/Mean with broadcasting; Where; comparisons and logic."""
    ties = np.array([[1, 3, 3, 0, 2, 2], [0, 0, 0, 1, 1, 1]], np.float32)
    x = grid(2, 3, 4, seed=17)
    for opset in OPSETS:
        for k, axis, largest in itertools.product((0, 1, 2, 6), (-1, 1, 0, -2), (0, 1)):
            yield Form("TopK", (ties, i64(min(k, ties.shape[axis]))), {"axis": axis, "largest": largest}, opset, 2)
        for axis in (-3, -1, 0, 1, 2):
            yield Form("Concat", (x, x * 2, x - 1), {"axis": axis}, opset)
        for start, end in [(None, None), (1, None), (-1, None), (0, 2), (-2, -1), (1, 10), (-10, 2), (2, 1)]:
            if opset >= 15 or (start, end) == (None, None):
                attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
                yield Form("Shape", (x,), attrs, opset)
        yield Form("Size", (x,), {}, opset)
        for value in (None, f32([2.5]), i64(3), np.array([1], np.int32), np.array([True]), np.array([1.5], np.float64)):
            for shape in (i64(2, 3), np.zeros(0, np.int64), i64(1, 0, 2)):
                attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
                yield Form("ConstantOfShape", (shape,), attrs, opset)
        for attrs in ({"value": numpy_helper.from_array(f32([[1.5, -2.0]]))}, {"value_float": 0.25},
                      {"value_floats": [1.0, -3.5]}, {"value_int": 7}, {"value_ints": [1, -2, 3]},
                      {"value": numpy_helper.from_array(i64(4))}):
            if opset >= 12 or "value" in attrs:
                yield Form("Constant", (), attrs, opset)
        for op in ("Max", "Min", "Sum", "Mean"):
            for shapes in [((2, 3, 4),), ((2, 3, 4), (4,)), ((3, 1), (2, 3, 4), (1, 1, 4)), ((1,), (2, 1, 1))]:
                yield Form(op, tuple(grid(*s, seed=len(s)) for s in shapes), {}, opset)
        for cond, a, b in [((2, 3, 4), (2, 3, 4), ()), ((4,), (2, 3, 1), (1,)), ((), (3, 4), (2, 1, 1))]:
            mask = rng(1).integers(0, 2, cond).astype(bool)
            yield Form("Where", (mask, grid(*a, seed=1), grid(*b, seed=2)), {}, opset)
        for op in ("Equal", "Less", "Greater"):
            yield Form(op, (x, grid(4, seed=3)), {}, opset)
        yield Form("Equal", (np.array([[1, 0, 3]], np.int64), i64(1)), {}, opset)
        if opset >= 12:
            for ratio in (0.0, 0.5):
                yield Form("Dropout", (x, f32(ratio)), {"seed": 3}, opset, 2 if opset >= 13 else 1)
                yield Form("Dropout", (x, f32(ratio), np.array(False)), {}, opset, 2)
            yield Form("Dropout", (x, f32(0.0), np.array(True)), {}, opset, 2)
        else:
            yield Form("Dropout", (x,), {"ratio": 0.3}, opset)


def test_topk_and_misc_forms() -> None:
    check_family("TopK, Concat, Shape, constants, variadic", topk_and_misc_forms())


# ------------------------------------------------------------------------------------------ casts

CAST_VALUES = np.array([0, 1, -1, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, -0.9, 0.1, 1e-8, -1e-8, 127.7, -128.9, 255.9,
                        256, -129, 65504, 65520, 70000, -70000, 2 ** 24 + 1, 3e9, -3e9, 2 ** 31, 1e10, 1e38],
                       np.float64)
HELD = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
        TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8,
        TensorProto.INT16: np.int16, TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
        TensorProto.BOOL: np.bool_}
FLOATS = (np.float32, np.float16, np.float64, ml_dtypes.bfloat16)
INTEGERS = (np.uint8, np.int8, np.int16, np.int32, np.int64)


def cast_sources(to: int) -> Iterator[np.ndarray]:
    """Values of every held type: for float sources, the values in range of integer target ``to`` and, apart, the
    whole list (which a cast to an integer type lipcert refuses when an entry is out of range or NaN)."""
    for kind in HELD.values():
        if kind in FLOATS:
            with np.errstate(over="ignore", invalid="ignore"):
                values = CAST_VALUES.astype(np.float32).astype(kind)
            values = values[np.isfinite(values.astype(np.float64))]
            yield values
            if HELD[to] in INTEGERS:
                info = np.iinfo(HELD[to])
                inside = np.trunc(values.astype(np.float64))
                yield values[(inside >= info.min) & (inside <= info.max)]
        elif kind is np.bool_:
            yield np.array([True, False])
        else:
            info = np.iinfo(kind)
            values = np.array([0, 1, -1, info.min, info.max, 100, -100, 255, 256, 65535, 2 ** 24 + 1, 2 ** 31 - 1])
            yield values[(values >= info.min) & (values <= info.max)].astype(kind)


def cast_forms() -> Iterator[Form]:
    """Cast from every held type to every held type, at opsets 13, 19 and the newest (bfloat16 needs 13)."""
    for opset, to in itertools.product((13, 19, NEWEST), HELD):
        for source in cast_sources(to):
            outside = False
            if source.dtype.type in FLOATS and HELD[to] in INTEGERS:
                info, whole_part = np.iinfo(HELD[to]), np.trunc(source.astype(np.float64))
                outside = bool(((whole_part < info.min) | (whole_part > info.max)).any())
            yield Form("Cast", (source,), {"to": to}, opset, refused="whose range it is outside" if outside else None)


def test_cast_forms() -> None:
    counts = check_family("Cast", cast_forms(), float64=False)  # a float64 run keeps float casts exact
    assert counts["refused"] >= 30


def test_cast_of_an_out_of_range_float_to_an_integer_is_refused_when_it_happens() -> None:
    """The specification leaves a float cast to an integer type undefined out of range (runtimes differ: x86 and
    ARM convert 300.0 to uint8 differently), so lipcert refuses the node the first time a value needs it."""
    node = Node("c", "Cast", ["x"], ["y"], {"to": TensorProto.UINT8})
    cast = REGISTRY["Cast"]
    assert cast.run(node, [torch.tensor([0.0, -0.9, 255.9])], RunContext())[0].tolist() == [0, 0, 255]
    for value in (-1.0, 256.0, float("nan"), float("inf")):
        with pytest.raises(ModelError, match=r"^node 'c' \(Cast\): casts .* to uint8, whose range it is outside"):
            cast.run(node, [torch.tensor([1.0, value])], RunContext())
    wide = Node("c", "Cast", ["x"], ["y"], {"to": TensorProto.INT64})
    assert cast.run(wide, [torch.tensor([-2.0 ** 63])], RunContext())[0].item() == -2 ** 63
    with pytest.raises(ModelError, match="whose range it is outside"):
        cast.run(wide, [torch.tensor([2.0 ** 63])], RunContext())


def cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return N("Cast", [src], [dst], to=to)


def cast_nets() -> Iterator[Net]:
    """Casts followed by arithmetic, as models: through float64, integers (truncation, integer division and the
    wrap of 8-bit arithmetic) and booleans, and back to float32; half types followed by operators that are exact
    in them (their results are representable, so holding them in float32 changes nothing)."""
    x = grid(2, 8, seed=18) * 3
    for opset in (13, 17, NEWEST):
        yield Net("double-arithmetic", [cast("x", "d", TensorProto.DOUBLE), N("Mul", ["d", "k"], ["m"]),
                                        N("Add", ["m", "d"], ["s"]), cast("s", "y", TensorProto.FLOAT)],
                  x, {"k": np.array(0.1, np.float64)}, opset)
        yield Net("int-division", [cast("x", "i", TensorProto.INT64), N("Div", ["i", "k"], ["q"]),
                                   N("Mul", ["q", "k"], ["m"]), cast("m", "y", TensorProto.FLOAT)],
                  x, {"k": i64(-3)}, opset)
        yield Net("int32-sub-neg-abs", [cast("x", "i", TensorProto.INT32), N("Sub", ["i", "k"], ["s"]),
                                        N("Neg", ["s"], ["n"]), N("Abs", ["n"], ["a"]),
                                        cast("a", "y", TensorProto.FLOAT)],
                  x, {"k": np.array([5], np.int32)}, opset)
        yield Net("uint8-wraps", [N("Abs", ["x"], ["p"]), cast("p", "u", TensorProto.UINT8),
                                  N("Mul", ["u", "k"], ["m"]), cast("m", "y", TensorProto.FLOAT)],
                  x, {"k": np.array(100, np.uint8)}, opset)
        yield Net("bool-mask", [cast("x", "b", TensorProto.BOOL), cast("b", "f", TensorProto.FLOAT),
                                N("Mul", ["x", "f"], ["y"])], x, {}, opset)
        for half in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            yield Net("half-exact-ops", [cast("x", "h", half), N("Relu", ["h"], ["r"]), N("Neg", ["r"], ["n"]),
                                         N("Max", ["n", "h"], ["m"]), cast("m", "y", TensorProto.FLOAT)],
                      x * 1000 + 0.1, {}, opset, float64=False)
            yield Net("half-round-trip-to-int", [cast("x", "h", half), cast("h", "i", TensorProto.INT32),
                                                 cast("i", "y", TensorProto.FLOAT)], x * 37, {}, opset, float64=False)
        yield Net("uint8-out-of-range", [N("Cast", ["x"], ["u"], to=TensorProto.UINT8, name="to_u8"),
                                         cast("u", "y", TensorProto.FLOAT)],
                  x, {}, opset, refused="whose range it is outside")


def test_cast_nets() -> None:
    counts = check_nets("Cast (models)", cast_nets())
    assert counts["refused"] == 3


def test_half_precision_arithmetic_is_held_wider() -> None:
    """Left alone, documented: lipcert holds half-type values in float32 (the loader widens them), so a cast to
    float16 rounds, and arithmetic after it runs in float32, where the specification rounds each result to float16
    (and onnxruntime's CPU kernels run it in float32 too, rounding where their inserted casts say). The results
    stay within one float16 rounding of each other; the load-time cross-check compares every intermediate value
    with onnxruntime's and names the node where they part."""
    x = grid(2, 8, seed=19) * 3 + 0.1
    net = Net("half-div", [N("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), N("Div", ["h", "k"], ["q"]),
                           N("Cast", ["q"], ["y"], to=TensorProto.FLOAT)], x, {"k": np.array(3, np.float16)})
    model = net.model()
    theirs = session(model, LEVELS["optimisations off"]).run(None, {"x": x})[0]
    ours = GraphModule(graph_from_onnx(model, "half-div"))(torch.from_numpy(x)).detach().numpy()
    assert np.array_equal(ours, x.astype(np.float16).astype(np.float32) / np.float32(3))
    assert np.all(np.abs(ours - theirs) <= 2.0 ** -10 * np.abs(theirs))


# ------------------------------------------------------------------------------------------ arithmetic layers

def arithmetic_forms() -> Iterator[Form]:
    """Clip with and without bounds (and min > max); Softmax/LogSoftmax on every axis from opset 13 (older opsets
    are models: the loader rewrites their 2-D meaning); Gemm over transA/transB/alpha/beta with C broadcast;
    MatMul broadcasting; BatchNormalization on 2-D to 4-D inputs; PRelu broadcasting; Elu/LeakyRelu alpha; Pow
    with integer and float exponents; Range in float and integer types with negative deltas; elementwise
    arithmetic on integer types."""
    x = grid(2, 3, 4, seed=20)
    for opset in OPSETS:
        for low, high in [(None, None), (-0.5, None), (None, 0.5), (-0.5, 0.5), (0.5, -0.5), (1.0, 1.0)]:
            yield Form("Clip", (x, None if low is None else f32(low), None if high is None else f32(high)), {}, opset)
        if opset >= 13:
            for op, axis in itertools.product(("Softmax", "LogSoftmax"), (None, -3, -2, -1, 0, 1, 2)):
                yield Form(op, (x,), {} if axis is None else {"axis": axis}, opset)
        a, b = whole(3, 4, seed=21), whole(4, 5, seed=22)
        for trans_a, trans_b, (alpha, beta) in itertools.product((0, 1), (0, 1), [(1.0, 1.0), (0.5, -2.0), (0.0, 1.0),
                                                                                   (2.0, 0.0)]):
            for c in (None, whole(5, seed=23), f32([1.5]), whole(3, 1, seed=24), whole(3, 5, seed=25),
                      whole(1, 5, seed=26), f32(2.0)):
                inputs = (a.T.copy() if trans_a else a, b.T.copy() if trans_b else b) + (() if c is None else (c,))
                yield Form("Gemm", inputs, {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}, opset)
        for left, right in [((3,), (3,)), ((3,), (3, 4)), ((2, 3), (3,)), ((2, 3), (3, 4)), ((5, 2, 3), (3, 4)),
                            ((2, 3), (5, 3, 4)), ((5, 1, 2, 3), (4, 3, 2)), ((1, 2, 3), (5, 3, 4))]:
            yield Form("MatMul", (whole(*left, seed=27), whole(*right, seed=28)), {}, opset)
        for shape, eps in itertools.product(((2, 3), (2, 3, 4), (2, 3, 4, 2)), (None, 1e-3, 0.5)):
            attrs = {} if eps is None else {"epsilon": eps}
            if opset < 14:
                attrs["momentum"] = 0.9
            scale, bias, mean, var = (p.astype(np.float32) for p in (
                rng(2).uniform(0.5, 2, 3), rng(3).normal(size=3), rng(4).normal(size=3), rng(5).uniform(0.5, 2, 3)))
            data = grid(*shape, seed=29)
            factor = np.abs(scale) / np.sqrt(var + attrs.get("epsilon", 1e-5))
            floor = float((np.abs(data).max() * factor + np.abs(mean) * factor + np.abs(bias)).max())
            yield Form("BatchNormalization", (data, scale, bias, mean, var), attrs, opset, floor=floor)
        for slope in ((1,), (4,), (3, 1), (1, 3, 4), (2, 3, 4), (), (1, 1)):
            yield Form("PRelu", (x, grid(*slope, seed=30)), {}, opset)
        for op, alpha in itertools.product(("Elu", "LeakyRelu"), (None, 0.0, 0.3, 1.0, 2.5, -1.0)):
            yield Form(op, (x,), {} if alpha is None else {"alpha": alpha}, opset)
        base = np.array([[-2, -1.5, -1, -0.5, 0, 0.5, 1, 2, 3]], np.float32)
        for exponent in (f32(2), f32(3), f32(0.5), f32(-1), f32(0), f32([[2.0]]), f32(2.5), i64(2), i64(-2),
                         np.array(3, np.int32), np.array(2, np.float64)):
            if opset >= 12 or exponent.dtype == np.float32:
                yield Form("Pow", (base, exponent), {}, opset)
        if opset >= 12:
            for exponent in (i64(2), i64(0), np.array(3, np.int32), f32(2.0)):
                yield Form("Pow", (np.array([[-3, -2, 0, 1, 2, 5]], np.int64), exponent), {}, opset)
        for (start, limit, delta), kind in itertools.product(
                [(0, 5, 1), (5, 0, -1), (5, 0, -2), (0, 5, 2), (0, 0, 1), (3, 1, 1), (-3, 4, 3), (10, -10, -7)],
                (np.int64, np.int32, np.float32, np.float64)):
            yield Form("Range", tuple(np.array(v, kind) for v in (start, limit, delta)), {}, opset)
        for (start, limit, delta), kind in itertools.product(
                [(0.5, 2.6, 0.3), (1.0, -1.0, -0.25), (0.1, 0.7, 0.1), (1.0, 0.0, -0.3)], (np.float32, np.float64)):
            yield Form("Range", tuple(np.array(v, kind) for v in (start, limit, delta)), {}, opset)
        for op, kind in itertools.product(("Add", "Sub", "Mul", "Div"), (np.int64, np.int32, np.uint8, np.float64)):
            left = np.array([[-7, -6, -1, 0, 1, 5, 7, 100]], np.int64)
            right = np.array([2, -2, 3, 1, -3, 2, -4, 7], np.int64)
            if kind is np.uint8:
                left, right = np.abs(left), np.abs(right)
            yield Form(op, (left.astype(kind), right.astype(kind)), {}, opset)
        for op, kind in itertools.product(("Neg", "Abs", "Sign", "Relu"), (np.int64, np.int32, np.int8, np.float64)):
            yield Form(op, (np.array([[-7, -1, 0, 1, 5]], kind),), {}, opset)
        for op in ("Sqrt", "Exp", "Log", "Reciprocal", "Softplus", "Sigmoid", "Tanh", "Identity", "Not"):
            values = np.array([[-1, 0, 0.5, 1, 2, 30, -30]], np.float32) if op != "Not" else np.array([[True, False]])
            yield Form(op, (values,), {}, opset)
        for op in ("And", "Or"):
            yield Form(op, (rng(6).integers(0, 2, (2, 3)).astype(bool), rng(7).integers(0, 2, (3,)).astype(bool)),
                       {}, opset)


def test_arithmetic_forms() -> None:
    check_family("Arithmetic layers", arithmetic_forms())


# ------------------------------------------------------------------------------------------ as models

def model_nets() -> Iterator[Net]:
    """Forms that only a model gives their meaning, or that graph optimisations rewrite: Softmax/LogSoftmax at
    opsets 11 and 13 on every axis (the loader rewrites the 2-D meaning of opsets before 13); Conv followed by
    BatchNormalization, Add or Mul (fused by onnxruntime); MatMul + Add (fused into Gemm); Pad followed by Conv
    and pooling; Gather with negative and scalar indices; padding, pooling and convolutions per sample."""
    x = grid(2, 3, 4, 5, seed=31)
    for opset, op in itertools.product((11, 13, NEWEST), ("Softmax", "LogSoftmax")):
        for axis in (None, -1, 1, 2, 3, -3):
            yield Net(f"{op}-axis{axis}", [N(op, ["x"], ["y"], **({} if axis is None else {"axis": axis}))], x,
                      opset=opset)
    weight, bias = whole(4, 3, 3, 3, seed=32), whole(4, seed=33)
    # BatchNormalization with epsilon 0 and a variance of 1/4: the fused and unfused forms are both exact
    bn = {"s": f32([0.5, -1.0, 2.0, 0.25]), "b": f32([0.25, 0.0, -1.5, 1.0]), "m": f32([0.5, -0.25, 0.0, 1.0]),
          "v": f32([0.25] * 4)}
    for opset in (11, 13, NEWEST):
        yield Net("conv-bn", [N("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                              N("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=0.0)],
                  x, {"W": weight, "B": bias, **bn}, opset)
        yield Net("conv-add-mul-relu", [N("Conv", ["x", "W"], ["c"], strides=[2, 2]), N("Add", ["c", "a"], ["d"]),
                                        N("Mul", ["d", "k"], ["e"]), N("Relu", ["e"], ["y"])],
                  x, {"W": weight, "a": f32([1.0, -2.0, 0.5, 0.0]).reshape(1, 4, 1, 1), "k": f32(0.5)}, opset)
        yield Net("matmul-add", [N("Flatten", ["x"], ["f"]), N("MatMul", ["f", "M"], ["p"]),
                                 N("Add", ["p", "c"], ["y"])],
                  x, {"M": whole(60, 5, seed=34), "c": whole(5, seed=35)}, opset)
        yield Net("gemm-transB-relu", [N("Flatten", ["x"], ["f"]), N("Gemm", ["f", "M", "c"], ["g"], transB=1,
                                                                     alpha=0.5), N("Relu", ["g"], ["y"])],
                  x, {"M": whole(5, 60, seed=36), "c": whole(5, seed=37)}, opset)
        for pads in ([0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 2, 0, 0, 0, 0, 2], [0, 1, 1, 0, 0, 0, 0, 1],
                     [0, 0, -1, 1, 0, 0, 1, 0]):
            p = {"p": i64(*pads)}
            yield Net("pad-conv", [N("Pad", ["x", "p"], ["q"]), N("Conv", ["q", "W"], ["y"])],
                      x, {**p, "W": whole(2, 3 + pads[1] + pads[5], 3, 3, seed=38)}, opset)
            for include in (0, 1):
                yield Net("pad-avgpool", [N("Pad", ["x", "p"], ["q"]),
                                          N("AveragePool", ["q"], ["y"], kernel_shape=[3, 3],
                                            count_include_pad=include)],
                          x, p, opset)
            yield Net("pad-maxpool-nonnegative", [N("Relu", ["x"], ["r"]), N("Pad", ["r", "p"], ["q"]),
                                                  N("MaxPool", ["q"], ["y"], kernel_shape=[3, 3])], x, p, opset)
        for axis, index in [(1, np.array(-1, np.int64)), (2, i64(-1, 0, -4)), (-1, i64(4, -5).reshape(2, 1))]:
            yield Net("gather", [N("Gather", ["x", "i"], ["y"], axis=axis)], x, {"i": index}, opset)
        for mode in ("reflect", "edge", "wrap"):
            if mode != "wrap" or opset >= 19:
                yield Net(f"pad-{mode}-conv", [N("Pad", ["x", "p"], ["q"], mode=mode),
                                               N("Conv", ["q", "W"], ["y"])],
                          x, {"p": i64(0, 0, 2, 1, 0, 0, 0, 3), "W": weight}, opset)
        for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            yield Net(f"convT-{auto_pad}", [N("ConvTranspose", ["x", "Wt"], ["y"], auto_pad=auto_pad, strides=[2, 2])],
                      x, {"Wt": whole(3, 2, 3, 3, seed=39)}, opset)


def test_model_nets() -> None:
    check_nets("Models", model_nets())


def test_onnxruntime_optimisations_that_change_the_function() -> None:
    """Left to the loader's cross-check, documented: onnxruntime's default graph optimisations fold a zero Pad into
    a following MaxPool (whose padding is -inf, so windows of negative values change) and into an AveragePool with
    ceil_mode (whose last window is then dropped). lipcert follows the specification, as onnxruntime does with its
    optimisations off; the deployed (optimised) model differs."""
    x = -grid(2, 2, 5, 5, seed=40, low=1, high=8)
    pad = {"p": i64(0, 0, 1, 1, 0, 0, 1, 1)}
    nets = [Net("pad-maxpool", [N("Pad", ["x", "p"], ["q"]), N("MaxPool", ["q"], ["y"], kernel_shape=[3, 3])], x, pad,
                optimiser_differs=True),
            Net("pad-avgpool-ceil", [N("Pad", ["x", "p"], ["q"]),
                                     N("AveragePool", ["q"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                       count_include_pad=1)], x, pad, optimiser_differs=True)]
    check_nets("Models (optimiser)", nets)
    for net in nets:
        model = net.model()
        off, on = (session(model, level).run(None, {"x": x})[0] for level in LEVELS.values())
        TALLY["Models (optimiser)", "optimisations change the function"] += int(off.shape != on.shape
                                                                                  or not np.array_equal(off, on))


# ------------------------------------------------------------------------------------------ coverage

FAMILIES: tuple[Callable[[], Iterator[Form]], ...] = (
    pad_forms, conv_forms, conv_transpose_forms, pool_forms, plumbing_forms, reduction_forms, topk_and_misc_forms,
    cast_forms, arithmetic_forms)


def test_every_registered_operator_with_attributes_is_enumerated() -> None:
    """Each registry entry that implements an attribute has forms here (the global pools are in their own test)."""
    with_attributes = {name for name, entry in REGISTRY.items() if entry.attributes}
    enumerated = {form.op for family in FAMILIES for form in family()}
    missing = with_attributes - enumerated - {"GlobalLpPool"}
    assert not missing, f"operators with attributes but no enumerated forms: {sorted(missing)}"
