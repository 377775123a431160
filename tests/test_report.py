"""End-to-end tests of ``lipcert report``: certificates checked against an independent computation from
onnxruntime logits, every output file, every data format, normalisation, L-infinity, declared bounds, bad
input, atomic writes, binary models and ``--quiet``."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

from lipcert import certify, load_model
from lipcert.certification.engine import Engine, choose_backend
from lipcert.certification.radii import BINARY_RULE
from lipcert.certification.setup import certificate_setup
from lipcert.cli.app import main
from lipcert.graph.executor import GraphModule
from lipcert.report.render import FILES

from .conftest import SAMPLES, export_onnx, run_cli, write_cifar10, write_idx, write_images

DIGITS = SAMPLES / "digits_test.npz"
EPS = "0,36/255,72/255,108/255,1"
SLACK = 1e-5  # radius difference allowed between onnxruntime's and lipcert's float32 logits
SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------- helpers


def cli(*args: str) -> tuple[int, str, str]:
    """Run the ``lipcert`` entry point in this process (no interpreter start-up): exit code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(list(args))
    return code, stdout.getvalue(), stderr.getvalue()


def report(model: Path, data: Path, out: Path, *flags: str) -> tuple[str, dict]:
    """Run ``lipcert report`` (no attack), require success, and return its stdout and report.json."""
    code, stdout, stderr = cli("report", str(model), "--data", str(data), "--out", str(out), "--no-attack", *flags)
    assert code == 0, stdout + stderr
    return stdout, json.loads((out / "report.json").read_text())


def samples(out: Path) -> dict[str, np.ndarray]:
    """samples.csv as columns, after checking its header."""
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:6] == ["index", "label", "prediction", "margin", "radius", "exact_radius"]
    cols = dict(zip(rows[0], np.array(rows[1:], dtype=object).T))
    return {k: v.astype(np.int64 if k in ("index", "label", "prediction") else np.float64) for k, v in cols.items()}


def dense_onnx(path: Path, shape: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    """Export a torch Flatten + Linear model with spectral norm just below 1; returns its weight (classes x inputs)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(shape), classes))
    with torch.no_grad():
        model[1].weight /= torch.linalg.matrix_norm(model[1].weight, 2) * 1.001
        model[1].bias.mul_(0.3)
    export_onnx(model, path, shape, dynamo=False)
    return model[1].weight.detach().numpy()


def last_gemm_weight(path: Path) -> np.ndarray:
    """The last Gemm's matrix as (classes x features), read from the ONNX file."""
    model = onnx.load(str(path))
    node = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
    return w if any(a.name == "transB" and a.i for a in node.attribute) else w.T


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the ONNX file directly with onnxruntime on CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def allowance(model: Path, x: np.ndarray, rep: dict, mean: list[float] | None = None,
              std: list[float] | None = None) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]:
    """lipcert's float error allowance for each sample (at the sample) and its growth with the radius, through
    its Python API with the backend the report used: the numbers the documented radius rules take; and the
    second centre: the float64 logits (lipcert's executor in float64, normalised in float64 from the float32
    mean and std) with lipcert's bound on their error."""
    graph = load_model(model)
    setup, _ = certificate_setup(graph, declared=rep["bound"]["declared"], mean=mean, std=std)
    engine = Engine(graph, setup, backend=rep["backend"], mean=mean, std=std)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    runner = choose_backend(graph, rep["backend"], "cpu", xt, engine.mean, engine.std, engine.measure)
    _, norms = runner(xt)
    x_norm = xt.flatten(1).double().norm(dim=1)
    error = engine.error(x_norm, norms)
    xd = xt.double() if mean is None else (xt.double() - engine.mean.double()) / engine.std.double()
    z64 = GraphModule(graph).to(torch.float64)(xd).reshape(len(x), -1).detach().numpy()
    e64 = engine.exact_error.base + engine.exact_error.slope * x_norm.numpy()
    assert (e64 < 1e-9).all()  # float64 rounding: about 1e-13 on these models
    return (np.broadcast_to(np.asarray(error.base, dtype=np.float64), (len(x),)), float(error.slope),
            (z64, e64))


