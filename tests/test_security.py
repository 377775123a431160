"""Issue 8, "no escape": untrusted files never make lipcert read outside the model's folder, unpickle, or run
code; user code runs only with --arch-python, and every output says so."""

from __future__ import annotations

import ast
import json
import os
import pickle
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

import lipcert
from lipcert.data import open_dataset
from lipcert.errors import DataError, ModelError

from .conftest import SAMPLES, one_line, run_main

PACKAGE = Path(lipcert.__file__).resolve().parent
WEIGHT = np.eye(3, 4, dtype=np.float32) * 0.5


# ------------------------------------------------------------------------------------------ external data


def _external(tensor: TensorProto, location: str) -> TensorProto:
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model_with_external(folder: Path, location: str) -> Path:
    """x (N, 4) -> Gemm(w) with ``w`` stored at ``location`` (relative to the model's folder)."""
    w = _external(TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(WEIGHT.shape)), location)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="dense", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_symlinked_directory_component_pointing_out_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    outside, inner = tmp_path / "elsewhere", tmp_path / "model"
    outside.mkdir()
    inner.mkdir()
    (outside / "w.data").write_bytes(WEIGHT.tobytes())
    os.symlink(outside, inner / "ext", target_is_directory=True)
    path = _model_with_external(inner, "ext/w.data")
    with pytest.raises(ModelError, match="external data of initializer 'w' points to 'ext/w.data', outside the "
                                         "model's folder"):
        lipcert.load_model(path)
    code, _, err = run_main(capsys, "inspect", str(path))
    assert code == 2 and str(path) in one_line(err) and "outside the model's folder" in err


def test_symlinks_inside_the_folder_load_or_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A symlink that stays inside the folder passes lipcert's check; recent onnx versions then refuse every
    symlink themselves, which must end as a one-line error (exit 2), never as an internal error."""
    inner = tmp_path / "model"
    (inner / "real").mkdir(parents=True)
    (inner / "real" / "w.data").write_bytes(WEIGHT.tobytes())
    os.symlink(inner / "real", inner / "alias", target_is_directory=True)
    os.symlink(inner / "real" / "w.data", inner / "link.data")
    for location in ("alias/w.data", "link.data"):
        path = _model_with_external(inner, location)
        code, out, err = run_main(capsys, "inspect", str(path))
        assert code in (0, 2), err
        assert "matches onnxruntime" in out if code == 0 else one_line(err).startswith(f"lipcert: error: {path}: ")


def test_model_folder_reached_through_a_symlink_loads(tmp_path: Path) -> None:
    inner = tmp_path / "model"
    inner.mkdir()
    (inner / "w.data").write_bytes(WEIGHT.tobytes())
    _model_with_external(inner, "w.data")
    os.symlink(inner, tmp_path / "via", target_is_directory=True)
    assert torch.equal(lipcert.load_model(tmp_path / "via" / "m.onnx").params["w"], torch.from_numpy(WEIGHT))


def test_external_data_in_a_subgraph_cannot_escape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tensor inside an If branch is loaded by onnx's external-data helper too: it is checked the same way."""
    inner = tmp_path / "model"
    inner.mkdir()
    (tmp_path / "outside.data").write_bytes(WEIGHT.tobytes())
    sub_w = _external(TensorProto(name="sub_w", data_type=TensorProto.FLOAT, dims=[3, 4]), "../outside.data")
    branch = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], [sub_w])
    other = helper.make_graph([helper.make_node("Identity", ["c"], ["b2"])], "other", [],
                              [helper.make_tensor_value_info("b2", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(WEIGHT, "c")])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["unused"], name="if", then_branch=branch, else_branch=other),
         helper.make_node("Gemm", ["x", "w"], ["y"], name="dense", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.array(True), "cond")])
    path = inner / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    code, _, err = run_main(capsys, "inspect", str(path))
    assert code == 2
    assert one_line(err) == (f"lipcert: error: {path}: external data of subgraph initializer of node 'if' 'sub_w' "
                             "points to '../outside.data', outside the model's folder")


# ------------------------------------------------------------------------------------------ safetensors header


@pytest.mark.parametrize("extra", [1, 2**40, 2**64 - 1 - 10**6])
def test_safetensors_header_longer_than_the_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             extra: int) -> None:
    raw = (SAMPLES / "digits_dense.safetensors").read_bytes()
    path = tmp_path / "m.safetensors"
    claimed = len(raw) + extra
    path.write_bytes(struct.pack("<Q", claimed) + raw[8:])
    code, _, err = run_main(capsys, "inspect", str(path))
    assert code == 2
    assert one_line(err) == (f"lipcert: error: {path}: not a valid safetensors file: header of {claimed} bytes in "
                             f"a {len(raw)}-byte file")


def test_safetensors_header_above_100_mb_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{")
    os.truncate(path, 100_000_100)  # sparse: the file is long enough, the header is not JSON and never read
    with pytest.raises(ModelError) as info:
        lipcert.load_model(path)
    assert str(info.value) == (f"{path}: not a valid safetensors file: header of 100000001 bytes (more than "
                               "100000000)")


def test_safetensors_dataset_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(2, 1, 8, 8), "y": torch.zeros(2, dtype=torch.int64)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 1) + raw[8:])
    with pytest.raises(DataError, match="not a readable .safetensors file") as info:
        open_dataset(path)
    assert str(info.value).startswith(f"{path}: ")


