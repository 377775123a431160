"""Resource limits (issue 8): ``lipcert.limits`` itself, ``--max-elements`` / ``max_elements`` /
``$LIPCERT_MAX_ELEMENTS`` on every command, and hostile files refused before anything is allocated."""

from __future__ import annotations

import gzip
import os
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import lipcert
from lipcert import limits
from lipcert.data import open_dataset
from lipcert.errors import ConfigError, DataError, ModelError
from lipcert.graph import budget
from lipcert.graph.core import Node

from .conftest import SAMPLES, one_line, run_main

CONV = SAMPLES / "digits_conv.onnx"
DENSE = SAMPLES / "digits_dense.onnx"
DEFAULT = f"{limits.DEFAULT_MAX_ELEMENTS:,}"
CAP = 4 << 30  # address-space cap of the subprocesses: an 8 GiB tensor cannot be allocated under it


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(limits.ENV_VAR, raising=False)


# ------------------------------------------------------------------------------------------ the module


def test_resolve_prefers_argument_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert limits.resolve(None) == limits.DEFAULT_MAX_ELEMENTS == 2**28
    monkeypatch.setenv(limits.ENV_VAR, " 1_000 ")
    assert limits.resolve(None) == 1000
    assert limits.resolve(5) == 5
    monkeypatch.setenv(limits.ENV_VAR, "")
    assert limits.resolve(None) == limits.DEFAULT_MAX_ELEMENTS


@pytest.mark.parametrize("text, needle", [("lots", "is not an integer"), ("1e6", "is not an integer"),
                                          ("0", "must be a positive integer"), ("-3", "must be a positive integer")])
def test_resolve_refuses_bad_env_values(monkeypatch: pytest.MonkeyPatch, text: str, needle: str) -> None:
    monkeypatch.setenv(limits.ENV_VAR, text)
    with pytest.raises(ConfigError, match=needle) as info:
        limits.resolve(None)
    assert limits.ENV_VAR in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_resolve_refuses_bad_arguments(value: object) -> None:
    with pytest.raises(ConfigError, match="max_elements must be a positive integer"):
        limits.resolve(value)  # type: ignore[arg-type]


def test_count_is_exact_for_huge_and_negative_dims() -> None:
    assert limits.count([2**40, 2**40, 2**40]) == 2**120  # no int64 wrap-around to a small number
    assert limits.count([3, -7, 5]) == 0
    assert limits.count([]) == 1


def test_check_names_the_tensor_its_shape_and_the_limit() -> None:
    assert limits.check([3, 4], 12, "tensor 'w'") == 12
    with pytest.raises(ModelError) as info:
        limits.check([3, 5], 12, "tensor 'w'", "m.onnx")
    assert str(info.value) == ("m.onnx: tensor 'w' has 15 elements (shape (3, 5)), more than the limit of 12 "
                               "(max_elements; raise it)")
    with pytest.raises(DataError, match="more than 10\\*\\*60 elements"):
        limits.check([2**100, 2**100], 10, "x", error=DataError)
    with pytest.raises(ModelError, match="has 13 elements, more than"):
        limits.check(13, 12, "x")


def _meta(*shape: int) -> torch.Tensor:
    """A tensor with a shape and no storage: bounds read only shapes."""
    return torch.empty(shape, device="meta")


def test_node_bounds_of_shape_making_ops() -> None:
    shape = torch.tensor([1000, 3000])
    assert budget.node_bounds("ConstantOfShape", {}, [shape]) == (3_000_000, 0)
    assert budget.node_bounds("Expand", {}, [_meta(1, 3), torch.tensor([4, 1])]) == (12, 0)
    assert budget.node_bounds("Tile", {}, [_meta(2, 3), torch.tensor([2**20, 2])]) == (6 * 2**21, 0)
    assert budget.node_bounds("Range", {}, [torch.tensor(0.0), torch.tensor(10.0), torch.tensor(2.0)]) == (5, 5)
    assert budget.node_bounds("Range", {}, [torch.tensor(0.0), torch.tensor(float("inf")),
                                            torch.tensor(1.0)])[0] >= limits.UNBOUNDED
    assert budget.node_bounds("Pad", {}, [_meta(1, 3, 8, 8), torch.tensor([0, 0, 2, 2, 0, 0, 2, 2])])[0] \
        >= 1 * 3 * 12 * 12
    assert budget.node_bounds("Concat", {"axis": 0}, [_meta(2, 5), _meta(3, 5)]) == (25, 25)
    assert budget.node_bounds("NoSuchOp", {}, [_meta(2)]) is None
    with pytest.raises(ModelError, match="node 'c' \\(ConstantOfShape\\): a shape-like input of 1,000 values"):
        budget.node_bounds("ConstantOfShape", {}, [torch.ones(1000, dtype=torch.int64)], "c")


