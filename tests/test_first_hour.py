"""A new user's first hour (issue 24, part 4), each stumble turned into behaviour: a run that certifies nothing warns
and fails its gates, a first CI run without a baseline can pass, a crashed run's checkpoint does not block the rerun
(and a resume with other settings is refused before the bound), and the API takes arrays, tensors, torch datasets
and modules, with progress as an option. Models are built with onnx.helper: a dense layer, with or without a
squashing output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lipcert
from lipcert.certification import run as run_module
from lipcert.errors import ConfigError, DataError, LipcertError, ModelError
from lipcert.progress import Progress

from .conftest import SAMPLES, one_line, run_main

FEATURES, CLASSES, SAMPLES_N = 16, 3, 48
#: what legitimately differs between two runs of the same settings
VOLATILE = ("timings", "created", "notes")


def dense_model(path: Path, final: str | None = None, classes: int = CLASSES) -> Path:
    """x (N, 16) -> Gemm with a weight of spectral norm 1 -> ``final`` (Softmax, Sigmoid...) when given."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(classes, FEATURES))
    weight = (weight / np.linalg.norm(weight, 2)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1, name="dense")]
    output = "logits"
    if final is not None:
        nodes.append(helper.make_node(final, ["logits"], ["out"], name="squash"))
        output = "out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def arrays(n: int = SAMPLES_N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.random((n, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first-hour")
    x, y = arrays()
    np.savez(root / "data.npz", x=x, y=y)
    return {"data": root / "data.npz", "plain": dense_model(root / "plain.onnx"),
            "softmax": dense_model(root / "softmax.onnx", "Softmax"),
            "logsoftmax": dense_model(root / "logsoftmax.onnx", "LogSoftmax"),
            "sigmoid": dense_model(root / "sigmoid.onnx", "Sigmoid"),
            "sigmoid1": dense_model(root / "sigmoid1.onnx", "Sigmoid", classes=1)}


def flat(text: str) -> str:
    """Terminal output with its wrapping undone."""
    return " ".join(text.split())


def gate(report: lipcert.Report, name: str = "something is certified") -> lipcert.Gate:
    (found,) = [g for g in report.gates if g.name == name]
    return found


# ---------------------------------------------------------------- CI goes green with nothing certified


@pytest.mark.parametrize("final", ["softmax", "logsoftmax"])
def test_a_model_ending_in_softmax_warns_to_certify_the_logits_and_fails(files: dict[str, Path], final: str) -> None:
    report = lipcert.certify(lipcert.load_model(files[final]), files["data"], eps="36/255", attack=False)
    assert report.bound.value == float("inf") and report.eps[0].certified == 0
    (note,) = [n for n in report.notes if n.startswith("OUTPUT SQUASHED")]
    assert "(node 'squash')" in note and "bound is inf" in note and "certify the logits" in note
    assert not gate(report).passed and gate(report).measured == "Lipschitz bound inf" and not report.passed
    allowed = lipcert.certify(lipcert.load_model(files[final]), files["data"], eps="36/255", attack=False,
                              allow_empty_certificates=True)
    assert allowed.passed and not [g for g in allowed.gates if g.name == "something is certified"]


def test_verify_of_a_model_ending_in_softmax_warns_too(files: dict[str, Path]) -> None:
    result = lipcert.verify(lipcert.load_model(files["softmax"]), empirical_budget=0.5)
    (note,) = [n for n in result.notes if n.startswith("OUTPUT SQUASHED")]
    assert "certify the logits" in note and not result.passed
    assert not [n for n in lipcert.verify(lipcert.load_model(SAMPLES / "digits_dense.onnx"), empirical=False).notes
                if n.startswith("OUTPUT SQUASHED")]