# ------------------------------------------------------------------------------------------ no pickle

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that could deserialize code or run it: pickle-family loads, torch.load
    without weights_only=True, numpy.load without allow_pickle=False, yaml.load, eval/exec/compile,
    __import__, importlib outside --arch-python's loader, and unpicklers that do not override find_class."""
    found = []
    tree = ast.parse(source, filename)
    functions = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                      if a.name in ("load", "loads", "Unpickler", "open")]
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler", "_pickle.Unpickler"} and not any(
                    isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"{where}: unpickler {node.name} without find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        module, _, attr = name.rpartition(".")
        if module in UNSAFE_MODULES and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where}: {name}")
        elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False):
            found.append(f"{where}: {name} without allow_pickle=False")
        elif name in ("yaml.load", "yaml.unsafe_load", "eval", "exec", "compile", "__import__", "runpy.run_path",
                      "runpy.run_module"):
            found.append(f"{where}: {name}")
        elif name == "importlib.import_module" and not (
                filename.endswith("loader.py") and functions.get(id(node)) == "_from_python"):
            found.append(f"{where}: importlib.import_module outside --arch-python")
    return found


def test_the_scanner_finds_unsafe_calls() -> None:
    bad = ("import pickle, numpy as np, torch\nfrom pickle import loads\n"
           "pickle.load(f)\nnp.load(p)\nnp.load(p, allow_pickle=True)\ntorch.load(p)\neval('1')\n"
           "class U(pickle.Unpickler):\n    pass\n")
    assert len(unsafe_calls(bad, "bad.py")) == 7
    good = "import numpy as np, torch\nnp.load(p, allow_pickle=False)\ntorch.load(p, weights_only=True)\n"
    assert unsafe_calls(good, "good.py") == []


def test_no_source_file_can_load_a_pickle_or_run_code() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30 and PACKAGE / "data" / "cifar.py" in files
    found = [f for path in files for f in unsafe_calls(path.read_text(encoding="utf-8"),
                                                       str(path.relative_to(PACKAGE)))]
    assert found == []


class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("key", ["x", "y"])
def test_npz_with_a_pickle_is_refused_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     key: str) -> None:
    marker = tmp_path / "pwned"
    arrays = {"x": np.zeros((2, 1, 8, 8), np.float32), "y": np.zeros(2, np.int64)}
    arrays[key] = np.array([Payload(marker), Payload(marker)], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    code, _, err = run_main(capsys, "report", str(SAMPLES / "digits_dense.onnx"), "--data", str(path), "--no-attack",
                       "--out", str(tmp_path / "out"))
    assert code == 2
    assert one_line(err) == (f"lipcert: error: {path}: {key}.npy holds Python objects (a pickle); only numeric "
                             "arrays are read")
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as data:  # the payload is live: numpy's own pickle loading runs it
        data[key]
    assert marker.exists()


def test_cifar_batch_with_a_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    folder.mkdir()
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Payload(marker)]}, protocol=2)
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(DataError) as info:
        open_dataset(folder)
    assert str(info.value) == (f"{folder / 'test_batch'}: the pickle refers to io.open, which is not allowed: only "
                               "numpy arrays are read from CIFAR batches")
    assert not marker.exists()
    pickle.loads(payload)
    assert marker.exists()


# ------------------------------------------------------------------------------------------ --arch-python


@pytest.fixture
def arch_python_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A safetensors file of a Flatten+Linear network and the user module that builds it, in the cwd."""
    name = "lipcert_security_net"
    (tmp_path / f"{name}.py").write_text("import torch\n\n\ndef build():\n    return torch.nn.Sequential("
                                         "torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight.mul_(0.1)
    save_file(net.state_dict(), str(tmp_path / "m.safetensors"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "m.safetensors", f"{name}:build"
    sys.modules.pop(name, None)


NOTE = "architecture from user Python code (arch_python lipcert_security_net:build)"


def test_verify_records_arch_python(arch_python_model, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, target = arch_python_model
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, err = run_main(capsys, "verify", str(model), "--arch-python", target, "--input-shape", "1,8,8",
                         "--json", str(tmp_path / "verify.json"))
    assert code in (0, 1), err
    assert NOTE in json.loads((tmp_path / "verify.json").read_text())["notes"]
    assert f"note: {NOTE}" in out
    assert f"- {NOTE}" in summary.read_text()


def test_report_records_arch_python(arch_python_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, target = arch_python_model
    out_dir = tmp_path / "out"
    code, out, err = run_main(capsys, "report", str(model), "--arch-python", target, "--input-shape", "1,8,8",
                         "--data", str(SAMPLES / "digits_test.npz"), "--no-attack", "--out", str(out_dir))
    assert code == 0, err
    assert NOTE in json.loads((out_dir / "report.json").read_text())["notes"]
    assert f"- {NOTE}" in (out_dir / "report.md").read_text()
    assert f"note: {NOTE}" in out


def test_without_arch_python_no_note(tmp_path: Path) -> None:
    graph = lipcert.load_model(SAMPLES / "digits_dense.safetensors")
    assert graph.notes == []