def test_node_bounds_of_conv_and_matmul_cover_the_real_sizes() -> None:
    x, w = torch.rand(2, 3, 17, 17), torch.rand(16, 3, 3, 3)
    attrs = {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    size, work = budget.node_bounds("Conv", attrs, [x, w])
    y = torch.nn.functional.conv2d(x, w, padding=1, stride=2)
    true_work = y.numel() * 3 * 3 * 3
    assert y.numel() <= size <= 4 * max(y.numel(), x.numel()) and true_work <= work <= 4 * true_work
    assert budget.node_bounds("MatMul", {}, [_meta(2, 3, 4), _meta(4, 5)]) == (2 * 3 * 5, 2 * 3 * 5 * 4)
    assert budget.node_bounds("Gemm", {"transB": 1}, [_meta(3, 4), _meta(5, 4)]) == (20, 60)  # B is largest


def test_check_node_refuses_size_work_and_total() -> None:
    limit = 2**20
    big = Node("blowup", "ConstantOfShape", ["s"], ["y"])
    with pytest.raises(ModelError) as info:
        budget.check_node(big, [torch.tensor([2**20, 2**20])], limit, "m.onnx")
    assert str(info.value) == ("m.onnx: node 'blowup' (ConstantOfShape) would allocate 1,099,511,627,776 "
                               "elements, more than the limit of 1,048,576 (max_elements; raise it)")
    mm = Node("mm", "MatMul", ["a", "b"], ["y"])  # 2**20-element inputs and output, 2**30 multiply-adds
    with pytest.raises(ModelError, match="node 'mm' \\(MatMul\\) would need 1,073,741,824 multiply-adds, more "
                                         "than 256 x the limit"):
        budget.check_node(mm, [_meta(1024, 1024), _meta(1024, 1024)], limit)
    small = Node("small", "Relu", ["a"], ["y"])
    assert budget.check_node(small, [_meta(1000)], limit) == 1000
    with pytest.raises(ModelError, match="node 'small' \\(Relu\\) would bring the values held"):
        budget.check_node(small, [_meta(1000)], limit, live=limits.TOTAL_FACTOR * limit)



# ------------------------------------------------------------------------------------------ the CLI flag


@pytest.mark.parametrize("limit, needle", [
    ("1000", "initializer 'conv2.weight' has 4,608 elements (shape (32, 16, 3, 3)), more than the limit of 1,000"),
    ("20000", "node '/conv2/Conv' (Conv) would allocate 23,328 elements, more than the limit of 20,000"),
])
def test_inspect_small_limit_names_tensor_or_node(capsys: pytest.CaptureFixture, limit: str, needle: str) -> None:
    code, out, err = run_main(capsys, "inspect", str(CONV), "--max-elements", limit)
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith(f"lipcert: error: {CONV}: ") and needle in line, line


def test_inspect_generous_limit_loads(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, "inspect", str(CONV), "--max-elements", "1_000_000")
    assert code == 0, err
    assert "matches onnxruntime" in out and "Conv x2" in out


@pytest.mark.parametrize("command", ["inspect", "verify", "report"])
@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5", "", "2**20"])
def test_invalid_flag_values_exit_2(capsys: pytest.CaptureFixture, command: str, value: str) -> None:
    extra = ["--data", str(SAMPLES / "digits_test.npz")] if command == "report" else []
    code, _, err = run_main(capsys, command, str(DENSE), *extra, f"--max-elements={value}")
    assert code == 2
    assert one_line(err) == f"lipcert: error: --max-elements {value!r}: expected a positive whole number of elements"


@pytest.mark.parametrize("command", ["inspect", "verify", "report"])
def test_help_shows_flag_and_default(capsys: pytest.CaptureFixture, command: str) -> None:
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "--max-elements N" in flat and f"default ${limits.ENV_VAR}, else {DEFAULT} = 2**28" in flat


def test_env_var_applies_and_the_flag_overrides_it(capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(limits.ENV_VAR, "1000")
    code, _, err = run_main(capsys, "inspect", str(DENSE))
    assert code == 2 and "more than the limit of 1,000 " in one_line(err)
    code, _, err = run_main(capsys, "inspect", str(DENSE), "--max-elements", "1000000")
    assert code == 0, err
    monkeypatch.setenv(limits.ENV_VAR, "many")
    code, _, err = run_main(capsys, "inspect", str(DENSE))
    assert code == 2 and one_line(err) == (f"lipcert: error: {limits.ENV_VAR}='many': expected a positive whole number "
                                           "of elements")


def test_config_file_sets_the_limit(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    config = tmp_path / "lipcert.toml"
    config.write_text(f'model = "{DENSE}"\nmax_elements = 1000\n')
    code, _, err = run_main(capsys, "verify", "--config", str(config))
    assert code == 2
    assert "initializer 'fc1.weight' has 8,192 elements (shape (128, 64)), more than the limit of 1,000" \
        in one_line(err)
    config.write_text(f'model = "{DENSE}"\nmax-elements = 1_000_000\n')
    code, out, err = run_main(capsys, "verify", "--config", str(config), "--quiet")
    assert code == 0 and "PROVEN" in out, err
    code, _, err = run_main(capsys, "verify", "--config", str(config), "--max-elements", "1000")  # the flag wins
    assert code == 2 and "more than the limit of 1,000 " in one_line(err)
    config.write_text(f'model = "{DENSE}"\nmax_elements = "lots"\n')
    code, _, err = run_main(capsys, "verify", "--config", str(config))
    assert code == 2 and 'max_elements = "lots": expected a positive whole number of elements' in one_line(err)


def test_pyproject_report_table_sets_the_limit(capsys: pytest.CaptureFixture, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text(f'[tool.lipcert]\nmodel = "{DENSE}"\n\n'
                                             f'[tool.lipcert.report]\nmax_elements = 1000\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "report", "--data", str(SAMPLES / "digits_test.npz"))
    assert code == 2 and "initializer 'fc1.weight'" in one_line(err) and "limit of 1,000 " in err
    assert not (tmp_path / "lipcert-report").exists()


# ------------------------------------------------------------------------------------------ huge ONNX graphs


def _blowup(tmp: Path, op: str) -> Path:
    """digits_dense with a node that would make an 8 GiB tensor (2**31 floats) feeding the output."""
    m = onnx.load(str(DENSE))
    g = m.graph
    shape = numpy_helper.from_array(np.array([2**15, 2**16], dtype=np.int64), "big_shape")
    if op == "Tile":
        g.initializer.extend([numpy_helper.from_array(np.ones((2, 2), np.float32), "small"),
                              numpy_helper.from_array(np.array([2**14, 2**15], dtype=np.int64), "reps")])
        nodes = [helper.make_node("Tile", ["small", "reps"], ["big"], name="blowup")]
    elif op == "Expand":
        g.initializer.extend([numpy_helper.from_array(np.ones(1, np.float32), "small"), shape])
        nodes = [helper.make_node("Expand", ["small", "big_shape"], ["big"], name="blowup")]
    else:  # ConstantOfShape; "reference": followed by Erf, which lipcert does not run, so that onnx's
        # reference evaluator folds the constant subgraph
        g.initializer.append(shape)
        nodes = [helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="blowup")]
        if op == "reference":
            nodes.append(helper.make_node("Erf", ["big"], ["big_erf"], name="erf"))
    last = nodes[-1].output[0]
    for k, node in enumerate(nodes):
        g.node.insert(k, node)
    g.node.append(helper.make_node("ReduceSum", [last], ["big_sum"], keepdims=0, name="big_sum"))
    g.node.append(helper.make_node("Add", [g.output[0].name, "big_sum"], ["joined"], name="join"))
    g.output[0].name = "joined"
    path = tmp / f"{op}.onnx"
    onnx.save(m, str(path))
    return path


def capped(*args: str) -> subprocess.CompletedProcess:
    """Run ``python args...`` with its address space capped at CAP, so that a big allocation fails loudly."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop(limits.ENV_VAR, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, preexec_fn=cap,
                          timeout=300)


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Tile", "reference"])
def test_huge_intermediate_refused_before_allocation(tmp_path: Path, op: str) -> None:
    path = _blowup(tmp_path, op)
    result = capped("-m", "lipcert", "inspect", str(path))
    line = one_line(result.stderr)
    assert result.returncode == 2, result.stderr
    kind = "ConstantOfShape" if op == "reference" else op
    assert line == (f"lipcert: error: {path}: node 'blowup' ({kind}) would allocate 2,147,483,648 elements, more "
                    f"than the limit of {DEFAULT} (--max-elements; raise it)")


# ------------------------------------------------------------------------------------------ dataset samples


def _npz(path: Path, sample: tuple[int, ...], n: int = 2) -> Path:
    np.savez(path, x=np.zeros((n, *sample), np.float32), y=np.zeros(n, np.int64))
    return path


def test_open_dataset_refuses_a_sample_above_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _npz(tmp_path / "big.npz", (1, 40, 40))
    with pytest.raises(DataError) as info:
        open_dataset(path, max_elements=1599)
    assert str(info.value) == (f"{path}: one sample of x has 1,600 elements (shape (1, 40, 40)), more than the "
                               "limit of 1,599 (max_elements; raise it)")
    assert open_dataset(path, max_elements=1600).info.sample_shape == (1, 40, 40)
    monkeypatch.setenv(limits.ENV_VAR, "1000")
    with pytest.raises(DataError, match="one sample of x has 1,600 elements"):
        open_dataset(path)


def test_certify_api_applies_the_limit_to_the_dataset(tmp_path: Path) -> None:
    graph = lipcert.load_model(DENSE, max_elements=100_000)
    path = _npz(tmp_path / "big.npz", (1, 400, 400))
    with pytest.raises(DataError, match="one sample of x has 160,000 elements \\(shape \\(1, 400, 400\\)\\), more "
                                        "than the limit of 100,000"):
        lipcert.certify(graph, path, max_elements=100_000)


def test_report_refuses_a_dataset_sample_above_the_limit(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = _npz(tmp_path / "big.npz", (1, 400, 400))
    code, _, err = run_main(capsys, "report", str(DENSE), "--data", str(path), "--max-elements", "100000",
                       "--no-attack", "--out", str(tmp_path / "out"))
    assert code == 2
    assert one_line(err) == (f"lipcert: error: {path}: one sample of x has 160,000 elements (shape (1, 400, "
                             "400)), more than the limit of 100,000 (--max-elements; raise it)")


def test_huge_declared_sample_refused_before_reading(tmp_path: Path) -> None:
    """A gzip IDX file whose header declares one 65536 x 65536 image (4 GiB) in a few bytes."""
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 2**16, 2**16) + b"\0" * 64))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 1)
                                                                       + b"\0"))
    script = textwrap.dedent("""
        import sys
        from lipcert.data import open_dataset
        from lipcert.errors import DataError
        try:
            next(open_dataset(sys.argv[1]).batches(1))
            print("READ")
        except DataError as exc:
            print("REFUSED", exc)
    """)
    result = capped("-c", script, str(tmp_path))
    assert result.stdout.strip() == (f"REFUSED {images}: one sample of x has 4,294,967,296 elements (shape "
                                     f"(65536, 65536)), more than the limit of {DEFAULT} (max_elements; "
                                     "raise it)"), result.stderr[-2000:]