def test_a_sigmoid_output_warns_even_with_a_finite_bound(files: dict[str, Path]) -> None:
    report = lipcert.certify(lipcert.load_model(files["sigmoid"]), files["data"], eps="1/255",
                             attack=False)
    (note,) = [n for n in report.notes if n.startswith("OUTPUT SQUASHED")]
    assert report.bound.value < 1 and "Sigmoid" in note and "far smaller" in note
    assert "always positive" not in note  # three outputs: the class is their argmax
    binary = lipcert.certify(lipcert.load_model(files["sigmoid1"]), (arrays()[0], arrays()[1] % 2),
                             eps="1/255", attack=False)
    (note,) = [n for n in binary.notes if n.startswith("OUTPUT SQUASHED")]
    assert "a one-output model's class is the sign of its output, which Sigmoid makes always positive" in note
    plain = lipcert.certify(lipcert.load_model(files["plain"]), files["data"], eps="1/255", attack=False)
    assert not [n for n in plain.notes if n.startswith("OUTPUT SQUASHED")] and gate(plain).passed


@pytest.mark.parametrize("norm, eps, beyond", [
    ("l2", "36", ["36"]),  # a forgotten /255: the L2 diameter of [0, 1]^16 is 4
    ("l2", "3.99,4.01", ["4.01"]),
    ("l2", "36/255", []),
    ("linf", "8", ["8"]),  # the L-infinity diameter is 1
    ("linf", "1", []),
])
def test_radii_beyond_the_inputs_diameter_warn(files: dict[str, Path], norm: str, eps: str, beyond: list[str]) -> None:
    report = lipcert.certify(lipcert.load_model(files["plain"]), files["data"], eps=eps, norm=norm, attack=False)
    notes = [n for n in report.notes if n.startswith("RADIUS BEYOND THE DATA")]
    if not beyond:
        assert notes == []
        return
    (note,) = notes
    assert f"eps {', '.join(beyond)} is larger than" in note
    assert ("did you mean 36/255?" in note) == (eps == "36")
    assert all(e.certified == 0 for e in report.eps if e.label in beyond)


def test_the_empty_table_gate_is_the_same_from_the_cli_and_the_api(capsys, tmp_path: Path,
                                                                    files: dict[str, Path]) -> None:
    """``--eps 36`` certifies nothing: a warning in the terminal, report.md and report.json, and exit 1; the
    flag ``--allow-empty-certificates`` (config key ``allow_empty_certificates``) passes the gate."""
    args = ["report", str(files["plain"]), "--data", str(files["data"]), "--eps", "36", "--no-attack"]
    code, out, err = run_main(capsys, *args, "--out", str(tmp_path / "cli"))
    assert code == 1, err
    assert "RADIUS BEYOND THE DATA" in flat(out) and "FAILED something is certified" in flat(out)
    assert "--allow-empty-certificates passes this gate" in flat(out)  # the terminal spells the flag
    document = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert "allow_empty_certificates passes this gate" in document["gates"][-1]["message"]  # the API, its name
    assert any(n.startswith("RADIUS BEYOND THE DATA") for n in document["notes"])
    assert "RADIUS BEYOND THE DATA" in (tmp_path / "cli" / "report.md").read_text()
    api = lipcert.certify(lipcert.load_model(files["plain"]), files["data"], eps="36", attack=False)
    assert [g.to_dict() for g in api.gates] == document["gates"]
    (tmp_path / "lipcert.toml").write_text("allow_empty_certificates = true\n")
    code, _, err = run_main(capsys, *args, "--out", str(tmp_path / "allowed"), "--config",
                            str(tmp_path / "lipcert.toml"))
    assert code == 0, err
    code, _, err = run_main(capsys, *args, "--out", str(tmp_path / "flag"), "--allow-empty-certificates")
    assert code == 0, err


# ---------------------------------------------------------------- the documented CI config can start


