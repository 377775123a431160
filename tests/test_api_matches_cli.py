"""``lipcert.certify`` called from Python equals ``lipcert report`` with the same settings: the command line only maps
its flags onto the API, whose defaults, checks, gate radii, attack settings and checkpoint handling are its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lipcert
from lipcert.certification.attack import AttackConfig
from lipcert.cli.config import parameter_flag
from lipcert.errors import ConfigError

from .conftest import SAMPLES, one_line, run_main

MODEL = SAMPLES / "digits_dense.onnx"  # the bundled model that loads and bounds in well under a second
#: a baseline that does not exist (yet)
MISSING = "/nonexistent/lipcert-baseline/report.json"
#: what legitimately differs between two runs of the same settings: the clock
VOLATILE = ("timings", "created")

#: (flags of ``lipcert report``, the same settings as ``lipcert.certify`` keywords); both also get --backend torch
#: (auto times the two backends, and may pick either) and a batch size that splits the data into several batches
CASES = {
    "defaults with a short attack": (
        ["--attack-steps", "3", "--attack-restarts", "1"],
        dict(attack=AttackConfig(steps=3, restarts=1))),
    "linf with an attack": (
        ["--norm", "linf", "--attack-steps", "3", "--attack-restarts", "1", "--seed", "7"],
        dict(norm="linf", attack=AttackConfig(steps=3, restarts=1, seed=7))),
    "nothing certified, and no baseline yet": (  # both gates fail or pass the same way from both
        ["--eps", "36/255,36", "--baseline", MISSING, "--missing-baseline", "skip", "--no-attack"],
        dict(eps="36/255,36", baseline=MISSING, missing_baseline="skip", attack=False)),
    "a gate at a radius not in eps": (
        ["--eps", "36/255,0.1", "--min-certified-acc", "72/255=0.5", "--min-certified-acc", "0.1=0.2",
         "--min-clean-acc", "0.9", "--max-drop", "0.01", "--no-attack"],
        dict(eps=["36/255", 0.1], min_certified_acc={"72/255": 0.5, 0.1: 0.2}, min_clean_acc=0.9, max_drop=0.01,
             attack=False)),
}


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 80 samples of the bundled test set, so that each case runs in seconds."""
    digits = np.load(SAMPLES / "digits_test.npz")
    path = tmp_path_factory.mktemp("data") / "digits80.npz"
    np.savez(path, x=digits["x"][:80], y=digits["y"][:80])
    return path


def _files(out: Path) -> tuple[dict, str]:
    """report.json without what legitimately differs, and samples.csv (per-sample radii and attack radii)."""
    report = json.loads((out / "report.json").read_text())
    assert not (out / ".lipcert-checkpoint").exists()
    return {k: v for k, v in report.items() if k not in VOLATILE}, (out / "samples.csv").read_text()


#: cases measured over about 5 s on the 2-core machine
SLOW_CASES = {"a gate at a radius not in eps", "nothing certified, and no baseline yet"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in sorted(CASES)])
def test_certify_gives_the_report_of_the_same_command(capsys, tmp_path: Path, subset: Path, case: str) -> None:
    flags, settings = CASES[case]
    code, _, err = run_main(capsys, "report", str(MODEL), "--data", str(subset), "--out", str(tmp_path / "cli"),
                            "--backend", "torch", "--batch-size", "32", "-q", *flags)
    assert code in (0, 1), err
    report = lipcert.certify(lipcert.load_model(MODEL), str(subset), backend="torch", batch_size=32,
                             out=tmp_path / "api", **settings)
    cli, cli_samples = _files(tmp_path / "cli")
    api, api_samples = _files(tmp_path / "api")
    assert api == cli
    assert api_samples == cli_samples
    assert {k: v for k, v in report.to_dict().items() if k not in VOLATILE} == api
    assert code == (0 if report.passed else 1)


def test_the_api_attacks_in_the_run_norm_and_certifies_the_gate_radii(subset: Path) -> None:
    graph = lipcert.load_model(MODEL)
    linf = lipcert.certify(graph, subset, norm="linf", backend="torch", attack=AttackConfig(steps=2, restarts=1),
                           min_certified_acc=["3/255=0.1"])
    assert linf.attack is not None and linf.attack.method.startswith("PGD-Linf")  # it attacked L2 balls before
    assert [e.label for e in linf.eps] == ["1/255", "2/255", "4/255", "8/255", "3/255"]
    assert "certified accuracy at 3/255 >= 0.1" in [g.name for g in linf.gates]
    with pytest.raises(ConfigError, match="the attack's norm 'l2' differs from norm 'linf'") as info:
        lipcert.certify(graph, subset, norm="linf", attack=AttackConfig(norm="l2"))
    assert info.value.parameter == ("norm",)


