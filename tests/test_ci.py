"""lipcert as a CI step: gates, exit codes, JUnit XML, step summary, JSON on stdout, config files, baselines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest

from .conftest import SAMPLES, run_cli

DATA = str(SAMPLES / "digits_test.npz")
FAST = ["--attack-steps", "5", "--attack-restarts", "1"]


def _cases(junit: Path) -> dict[str, bool]:
    root = ElementTree.parse(junit).getroot()
    return {c.get("name"): c.find("failure") is None for c in root.iter("testcase")}


@pytest.mark.slow
def test_report_gates_pass_and_fail_with_junit_and_summary(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    ok = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", DATA, "--out", str(tmp_path / "a"),
                 "--min-clean-acc", "0.9", "--min-certified-acc", "36/255=0.5", "--junit", str(tmp_path / "ok.xml"),
                 *FAST, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    cases = _cases(tmp_path / "ok.xml")
    assert cases["clean accuracy >= 0.9"] and cases["certified accuracy at 36/255 >= 0.5"]
    assert all(cases.values())
    text = summary.read_text()
    assert "lipcert report" in text and "| clean accuracy >= 0.9 | pass |" in text

    bad = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", DATA, "--out", str(tmp_path / "b"),
                  "--min-clean-acc", "0.999", "--min-certified-acc", "36/255=0.99", "--min-certified-acc",
                  "0.5=0.9", "--junit", str(tmp_path / "bad.xml"), *FAST)
    assert bad.returncode == 1
    assert bad.stdout.count("FAILED") == 3  # every failed gate is listed, not just the first
    cases = _cases(tmp_path / "bad.xml")
    assert not cases["clean accuracy >= 0.999"] and not cases["certified accuracy at 0.5 >= 0.9"]
    failure = ElementTree.parse(tmp_path / "bad.xml").getroot().find(".//failure")
    assert "measured" in failure.get("message") and "required" in failure.get("message")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any(abs(e["eps"] - 0.5) < 1e-12 for e in report["eps"])  # the gate's radius was certified too


@pytest.mark.slow
def test_verify_gates_and_json_stdout(tmp_path: Path) -> None:
    good = run_cli("verify", str(SAMPLES / "digits_conv.onnx"), "--format", "json", "--max-lipschitz", "1.001")
    assert good.returncode == 0, good.stderr
    data = json.loads(good.stdout)  # nothing but JSON on stdout
    assert data["status"] == "proven" and data["passed"] is True and len(data["gates"]) == 2
    capped = run_cli("verify", str(SAMPLES / "digits_conv.onnx"), "--max-lipschitz", "0.5", "-q")
    assert capped.returncode == 1 and capped.stdout.strip().splitlines() == ["verdict: PROVEN: 1 gate(s) failed"]
    broken = run_cli("verify", str(SAMPLES / "digits_broken.onnx"), "--require", "not-violated",
                     "--junit", str(tmp_path / "v.xml"))
    assert broken.returncode == 1
    assert not _cases(tmp_path / "v.xml")["lipschitz claim 1 is not-violated"]


@pytest.mark.slow
def test_report_json_stdout_only(tmp_path: Path) -> None:
    result = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", DATA, "--out", str(tmp_path / "r"),
                     "--format", "json", "--no-attack")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "lipcert.report/1" and data["passed"] is True and data["attack"] is None


@pytest.mark.slow
def test_config_file_with_flag_override(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "digits_dense.onnx", tmp_path / "model.onnx")
    shutil.copy(SAMPLES / "digits_test.npz", tmp_path / "test.npz")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.lipcert]\nmodel = "model.onnx"\ndevice = "cpu"\n\n'
        '[tool.lipcert.report]\ndata = "test.npz"\neps = "36/255"\nmin-certified-acc = ["36/255=0.99"]\n'
        'attack = false\nout = "rep"\n')
    fails = run_cli("report", cwd=tmp_path)
    assert fails.returncode == 1, fails.stdout + fails.stderr
    assert (tmp_path / "rep" / "report.json").is_file()
    passes = run_cli("report", "--min-certified-acc", "36/255=0.5", cwd=tmp_path)
    assert passes.returncode == 0, passes.stdout + passes.stderr
    verify = run_cli("verify", "-q", cwd=tmp_path)
    assert verify.returncode == 0 and "PROVEN" in verify.stdout


def test_lipcert_toml_unknown_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "lipcert.toml").write_text('model = "m.onnx"\nmin-clean-accuracy = 0.9\n')
    result = run_cli("report", cwd=tmp_path)
    assert result.returncode == 2
    assert 'unknown key "min-clean-accuracy"; did you mean "min-clean-acc"?' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_baseline_regression_gate(tmp_path: Path) -> None:
    base = tmp_path / "base"
    first = run_cli("report", str(SAMPLES / "digits_conv.onnx"), "--data", DATA, "--eps", "36/255,72/255",
                    "--out", str(base), "--no-attack")
    assert first.returncode == 0
    same = run_cli("report", str(SAMPLES / "digits_conv.onnx"), "--data", DATA, "--eps", "36/255,72/255",
                   "--out", str(tmp_path / "same"), "--no-attack", "--baseline", str(base / "report.json"))
    assert same.returncode == 0, same.stdout
    worse = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", DATA, "--eps", "36/255,72/255",
                    "--out", str(tmp_path / "worse"), "--no-attack", "--baseline", str(base / "report.json"),
                    "--max-drop", "0.01", "--lipschitz", "3")
    assert worse.returncode == 1
    assert "baseline" in worse.stdout and "change -" in worse.stdout


@pytest.mark.parametrize("args", [["--format", "yaml"], ["--max-drop", "-1"], ["--baseline", "missing.json"],
                                  ["--min-certified-acc", "36/255"]])
def test_bad_configuration_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = run_cli("report", str(SAMPLES / "digits_dense.onnx"), "--data", DATA, "--out", str(tmp_path / "r"),
                     *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_no_color_plain_text(tmp_path: Path) -> None:
    result = run_cli("verify", str(SAMPLES / "digits_dense.onnx"))
    assert "\x1b[" not in result.stdout


@pytest.mark.slow
def test_bound_from_the_config_file_is_named_as_such(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "digits_broken.onnx", tmp_path / "model.onnx")
    (tmp_path / "lipcert.toml").write_text('model = "model.onnx"\n\n[verify]\nbound = 3.0\n')
    from_config = run_cli("verify", "--format", "json", cwd=tmp_path)
    assert from_config.returncode == 0, from_config.stderr
    data = json.loads(from_config.stdout)
    assert data["claimed"] == 3.0 and data["claim_source"] == "bound in the config file"
    from_flag = run_cli("verify", "--format", "json", "--bound", "0.5", cwd=tmp_path)
    assert from_flag.returncode == 1 and json.loads(from_flag.stdout)["claim_source"] == "bound"


def test_wheel_builds_and_allows_the_tested_torch(tmp_path: Path) -> None:
    """The wheel .ci/run builds (here without network: the installed setuptools), with its entry point and a torch
    range that admits torch 2.13.0 but no torch 3."""
    import subprocess
    import sys
    import zipfile

    from packaging.requirements import Requirement

    from .conftest import ROOT

    src = tmp_path / "src"
    shutil.copytree(ROOT / "lipcert", src / "lipcert", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = (tmp_path / "dist").glob("lipcert-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [Requirement(line.split(":", 1)[1].strip()) for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        entry = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lipcert/cli/app.py" in names and "lipcert/data/npz.py" in names and "lipcert/graph/ops/base.py" in names
    assert "lipcert = lipcert.cli.app:main" in entry
    torch = next(r for r in requires if r.name == "torch")
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.2.0")
    assert not torch.specifier.contains("2.1.0") and not torch.specifier.contains("3.0.0")
    assert "pip wheel --no-deps . -w dist/" in (ROOT / ".ci" / "run").read_text()
