"""Each registered operator owns its contract: its role attributes (``Op.combination``, ``shape_only``,
``row_priority``, ``row_suffix``) are well typed and mean what they say, its facts (size rule, linear combination,
slope range) are declared and true, and its linear operator carries the typed
structure of its kind, with the node's own settings in it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert.bounds.decompose import decompose
from lipcert.bounds.kinds import Combination
from lipcert.bounds.spectral import upper_bound
from lipcert.bounds.steps import Context
from lipcert.graph import budget
from lipcert.graph.core import Graph, Node
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    IsometryStructure,
    ScalarStructure,
    Structure,
    from_function,
)
from lipcert.graph.ops import REGISTRY, Op, RunContext
from lipcert.graph.ops.base import CombinationMode
from lipcert.graph.ops.fold_only import FOLD_ONLY
from lipcert.graph.ops.pooling import PoolSettings, pool_settings
from lipcert.graph.ops.sizes import SizeRule
from lipcert.model.fold import data_dependent
from lipcert.model.onnx_loader import graph_from_onnx

COMBINING = sorted(name for name, op in REGISTRY.items() if op.combination is not None)
SHAPE_ONLY = sorted(name for name, op in REGISTRY.items() if op.shape_only)
F64 = RunContext(torch.float64)


def _graph(nodes: list, inits: dict[str, np.ndarray], shape: tuple[int, ...], output: str = "logits") -> Graph:
    """A one-input ONNX model (opset 17) loaded as lipcert's graph."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return graph_from_onnx(model, "contract.onnx")


# ---------------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_role_attributes_are_well_typed(name: str) -> None:
    op = REGISTRY[name]
    assert op.name == name
    assert op.combination is None or isinstance(op.combination, CombinationMode)  # the kinds propagate bounds
    assert isinstance(op.combination_reason, str) and bool(op.combination_reason) == (op.combination is not None)
    assert isinstance(op.shape_only, bool) and isinstance(op.row_suffix, bool)
    assert op.row_priority is None or (isinstance(op.row_priority, int) and not isinstance(op.row_priority, bool))


def test_row_priorities_are_distinct_and_only_on_linear_operators() -> None:
    """Two operators of one priority would name a row by node order; an operator that names a linear row
    must have a linear map."""
    named = {name: op.row_priority for name, op in REGISTRY.items() if op.row_priority is not None}
    assert len(set(named.values())) == len(named)
    assert all(type(REGISTRY[name]).linear is not Op.linear for name in named)
    assert min(named, key=named.get) == "Conv"


def test_roles_that_the_analysis_relies_on() -> None:
    assert {"Add", "Sub", "Sum", "Mean", "Concat", "Max", "Min"} <= set(COMBINING)
    assert {"Shape", "Size"} <= set(SHAPE_ONLY)
    assert not REGISTRY["Pad"].row_suffix and not REGISTRY["Concat"].row_suffix and REGISTRY["Gemm"].row_suffix


@pytest.mark.parametrize("name", COMBINING)
def test_combining_operators_combine_as_declared(name: str) -> None:
    """A sum is linear in all its inputs together, a max picks one input's entry and moves by at most the
    largest input change, a concatenation keeps every entry of every input."""
    op = REGISTRY[name]
    node = Node("n", name, ["a", "b"], ["y"], {"axis": 1} if name == "Concat" else {})
    gen = torch.Generator().manual_seed(0)
    a, b, a2, b2 = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(4))

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return op.run(node, [x, y], F64)[0]

    zero = torch.zeros_like(a)
    if op.combination is CombinationMode.SUM:
        assert torch.allclose(f(a, b), f(a, zero) + f(zero, b))
        assert torch.allclose(f(2.5 * a, 2.5 * b), 2.5 * f(a, b))
    elif op.combination is CombinationMode.MAX:
        out = f(a, b)
        assert bool(((out == a) | (out == b)).all())
        assert bool(((f(a2, b2) - out).abs() <= torch.maximum((a2 - a).abs(), (b2 - b).abs()) + 1e-15).all())
    else:
        out = f(a, b)
        assert out.numel() == a.numel() + b.numel()
        assert torch.equal(out.flatten().sort().values, torch.cat([a, b]).flatten().sort().values)


@pytest.mark.parametrize("name", COMBINING)
def test_a_combining_node_becomes_a_step_of_its_combination(name: str) -> None:
    """Two data-dependent inputs (Relu(x), Abs(x)): the analysis gives the node a step of the op's combination
    kind with the op's reason."""
    extra = {"axis": 1} if name == "Concat" else {}
    nodes = [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Abs", ["input"], ["s"]),
             helper.make_node(name, ["r", "s"], ["logits"], name="combine", **extra)]
    steps = [s for s in decompose(_graph(nodes, {}, (4,))) if "combine" in s.nodes]
    assert len(steps) == 1
    details = steps[0].details
    assert isinstance(details, Combination) and details.mode is REGISTRY[name].combination
    assert steps[0].kind == details.mode.value and steps[0].reason == REGISTRY[name].combination_reason


