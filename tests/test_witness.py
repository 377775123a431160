"""Evidence for ``violated``: the witness pair is confirmed by onnxruntime and written only then; ``why`` says
what keeps a claim from being proven."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lipcert.bounds.results import PROVEN, UNPROVEN, VIOLATED
from lipcert.bounds.verify import verify
from lipcert.bounds.witness import find_witness
from lipcert.model.loader import load_model

from .conftest import SAMPLES, run_cli


def _ort_ratio(model: Path, data: np.lib.npyio.NpzFile) -> float:
    session = ort.InferenceSession(str(model))
    name = session.get_inputs()[0].name
    a, b = (session.run(None, {name: data[k]})[0] for k in ("x", "x_prime"))
    return float(np.linalg.norm(a - b) / np.linalg.norm(data["x"].astype(np.float64) - data["x_prime"]))


@pytest.mark.slow
def test_a_violated_claim_writes_a_witness_that_onnxruntime_confirms(tmp_path: Path) -> None:
    model = SAMPLES / "digits_broken.onnx"
    result = verify(load_model(model), witness=tmp_path / "w.npz", empirical_budget=5)
    assert result.status == VIOLATED and result.witness is not None and result.witness["confirmed"]
    data = np.load(tmp_path / "w.npz")
    assert data["x"].dtype == np.float32 and data["x"].shape == (1, 1, 8, 8)
    ratio = _ort_ratio(model, data)
    assert ratio > result.claimed and ratio == pytest.approx(result.witness["ratio"], rel=1e-6)
    assert "claim is false" in result.why


def test_no_witness_without_a_violation(tmp_path: Path) -> None:
    result = verify(load_model(SAMPLES / "digits_conv.onnx"), witness=tmp_path / "w.npz", empirical_budget=2)
    assert result.status == PROVEN and result.why == ""
    assert result.witness is None and not (tmp_path / "w.npz").exists()
    assert any("not violated" in note for note in result.notes)


def test_an_unconfirmed_pair_is_not_written() -> None:
    graph = load_model(SAMPLES / "digits_conv.onnx")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, 8, 8), generator=gen, dtype=torch.float64)
    found = find_witness(graph, (x + 0.01 * torch.randn(x.shape, generator=gen, dtype=x.dtype), x), 1.0, 1e-5)
    assert not found.confirmed and 0 < found.ratio <= 1.0


def test_witness_of_a_fixed_batch_model(tmp_path: Path) -> None:
    """A model whose batch is fixed (here 3) runs the pair padded to its batch in onnxruntime."""
    layer = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.qr(torch.randn(6, 4))[0].T * 1.5)
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (torch.rand(3, 6),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    result = verify(load_model(path), witness=tmp_path / "w.npz", empirical_budget=5)
    assert result.status == VIOLATED and result.witness is not None and result.witness["confirmed"]
    data = np.load(tmp_path / "w.npz")
    session = ort.InferenceSession(str(path))
    both = session.run(None, {"x": np.concatenate([data["x"], data["x_prime"], data["x"]])})[0]
    ratio = np.linalg.norm(both[0] - both[1]) / np.linalg.norm(data["x"][0].astype(np.float64) - data["x_prime"][0])
    assert ratio > 1.0 and ratio == pytest.approx(1.5, rel=1e-3)


def test_why_names_the_factors_of_an_unproven_claim() -> None:
    result = verify(load_model(SAMPLES / "digits_broken.onnx"), empirical=False)
    assert result.status == UNPROVEN
    assert "/conv1/Conv" in result.why and "above the claim" in result.why


@pytest.mark.slow
def test_cli_witness_flag(tmp_path: Path) -> None:
    out = run_cli("verify", str(SAMPLES / "digits_broken.onnx"), "--witness", str(tmp_path / "w.npz"),
                  "--empirical-budget", "5", "--json", str(tmp_path / "v.json"))
    assert out.returncode == 1, out.stderr
    assert json.loads((tmp_path / "v.json").read_text())["witness"]["file"] == str(tmp_path / "w.npz")
    assert _ort_ratio(SAMPLES / "digits_broken.onnx", np.load(tmp_path / "w.npz")) > 1.0
