"""Shared fixtures: sample model paths and exporters that make real models on the fly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

torch.set_num_threads(2)


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
            f"checked, {stats['values']} value bounds checked, {stats['certificates']} certificates attacked")
