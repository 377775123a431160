"""Models with one output (binary classifiers, class 1 when the logit s > 0): ``lipcert verify``, ``lipcert report``
with and without the attack, labels 0/1 and deel-lip's -1/+1, data of one class, bad labels, every output file,
the API, the soundness harness on one-logit programs, and a 1-Lipschitz binary classifier trained on scikit-learn's
digits with deel-torchlip, exported by both torch exporters, against radii computed from onnxruntime's logits."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lipcert
from lipcert.certification.attack import AttackConfig, margin_loss, pgd, predict
from lipcert.certification.engine import Engine, choose_backend
from lipcert.certification.radii import BINARY_RULE
from lipcert.certification.setup import certificate_setup
from lipcert.data import check_fits, open_dataset
from lipcert.data.labels import BINARY_LABELS
from lipcert.errors import DataError
from lipcert.graph.executor import GraphModule
from lipcert.report.render import figure

from .conftest import export_onnx, one_line, run_main

SHAPE = (1, 8, 8)
SLACK = 1e-5  # radius difference allowed between onnxruntime's and lipcert's float32 logits
PLUS_MINUS_NOTE = "deel-lip's convention"


# ---------------------------------------------------------------- helpers


class Squeeze(torch.nn.Module):
    """Drops the last axis: a one-logit model whose output has shape (N,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(1)


def dense_binary(seed: int = 0) -> torch.nn.Sequential:
    """Flatten, Linear(64, 16), ReLU, Linear(16, 1) with both matrices of norm 0.9: its bound is 0.81."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight *= 0.9 / torch.linalg.matrix_norm(layer.weight, 2)
    return model.eval()


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The one logit of every sample, from onnxruntime on CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0].reshape(len(x))


def allowance(model: Path, x: np.ndarray,
              rep: dict) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]:
    """lipcert's float error allowance of each sample (at the sample) and its growth with the radius, through its
    Python API with the backend the report used: what the documented binary rule subtracts; and the float64
    centre (lipcert's executor in float64, with lipcert's bound on its error)."""
    graph = lipcert.load_model(model)
    setup, _ = certificate_setup(graph, declared=rep["bound"]["declared"])
    engine = Engine(graph, setup, backend=rep["backend"])
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    runner = choose_backend(graph, rep["backend"], "cpu", xt, None, None, engine.measure)
    _, norms = runner(xt)
    x_norm = xt.flatten(1).double().norm(dim=1)
    error = engine.error(x_norm, norms)
    s64 = GraphModule(graph).to(torch.float64)(xt.double()).reshape(-1).detach().numpy()
    e64 = (engine.exact_error.base + engine.exact_error.slope * x_norm).numpy()
    return (np.broadcast_to(np.asarray(error.base, dtype=np.float64), (len(x),)), float(error.slope), (s64, e64))


def binary_radii(s: np.ndarray, lipschitz: float,
                 error: tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The binary rule, computed here: the larger over the centres (s, base) and (s64, e64) of
    (+-centre - e_centre - base) / (L + slope) (the sign of the deployed prediction), 0 when not positive."""
    base, slope, (s64, e64) = error
    s = s.astype(np.float64)
    sign = np.where(s > 0, 1.0, -1.0)
    return np.maximum.reduce([np.maximum(0.0, (sign * c - e - base) / (lipschitz + slope))
                              for c, e in ((s, base), (s64, e64))])


def read_samples(out: Path) -> dict[str, np.ndarray]:
    """samples.csv as columns."""
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.reader(f))
    cols = dict(zip(rows[0], np.array(rows[1:], dtype=object).T))
    return {k: v.astype(np.int64 if k in ("index", "label", "prediction") else np.float64) for k, v in cols.items()}


def report_cli(capsys: pytest.CaptureFixture, model: Path, data: Path, out: Path, *flags: str) -> tuple[str, dict]:
    """``lipcert report`` in this process; requires exit 0; its terminal output and report.json."""
    code, stdout, stderr = run_main(capsys, "report", str(model), "--data", str(data), "--out", str(out), *flags)
    assert code == 0, stdout + stderr
    return stdout, json.loads((out / "report.json").read_text())