def _rules(c: np.ndarray, pred: np.ndarray, lip: float, head: np.ndarray | None, allow: np.ndarray,
           slope: float) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(2) rule, the larger of it and the per-pair rule) for the centre logits ``c``: with the head's bound
    L' = L / ||W||, (c_pred - max_j c_j - allow) / (sqrt(2) (L + slope)) and
    min_j (c_pred - c_j - allow) / (L' ||w_pred - w_j|| + sqrt(2) slope)."""
    rows = np.arange(len(c))
    gap = c[rows, pred][:, None] - c
    gap[rows, pred] = np.inf
    sqrt2 = np.maximum(0, (gap.min(1) - allow) / (SQRT2 * (lip + slope)))
    if head is None:
        return sqrt2, sqrt2
    w = head.astype(np.float64)
    pairs = (lip / np.linalg.norm(w, 2)) * np.linalg.norm(w[:, None] - w[None], axis=2) + SQRT2 * slope
    per = (gap - allow[:, None]) / pairs[pred].clip(1e-300)
    return sqrt2, np.maximum(sqrt2, per.min(1).clip(0))


def radii(z: np.ndarray, x: np.ndarray, bound: dict, head: np.ndarray | None,
          error: tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Prediction, margin and radii by radii.py's documented rules, from float32 logits, the report's bound,
    the float error allowance E = base + slope r of each sample and the float64 centre (c, e_c):
    float32-safe: the larger over the centres (z, base) and (c, e_c) of the rules with the allowance
    sqrt(2) (e_centre + base) and slope; exact: the rules on z with neither; one logit:
    (+-c - e_centre - base) / (L + slope), exact |z| / L.
    """
    z = z.astype(np.float64)
    lip = bound["value"]
    base, slope, (z64, e64) = error
    z64 = z64.reshape(z.shape)
    if z.shape[1] == 1:
        pred = (z[:, 0] > 0).astype(np.int64)
        sign = 2.0 * pred - 1
        r = np.maximum.reduce([np.maximum(0, (sign * c[:, 0] - e - base) / (lip + slope))
                               for c, e in ((z, base), (z64, e64))])
        return {"prediction": pred, "margin": np.abs(z[:, 0]), "sqrt2": r, "radius": r,
                "exact": np.abs(z[:, 0]) / lip}
    pred = np.argsort(-z, axis=1, kind="stable")[:, 0]
    rows = np.arange(len(z))
    margin = z[rows, pred] - np.sort(z, axis=1)[:, -2]
    ours = _rules(z, pred, lip, head, 2 * SQRT2 * base, slope)
    centre = _rules(z64, pred, lip, head, SQRT2 * (e64 + base), slope)
    _, exact = _rules(z, pred, lip, head, np.zeros(len(z)), 0.0)
    return {"prediction": pred, "margin": margin, "sqrt2": np.maximum(ours[0], centre[0]),
            "radius": np.maximum(ours[1], centre[1]), "exact": exact}


def assert_counts(rep: dict, radius: np.ndarray, correct: np.ndarray) -> None:
    """Each eps's certified count equals the independent one, but for the few samples within SLACK of eps."""
    for e in rep["eps"]:
        border = int((correct & (np.abs(radius - e["eps"]) <= SLACK)).sum())
        assert border <= 2, f"{border} samples on the border of eps {e['label']}"
        assert abs(e["certified"] - int(((radius > e["eps"]) & correct).sum())) <= border, e
        assert e["certified_accuracy"] == pytest.approx(e["certified"] / rep["dataset"]["num_samples"])


def assert_matches(out: Path, rep: dict, expect: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """samples.csv and report.json agree with the independent certificates; returns samples.csv."""
    s = samples(out)
    assert np.array_equal(s["index"], np.arange(len(labels))) and np.array_equal(s["label"], labels)
    assert np.array_equal(s["prediction"], expect["prediction"])
    assert np.allclose(s["margin"], expect["margin"], rtol=1e-5, atol=1e-6)
    assert np.allclose(s["radius"], expect["radius"], rtol=1e-5, atol=SLACK)
    assert np.allclose(s["exact_radius"], expect["exact"], rtol=1e-5, atol=SLACK)
    assert (s["radius"] <= s["exact_radius"]).all()  # the float32-safe radius only subtracts rounding
    assert rep["dataset"]["num_samples"] == len(labels)
    assert rep["clean_accuracy"] == pytest.approx(float((expect["prediction"] == labels).mean()))
    assert_counts(rep, expect["radius"], expect["prediction"] == labels)
    return s


def out_is_empty(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


# ---------------------------------------------------------------- the sample digits models

MODELS = ["digits_conv.onnx", "digits_dense.onnx", "digits_conv.safetensors", "digits_dense.safetensors"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """One ``lipcert report`` run per sample model: (out folder, report.json)."""
    runs = {}
    for name in MODELS:
        out = tmp_path_factory.mktemp(name.replace(".", "_"))
        runs[name] = (out, report(SAMPLES / name, DIGITS, out, "--eps", EPS)[1])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_digits_certificates_equal_independent_computation(digits, name: str) -> None:
    out, rep = digits[name]
    stem = name.split(".")[0]
    onnx_file = SAMPLES / f"{stem}.onnx"
    data = np.load(DIGITS)
    x, y = data["x"], data["y"]
    b = rep["bound"]
    assert b["value"] == pytest.approx(1.0, abs=1e-6) and b["declared"] is None
    assert b["rule"].startswith("per-pair") and 0 < b["error_base"] < 1e-2 and 0 < b["error_slope"] < 1e-2
    expect = radii(ort_logits(onnx_file, x), x, b, last_gemm_weight(onnx_file), allowance(SAMPLES / name, x, rep))
    s = assert_matches(out, rep, expect, y)
    # the per-pair rule is never below the sqrt(2) rule, and strictly above it somewhere
    assert (s["radius"] >= expect["sqrt2"] - SLACK).all()
    assert (s["radius"] > expect["sqrt2"] + 1e-3).sum() > len(y) // 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", ["digits_conv.onnx", "digits_dense.onnx"])
def test_float_error_allowance_covers_the_real_rounding(name: str, backend: str) -> None:
    """The deployed float32 logits are within the allowance of the exact ones (float64), for every sample,
    both around each sample (measured norms) and around the zero image."""
    graph = load_model(SAMPLES / name)
    setup, info = certificate_setup(graph)
    engine = Engine(graph, setup, backend=backend)
    x = torch.from_numpy(np.load(DIGITS)["x"]).reshape((-1,) + graph.input_shape)
    runner = choose_backend(graph, backend, "cpu", x, None, None, engine.measure)
    z, norms = runner(x)
    assert norms is not None and set(norms) == set(engine.measure)
    exact = GraphModule(graph).to(torch.float64)(x.double())
    gap = (z.double() - exact).norm(dim=1)
    x_norm = x.flatten(1).double().norm(dim=1)
    measured = engine.error(x_norm, norms)
    assert (gap > 0).any() and (gap <= measured.base).all()
    assert (gap <= info.error_base + info.error_slope * x_norm).all()
    assert (measured.base < info.error_base + info.error_slope * x_norm).float().mean() > 0.9  # measured is tighter


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_conv.onnx", "digits_dense.onnx"])
def test_digits_sqrt2_rule_with_the_models_bound(digits, name: str) -> None:
    """Certifying with the model's own bound declared (no per-pair head) is exactly the sqrt(2) rule."""
    rep = digits[name][1]
    data = np.load(DIGITS)
    x, y = data["x"], data["y"]
    result = certify(load_model(SAMPLES / name), DIGITS, EPS, lipschitz=rep["bound"]["value"], attack=False)
    assert result.bound.rule == "sqrt(2) margin"
    declared = {**rep, "bound": asdict(result.bound), "backend": result.backend}
    expect = radii(ort_logits(SAMPLES / name, x), x, rep["bound"], None, allowance(SAMPLES / name, x, declared))
    assert np.allclose(result.samples.radii.numpy(), expect["sqrt2"], rtol=1e-5, atol=SLACK)
    assert_counts(result.to_dict(), expect["sqrt2"], expect["prediction"] == y)
    assert all(e.certified <= f["certified"] for e, f in zip(result.eps, rep["eps"]))


def test_outputs(digits) -> None:
    out, rep = digits["digits_conv.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["certified_accuracy.png", "report.json", "report.md",
                                                     "samples.csv"]
    assert rep["schema"] == "lipcert.report/1"
    assert rep["model"]["sha256"] == hashlib.sha256((SAMPLES / "digits_conv.onnx").read_bytes()).hexdigest()
    d = rep["dataset"]
    assert d["sha256"] == hashlib.sha256(DIGITS.read_bytes()).hexdigest()
    assert (d["format"], d["num_samples"], d["layout"], d["value_range"]) == ("npz", 540, "NCHW", "float 0-1")
    assert [e["label"] for e in rep["eps"]] == EPS.split(",")
    assert [e["eps"] for e in rep["eps"]] == pytest.approx([0, 36 / 255, 72 / 255, 108 / 255, 1])
    assert all(rep["timings"][k] >= 0 for k in ("bound_seconds", "inference_seconds", "total_seconds"))
    assert rep["timings"]["images_per_second"] > 0 and rep["lipcert_version"] and rep["device"] == "cpu"
    curve = np.array(rep["curve"])
    assert (np.diff(curve[:, 0]) > 0).all() and (np.diff(curve[:, 1]) <= 0).all()
    s = samples(out)
    assert len(s["index"]) == 540
    correct = s["label"] == s["prediction"]
    assert rep["clean_accuracy"] == pytest.approx(correct.mean())
    assert [e["certified"] for e in rep["eps"]] == [int(((s["radius"] > e["eps"]) & correct).sum()) for e in rep["eps"]]
    md = (out / "report.md").read_text()
    for e in rep["eps"]:
        assert f"| {e['label']} (" in md and f"{100 * e['certified_accuracy']:.2f}%" in md
    png = (out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(out / "certified_accuracy.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100


@pytest.mark.slow
def test_quiet_prints_one_summary_line(digits, tmp_path: Path) -> None:
    """The installed command, as a user runs it: one line on stdout, the same report as without --quiet."""
    result = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", str(DIGITS), "--eps", EPS, "--out",
                     str(tmp_path), "--no-attack", "--quiet")
    assert result.returncode == 0, result.stderr
    rep = digits["digits_dense.onnx"][1]
    pct = [f"{100 * e['certified_accuracy']:.2f}% (exact {100 * e['exact_certified_accuracy']:.2f}%)"
           for e in rep["eps"]]
    assert result.stdout.splitlines() == [f"clean {100 * rep['clean_accuracy']:.2f}%, "
                                          + ", ".join(f"certified@{e['label']} {p}" for e, p in zip(rep["eps"], pct))
                                          + ": all gates pass"]


@pytest.mark.slow
def test_declared_bound_on_the_broken_model(tmp_path: Path) -> None:
    _, declared = report(SAMPLES / "digits_broken.onnx", DIGITS, tmp_path / "a", "--lipschitz", "1.0", "--eps",
                         "36/255", "--no-require-claim")
    _, computed = report(SAMPLES / "digits_broken.onnx", DIGITS, tmp_path / "b", "--eps", "36/255",
                         "--no-require-claim")
    assert declared["bound"]["value"] == 1.0 and declared["bound"]["declared"] == 1.0
    assert "declared" in declared["bound"]["method"]
    assert any("declared with lipschitz" in note for note in declared["notes"])
    assert "declared with lipschitz" in (tmp_path / "a" / "report.md").read_text()
    assert computed["bound"]["value"] == pytest.approx(2.7987, abs=1e-3) and computed["bound"]["declared"] is None
    assert not any("declared" in note for note in computed["notes"])
    assert computed["eps"][0]["certified_accuracy"] < 0.8 * declared["eps"][0]["certified_accuracy"]
    data = np.load(DIGITS)
    z = ort_logits(SAMPLES / "digits_broken.onnx", data["x"])
    broken = SAMPLES / "digits_broken.onnx"
    assert_matches(tmp_path / "a", declared, radii(z, data["x"], declared["bound"], None,
                                                   allowance(broken, data["x"], declared)), data["y"])
    head = last_gemm_weight(broken)
    assert_matches(tmp_path / "b", computed, radii(z, data["x"], computed["bound"], head,
                                                   allowance(broken, data["x"], computed)), data["y"])


# ---------------------------------------------------------------- data formats, on small generated files


def check_format(tmp_path: Path, data: Path, shape: tuple[int, ...], classes: int, x: np.ndarray, y: np.ndarray,
                 fmt: str, layout: str, value_range: str, *flags: str) -> dict:
    """Run the CLI on a fresh dense model of ``shape``; x (channels first, [0, 1]) and y are what the file holds."""
    model = tmp_path / "model.onnx"
    w = dense_onnx(model, shape, classes)
    out = tmp_path / "out"
    # a random model may certify nothing: the formats are under test here, not the gates
    stdout, rep = report(model, data, out, "--eps", "0,0.05,0.1", "--allow-empty-certificates", *flags)
    assert "certified accuracy" in stdout and "wrote" in stdout
    d = rep["dataset"]
    assert (d["format"], d["layout"], d["value_range"], d["num_samples"]) == (fmt, layout, value_range, len(y))
    assert d["sample_shape"] == list(shape)
    assert_matches(out, rep, radii(ort_logits(model, x), x, rep["bound"], w, allowance(model, x, rep)), y)
    return rep


def test_format_cifar10(tmp_path: Path) -> None:
    data, labels = write_cifar10(tmp_path / "cifar-10-batches-py", train_batches=1, per_batch=2, test=6)["test_batch"]
    x = data.reshape(-1, 3, 32, 32) / np.float32(255)
    check_format(tmp_path, tmp_path / "cifar-10-batches-py", (3, 32, 32), 10, x, labels, "cifar", "NCHW",
                 "uint8 0-255")


def test_format_mnist_idx_gz(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), rng.integers(0, 10, 9).astype(np.uint8)
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", y)
    check_format(tmp_path, tmp_path / "mnist", (1, 28, 28), 10, x[:, None] / np.float32(255), y, "idx", "NHW",
                 "uint8 0-255")


def test_format_image_folder_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = {cls: [(f"{i}.png", rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for i in range(3)]
              for cls in ("cat", "dog")}
    write_images(tmp_path / "images", images)
    x = np.stack([a for cls in ("cat", "dog") for _, a in images[cls]]).transpose(0, 3, 1, 2) / np.float32(255)
    check_format(tmp_path, tmp_path / "images", (3, 8, 6), 2, x, np.repeat([0, 1], 3), "image-folder", "NHWC",
                 "uint8 0-255")


def test_format_safetensors_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x, y = rng.random((11, 1, 6, 6), dtype=np.float32), rng.integers(0, 4, 11)
    save_file({"images": x, "labels": y}, str(tmp_path / "d.safetensors"))
    check_format(tmp_path, tmp_path / "d.safetensors", (1, 6, 6), 4, x, y, "safetensors", "NCHW", "float 0-1")


NHWC_MEAN, NHWC_STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.5]


@pytest.fixture(scope="module")
def nhwc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, dict]:
    """A uint8 NHWC npz and a 3-channel dense model in one folder, with the L2 report: (folder, x, y, report)."""
    root = tmp_path_factory.mktemp("nhwc")
    rng = np.random.default_rng(4)
    raw, y = rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8), rng.integers(0, 5, 40)
    np.savez(root / "d.npz", x=raw, y=y)
    rep = check_format(root, root / "d.npz", (3, 6, 5), 5, raw.transpose(0, 3, 1, 2) / np.float32(255), y, "npz",
                       "NHWC", "uint8 0-255")
    return root, raw.transpose(0, 3, 1, 2) / np.float32(255), y, rep


def test_format_npz_nhwc_uint8(nhwc) -> None:
    root, _, _, rep = nhwc
    assert rep["dataset"]["sha256"] == hashlib.sha256((root / "d.npz").read_bytes()).hexdigest()
    assert "layout NHWC" in (root / "out" / "report.md").read_text()


def test_mean_std_scale_the_bound(nhwc, tmp_path: Path) -> None:
    root, x, y, plain = nhwc
    out = tmp_path / "out"
    _, rep = report(root / "model.onnx", root / "d.npz", out, "--eps", "0,0.05,0.1", "--mean",
                    ",".join(map(str, NHWC_MEAN)), "--std", ",".join(map(str, NHWC_STD)))
    b = rep["bound"]
    assert b["normalisation_factor"] == pytest.approx(1 / min(NHWC_STD))
    assert b["value"] == pytest.approx(plain["bound"]["value"] / min(NHWC_STD), rel=1e-9)
    assert b["computed_upper"] == pytest.approx(b["value"])
    normalised = (x - np.float32(NHWC_MEAN)[:, None, None]) / np.float32(NHWC_STD)[:, None, None]
    z = ort_logits(root / "model.onnx", normalised)
    error = allowance(root / "model.onnx", x, rep, list(NHWC_MEAN), list(NHWC_STD))
    assert_matches(out, rep, radii(z, x, b, last_gemm_weight(root / "model.onnx"), error), y)
    assert "multiplies the bound by 5" in (out / "report.md").read_text()


def test_linf_radii_are_l2_over_sqrt_d(nhwc, tmp_path: Path) -> None:
    root, _, _, l2 = nhwc
    out = tmp_path / "out"
    _, rep = report(root / "model.onnx", root / "d.npz", out, "--eps", "0,0.001,0.002", "--norm", "linf")
    assert rep["norm"] == "linf" and rep["input_dim"] == 90
    assert any("L-infinity" in note for note in rep["notes"])
    linf, ref = samples(out), samples(root / "out")
    assert np.allclose(linf["radius"], ref["radius"] / math.sqrt(90), rtol=1e-7, atol=1e-12)
    correct = linf["prediction"] == linf["label"]
    assert [e["certified"] for e in rep["eps"]] == [int(((linf["radius"] > e["eps"]) & correct).sum())
                                                   for e in rep["eps"]]


def test_binary_model(tmp_path: Path) -> None:
    """One logit z: prediction z > 0, radius (|z| - err) / L, certified iff |z| / L > eps up to float slack."""
    rng = np.random.default_rng(5)
    x, y = rng.random((60, 1, 4, 4), dtype=np.float32), rng.integers(0, 2, 60)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    model = tmp_path / "binary.onnx"
    w = dense_onnx(model, (1, 4, 4), 1)
    z = ort_logits(model, x)[:, 0]
    lip = float(np.linalg.norm(w.astype(np.float64)))
    eps = np.quantile(np.abs(z) / lip, [0.25, 0.5, 0.75])
    out = tmp_path / "out"
    _, rep = report(model, tmp_path / "d.npz", out, "--eps", ",".join(f"{e:.6g}" for e in eps))
    assert rep["bound"]["rule"] == BINARY_RULE and rep["bound"]["value"] == pytest.approx(lip, rel=1e-6)
    expect = radii(z[:, None], x, rep["bound"], None, allowance(model, x, rep))
    s = assert_matches(out, rep, expect, y)
    assert np.allclose(s["radius"], np.abs(z) / lip, atol=1e-5) and (s["radius"] <= np.abs(z) / lip).all()
    assert 0 < rep["eps"][1]["certified"] < rep["eps"][0]["certified"]


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


BAD = {
    "label out of range": (lambda t: ["--data", _npz(t / "labels.npz", np.zeros((3, 1, 8, 8), np.float32),
                                                   np.array([0, 10, 1]))], "labels.npz"),
    "wrong shape": (lambda t: ["--data", _npz(t / "shape.npz", np.zeros((3, 1, 7, 7), np.float32), np.zeros(3, int))],
                    "shape.npz"),
    "empty dataset": (lambda t: ["--data", _npz(t / "empty.npz", np.zeros((0, 1, 8, 8), np.float32),
                                                np.zeros(0, int))], "empty.npz"),
    "bad eps": (lambda t: ["--data", str(DIGITS), "--eps", "abc"], "--eps"),
    "no cuda": (lambda t: ["--data", str(DIGITS), "--device", "cuda"], "--device"),
    "missing data": (lambda t: ["--data", str(t / "nothing.npz")], "nothing.npz"),
    "mean count": (lambda t: ["--data", str(DIGITS), "--mean", "0.1,0.2", "--std", "0.3,0.4"], "--mean"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad-input case run through the installed command at once (they only start up and fail)."""
    root = tmp_path_factory.mktemp("bad")
    cases = {case: (root / case.replace(" ", "_"), args) for case, (args, _) in BAD.items()}
    for folder, _ in cases.values():
        folder.mkdir()
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = {case: pool.submit(run_cli, "report", str(SAMPLES / "digits_dense.onnx"), *args(folder), "--out",
                                  str(folder / "out"), "--no-attack") for case, (folder, args) in cases.items()}
        return {case: (run.result(), cases[case][0] / "out") for case, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_input(bad_runs, case: str) -> None:
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result, out = bad_runs[case]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipcert: error: ") and BAD[case][1] in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert out_is_empty(out)


def test_failed_run_leaves_the_previous_report(digits, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(digits["digits_dense.onnx"][0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    x = np.random.default_rng(6).random((600, 1, 8, 8), dtype=np.float32)
    x[590, 0, 0, 0] = 2.0  # read as float 0-1 (forced), sample 590 fails in the 10th batch, mid-run
    early = cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", _npz(tmp_path / "l.npz", x[:3],
                np.array([0, 11, 1])), "--out", str(out), "--no-attack")
    late = cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", _npz(tmp_path / "v.npz", x, np.zeros(600, int)),
               "--value-range", "0-1", "--batch-size", "64", "--out", str(out), "--no-attack")
    assert (early[0], late[0]) == (2, 2)
    assert "label 11" in early[2] and "sample 590" in late[2]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- --skip-bad-samples


def test_skip_bad_samples_corrupt_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    images = {cls: [(f"{i}.png", rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for i in range(5)]
              for cls in ("cat", "dog")}
    write_images(tmp_path / "images", images)
    bad = tmp_path / "images" / "cat" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    model = tmp_path / "model.onnx"
    w = dense_onnx(model, (3, 8, 6), 2)
    code, stdout, stderr = cli("report", str(model), "--data", str(tmp_path / "images"), "--out",
                               str(tmp_path / "strict"), "--no-attack")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"lipcert: error: {bad}: corrupt or unreadable image")
    strict = tmp_path / "strict"
    assert not strict.exists() or not any(strict.iterdir())  # no report file, and no checkpoint to resume from

    out = tmp_path / "skip"
    stdout, rep = report(model, tmp_path / "images", out, "--eps", "0,0.05,0.1", "--skip-bad-samples",
                         "--allow-empty-certificates")
    assert rep["skipped"]["count"] == 1 and rep["skipped"]["evaluated"] == 9 and rep["dataset"]["num_samples"] == 10
    [entry] = rep["skipped"]["samples"]
    assert entry["index"] == 3 and entry["reason"].startswith("cat/3.png: corrupt or unreadable image")
    keep = [i for i in range(10) if i != 3]
    x = np.stack([a for cls in ("cat", "dog") for _, a in images[cls]]).transpose(0, 3, 1, 2)[keep] / np.float32(255)
    y = np.repeat([0, 1], 5)[keep]
    expect = radii(ort_logits(model, x), x, rep["bound"], w, allowance(model, x, rep))
    s = samples(out)
    assert list(s["index"]) == keep and np.array_equal(s["label"], y)
    assert np.array_equal(s["prediction"], expect["prediction"])
    assert np.allclose(s["radius"], expect["radius"], rtol=1e-5, atol=SLACK)
    correct = s["prediction"] == y
    assert rep["clean_accuracy"] == pytest.approx(correct.mean())  # over the samples evaluated
    for e in rep["eps"]:
        assert e["certified"] == int(((s["radius"] > e["eps"]) & correct).sum())
        assert e["certified_accuracy"] == pytest.approx(e["certified"] / 9)
    assert any("accuracies are over the 9 samples evaluated" in note for note in rep["notes"])
    assert "1 unreadable or invalid samples skipped" in (out / "report.md").read_text()
    assert "skipped 1 unreadable or invalid sample(s)" in stdout and "first: sample 3: cat/3.png" in stdout
    acc = f"{rep['clean_accuracy']:.6f}"
    gate = cli("report", str(model), "--data", str(tmp_path / "images"), "--out", str(tmp_path / "gate"),
               "--no-attack", "--skip-bad-samples", "--min-clean-acc", str(float(acc) - 1e-6), "-q")
    assert gate[0] == 0, gate[1] + gate[2]  # the gate sees the accuracy over the samples evaluated
    failing = cli("report", str(model), "--data", str(tmp_path / "images"), "--out", str(tmp_path / "gate"),
                  "--no-attack", "--skip-bad-samples", "--min-clean-acc", str(min(1.0, float(acc) + 0.01)), "-q")
    assert failing[0] == 1


def test_skip_bad_samples_nan_npz(digits, tmp_path: Path) -> None:
    data = np.load(DIGITS)
    x, y = data["x"].copy(), data["y"]
    x[4, 0, 3, 3], x[300, 0, 0, 0] = np.nan, np.inf
    path = _npz(tmp_path / "nan.npz", x, y)
    code, _, stderr = cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", path, "--out",
                          str(tmp_path / "strict"), "--no-attack")
    assert code == 2 and stderr.strip().splitlines() == [f"lipcert: error: {path}: sample 4: x contains NaN or Inf"]
    assert out_is_empty(tmp_path / "strict")
    out = tmp_path / "skip"
    _, rep = report(SAMPLES / "digits_dense.onnx", Path(path), out, "--eps", EPS, "--skip-bad-samples")
    assert rep["skipped"] == {"count": 2, "evaluated": 538, "samples": [
        {"index": 4, "reason": "x contains NaN or Inf"}, {"index": 300, "reason": "x contains NaN or Inf"}]}
    keep = np.setdiff1d(np.arange(540), [4, 300])
    s, ref = samples(out), samples(digits["digits_dense.onnx"][0])
    assert np.array_equal(s["index"], keep) and np.array_equal(s["label"], y[keep])
    assert np.array_equal(s["prediction"], ref["prediction"][keep])
    assert np.allclose(s["radius"], ref["radius"][keep], rtol=1e-5, atol=SLACK)
    correct = s["prediction"] == s["label"]
    assert rep["clean_accuracy"] == pytest.approx(correct.mean())
    assert [e["certified"] for e in rep["eps"]] == [int(((s["radius"] > e["eps"]) & correct).sum())
                                                   for e in rep["eps"]]


@pytest.mark.slow
def test_skip_bad_samples_checkpoint_and_resume(tmp_path: Path) -> None:
    from lipcert import AttackConfig
    from lipcert.errors import ConfigError

    data = np.load(DIGITS)
    x, y = data["x"].copy(), data["y"].copy()
    x[[5, 100, 301]] = np.nan
    y[200] = 10  # not a class of the model
    path = _npz(tmp_path / "bad.npz", x, y)
    graph = load_model(SAMPLES / "digits_dense.onnx")
    kw = dict(batch_size=64, backend="torch", skip_bad_samples=True, attack=AttackConfig(steps=3, restarts=1))
    full = certify(graph, path, EPS, checkpoint_dir=tmp_path / "ck", **kw)
    assert full.skipped is not None and [(s.index, s.reason) for s in full.skipped.samples] == [
        (5, "x contains NaN or Inf"), (100, "x contains NaN or Inf"),
        (200, "label 10, but the model has 10 classes (0..9)"), (301, "x contains NaN or Inf")]
    files = sorted((tmp_path / "ck" / ".lipcert-checkpoint").glob("batch-*.npz"))
    assert len(files) == 9
    with np.load(files[1]) as saved:  # samples 64..127: the checkpoint records what was skipped
        assert json.loads(bytes(saved["__extra__"]).decode())[0]["skipped"] == [[100, "x contains NaN or Inf"]]
        assert 100 not in saved["indices"] and len(saved["indices"]) == 63
    for f in files[2:]:
        f.unlink()
    resumed = certify(graph, path, EPS, checkpoint_dir=tmp_path / "ck", resume=True, **kw)
    volatile = ("timings", "created")
    assert ({k: v for k, v in resumed.to_dict().items() if k not in volatile}
            == {k: v for k, v in full.to_dict().items() if k not in volatile})
    assert torch.equal(resumed.samples.indices, full.samples.indices)
    assert torch.equal(resumed.samples.radii, full.samples.radii)
    certify(graph, DIGITS, EPS, checkpoint_dir=tmp_path / "ck2", batch_size=256, skip_bad_samples=True, attack=False)
    with pytest.raises(ConfigError, match="was made with skip_bad_samples"):
        certify(graph, DIGITS, EPS, checkpoint_dir=tmp_path / "ck2", batch_size=256, resume=True, attack=False)


def test_skip_bad_samples_still_fails_on_whole_file_faults(tmp_path: Path) -> None:
    model = str(SAMPLES / "digits_dense.onnx")
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((50, 1, 8, 8), np.float32), y=np.zeros(50, np.int64))
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    cases = {
        "cut.npz": "not a readable .npz archive",
        _npz(tmp_path / "empty.npz", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, int)): "the dataset is empty",
        _npz(tmp_path / "all.npz", np.zeros((3, 1, 8, 8), np.float32), np.array([10, 11, 12])):
            "every sample was skipped as unreadable or invalid (sample 0: label 10, but the model has 10 classes",
    }
    for data, needle in cases.items():
        out = tmp_path / ("out-" + Path(data).stem)
        code, _, stderr = cli("report", model, "--data", str(tmp_path / data), "--out", str(out), "--no-attack",
                              "--skip-bad-samples")
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], stderr
        assert not [f for f in FILES if (out / f).exists()]


def test_mean_radii_in_every_output(digits: dict[str, tuple[Path, dict]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """report.json's mean_radius is samples.csv's radii averaged (0, or minus the radius, for a wrong prediction),
    report.md states it, and --min-mean-radius gates on it."""
    out, rep = digits["digits_dense.onnx"]
    cols = samples(out)
    right = cols["label"].astype(int) == cols["prediction"].astype(int)
    radius = cols["radius"].astype(float)
    assert rep["mean_radius"]["mean"] == pytest.approx(float(np.where(right, radius, 0).mean()), rel=1e-6)
    assert rep["mean_radius"]["signed_mean"] == pytest.approx(float(np.where(right, radius, -radius).mean()),
                                                              rel=1e-6)
    assert rep["mean_radius"]["signed_mean"] < rep["mean_radius"]["mean"]  # the sample model errs on some
    assert f"Mean certified radius {rep['mean_radius']['mean']:.4g}" in (out / "report.md").read_text()
    for gate, code_wanted in (("0.1", 0), ("10", 1)):  # the mean is about 0.38
        code, stdout, _ = cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", str(DIGITS), "--out",
                              str(tmp_path / gate), "--no-attack", "--eps", EPS, "--min-mean-radius", gate)
        assert code == code_wanted and (code == 0 or f"mean certified radius >= {gate}" in stdout)
        gates = json.loads((tmp_path / gate / "report.json").read_text())["gates"]
        assert [g["passed"] for g in gates if g["name"] == f"mean certified radius >= {gate}"] == [not code]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_conv.onnx", "digits_dense.onnx", "digits_broken.onnx"])
def test_exact_radius_is_never_below_the_peers_rule(name: str) -> None:
    """The exact radius is the peers' figure, margin / (sqrt(2) L) of the deployed logits (onnxruntime here, as a
    peer runs the model), refined by the last layer's rows: never below it, sample by sample and in certified
    accuracy, and never below the float32-safe radius, which only subtracts rounding."""
    data = np.load(DIGITS)
    x, y = data["x"], data["y"]
    rep = certify(load_model(SAMPLES / name), DIGITS, EPS, attack=False)
    z = ort_logits(SAMPLES / name, x).astype(np.float64)
    top = np.sort(z, axis=1)
    peers = (top[:, -1] - top[:, -2]) / (SQRT2 * rep.bound.value)
    exact, safe = rep.samples.exact_radii.numpy(), rep.samples.radii.numpy()
    assert (exact >= peers - SLACK).all() and (safe <= exact).all()
    assert (exact > safe).mean() > 0.9  # the allowance is not zero
    correct = z.argmax(1) == y
    for e in rep.eps:
        assert e.exact_certified_accuracy >= float(((peers > e.eps) & correct).mean()) - 1 / len(y)
        assert e.exact_certified_accuracy >= e.certified_accuracy


def test_gate_on_chooses_the_radius_the_gates_read(tmp_path: Path) -> None:
    """A certified-accuracy threshold between the float32-safe and the exact figure fails with gate_on float
    (the default) and passes with gate_on exact; report.json, report.md and the terminal say which was read."""
    model = load_model(SAMPLES / "digits_conv.onnx")
    eps = "72/255"
    first = certify(model, DIGITS, eps, attack=False)
    e = first.eps[0]
    assert e.exact_certified_accuracy > e.certified_accuracy  # a few points have exact radii just above eps
    threshold = (e.exact_certified_accuracy + e.certified_accuracy) / 2
    code, stdout, _ = cli("report", str(SAMPLES / "digits_conv.onnx"), "--data", str(DIGITS), "--eps", eps,
                          "--no-attack", "--out", str(tmp_path / "float"), "--min-certified-acc",
                          f"{eps}={threshold:.6f}")
    assert code == 1 and "gates read the float32-safe radii (gate_on float)" in " ".join(stdout.split())
    code, stdout, _ = cli("report", str(SAMPLES / "digits_conv.onnx"), "--data", str(DIGITS), "--eps", eps,
                          "--no-attack", "--out", str(tmp_path / "exact"), "--min-certified-acc",
                          f"{eps}={threshold:.6f}", "--gate-on", "exact")
    assert code == 0, stdout
    rep = json.loads((tmp_path / "exact" / "report.json").read_text())
    assert rep["gate_on"] == "exact" and rep["gates"][-1]["name"].startswith("certified accuracy (exact) at")
    assert rep["eps"][0]["exact_certified_accuracy"] == pytest.approx(e.exact_certified_accuracy)
    assert rep["exact_mean_radius"]["mean"] > rep["mean_radius"]["mean"]
    assert "(gate_on exact)" in (tmp_path / "exact" / "report.md").read_text()
    cols = samples(tmp_path / "exact")
    assert (cols["exact_radius"] >= cols["radius"]).all()


def test_a_checkpoint_without_exact_radii_is_refused() -> None:
    """A batch saved before exact radii were recorded cannot be resumed: its radii came from another allowance
    and the exact ones cannot be made up."""
    from lipcert.certification.checkpoint import BatchResult
    from lipcert.errors import ConfigError

    result = BatchResult(np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones(2), np.ones(2), "torch",
                         exact_radii=np.full(2, 1.5))
    assert np.array_equal(BatchResult.stored(result.arrays(), result.extra()).exact_radii, result.exact_radii)
    old = {k: v for k, v in result.arrays().items() if k != "exact_radii"}
    with pytest.raises(ConfigError, match="did not record exact-arithmetic radii"):
        BatchResult.stored(old, result.extra())
