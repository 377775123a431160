"""Loading real models: peer-library exports, external data, safetensors specs, and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from lipcert.errors import ModelError
from lipcert.graph.executor import GraphModule
from lipcert.model.loader import load_model
from lipcert.model.spec import SPEC_KEY

from .conftest import export_onnx, orthogonium_model, run_cli, run_main, torchlip_model

PEERS = {
    "torchlip-conv": lambda: torchlip_model("conv"),
    "torchlip-dense": lambda: torchlip_model("dense"),
    "orthogonium-conv": orthogonium_model,
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_exports_load_and_match(tmp_path: Path, peer: str, dynamo: bool) -> None:
    model = PEERS[peer]()
    path = export_onnx(model, tmp_path / f"{peer}.onnx", (1, 8, 8), dynamo)
    graph = load_model(path)
    assert graph.input_shape == (1, 8, 8)
    assert graph.crosscheck.max_rel_diff <= 1e-5
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        ours = GraphModule(graph)(x)
        ref = model(x)
        ours64 = GraphModule(graph).to(torch.float64)(x.double())
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours64, ref.double(), rtol=1e-5, atol=1e-6)


def test_executor_gives_gradients(tmp_path: Path) -> None:
    path = export_onnx(orthogonium_model(), tmp_path / "m.onnx", (1, 8, 8), dynamo=False)
    module = GraphModule(load_model(path))
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    module(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _tiny_model(weight: np.ndarray, ops: list[tuple[str, str]] | None = None) -> onnx.ModelProto:
    """x (N, 4) -> Gemm(weight) -> [extra ops] -> y."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h0"], name="dense", transB=1)]
    last = "h0"
    for i, (op, name) in enumerate(ops or []):
        nodes.append(helper.make_node(op, [last], [f"h{i + 1}"], name=name))
        last = f"h{i + 1}"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    model = _tiny_model(np.eye(3, 4) * 0.5)
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    graph = load_model(tmp_path / "m.onnx")
    assert torch.allclose(graph.params["w"], torch.eye(3, 4) * 0.5)


def _with_location(tmp_path: Path, location: str) -> Path:
    model = _tiny_model(np.eye(3, 4))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path = tmp_path / "evil.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../outside.data"])
def test_external_data_leaving_folder_is_refused(tmp_path: Path, location: str) -> None:
    inner = tmp_path / "model"
    inner.mkdir()
    (tmp_path / "outside.data").write_bytes(np.eye(3, 4, dtype=np.float32).tobytes())
    path = _with_location(inner, location)
    with pytest.raises(ModelError, match="outside the model's folder|not a path inside"):
        load_model(path)


def test_external_data_symlink_out_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "model"
    inner.mkdir()
    (tmp_path / "outside.data").write_bytes(np.eye(3, 4, dtype=np.float32).tobytes())
    os.symlink(tmp_path / "outside.data", inner / "link.data")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(_with_location(inner, "link.data"))


def _spec(layers: list[dict], shape: list[int]) -> dict:
    return {"format": "lipcert-arch", "version": 1, "input_shape": shape, "claimed_lipschitz": 1.0,
            "layers": layers}


SPEC_LAYERS = [
    {"type": "conv", "weight": "c1.w", "bias": "c1.b", "padding": 1, "padding_mode": "circular"},
    {"type": "maxmin"},
    {"type": "residual", "branch": [{"type": "conv", "weight": "r.w", "padding": 1}, {"type": "relu"}]},
    {"type": "l2pool", "kernel": 2},
    {"type": "flatten"},
    {"type": "linear", "weight": "fc.w", "bias": "fc.b"},
]


def _spec_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"c1.w": torch.randn(4, 1, 3, 3) * 0.3, "c1.b": torch.randn(4) * 0.1,
            "r.w": torch.randn(4, 4, 3, 3) * 0.1, "fc.w": torch.randn(10, 64) * 0.1, "fc.b": torch.zeros(10)}