def test_a_first_run_without_its_baseline(capsys, tmp_path: Path, files: dict[str, Path]) -> None:
    """The default is an error naming the file and the flag; ``--missing-baseline skip`` passes the drop gate with a
    note, and the report it writes, copied into place, is the next run's baseline."""
    baseline = tmp_path / "baseline" / "report.json"
    args = ["report", str(files["plain"]), "--data", str(files["data"]), "--eps", "1/255", "--no-attack",
            "--out", str(tmp_path / "run"), "--baseline", str(baseline)]
    code, _, err = run_main(capsys, *args)
    assert code == 2 and one_line(err) == (f"lipcert: error: {baseline}: no such baseline report (for a first run, "
                                           "before any baseline exists, set --missing-baseline skip)")
    with pytest.raises(ConfigError) as info:
        lipcert.CertifyOptions(baseline=baseline)
    assert info.value.parameter == ("missing_baseline",)
    code, out, err = run_main(capsys, *args, "--missing-baseline", "skip")
    assert code == 0, err
    assert f"the baseline {baseline} does not exist yet" in flat(out)
    document = json.loads((tmp_path / "run" / "report.json").read_text())
    (skipped,) = [g for g in document["gates"] if g["name"] == "certified accuracy vs baseline"]
    assert skipped["passed"] and skipped["measured"] == f"skipped: no baseline at {baseline}"
    baseline.parent.mkdir()
    shutil.copy(tmp_path / "run" / "report.json", baseline)  # the recipe of docs/ci.md
    code, out, err = run_main(capsys, *args, "--missing-baseline", "skip")
    assert code == 0 and "does not exist yet" not in flat(out), err
    document = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {g["name"]: g["passed"] for g in document["gates"]}["certified accuracy at 1/255 vs baseline (max drop "
                                                               "0)"]


# ---------------------------------------------------------------- a crashed run does not block the rerun


class Crash(Progress):
    """A progress that raises ``error`` once ``after`` samples of inference are done: a crash mid-run."""

    def __init__(self, error: BaseException, after: int) -> None:
        self.error, self.after, self.done = error, after, 0

    def advance(self, phase: str, amount: float) -> None:
        if phase == "inference":
            self.done += amount
            if self.done >= self.after:
                raise self.error


def _strip(report: lipcert.Report) -> dict:
    return {k: v for k, v in report.to_dict().items() if k not in VOLATILE}


@pytest.mark.parametrize("error", [RuntimeError("an internal error"), KeyboardInterrupt()],
                         ids=["internal error", "ctrl-c"])
def test_the_same_command_after_a_crash_continues_the_checkpoint(tmp_path: Path, files: dict[str, Path],
                                                                 error: BaseException) -> None:
    graph = lipcert.load_model(files["plain"])
    settings = dict(eps="1/255", attack=lipcert.AttackConfig(steps=2, restarts=1), batch_size=16,
                    backend="torch", out=tmp_path / "run")
    with pytest.raises(type(error)):
        lipcert.certify(graph, files["data"], progress=Crash(error, 32), **settings)
    folder = tmp_path / "run" / ".lipcert-checkpoint"
    assert len(list(folder.glob("batch-*.npz"))) == 1  # the batch in flight when it crashed is lost
    notes: list[str] = []

    class Notes(Progress):
        def note(self, text: str) -> None:
            notes.append(text)

    report = lipcert.certify(graph, files["data"], progress=Notes(), **settings)  # the same command, no resume
    assert report.timings.samples_read_back == 16 and not folder.exists()
    assert any("holds an unfinished run with the same model, data and settings" in n for n in notes)
    assert any(n.startswith("continued the unfinished run") for n in report.notes)
    fresh = lipcert.certify(graph, files["data"], **{**settings, "out": tmp_path / "fresh"})
    assert _strip(report) == _strip(fresh)


def test_a_checkpoint_of_other_settings_is_replaced_without_resume_and_refused_with_it(
        tmp_path: Path, files: dict[str, Path]) -> None:
    graph = lipcert.load_model(files["plain"])
    settings = dict(eps="1/255", attack=False, backend="torch", checkpoint_dir=tmp_path)
    with pytest.raises(RuntimeError):
        lipcert.certify(graph, files["data"], batch_size=16, progress=Crash(RuntimeError("crash"), 32), **settings)
    folder = tmp_path / ".lipcert-checkpoint"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ConfigError) as info:
        lipcert.certify(graph, files["data"], batch_size=8, resume=True, **settings)
    assert "was made with batch_size 16, this run has batch_size 8" in str(info.value)
    assert info.value.parameter == ("batch_size",) and sorted(p.name for p in folder.iterdir()) == before
    report = lipcert.certify(graph, files["data"], batch_size=8, **settings)
    (note,) = [n for n in report.notes if n.startswith("replaced an unfinished run's checkpoint")]
    assert "batch_size 16, this run has batch_size 8 (1 finished batch(es), discarded)" in note
    assert report.timings.samples_read_back == 0


