"""``lipcert inspect`` on every bundled sample model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import SAMPLES, run_cli, run_main

SAMPLE_MODELS = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".onnx", ".safetensors"))


def test_samples_are_bundled() -> None:
    assert {"digits_conv.onnx", "digits_dense.onnx", "digits_broken.onnx"} <= set(SAMPLE_MODELS)
    assert {"digits_conv.safetensors", "digits_dense.safetensors", "digits_broken.safetensors"} <= set(SAMPLE_MODELS)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_inspect_json(name: str) -> None:
    result = run_cli("inspect", str(SAMPLES / name), "--json", "-")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["input_shape"] == [1, 8, 8]
    assert summary["metadata"]["lipcert.claimed_lipschitz"] in ("1.0", "1")
    assert summary["parameters"] > 1000
    assert summary["nodes"][-1]["output_shapes"] == [[10]]
    assert summary["crosscheck"]["max_rel_diff"] <= 1e-5


def test_inspect_table(tmp_path: Path) -> None:
    result = run_cli("inspect", str(SAMPLES / "digits_conv.onnx"))
    assert result.returncode == 0, result.stderr
    assert "Conv" in result.stdout and "Gemm" in result.stdout
    assert "matches onnxruntime" in result.stdout


def test_inspect_json_file_dash_and_format_json(capsys, tmp_path: Path) -> None:
    model = str(SAMPLES / "digits_dense.onnx")
    code, to_stdout, _ = run_main(capsys, "inspect", model, "--json", "-")
    assert code == 0 and json.loads(to_stdout)["input_shape"] == [1, 8, 8]  # nothing else on stdout
    code, by_format, _ = run_main(capsys, "inspect", model, "--format", "json")
    assert code == 0 and json.loads(by_format) == json.loads(to_stdout)
    code, table, _ = run_main(capsys, "inspect", model, "--json", str(tmp_path / "summary.json"))
    assert code == 0 and "Gemm" in table and "matches onnxruntime" in table  # the table still shows
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(to_stdout)
    code, _, err = run_main(capsys, "inspect", model, "--json")
    assert code == 2 and "--json" in err and "requires an argument" in err
