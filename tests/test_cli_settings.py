"""Every setting, from a flag, a config file or the environment, is checked in one place: a wrong one is a
one-line error naming it, with exit code 2 (never a traceback, never exit 3), before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipcert.certification.settings import SETTINGS
from lipcert.cli.config import KEYS

from .conftest import SAMPLES, one_line, run_main

DENSE = str(SAMPLES / "digits_dense.onnx")
DATA = str(SAMPLES / "digits_test.npz")

#: a value of the wrong type (or out of range) for every key a config file may set, as TOML
WRONG = {
    "model": "5", "arch": "true", "arch_python": '"no_colon"', "input_shape": '"3,x"', "device": '"gpu"',
    "seed": '"one"', "junit": "1", "json": "[]", "format": '"yaml"', "quiet": '"yes"', "max_lipschitz": '"one"',
    "min_mean_radius": "-0.5",
    "max_elements": "0", "bound": '"one"', "tol": "-1", "require": '"maybe"', "data": "1.5", "eps": '"a"',
    "norm": '"l1"', "batch_size": "0", "out": "false", "mean": '"x"', "std": "0", "lipschitz": "-2",
    "backend": '"tf"', "layout": '"CHW"', "value_range": '"0-9"', "skip_bad_samples": '"no"', "workers": "-1",
    "attack": "1", "attack_steps": "2.5", "attack_restarts": '"two"', "attack_precision": '"fp16"',
    "min_clean_acc": '"high"', "min_certified_acc": '"36/255"', "max_violations": "-1", "baseline": "3",
    "max_drop": '"x"', "require_claim": '"yes"', "empirical_budget": "0", "missing_baseline": '"maybe"',
    "allow_empty_certificates": '"yes"', "witness": "5", "gate_on": '"both"', "local": '"yes"', "local_depth": "0",
}


def test_every_config_key_has_a_validator_and_a_wrong_value_here() -> None:
    keys = KEYS["verify"] | KEYS["report"]
    assert keys <= set(SETTINGS) and keys == set(WRONG)


@pytest.mark.parametrize("key", sorted(WRONG))
def test_wrong_type_in_the_config_file_names_the_key(capsys, tmp_path: Path, key: str) -> None:
    command = "verify" if key in KEYS["verify"] - KEYS["report"] else "report"
    spelled = key.replace("_", "-")
    config = tmp_path / "lipcert.toml"
    config.write_text(f"[{command}]\n{spelled} = {WRONG[key]}\n")
    code, out, err = run_main(capsys, command, DENSE, "--data", DATA, "--config", str(config)) \
        if command == "report" else run_main(capsys, command, DENSE, "--config", str(config))
    line = one_line(err)
    assert code == 2 and out == ""
    assert line.startswith(f"lipcert: error: {config}: [{command}] {spelled} = {WRONG[key]}: expected"), line


@pytest.mark.parametrize("args", [
    ["--bound", "one"], ["--tol", "-1"], ["--seed", "x"], ["--max-lipschitz", "0"], ["--max-elements", "0"],
    ["--device", "gpu"], ["--format", "yaml"], ["--input-shape", "3,x"], ["--arch-python", "nocolon"],
    ["--require", "maybe"], ["--bound", "nan"],
])
def test_wrong_verify_flag_is_named(capsys, args: list[str]) -> None:
    code, out, err = run_main(capsys, "verify", DENSE, *args)
    assert code == 2 and one_line(err).startswith(f"lipcert: error: {args[0]} {args[1]!r}: expected")


@pytest.mark.parametrize("args", [
    ["--batch-size", "0"], ["--batch-size", "many"], ["--eps", "a"], ["--eps", "-1"], ["--norm", "l1"],
    ["--mean", "x"], ["--std", "0"], ["--std", "0.5,-1"], ["--lipschitz", "-1"], ["--backend", "tf"],
    ["--layout", "CHW"], ["--value-range", "1-9"], ["--workers", "-1"], ["--attack-steps", "0"],
    ["--attack-restarts", "1.5"], ["--attack-precision", "fp16"], ["--min-clean-acc", "high"],
    ["--min-certified-acc", "36/255"], ["--max-violations", "-1"], ["--max-drop", "x"], ["--gpus", "0"],
    ["--launcher", "mpirun"],
])
def test_wrong_report_flag_is_named(capsys, tmp_path: Path, args: list[str]) -> None:
    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--out", str(tmp_path / "r"), *args)
    assert code == 2 and one_line(err).startswith(f"lipcert: error: {args[0]} {args[1]!r}: expected"), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, hint", [
    (["--min-clean-acc", "90"], "--min-clean-acc '90': expected a fraction between 0 and 1; 90 looks like a "
                                "percentage: write 0.9"),
    (["--min-certified-acc", "36/255=60"], "--min-certified-acc '36/255=60': expected EPS=ACCURACY with the accuracy "
                                           "a fraction between 0 and 1; 60 looks like a percentage: write 0.6"),
    (["--max-drop", "5"], "--max-drop '5': expected a fraction between 0 and 1; 5 looks like a percentage: write 0.05"),
])
def test_percent_looking_accuracies_are_refused_with_a_hint(capsys, args: list[str], hint: str) -> None:
    code, _, err = run_main(capsys, "report", DENSE, "--data", DATA, *args)
    assert code == 2 and one_line(err) == f"lipcert: error: {hint}"


def test_percent_in_the_api_gates_too() -> None:
    from lipcert import ConfigError
    from lipcert.report.gates import report_gates

    with pytest.raises(ConfigError, match="looks like a percentage: write 0.95"):
        report_gates(None, min_clean_acc=95)  # type: ignore[arg-type]  # refused before the report is read


def test_environment_variable_is_validated_and_named(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LIPCERT_MAX_ELEMENTS", "lots")
    code, _, err = run_main(capsys, "verify", DENSE)
    assert code == 2 and one_line(err) == ("lipcert: error: LIPCERT_MAX_ELEMENTS='lots': expected a positive whole "
                                           "number of elements")
    monkeypatch.setenv("LIPCERT_MAX_ELEMENTS", "10")  # valid, and applied: the model's weights are larger
    code, _, err = run_main(capsys, "inspect", DENSE)
    assert code == 2 and "more than the limit of 10" in one_line(err)


def test_malformed_pyproject_is_reported_like_lipcert_toml(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.lipcert\nmodel = "m.onnx"\n')
    code, _, err = run_main(capsys, "verify")
    assert code == 2 and one_line(err).startswith(f"lipcert: error: {tmp_path / 'pyproject.toml'}: not valid TOML")
    (tmp_path / "pyproject.toml").unlink()
    (tmp_path / "lipcert.toml").write_text('model = "m.onnx\n')
    code, _, err = run_main(capsys, "verify")
    assert code == 2 and one_line(err).startswith(f"lipcert: error: {tmp_path / 'lipcert.toml'}: not valid TOML")


def test_toml_lists_and_single_strings_for_list_keys(capsys, tmp_path: Path) -> None:
    """``eps = [...]`` of numbers and strings, a one-value ``std``, and one gate as a plain string all work."""
    config = tmp_path / "lipcert.toml"
    config.write_text(f'model = "{DENSE}"\n[report]\ndata = "{DATA}"\neps = [0.1, "36/255", 0.1]\nmean = [0]\n'
                      f'std = 1\nmin-certified-acc = "36/255=0.5"\nattack = false\nout = "rep"\n')
    code, out, err = run_main(capsys, "report", "--config", str(config), "-q")
    assert code == 0, out + err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [e["label"] for e in rep["eps"]] == ["0.1", "36/255"]  # the duplicate 0.1 is dropped
    assert rep["bound"]["normalisation_factor"] == 1.0
    assert [g["name"] for g in rep["gates"] if g["name"].startswith("certified")] == \
        ["certified accuracy at 36/255 >= 0.5"]


def test_relative_paths_in_the_config_and_json_dash(capsys, tmp_path: Path) -> None:
    """Paths are relative to the config file, but ``json = "-"`` is stdout, not a file named ``-``."""
    config = tmp_path / "sub" / "lipcert.toml"
    config.parent.mkdir()
    config.write_text(f'model = "{DENSE}"\njson = "-"\n[report]\ndata = "{DATA}"\nattack = false\nout = "rep"\n')
    code, out, _ = run_main(capsys, "report", "--config", str(config))
    assert code == 0 and json.loads(out)["passed"] is True
    assert (tmp_path / "sub" / "rep" / "report.json").is_file() and not (tmp_path / "sub" / "-").exists()


#: flag spellings below cli/ in modules another change owns, still to be made setting names (file, flag); the test
#: reports each one still there and fails on any other
PENDING_FLAGS: set[tuple[str, str]] = set()


def _flag_spellings(path: Path) -> set[str]:
    """The flags (``--word``) a module's string literals spell, docstrings left out (they may show commands)."""
    import ast
    import re

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {flag for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value)}


def test_no_flag_is_spelled_below_the_command_line() -> None:
    """Messages, notes and report fields below ``cli/`` name settings (``batch_size``); only the command line
    spells them as flags (``LipcertError.parameter``, ``cli.config.parameter_flag``)."""
    import warnings

    import lipcert

    root = Path(lipcert.__file__).resolve().parent
    found = {(str(path.relative_to(root.parent)), flag) for path in sorted(root.rglob("*.py"))
             if "cli" not in path.relative_to(root).parts for flag in _flag_spellings(path)}
    assert found - PENDING_FLAGS == set()
    if found & PENDING_FLAGS:
        warnings.warn(f"flag spellings still to be made setting names: {sorted(found & PENDING_FLAGS)}", stacklevel=1)