@pytest.mark.parametrize("name", SHAPE_ONLY)
def test_shape_only_operators_read_only_the_shape(name: str) -> None:
    op = REGISTRY[name]
    node = Node("n", name, ["x"], ["y"])
    gen = torch.Generator().manual_seed(1)
    x, other = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    assert torch.equal(op.run(node, [x], F64)[0], op.run(node, [other], F64)[0])
    graph = Graph(nodes=[Node("n", name, ["x"], ["size"]), Node("r", "Relu", ["x"], ["y"])], params={},
                  input_name="x", input_shape=(3, 4), outputs=["y"])
    assert data_dependent(graph) == {"x", "y"}


def test_rows_are_named_by_priority_and_list_the_other_layers() -> None:
    """Flatten, Gemm, then Mul by a constant vector: one fused linear step, named after the Gemm (priority),
    labelled with the Mul; the Flatten (no priority) is left out of the label."""
    from lipcert.bounds.propagate import propagate

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
             helper.make_node("Mul", ["g", "c"], ["logits"])]
    graph = _graph(nodes, {"w": rng.standard_normal((3, 8)), "c": rng.standard_normal(3)}, (2, 4))
    rows = propagate(graph, lower_bounds=False).layers
    assert [(r.op, len(r.nodes)) for r in rows] == [("Gemm + Mul", 3)]
    assert next(n.op for n in graph.nodes if n.name == rows[0].name) == "Gemm"


# ------------------------------------------------------------------------------------------ structures