def test_a_checkpoint_of_another_lipcert_is_never_continued(tmp_path: Path, files: dict[str, Path]) -> None:
    graph = lipcert.load_model(files["plain"])
    settings = dict(eps="1/255", attack=False, backend="torch", checkpoint_dir=tmp_path, batch_size=16)
    with pytest.raises(RuntimeError):
        lipcert.certify(graph, files["data"], progress=Crash(RuntimeError("crash"), 32), **settings)
    manifest = tmp_path / ".lipcert-checkpoint" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["lipcert_version"] == lipcert.__version__
    data.pop("lipcert_version")
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="was made with an earlier lipcert, this run has lipcert "):
        lipcert.certify(graph, files["data"], resume=True, **settings)
    report = lipcert.certify(graph, files["data"], **settings)
    assert report.timings.samples_read_back == 0
    assert any(n.startswith("replaced an unfinished run's checkpoint") for n in report.notes)


def test_a_resume_with_other_settings_is_refused_before_the_bound(monkeypatch, tmp_path: Path,
                                                                  files: dict[str, Path]) -> None:
    graph = lipcert.load_model(files["plain"])
    settings = dict(eps="1/255", attack=False, backend="torch", checkpoint_dir=tmp_path)
    with pytest.raises(RuntimeError):
        lipcert.certify(graph, files["data"], batch_size=16, progress=Crash(RuntimeError("crash"), 32), **settings)

    def no_bound(*args, **kwargs):
        raise AssertionError("the bound was computed before the checkpoint was checked")

    monkeypatch.setattr(run_module, "certificate_setup", no_bound)
    with pytest.raises(ConfigError, match="was made with batch_size 16"):
        lipcert.certify(graph, files["data"], batch_size=32, resume=True, **settings)


# ---------------------------------------------------------------- the API takes what a notebook holds


def test_arrays_tensors_and_torch_datasets_give_the_report_of_the_file(files: dict[str, Path]) -> None:
    graph = lipcert.load_model(files["plain"])
    x, y = arrays()

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.from_numpy(x[i]), int(y[i])

    settings = dict(eps="1/255,2/255", attack=False, backend="torch")
    reference = lipcert.certify(graph, files["data"], **settings)
    for data in [(x, y), (torch.from_numpy(x), torch.from_numpy(y)), [x, y.astype(np.float64)], Pairs()]:
        report = lipcert.certify(graph, data, **settings)
        assert [(e.certified, e.certified_accuracy) for e in report.eps] == \
            [(e.certified, e.certified_accuracy) for e in reference.eps]
        assert torch.equal(report.samples.radii, reference.samples.radii)
    assert lipcert.certify(graph, Pairs(), **settings).dataset.path == "<Pairs>"


def test_a_module_is_exported_in_memory_and_the_export_is_what_is_verified(files: dict[str, Path]) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.ReLU(), torch.nn.Linear(8, CLASSES))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight /= torch.linalg.matrix_norm(layer.weight, 2)
    graph = lipcert.load_model(net, example_input=torch.rand(2, FEATURES))
    assert graph.input_shape == (FEATURES,) and graph.source == "<Sequential module>"
    assert graph.crosscheck is not None  # matched against onnxruntime, as a file would be
    result = lipcert.verify(net, example_input=torch.rand(2, FEATURES), empirical=False)
    assert result.status == "proven" and result.network_upper <= 1 + 1e-4
    x, y = arrays()
    report = lipcert.certify(net, (x, y), eps="1/255", attack=False)  # exported with the data's first sample
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(report.samples.predictions.numpy(), expected)