@pytest.mark.parametrize("make, parameter, message", [
    (lambda: AttackConfig(precision="fp16"), "precision", "precision must be float32 or bfloat16, got 'fp16'"),
    (lambda: AttackConfig(steps=0), "steps", "steps must be a whole number of at least 1, got 0"),
    (lambda: lipcert.CertifyOptions(batch_size=0), "batch_size", "batch_size must be a whole number of at least 1, "
                                                                 "got 0"),
    (lambda: lipcert.CertifyOptions(norm="l1"), "norm", "norm must be l2 or linf, got 'l1'"),
    (lambda: lipcert.CertifyOptions(min_clean_acc=90), "min_clean_acc",
     "min_clean_acc must be a fraction between 0 and 1, got 90; 90 looks like a percentage: write 0.9"),
    (lambda: lipcert.CertifyOptions(missing_baseline="ignore"), "missing_baseline",
     "missing_baseline must be fail or skip, got 'ignore'"),
    (lambda: lipcert.CertifyOptions(allow_empty_certificates=1), "allow_empty_certificates",
     "allow_empty_certificates must be True or False, got 1"),
    (lambda: lipcert.CertifyOptions(attack="yes"), "attack", "attack must be True, False, None or an AttackConfig, "
                                                             "got 'yes'"),
])
def test_wrong_settings_are_config_errors_naming_the_parameter(make, parameter: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message and info.value.parameter == (parameter,)


def test_the_command_line_spells_the_parameters_as_its_flags(capsys, tmp_path: Path) -> None:
    error = ConfigError("batch_size must be a whole number of at least 1, got 0", parameter="batch_size")
    assert error.spelled(parameter_flag) == "--batch-size must be a whole number of at least 1, got 0"
    assert ConfigError("steps must be at least 1", parameter="steps").spelled(parameter_flag) == \
        "--attack-steps must be at least 1"
    in_a_path = ConfigError("out /tmp/out/x holds it, out", source="/tmp/out", parameter="out")
    assert in_a_path.spelled(parameter_flag) == "/tmp/out: --out /tmp/out/x holds it, --out"
    code, _, err = run_main(capsys, "report", str(MODEL), "--data", str(SAMPLES / "digits_test.npz"), "--mean", "0.5",
                            "--out", str(tmp_path / "r"))
    assert code == 2 and one_line(err) == "lipcert: error: --mean and --std go together: give both, or neither"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_verify_names_the_device_parameter_and_the_command_its_flag(capsys) -> None:
    """``verify`` resolves its device itself (``auto`` by default): a GPU that is not there is an error naming
    ``device`` from Python and ``--device`` from the command line."""
    graph = lipcert.load_model(MODEL)
    with pytest.raises(ConfigError) as info:
        lipcert.verify(graph, device="cuda", empirical=False)
    assert str(info.value) == "device cuda: no CUDA GPU is available to torch on this machine"
    assert info.value.parameter == ("device",)
    assert lipcert.verify(graph, empirical=False).device == "cpu"
    code, _, err = run_main(capsys, "verify", str(MODEL), "--device", "cuda")
    assert code == 2
    assert one_line(err) == "lipcert: error: --device cuda: no CUDA GPU is available to torch on this machine"


@pytest.mark.slow
def test_verify_returns_the_gates_of_the_command(capsys) -> None:
    """``lipcert.verify`` gates its result as ``lipcert verify`` does, as ``lipcert.certify`` gates its report."""
    graph = lipcert.load_model(MODEL)
    result = lipcert.verify(graph, empirical=False, max_lipschitz=0.5)
    code, out, _ = run_main(capsys, "verify", str(MODEL), "--max-lipschitz", "0.5", "--format", "json")
    data = json.loads(out)
    assert [g.to_dict() for g in result.gates] == data["gates"] and len(result.gates) == 2
    assert result.passed is data["passed"] is False and code == 1
    assert result.to_dict()["gates"] == data["gates"]


def test_a_wrong_eps_names_the_setting_and_the_command_its_flag(capsys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        lipcert.CertifyOptions(eps="abc")
    assert str(info.value).startswith("eps 'abc': ") and info.value.parameter == ("eps",)
    code, _, err = run_main(capsys, "report", str(MODEL), "--data", str(SAMPLES / "digits_test.npz"), "--eps", "abc",
                            "--out", str(tmp_path / "r"))
    assert code == 2 and one_line(err).startswith("lipcert: error: --eps 'abc': ")


def test_the_options_are_the_settings_table() -> None:
    """``CertifyOptions`` and ``AttackConfig`` take each field's default and check from ``settings.SETTINGS``."""
    from dataclasses import fields

    from lipcert.certification.settings import ATTACK_FIELDS, CERTIFY_FIELDS, SETTINGS

    options = {f.name: f for f in fields(lipcert.CertifyOptions) if f.init}
    assert set(options) == set(CERTIFY_FIELDS)
    assert all(options[name].metadata["setting"] is SETTINGS[name] for name in CERTIFY_FIELDS)
    assert all(options[name].default == SETTINGS[name].default for name in CERTIFY_FIELDS)
    attack = {f.name: f for f in fields(AttackConfig)}
    assert all(attack[field].metadata["setting"] is SETTINGS[name] for name, field in ATTACK_FIELDS.items())