def test_structures_refuse_unknown_fields_and_changes() -> None:
    w = torch.ones(2, 1, 3, 3)
    with pytest.raises(TypeError):
        ConvStructure(weight=w, input_spatial=(5, 5), strides=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1))
    with pytest.raises(TypeError):
        ScalarStructure(value=1.0, norm_ony=True)
    with pytest.raises(TypeError):  # a required field cannot be left out
        ConvStructure(weight=w, input_spatial=(5, 5), pads=(0, 0, 0, 0), dilation=(1, 1))
    structure = ConvStructure(weight=w, input_spatial=(5, 5), stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1))
    s = structure
    assert (s.groups, s.transpose, s.circular, s.output_padding) == (1, False, False, ())  # the optional fields
    assert (s.core, s.loose_in, s.loose_out, s.inexact) == (None, False, False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        structure.circular = True


def test_the_structure_is_the_kind() -> None:
    ident = lambda x: x  # noqa: E731
    assert type(from_function(ident, (3,), (3,)).structure) is Structure
    iso = from_function(ident, (3,), (3,), structure=IsometryStructure())
    assert isinstance(iso.structure, IsometryStructure) and not iso.structure.flat and not iso.structure.onto
    with pytest.raises(TypeError):  # a conv structure has no default for its settings
        ConvStructure()  # type: ignore[call-arg]
    chain = iso.then(from_function(lambda x: 2 * x, (3,), (3,), structure=ScalarStructure(value=2.0)))
    assert type(chain.structure) is ChainStructure and len(chain.structure.parts) == 2


def test_conv_operator_carries_the_node_settings() -> None:
    """A Conv with strides, asymmetric pads, dilations and groups: its linear operator's ConvStructure holds
    exactly those, and the DFT bound built from the structure alone is an upper bound of the operator's norm."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 2, 3, 2))
    nodes = [helper.make_node("Conv", ["input", "w"], ["logits"], name="conv", strides=[2, 1], pads=[1, 0, 2, 1],
                              dilations=[1, 2], group=2)]
    graph = _graph(nodes, {"w": w}, (4, 9, 8))
    node = graph.nodes[0]
    ctx = Context(graph)
    op = REGISTRY["Conv"].linear(node, ctx.const_inputs(node), 0, ctx.shape("input"), ctx.shape("logits"))
    s = op.structure
    assert type(s) is ConvStructure
    assert (s.stride, s.pads, s.dilation, s.groups) == ((2, 1), (1, 0, 2, 1), (1, 2), 2)
    assert (s.input_spatial, s.transpose, s.circular, s.output_padding) == ((9, 8), False, False, (0, 0))
    assert torch.equal(s.weight, torch.from_numpy(w.astype(np.float32)))
    exact = float(torch.linalg.matrix_norm(op.to_dense(), 2))
    structured = upper_bound(op, dense_limit=0)
    assert structured.method == "fft-embedding" and exact * (1 - 1e-12) <= structured.value <= 2 * exact


def test_conv_transpose_operator_carries_its_output_padding() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 2, 3, 3))
    nodes = [helper.make_node("ConvTranspose", ["input", "w"], ["logits"], name="convt", strides=[2, 2],
                              pads=[1, 0, 0, 1], output_padding=[1, 0])]
    graph = _graph(nodes, {"w": w}, (3, 4, 5))
    node = graph.nodes[0]
    ctx = Context(graph)
    s = REGISTRY["ConvTranspose"].linear(node, ctx.const_inputs(node), 0, ctx.shape("input"),
                                         ctx.shape("logits")).structure
    assert (s.stride, s.pads, s.dilation, s.groups, s.output_padding) == ((2, 2), (1, 0, 0, 1), (1, 1), 1, (1, 0))
    assert s.transpose and s.input_spatial == (4, 5)


@pytest.mark.parametrize("kernel, strides, constant", [((2, 2), (2, 2), 1.0), ((3, 3), (2, 2), 2.0),
                                                        ((3, 1), (1, 1), math.sqrt(3))])
def test_pool_settings_reach_the_pooling_rule(kernel: tuple[int, ...], strides: tuple[int, ...],
                                              constant: float) -> None:
    """An entry in m windows of a max pooling gives sqrt(m): the rule reads the kernel and strides the node
    gives, through ``PoolSettings``."""
    node = Node("p", "MaxPool", ["x"], ["y"], {"kernel_shape": list(kernel), "strides": list(strides)})
    settings = pool_settings(node, (8, 8))
    assert isinstance(settings, PoolSettings)
    assert (settings.kernel, settings.stride, settings.dilation, settings.pads) == (kernel, strides, (1, 1), (0,) * 4)
    rule = REGISTRY["MaxPool"].lipschitz(node, [None], 0, (1, 8, 8), (1, 4, 4))
    assert rule.constant == pytest.approx(constant)


# ---------------------------------------------------------------------------------------------- facts


def _declares(cls: type, fact: str) -> bool:
    """Whether a class below ``Op`` states ``fact`` (None, explicitly, counts as stating it)."""
    return any(fact in vars(k) for k in cls.__mro__ if k is not Op and k is not object)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_operator_declares_its_size_rule(name: str) -> None:
    """``Op.size`` has no default: a new operator without a size rule fails here (``lipcert.graph.budget``)."""
    op = REGISTRY[name]
    assert _declares(type(op), "size"), f"{name} declares no size rule (Op.size)"
    assert op.size is None or isinstance(op.size, SizeRule)
    assert budget.size_rule(name) is op.size


def test_fold_only_operators_are_not_registered_and_have_size_rules() -> None:
    assert not set(FOLD_ONLY) & set(REGISTRY)
    for name, entry in FOLD_ONLY.items():
        assert entry.name == name and isinstance(entry.size, SizeRule) and budget.size_rule(name) is entry.size
    assert budget.size_rule("NoSuchOp") is None


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_linear_combination_is_what_the_operator_computes(name: str) -> None:
    """``linear_combination`` is declared exactly by the SUM combiners, and their output is sum(sign x) / divisor
    on random broadcast inputs."""
    op = REGISTRY[name]
    summed = op.linear_combination(2)
    assert (summed is not None) == (op.combination is CombinationMode.SUM), name
    if summed is None:
        return
    for n in (2, 3):
        summed = op.linear_combination(n)
        if len(summed.signs) != n:
            continue  # an operator of a fixed number of inputs
        xs = [torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
              torch.randn(1, 3, dtype=torch.float64)][:n]
        out = op.run(Node("n", name, [f"x{i}" for i in range(n)], ["y"]), xs, F64)[0]
        terms = [s * torch.broadcast_to(x, (2, 3)) for s, x in zip(summed.signs, xs, strict=True)]
        expected = sum(terms) / summed.divisor
        assert torch.allclose(out, expected, rtol=1e-12, atol=0), name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_slope_range_holds_every_slope(name: str) -> None:
    """A declared slope range holds the difference quotients of the activation over a wide grid."""
    op = REGISTRY[name]
    for attrs in ({}, {"alpha": 0.3}, {"alpha": -0.5}):
        node = Node("n", name, ["x"], ["y"], {k: v for k, v in attrs.items() if k in op.attributes})
        slopes = op.slope_range(node)
        if slopes is None:
            continue
        x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
        y = op.run(node, [x], F64)[0]
        quotients = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
        assert slopes[0] - 1e-9 <= float(quotients.min()) and float(quotients.max()) <= slopes[1] + 1e-9, name