def _spec_reference(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    h = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), t["c1.w"], t["c1.b"])
    pairs = h.reshape(h.shape[0], 2, 2, 8, 8)
    h = torch.stack([pairs.min(2).values, pairs.max(2).values], 2).reshape(h.shape)
    h = h + torch.relu(F.conv2d(h, t["r.w"], padding=1))
    h = F.lp_pool2d(h, 2, 2)
    return h.flatten(1) @ t["fc.w"].T + t["fc.b"]


def test_safetensors_with_metadata_spec_matches_reference(tmp_path: Path) -> None:
    tensors = _spec_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={SPEC_KEY: json.dumps(_spec(SPEC_LAYERS, [1, 8, 8]))})
    graph = load_model(path)
    assert graph.claimed_lipschitz() == 1.0
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(GraphModule(graph)(x), _spec_reference(tensors, x), atol=1e-5)
    assert graph.crosscheck.max_rel_diff <= 1e-5


def test_safetensors_with_arch_file(tmp_path: Path) -> None:
    tensors = _spec_tensors()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "spec.json").write_text(json.dumps(_spec(SPEC_LAYERS, [1, 8, 8])))
    graph = load_model(tmp_path / "m.safetensors", tmp_path / "spec.json")
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(GraphModule(graph)(x), _spec_reference(tensors, x), atol=1e-5)