@pytest.mark.parametrize("call, error, needle", [
    (lambda g, d: lipcert.certify(g, 5), DataError, "the data must be a dataset file or folder, an (x, y) pair"),
    (lambda g, d: lipcert.certify(g, (np.zeros((3, FEATURES)),)), DataError, "got tuple"),
    (lambda g, d: lipcert.certify(g, (np.zeros((3, FEATURES)), np.zeros(4))), DataError, "x holds 3 samples but y "
                                                                                      "holds 4 labels"),
    (lambda g, d: lipcert.certify(42, d), ModelError, "the model must be a lipcert Graph"),
    (lambda g, d: lipcert.verify({"weights": 1}), ModelError, "got dict"),
    (lambda g, d: lipcert.load_model(object()), ModelError, "a model file path or a torch.nn.Module, got object"),
    (lambda g, d: lipcert.load_model(torch.nn.Linear(2, 2)), ModelError, "needs example_input"),
    (lambda g, d: lipcert.load_model(torch.nn.Linear(2, 2), example_input=torch.zeros(1, 3)), ModelError,
     "cannot export the Linear module to ONNX"),
    (lambda g, d: lipcert.certify(g, d, progress="yes"), ConfigError, "progress must be a lipcert.Progress"),
], ids=["a number", "a 1-tuple", "lengths", "a model number", "a dict", "an object", "no example",
        "export fails", "progress"])
def test_anything_else_is_a_one_line_lipcert_error(files: dict[str, Path], call, error: type, needle: str) -> None:
    with pytest.raises(LipcertError) as info:
        call(lipcert.load_model(files["plain"]), files["data"])
    assert isinstance(info.value, error) and needle in str(info.value) and "\n" not in str(info.value)


def test_progress_is_an_option_printed_or_called_back(capsys, files: dict[str, Path]) -> None:
    graph = lipcert.load_model(files["plain"])
    lipcert.certify(graph, files["data"], eps="36", attack=False, progress=True)
    err = capsys.readouterr().err.splitlines()
    for phase in ("opening the data", "computing the Lipschitz bound", "inference"):
        assert f"lipcert: {phase}..." in err or any(line.startswith(f"lipcert: {phase}: 0/") for line in err), err
        assert any(line.startswith(f"lipcert: {phase}: done in") for line in err), err
    assert any(line.startswith("lipcert: note: RADIUS BEYOND THE DATA") for line in err)
    calls: list[tuple[str, float, float | None]] = []
    lipcert.certify(graph, files["data"], eps="1/255", attack=False, progress=lambda *a: calls.append(a))
    assert ("inference", SAMPLES_N, SAMPLES_N) == calls[-1] or ("inference", SAMPLES_N, SAMPLES_N) in calls
    assert calls[0] == ("opening the data", 0.0, None)


def test_pixels_in_0_255_are_read_as_a_files_would_be(files: dict[str, Path]) -> None:
    """Arrays hold what a file would: 0-255 pixels (as floats or uint8) are scaled, as the value range says."""
    graph = lipcert.load_model(files["plain"])
    x, y = arrays()
    settings = dict(eps="1/255", attack=False, backend="torch")
    unit = lipcert.certify(graph, (x, y), **settings)
    pixels = np.round(x * 255)
    for stored in (pixels, pixels.astype(np.uint8)):
        scaled = lipcert.certify(graph, (stored, y), **settings)
        assert scaled.dataset.value_range == "uint8 0-255" and scaled.dataset.path == "<arrays>"
        assert scaled.clean_accuracy == unit.clean_accuracy
    with pytest.raises(DataError, match="outside the float range"):
        lipcert.certify(graph, (x * 1.5, y), value_range="0-1", **settings)


@pytest.mark.parametrize(("made", "resumed", "named"), [
    ({}, {"local": True}, "local"), ({"local": True}, {}, "local"),
    ({"local": True, "local_depth": 2}, {"local": True, "local_depth": 1}, "local_depth")])
def test_a_checkpoint_without_the_local_radii_asked_is_never_continued(
        tmp_path: Path, files: dict[str, Path], made: dict, resumed: dict, named: str) -> None:
    """The local certificates change the stored radii: a checkpoint made with other local settings is refused."""
    graph = lipcert.load_model(files["plain"])
    settings = dict(eps="1/255", attack=False, backend="torch", checkpoint_dir=tmp_path, batch_size=16)
    with pytest.raises(RuntimeError):
        lipcert.certify(graph, files["data"], progress=Crash(RuntimeError("crash"), 32), **settings, **made)
    with pytest.raises(ConfigError) as info:
        lipcert.certify(graph, files["data"], resume=True, **settings, **resumed)
    assert named in str(info.value)
