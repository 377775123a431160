"""The float error allowance of certificates (``lipcert.rounding``): every operator states its rounding, the
bounds hold against the real float32 error (float64 as the exact value), and large intermediate values count."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert import certify, load_model
from lipcert.bounds.rounding import nonnegative_norm
from lipcert.certification.engine import Engine, choose_backend
from lipcert.certification.setup import certificate_setup
from lipcert.graph.executor import GraphModule
from lipcert.graph.linop import from_function
from lipcert.graph.ops import REGISTRY, Op


def test_every_operator_with_a_bound_states_its_rounding() -> None:
    """An operator with a linear map or a Lipschitz rule must say how it rounds (else certificates through it
    would silently assume it exact)."""
    missing = [name for name, op in REGISTRY.items()
               if (type(op).linear is not Op.linear or type(op).lipschitz is not Op.lipschitz)
               and type(op).rounding is Op.rounding]
    assert not missing, missing


@pytest.mark.parametrize("seed", range(4))
def test_nonnegative_norm_is_an_upper_bound_and_tight(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand((30, 50), generator=gen, dtype=torch.float64) ** 3
    m[:, :5] = 0  # inputs the map ignores
    op = from_function(lambda x: x @ m.T, (50,), (30,), adjoint=lambda y: y @ m)
    exact = float(torch.linalg.matrix_norm(m, 2))
    bound = nonnegative_norm(op)
    assert exact <= bound <= exact * 1.01


def _model(path: Path, nodes: list, inits: dict[str, np.ndarray], shape: tuple[int, ...]) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _shifted(tmp_path: Path, shift: float) -> Path:
    """logits = W ((x + shift) - shift): the same function for every shift, with values of size |shift| inside."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 16))
    w /= np.linalg.norm(w, 2)
    nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("Add", ["f", "c"], ["a"]),
             helper.make_node("Sub", ["a", "c"], ["s"]), helper.make_node("Gemm", ["s", "w"], ["logits"], transB=1)]
    return _model(tmp_path / f"shift{shift:g}.onnx", nodes, {"c": np.full(16, shift), "w": w}, (1, 4, 4))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_large_intermediate_values_widen_the_allowance(tmp_path: Path, backend: str) -> None:
    """(x + 1e6) - 1e6 computes x only to float32's precision at 1e6: the allowance covers the real error at
    every sample, and the certified radii shrink to what that error leaves."""
    rng = np.random.default_rng(1)
    x = rng.random((64, 1, 4, 4), dtype=np.float32)
    small, large = load_model(_shifted(tmp_path, 1.0)), load_model(_shifted(tmp_path, 1e6))
    setup_small, _ = certificate_setup(small)
    setup_large, info = certificate_setup(large)
    assert setup_large.lipschitz == pytest.approx(setup_small.lipschitz)
    engine = Engine(large, setup_large, backend=backend)
    xt = torch.from_numpy(x)
    z, norms = choose_backend(large, backend, "cpu", xt, None, None, engine.measure)(xt)
    exact = GraphModule(large).to(torch.float64)(xt.double())
    gap = (z.double() - exact).norm(dim=1)
    error = engine.error(xt.flatten(1).double().norm(dim=1), norms)
    assert gap.max() > 1e-3  # the float32 model really is this far off
    assert (gap <= error.base).all()
    assert info.error_base > 1e-2 > certificate_setup(small)[1].error_base
    y = z.argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    radii = {name: certify(model, tmp_path / "d.npz", "0.01", backend=backend, attack=False).samples.radii
             for name, model in (("small", small), ("large", large))}
    assert (radii["large"] < radii["small"] - 0.01).all()


def test_allowance_of_each_operator_covers_its_real_error(tmp_path: Path) -> None:
    """A chain of accumulating operators with large biases (conv, batch norm, pooling, dense): the deployed
    float32 output is within the allowance of the float64 one at random and at adversarially large inputs."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((6, 2, 3, 3)) * 0.3, "b1": rng.standard_normal(6) * 300,
             "sc": rng.random(6) + 0.5, "bb": rng.standard_normal(6) * 50, "mu": rng.standard_normal(6) * 100,
             "var": rng.random(6) + 0.1, "w2": rng.standard_normal((4, 54)) * 0.1, "b2": rng.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "sc", "bb", "mu", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    model = load_model(_model(tmp_path / "m.onnx", nodes, inits, (2, 6, 6)))
    setup, info = certificate_setup(model)
    x = torch.cat([torch.rand((32, 2, 6, 6)), 50 * torch.randn((32, 2, 6, 6))])
    exact = GraphModule(model).to(torch.float64)(x.double())
    for backend in ("torch", "onnxruntime"):
        engine = Engine(model, setup, backend=backend)
        z, norms = choose_backend(model, backend, "cpu", x, None, None, engine.measure)(x)
        gap = (z.double() - exact).norm(dim=1)
        x_norm = x.flatten(1).double().norm(dim=1)
        assert (gap <= engine.error(x_norm, norms).base).all(), backend
        assert (gap <= info.error_base + info.error_slope * x_norm).all(), backend
    assert math.isfinite(info.error_base) and info.error_base > 0


def test_float64_centre_error_covers_the_float64_rounding(tmp_path: Path) -> None:
    """The float64 run's error bound (the plan at float64's unit roundoff) covers its real error against the
    logits computed in extended precision (numpy's longdouble), with and without large values inside."""
    if np.finfo(np.longdouble).nmant < 60:
        pytest.skip("no extended precision on this platform")
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((64, 1, 4, 4), dtype=np.float32))
    x_norm = x.flatten(1).double().norm(dim=1)
    for shift in (1.0, 1e6):
        path = _shifted(tmp_path, shift)
        w = numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer if i.name == "w"))
        truth = x.flatten(1).numpy().astype(np.longdouble) @ w.astype(np.longdouble).T
        graph = load_model(path)
        centre = Engine(graph, certificate_setup(graph)[0], backend="torch").exact_logits(x, x_norm)
        assert centre is not None
        gap = torch.from_numpy(np.linalg.norm((centre[0].numpy().astype(np.longdouble) - truth).astype(np.float64),
                                              axis=1))
        assert gap.max() > 0 and (gap <= centre[1]).all(), shift
        assert (centre[1] < (1e-12 if shift == 1.0 else 1e-8)).all(), shift  # large values widen it

