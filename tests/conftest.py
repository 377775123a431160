"""Shared fixtures and helpers: sample model paths, exporters and peer-library models made on the fly, CLI runners,
dense norms, and writers of dataset files; test modules import helpers from here, never from one another."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

# the CLI's terminal width is 140 off a terminal unless COLUMNS says otherwise; pytest-xdist's workers set
# COLUMNS=80, and the tests that read wrapped output expect the same width in every run
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)
# one thread per pytest-xdist worker (the README runs one per core), both cores otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...], dynamo: bool,
                opset: int | None = None) -> Path:
    """Export with torch's TorchScript (dynamo=False) or dynamo exporter, batch dimension dynamic."""
    model.eval()
    x = torch.rand((2,) + tuple(input_shape))
    kwargs: dict = {"input_names": ["input"], "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def strip_parametrizations(model: torch.nn.Module) -> torch.nn.Module:
    """Bake torch parametrizations (orthogonium, spectral_norm) into plain weights, as an export does."""
    import torch.nn.utils.parametrize as parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name)
    return model


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``lipcert`` command (falling back to ``python -m lipcert``) as a subprocess."""
    exe = shutil.which("lipcert")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "lipcert", *args]
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from lipcert.cli.app import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line of a CLI error, failing when there is more than one or a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def dense_norm(linear, shape: tuple[int, ...]) -> float:
    """||A||_2 of a linear map on one sample, by the SVD of its explicit float64 matrix."""
    n = math.prod(shape)
    with torch.no_grad():
        columns = linear(torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(shape))).reshape(n, -1)
    return float(torch.linalg.matrix_norm(columns, 2))


def graph_of(builder, output: str):
    """The lipcert ``Graph`` of a model written with ``tests.soundness.build.Builder`` (loaded without a file)."""
    from lipcert.model.onnx_loader import graph_from_onnx

    return graph_from_onnx(builder.model(output), "built")


def ir_version(opset: int) -> int:
    """The smallest IR version for a default-domain opset (onnxruntime refuses IR versions newer than it knows)."""
    from onnx import helper

    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


def newest_opset() -> int:
    """The newest default-domain opset that both onnx and onnxruntime accept (17 at the least)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def accepted(opset: int) -> bool:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version(opset))
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime refuses opsets newer than it knows
            return False
        return True

    return next((opset for opset in range(onnx.defs.onnx_opset_version(), 17, -1) if accepted(opset)), 17)


# ------------------------------------------------------------------------------------------ peer-library models


def torchlip_model(kind: str) -> torch.nn.Module:
    import deel.torchlip as tl

    torch.manual_seed(0)
    if kind == "conv":
        model = tl.Sequential(
            tl.SpectralConv2d(1, 8, 3, padding=1), tl.GroupSort2(),
            tl.SpectralConv2d(8, 16, 3, stride=2, padding=1), tl.GroupSort(4),
            tl.ScaledL2NormPool2d(kernel_size=2), torch.nn.Flatten(), tl.SpectralLinear(16 * 2 * 2, 10))
    else:
        model = tl.Sequential(torch.nn.Flatten(), tl.SpectralLinear(64, 32), tl.FullSort(),
                              tl.SpectralLinear(32, 10))
    return model.vanilla_export().eval()


def orthogonium_model() -> torch.nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        AdaptiveOrthoConv2d(1, 8, 3, padding="same", padding_mode="circular"), MaxMin(),
        AdaptiveOrthoConv2d(8, 16, 2, stride=2, padding=0), MaxMin(),
        torch.nn.Flatten(), OrthoLinear(16 * 4 * 4, 10))
    return strip_parametrizations(model.eval())


# ------------------------------------------------------------------------------------------ dataset writers

RNG = np.random.default_rng(0)


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def write_cifar10(root: Path, train_batches: int = 2, per_batch: int = 5, test: int = 7) -> dict[str, np.ndarray]:
    """A cifar-10-batches-py folder as the official files are: protocol-2 pickles of dicts with bytes keys."""
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    out = {}
    for name, n in [(f"data_batch_{i + 1}", per_batch) for i in range(train_batches)] + [("test_batch", test)]:
        data, labels = u8(n, 3072), [int(v) for v in RNG.integers(0, 10, n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"img%d.png" % i for i in range(n)]}, f, protocol=2)
        out[name] = (data, np.array(labels))
    return out


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)


def write_images(root: Path, spec: dict[str, list[tuple[str, np.ndarray]]]) -> None:
    from PIL import Image

    for cls, images in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, array in images:
            Image.fromarray(array).save(root / cls / name, quality=95, subsampling=0)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Record in the test output how many fuzz cases ran (issue: "record the number of cases tried")."""
    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and sum(fuzz.CASES.values()):
        cases = fuzz.CASES
        terminalreporter.write_line(f"fuzz ({fuzz.PROFILE} profile): {cases['onnx']} ONNX cases, "
                                    f"{cases['safetensors']} safetensors cases, {cases['cli']} memory-capped "
                                    "CLI cases")
    soundness = sys.modules.get("tests.soundness.oracle")
    if soundness is not None and soundness.STATS["models"]:
        stats = soundness.STATS
        profile = os.environ.get("LIPCERT_SOUNDNESS_PROFILE", "ci")
        terminalreporter.write_line(
            f"soundness ({profile} profile): {stats['models']} models generated ({stats['refused']} refused at load; "
            f"{stats['discarded']} more drawn but discarded, onnxruntime cannot run them), {stats['steps']} steps "
            f"checked, {stats['values']} value bounds checked, {stats['certificates']} certificates attacked "
            f"({stats['local']} of them raised by local certificates)")
    forms = sys.modules.get("tests.test_runtime_forms")
    if forms is not None and sum(forms.TALLY.values()):
        terminalreporter.write_line(f"runtime forms: {forms.tally_line()}")