@dataclass
class Binary:
    """A small one-logit model, its data (both classes predicted, a quarter mislabelled) and onnxruntime's logits."""

    module: torch.nn.Module
    model: Path
    x: np.ndarray
    s: np.ndarray
    labels: np.ndarray
    data: Path
    folder: Path

    def dataset(self, name: str, labels: np.ndarray) -> Path:
        path = self.folder / name
        np.savez(path, x=self.x, y=labels)
        return path


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Binary:
    folder = tmp_path_factory.mktemp("one_logit")
    x = np.random.default_rng(1).random((48,) + SHAPE, dtype=np.float32)
    model = dense_binary()
    with torch.no_grad():  # the mean logit at 0: both classes are predicted, no sample right at 0
        model[3].bias -= model(torch.from_numpy(x)).mean()
    path = export_onnx(model, folder / "binary.onnx", SHAPE, dynamo=False)
    s = ort_logits(path, x)
    labels = (s > 0).astype(np.int64)
    labels[::4] = 1 - labels[::4]
    found = Binary(model, path, x, s, labels, folder / "d.npz", folder)
    found.dataset("d.npz", labels)
    return found


# ---------------------------------------------------------------- verify


def test_verify_proves_the_one_logit_model(binary: Binary, capsys: pytest.CaptureFixture) -> None:
    code, stdout, stderr = run_main(capsys, "verify", str(binary.model), "--json", "-")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["status"] == "proven" and result["passed"]
    assert [(r["op"], r["in_shape"], r["out_shape"], r["status"]) for r in result["layers"]] == [
        ("Gemm", [1, 8, 8], [16], "proven"), ("Relu", [16], [16], "proven"), ("Gemm", [16], [1], "proven")]
    assert result["layers"][-1]["upper"] == pytest.approx(0.9, rel=1e-6)  # a 1-row matrix: the norm of its row
    assert result["network_upper"] == pytest.approx(0.81, rel=1e-6)
    assert 0 < result["network_lower"] <= result["network_upper"]


# ---------------------------------------------------------------- report