def test_arch_python_runs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="give its architecture as arch \\(a JSON spec\\)"):
        load_model(tmp_path / "m.safetensors")
    graph = load_model(tmp_path / "m.safetensors", arch_python="mynet:build", input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(GraphModule(graph)(x), reference(x), atol=1e-6)
    assert any("(arch_python mynet:build)" in note for note in graph.notes)


BAD_SPEC_CASES = {
    "missing tensor": ([{"type": "flatten"}, {"type": "linear", "weight": "nope"}], {"w": (10, 64)}, "'nope'"),
    "wrong shape": ([{"type": "flatten"}, {"type": "linear", "weight": "w"}], {"w": (10, 65)}, "'w'"),
    "unused tensor": ([{"type": "flatten"}, {"type": "linear", "weight": "w"}], {"w": (10, 64), "extra": (3,)},
                      "'extra'"),
    "unknown layer": ([{"type": "wobble"}], {}, "wobble"),
    "field of the wrong type": ([{"type": "groupsort", "group_size": None}, {"type": "flatten"},
                                 {"type": "linear", "weight": "w"}], {"w": (10, 64)},
                                "field 'group_size' must be an integer, got None"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPEC_CASES))
def test_spec_mismatch_names_the_tensor(tmp_path: Path, case: str) -> None:
    layers, shapes, needle = BAD_SPEC_CASES[case]
    tensors = {k: torch.randn(*s) for k, s in shapes.items()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={SPEC_KEY: json.dumps(_spec(layers, [1, 8, 8]))})
    result = run_cli("inspect", str(path))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input, as a file, with a fragment its error message must contain."""
    good = _tiny_model(np.eye(3, 4))
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp / "absent.onnx", "no such model file")
    (tmp / "text.onnx").write_text("this is not a model")
    cases["not onnx"] = (tmp / "text.onnx", "not a valid ONNX model")
    data = good.SerializeToString()
    (tmp / "trunc.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated onnx"] = (tmp / "trunc.onnx", "not a valid ONNX model")
    unsupported = _tiny_model(np.eye(3, 4), [("Relu", "ok"), ("Erf", "weird1"), ("HardSwish", "weird2")])
    onnx.save(unsupported, str(tmp / "unsupported.onnx"))
    cases["unsupported ops"] = (tmp / "unsupported.onnx", "weird1 (Erf), weird2 (HardSwish)")
    nan = np.eye(3, 4)
    nan[0, 0] = np.nan
    onnx.save(_tiny_model(nan), str(tmp / "nan.onnx"))
    cases["nan weights"] = (tmp / "nan.onnx", "initializer 'w' contains NaN or Inf")
    inf = np.eye(3, 4)
    inf[1, 1] = np.inf
    onnx.save(_tiny_model(inf), str(tmp / "inf.onnx"))
    cases["inf weights"] = (tmp / "inf.onnx", "initializer 'w' contains NaN or Inf")
    onnx.save(_tiny_model(np.full((3, 4), 3e38)), str(tmp / "overflow.onnx"))
    cases["finite weights whose outputs overflow"] = (tmp / "overflow.onnx", "outputs are NaN or Inf on random inputs")
    save_file({"w": torch.randn(10, 64)}, str(tmp / "nospec.safetensors"))
    cases["safetensors without spec"] = (tmp / "nospec.safetensors", "give its architecture as --arch (a JSON spec)")
    save_file({"w": torch.randn(10, 64)}, str(tmp / "cut.safetensors"),
              metadata={SPEC_KEY: json.dumps(_spec([{"type": "flatten"}, {"type": "linear", "weight": "w"}],
                                                  [1, 8, 8]))})
    raw = (tmp / "cut.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(raw[:-100])
    cases["truncated safetensors"] = (tmp / "cut.safetensors", "outside the 2460-byte data section")
    (tmp / "junk.safetensors").write_bytes(b"\xff" * 64)
    cases["not safetensors"] = (tmp / "junk.safetensors", "not a valid safetensors file")
    save_file({"w": torch.randn(10, 64)}, str(tmp / "badjson.safetensors"), metadata={SPEC_KEY: "{not json"})
    cases["spec not json"] = (tmp / "badjson.safetensors", "not valid JSON")
    (tmp / "model.txt").write_text("hello")
    cases["unknown format"] = (tmp / "model.txt", "unknown model format")
    return cases


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every bad file through the command's ``main`` (the first also as a real process): exit 2, one line naming
    the file."""
    for i, (name, (path, needle)) in enumerate(_bad_files(tmp_path).items()):
        if i == 0:
            result = run_cli("inspect", str(path))
            code, err = result.returncode, result.stderr
        else:
            code, _, err = run_main(capsys, "inspect", str(path))
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert "Traceback" not in err
        assert needle in lines[0], (name, lines[0])
        assert str(path) in lines[0], (name, lines[0])


def test_mismatch_with_onnxruntime_names_first_diverging_node(tmp_path: Path, monkeypatch) -> None:
    from lipcert.graph.ops import REGISTRY

    path = tmp_path / "m.onnx"
    onnx.save(_tiny_model(np.eye(3, 4), [("Relu", "act"), ("Neg", "flip")]), str(path))
    real = REGISTRY["Relu"].fn
    monkeypatch.setattr(REGISTRY["Relu"], "fn", lambda node, x: real(node, x) + 0.5)
    with pytest.raises(ModelError, match="'act' \\(Relu\\) is the first to differ from onnxruntime"):
        load_model(path)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_fixed_batch_exports_run_any_batch(tmp_path: Path, dynamo: bool) -> None:
    """An export without a dynamic batch runs in chunks of its fixed batch, the last one padded."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(256, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    graph = load_model(tmp_path / "m.onnx")
    assert graph.fixed_batch == 1
    x = torch.rand(7, 1, 8, 8)
    assert torch.allclose(GraphModule(graph)(x), model(x), atol=1e-5)
    from lipcert.certification.run import certify

    report = certify(graph, Path(__file__).parent.parent / "sample_models" / "digits_test.npz", "36/255",
                     batch_size=64, backend="onnxruntime", attack=False)
    assert report.num_samples == 540


@pytest.mark.slow
def test_model_with_local_functions_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """A model whose nodes call a local function is inlined and proven from the command line, in a process that
    imported nothing else first (``onnx.inliner`` is a submodule ``import onnx`` does not load)."""
    relu = helper.make_function("local", "Act", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                [helper.make_opsetid("", 17)])
    w = numpy_helper.from_array((np.eye(10, 64) * 0.5).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Act", ["f"], ["r"], domain="local"),
             helper.make_node("Gemm", ["r", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[relu], ir_version=8)
    onnx.save(model, tmp_path / "func.onnx")
    result = run_cli("verify", str(tmp_path / "func.onnx"), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["network_upper"] == pytest.approx(0.5, rel=1e-6)