def test_report_without_attack(binary: Binary, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every output of a one-logit run states the binary rule and none of the multi-class wording, and the radii
    are (|s| - 2 base) / (L + slope) from onnxruntime's logits."""
    eps = np.quantile(np.abs(binary.s) / 0.81, [0.3, 0.7])
    out = tmp_path / "out"
    stdout, rep = report_cli(capsys, binary.model, binary.data, out, "--no-attack",
                             "--eps", ",".join(f"{e:.6g}" for e in eps))
    b = rep["bound"]
    assert b["rule"] == BINARY_RULE and b["value"] == pytest.approx(0.81, rel=1e-6)
    expect = binary_radii(binary.s, b["value"], allowance(binary.model, binary.x, rep))
    got = read_samples(out)
    assert np.array_equal(got["label"], binary.labels) and np.array_equal(got["prediction"], binary.s > 0)
    assert np.allclose(got["margin"], np.abs(binary.s), rtol=1e-5, atol=1e-6)
    assert np.allclose(got["radius"], expect, rtol=1e-5, atol=SLACK)
    assert (got["radius"] <= np.abs(binary.s) / b["value"]).all()
    correct = got["label"] == got["prediction"]
    assert rep["clean_accuracy"] == pytest.approx(correct.mean()) and rep["attack"] is None
    assert [e["certified"] for e in rep["eps"]] == [int(((got["radius"] > e["eps"]) & correct).sum())
                                                   for e in rep["eps"]]
    assert rep["eps"][0]["certified"] > rep["eps"][1]["certified"] > 0
    md = (out / "report.md").read_text()
    assert f"Certificate rule: {BINARY_RULE}" in md and f"rule: {BINARY_RULE}" in " ".join(stdout.split())
    for text in (md, stdout, (out / "report.json").read_text()):
        assert "sqrt(2)" not in text and "per-pair" not in text
    assert not rep["notes"]
    assert matplotlib.image.imread(out / "certified_accuracy.png").ndim == 3


def test_report_with_the_attack(binary: Binary, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """PGD on one logit: no certified point is broken, points are broken beyond their radii, and the report
    names the one-logit loss."""
    out = tmp_path / "out"
    stdout, rep = report_cli(capsys, binary.model, binary.data, out, "--eps", "0.1,0.3,1",
                             "--attack-steps", "20", "--attack-restarts", "1")
    a = rep["attack"]
    assert a["method"] == "PGD-L2, one-logit margin loss (s for label 0, -s for label 1), random start"
    assert a["violation_count"] == 0 and a["consistent"] and a["per_eps"][-1]["broken"] > 0
    assert "one-logit margin loss" in (out / "report.md").read_text() and "one-logit margin loss" in stdout
    got = read_samples(out)
    correct = got["label"] == got["prediction"]
    assert (got["attack_radius"][~correct] == 0).all()
    broken = correct & np.isfinite(got["attack_radius"])
    assert broken.any() and (got["attack_radius"][broken] >= got["radius"][broken]).all()
    # a broken point really changed sides, at most at its attack radius: |s| / L is no more than that distance
    assert (np.abs(binary.s[broken]) / 0.81 <= got["attack_radius"][broken] * (1 + 1e-5)).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_on_one_logit_finds_examples_exactly_where_they_exist(norm: str) -> None:
    """s = w.x + b: PGD crosses s = 0 from either side at 1.05 times the exact distance, never at 0.95."""
    torch.manual_seed(0)
    w = torch.randn(16)
    x = 0.4 + 0.2 * torch.rand(32, 16)
    b = -float((x @ w).mean())

    def model(v: torch.Tensor) -> torch.Tensor:
        return (v.flatten(1) @ w + b)[:, None]

    y = predict(model(x))
    assert 0 < int(y.sum()) < len(y)
    exact = (x @ w + b).abs() / (w.norm() if norm == "l2" else w.abs().sum())
    cfg = AttackConfig(steps=40, restarts=1, norm=norm, lower=-10.0, upper=10.0)
    gen = torch.Generator().manual_seed(0)
    for factor, expect in ((1.05, True), (0.95, False)):
        found = [bool(pgd(model, x[i:i + 1], y[i:i + 1], float(exact[i]) * factor, cfg, gen)[1]) for i in range(32)]
        assert all(f == expect for f in found), (factor, sum(found))


def test_one_logit_margin_and_prediction() -> None:
    s = torch.tensor([[2.0], [-1.0], [0.0], [3.0], [0.0]])
    y = torch.tensor([1, 1, 0, 0, 1])
    assert predict(s).tolist() == [1, 0, 0, 1, 0]  # class 1 only when s > 0
    assert margin_loss(s, y).tolist() == [-2.0, 1.0, 0.0, 3.0, 0.0]  # label 1: -s; label 0: s


def test_violations_name_the_two_class_reading(binary: Binary) -> None:
    """A declared bound 100 times too small certifies too much: the attack's violations give the adversarial
    class and the logits read as (0, s)."""
    graph = lipcert.load_model(binary.model)
    rep = lipcert.certify(graph, binary.data, "0.3,1", lipschitz=0.0081, attack=AttackConfig(steps=10, restarts=1))
    assert rep.attack is not None
    violations = rep.attack.violations
    assert violations and rep.attack.violation_count == len(violations) and not rep.attack.consistent
    assert any(g.name.startswith("attack violations") and not g.passed for g in rep.gates)
    for v in violations:
        assert v.adversarial_class == 1 - v.label and v.adversarial_distance < v.certified_radius
        assert v.logit_adversarial >= v.logit_true
        assert (v.logit_true if v.label == 0 else v.logit_adversarial) == 0.0


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("value", [0, 1, -1])
def test_data_of_one_class(binary: Binary, tmp_path: Path, capsys: pytest.CaptureFixture, value: int) -> None:
    labels = np.full(len(binary.s), value)
    data = binary.dataset(f"only_{value}.npz", labels)
    stdout, rep = report_cli(capsys, binary.model, data, tmp_path / "out", "--eps", "0.1,0.3",
                             "--attack-steps", "5", "--attack-restarts", "1")
    cls = max(value, 0)
    assert rep["clean_accuracy"] == pytest.approx(float(((binary.s > 0) == cls).mean()))
    assert (read_samples(tmp_path / "out")["label"] == cls).all()
    assert rep["attack"]["consistent"]
    assert any(PLUS_MINUS_NOTE in n for n in rep["notes"]) == (value == -1)


def test_deel_lip_labels_are_read_as_0_and_1(binary: Binary, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pm = binary.dataset("pm.npz", 2 * binary.labels - 1)
    # one backend for both runs: "auto" picks the faster by timing, whose float32 logits differ in the last bits
    flags = ("--no-attack", "--eps", "0.1,0.3", "--backend", "onnxruntime")
    stdout, rep = report_cli(capsys, binary.model, pm, tmp_path / "pm", *flags)
    _, plain = report_cli(capsys, binary.model, binary.data, tmp_path / "plain", *flags)
    assert (tmp_path / "pm" / "samples.csv").read_text() == (tmp_path / "plain" / "samples.csv").read_text()
    assert rep["eps"] == plain["eps"] and rep["clean_accuracy"] == plain["clean_accuracy"]
    note = ("labels -1 and +1 (deel-lip's convention for one-output models) were read as classes 0 and 1 (class 1 "
            "when the logit is positive)")
    assert rep["notes"] == [note] and not plain["notes"]
    assert note in (tmp_path / "pm" / "report.md").read_text() and note in " ".join(stdout.split())
    api = lipcert.attack(lipcert.load_model(binary.model), pm, "0.1,0.3", steps=5, restarts=1)
    assert api.per_eps[0].robust_accuracy <= plain["clean_accuracy"]


BAD_LABELS = {
    "label 2": (lambda y: np.where(np.arange(len(y)) == 5, 2, y), "sample 5 has label 2, but the model has one "
                f"output (a binary classifier): {BINARY_LABELS}"),
    "label -2 among -1/+1": (lambda y: np.where(np.arange(len(y)) == 7, -2, 2 * y - 1), "sample 7 has label -2"),
    "-1 beside 0": (lambda y: np.where(np.arange(len(y)) == 9, -1, y), "has label -1 and sample"),
    "not a whole number": (lambda y: np.where(np.arange(len(y)) == 3, 0.5, y), "sample 3: label 0.5 is not an "
                           "integer"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_bad_labels_are_one_line_errors(binary: Binary, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        case: str) -> None:
    change, message = BAD_LABELS[case]
    data = binary.dataset(f"bad_{list(BAD_LABELS).index(case)}.npz", change(binary.labels))
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "report", str(binary.model), "--data", str(data), "--out", str(out), "--no-attack")
    line = one_line(err)
    assert code == 2 and line.startswith(f"lipcert: error: {data}: ") and message in line, line
    assert not out.exists() or not any(out.iterdir())


def test_skipped_labels_and_a_mix_that_is_never_skipped(binary: Binary, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    labels = np.where(np.arange(len(binary.labels)) == 5, 2, binary.labels)
    _, rep = report_cli(capsys, binary.model, binary.dataset("two.npz", labels), tmp_path / "out", "--no-attack",
                        "--skip-bad-samples")
    assert rep["skipped"]["samples"] == [{"index": 5, "reason": f"label 2, but the model has one output (a binary "
                                                                f"classifier): {BINARY_LABELS}"}]
    mixed = binary.dataset("mixed.npz", np.where(np.arange(len(binary.labels)) == 9, -1, binary.labels))
    code, _, err = run_main(capsys, "report", str(binary.model), "--data", str(mixed), "--out",
                            str(tmp_path / "mixed"), "--no-attack", "--skip-bad-samples")
    zero = int(np.flatnonzero(binary.labels == 0)[0])
    assert code == 2 and f"sample 9 has label -1 and sample {zero} has label 0" in one_line(err)


def test_multi_class_models_keep_their_label_check(tmp_path: Path) -> None:
    np.savez(tmp_path / "pm.npz", x=np.zeros((3, 4), np.float32), y=np.array([1, -1, 1]))
    ds = open_dataset(tmp_path / "pm.npz")
    with pytest.raises(DataError, match=r"sample 1 has label -1, but the model has 10 classes \(0..9\)"):
        check_fits(ds, sample_shape=(4,), num_classes=10)
    assert check_fits(ds, sample_shape=(4,), num_classes=2, binary=True).plus_minus


# ---------------------------------------------------------------- the API, and an output of shape (N,)


def test_api_and_a_scalar_output(binary: Binary, tmp_path: Path) -> None:
    """load_model, verify, certify and attack on the model squeezed to an output of shape (N,): the certificates
    of the (N, 1) model."""
    flat = export_onnx(torch.nn.Sequential(binary.module, Squeeze()), tmp_path / "flat.onnx", SHAPE, dynamo=False)
    graph = lipcert.load_model(flat)
    assert graph.value_shapes[graph.output] == ()
    assert lipcert.verify(graph).status == "proven"
    rep = lipcert.certify(graph, binary.data, "0.05,0.1", attack=AttackConfig(steps=5, restarts=1))
    assert rep.bound.rule == BINARY_RULE and rep.attack is not None and rep.attack.consistent
    fig = figure(rep)
    assert f"certificate rule: {BINARY_RULE}" in [t.get_text() for t in fig.texts]
    matplotlib.pyplot.close(fig)
    assert np.array_equal(rep.samples.predictions.numpy(), binary.s > 0)
    same = lipcert.certify(lipcert.load_model(binary.model), binary.data, "0.05,0.1", attack=False)
    assert torch.allclose(rep.samples.radii, same.samples.radii, atol=SLACK)
    summary = lipcert.attack(graph, binary.data, "0.05,0.1", steps=5, restarts=1)
    assert summary.method.startswith("PGD-L2, one-logit margin loss") and not summary.violations
    assert [row.robust_accuracy for row in summary.per_eps] == [e.extra["empirical robust"] for e in rep.eps]


# ---------------------------------------------------------------- the soundness harness


@pytest.mark.slow
def test_soundness_harness_checks_binary_certificates(tmp_path: Path) -> None:
    """The generator draws one-logit programs (a Gemm to 1, a ReduceSum of the features, a Slice of one feature),
    and the report oracle attacks their certificates, with its own searches and with lipcert's one-logit PGD."""
    from .soundness import oracle
    from .soundness.generator import RandomDraw, draw_program

    wanted = {"Gemm": None, "ReduceSum": None, "feature": None}
    for seed in range(400):
        program = draw_program(RandomDraw(seed))
        if program.invalid is None and program.k == 1:
            form = [line for line in program.log if line.startswith("logit")][-1].split(" ")[1]
            if form in wanted and wanted[form] is None:
                wanted[form] = program
        if all(wanted.values()):
            break
    assert all(wanted.values()), [k for k, v in wanted.items() if v is None]
    attacked = 0
    for form, program in wanted.items():
        path = tmp_path / f"{form}.onnx"
        onnx.save(program.model, path)
        outcome = oracle.check_model(path, seed=program.seed % 1000, steps=False, values=False, verify=False)
        assert not outcome.failures and not outcome.refused, (program.describe(), oracle.describe(outcome))
        attacked += outcome.attacked
    assert attacked > 0


# ---------------------------------------------------------------- a real binary 1-Lipschitz classifier


@pytest.fixture(scope="module")
def digits_binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """deel-torchlip's SpectralLinear + GroupSort2 network trained with its HKR loss on scikit-learn's digits,
    even (+1) against odd (-1), a few epochs; the test split saved with deel-lip's -1/+1 labels."""
    import deel.torchlip as tl
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32).reshape((-1,) + SHAPE)
    y = np.where(digits.target % 2 == 0, 1, -1)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = tl.Sequential(torch.nn.Flatten(), tl.SpectralLinear(64, 32), tl.GroupSort2(), tl.SpectralLinear(32, 1))
    loss = tl.HKRLoss(alpha=0.98, min_margin=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x[train]), torch.from_numpy(y[train]).float()[:, None]
    for _ in range(6):
        for batch in torch.randperm(len(xs)).split(128):
            opt.zero_grad()
            loss(model(xs[batch]), ys[batch]).backward()
            opt.step()
    folder = tmp_path_factory.mktemp("digits_binary")
    np.savez(folder / "test.npz", x=x[test], y=y[test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.vanilla_export().eval(), folder / "test.npz"


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_digits_binary_classifier(digits_binary, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  dynamo: bool) -> None:
    """verify proves it 1-Lipschitz; report's radii are |s| / L less the stated float allowance, s from
    onnxruntime, and the certified accuracy is that of a robust model."""
    model, data = digits_binary
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE, dynamo)
    capsys.readouterr()  # what the exporter printed
    code, stdout, err = run_main(capsys, "verify", str(path), "--json", "-")
    assert code == 0 and json.loads(stdout)["status"] == "proven", err
    out = tmp_path / "out"
    _, rep = report_cli(capsys, path, data, out, "--no-attack", "--eps", "36/255,72/255")
    b = rep["bound"]
    assert b["rule"] == BINARY_RULE and b["value"] <= 1 + 1e-6 and rep["notes"][0].startswith("labels -1 and +1")
    test = np.load(data)
    s = ort_logits(path, test["x"])
    expect = binary_radii(s, b["value"], allowance(path, test["x"], rep))
    got = read_samples(out)
    assert np.array_equal(got["label"], (test["y"] == 1).astype(np.int64))
    assert np.array_equal(got["prediction"], s > 0)
    assert np.allclose(got["radius"], expect, rtol=1e-5, atol=SLACK)
    assert (got["radius"] <= np.abs(s) / b["value"]).all() and (expect < np.abs(s) / b["value"]).any()
    correct = got["label"] == got["prediction"]
    for e in rep["eps"]:
        border = int((correct & (np.abs(expect - e["eps"]) <= SLACK)).sum())
        assert abs(e["certified"] - int(((expect > e["eps"]) & correct).sum())) <= border
    assert rep["clean_accuracy"] > 0.85 and rep["eps"][0]["certified_accuracy"] > 0.6
