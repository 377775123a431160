"""What users expect of the command line: --version, a fast --help, --json -, readable narrow tables, hints,
the Lipschitz claim checked by report, checkpoints that are never lost, Ctrl-C, and progress that informs."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import ROOT, SAMPLES, one_line, run_main

DENSE = str(SAMPLES / "digits_dense.onnx")
BROKEN = str(SAMPLES / "digits_broken.onnx")
DATA = str(SAMPLES / "digits_test.npz")


def test_version_flag(capsys) -> None:
    from importlib.metadata import version

    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out == f"{version('lipcert')}\n"


def test_short_flags_are_the_long_ones(capsys) -> None:
    assert run_main(capsys, "-V") == run_main(capsys, "--version")
    for command in ([], ["verify"], ["report"], ["inspect"], ["compare"], ["version"]):
        code, out, _ = run_main(capsys, *command, "-h")
        assert code == 0 and "--help" in out and "--debug" in out
        assert (code, out) == run_main(capsys, *command, "--help")[:2]


def _crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model raise what no input explains: an internal error."""
    import lipcert.model.loader

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom in the loader")

    monkeypatch.setattr(lipcert.model.loader, "load_model", crash)


def test_internal_error_says_what_a_bug_report_needs(capsys, monkeypatch) -> None:
    from lipcert.version import __version__

    _crash(monkeypatch)
    code, out, err = run_main(capsys, "verify", DENSE, "--bound", "1")
    assert code == 3 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "lipcert: internal error: RuntimeError: boom in the loader"
    assert f"  command: lipcert verify {DENSE} --bound 1" in lines
    assert any(line.startswith(f"  version: lipcert {__version__}, Python ") for line in lines)
    assert lines[-1] == "  rerun with --debug for the traceback"


@pytest.mark.parametrize("where", ["global", "command"])
def test_debug_prints_the_traceback(capsys, monkeypatch, where: str) -> None:
    _crash(monkeypatch)
    args = ["--debug", "verify", DENSE] if where == "global" else ["verify", DENSE, "--debug"]
    code, _, err = run_main(capsys, *args)
    assert code == 3 and err.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("boom in the loader")' in err and "in _load" in err
    assert err.strip().endswith("the traceback is above")
    code, _, err = run_main(capsys, "verify", DENSE)  # --debug does not stay on for the next run
    assert code == 3 and "Traceback" not in err
    code, _, err = run_main(capsys, "--debug", "compare", str(Path("no-such-report.json")))  # bad input too
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lipcert: error: ")


def test_unknown_config_key_suggests_the_nearest(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lipcert.toml").write_text('max-lipshitz = 1.0\n')
    code, _, err = run_main(capsys, "verify", DENSE)
    assert code == 2 and one_line(err).endswith('lipcert.toml: unknown key "max-lipshitz"; did you mean '
                                                 '"max-lipschitz"?')
    (tmp_path / "lipcert.toml").write_text('[verify]\nbund = 1.0\n')
    code, _, err = run_main(capsys, "verify", DENSE)
    assert code == 2 and one_line(err).endswith('unknown key "verify.bund"; did you mean "verify.bound"?')
    (tmp_path / "lipcert.toml").write_text('[verfy]\nbound = 1.0\n')
    code, _, err = run_main(capsys, "verify", DENSE)
    assert code == 2 and one_line(err).endswith('unknown key "verfy"; did you mean "verify"?')
    (tmp_path / "lipcert.toml").write_text('colour = "blue"\n')  # nothing near: no guess
    code, _, err = run_main(capsys, "verify", DENSE)
    assert code == 2 and one_line(err).endswith('unknown key "colour"')
    pyproject = '[tool.lipcert]\nmin_clean_accuracy = 0.9\n'
    (tmp_path / "lipcert.toml").unlink()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    code, _, err = run_main(capsys, "report", DENSE)
    assert code == 2 and one_line(err).endswith('unknown key "min_clean_accuracy"; did you mean "min_clean_acc"?')


def test_choices_ignore_case_from_flags_and_config(capsys, monkeypatch, tmp_path: Path) -> None:
    from lipcert.certification.settings import SETTINGS
    from lipcert.cli.config import Settings

    flags = {"norm": "L2", "device": "CPU", "backend": "ORT", "layout": "nchw", "value_range": "AUTO",
             "attack_precision": "BFloat16", "format": "JSON"}
    s = Settings("report", flags, use_file=False, environ={})
    assert s.given(*flags) == {"norm": "l2", "device": "cpu", "backend": "onnxruntime", "layout": "NCHW",
                               "value_range": "auto", "attack_precision": "bfloat16", "format": "json"}
    assert Settings("verify", {"require": "Not-Violated", "device": "CUDA:1"}, use_file=False,
                    environ={}).given("require", "device") == {"require": "not-violated", "device": "cuda:1"}
    assert SETTINGS["backend"].parse("OnnxRuntime") == "onnxruntime"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lipcert.toml").write_text('[report]\nnorm = "LINF"\nbackend = "Torch"\n')
    s = Settings("report", {}, environ={})
    assert s.get("norm") == "linf" and s.get("backend") == "torch"
    code, _, err = run_main(capsys, "report", DENSE, "--norm", "L3")
    assert code == 2 and one_line(err) == "lipcert: error: --norm 'L3': expected one of l2, linf"
    code, out, _ = run_main(capsys, "verify", DENSE, "--device", "CPU", "--require", "PROVEN", "--format", "JSON",
                            "--empirical-budget", "0.2")
    assert code == 0 and json.loads(out)["device"] == "cpu"


def test_choices_ignore_case_in_the_api() -> None:
    from lipcert.bounds.results import PROVEN, VerifyResult
    from lipcert.certification.attack import AttackConfig
    from lipcert.certification.options import CertifyOptions
    from lipcert.errors import ConfigError
    from lipcert.report.gates import verify_gates

    options = CertifyOptions(eps="0.1", norm="L2", backend="ORT", layout="nchw", value_range="AUTO",
                             attack=AttackConfig(precision="BFloat16"))
    assert (options.norm, options.backend, options.layout, options.value_range) == ("l2", "onnxruntime", "NCHW",
                                                                                   "auto")
    assert options.attack_config is not None and options.attack_config.precision == "bfloat16"
    with pytest.raises(ConfigError, match="norm must be l2 or linf, got 'l1'"):
        CertifyOptions(eps="0.1", norm="l1")
    result = VerifyResult("s", "v", "m", 1.0, "default", 1e-5, "cpu", 0, [], 1.0, 0.5, "x", None, 0, False, PROVEN,
                          [], [], [])
    assert verify_gates(result, require="PROVEN")[0].passed


def test_help_does_not_import_torch() -> None:
    script = ("import sys; from lipcert.cli.app import main; main(['--help']); main(['report', '--help']); "
              "main(['--version']); "
              "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--min-certified-acc" in result.stdout and result.stdout.strip().endswith("[]")


def test_unknown_flag_is_one_line(capsys) -> None:
    code, _, err = run_main(capsys, "verify", DENSE, "--bund", "1")
    assert code == 2 and one_line(err).startswith("lipcert: error: No such option: --bund")


@pytest.mark.slow
def test_json_dash_is_stdout_for_verify_and_report(capsys, tmp_path: Path) -> None:
    code, out, _ = run_main(capsys, "verify", DENSE, "--json", "-")
    data = json.loads(out)  # nothing else on stdout
    assert code == 0 and data["status"] == "proven" and data["passed"] is True and data["gates"]
    code, out, _ = run_main(capsys, "report", DENSE, "--data", DATA, "--no-attack", "--out", str(tmp_path / "r"),
                            "--json", "-")
    data = json.loads(out)
    assert code == 0 and data["schema"] == "lipcert.report/1" and data["passed"] is True
    code, out, _ = run_main(capsys, "report", DENSE, "--data", DATA, "--no-attack", "--out", str(tmp_path / "r"),
                            "--json", str(tmp_path / "r.json"), "-q")
    written = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and out.startswith("clean ") and written["passed"] is True
    assert written["eps"] == data["eps"] and [g["name"] for g in written["gates"]] == [g["name"] for g in data["gates"]]


def test_verify_table_fits_80_columns_without_cutting_bounds_or_verdicts(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_main(capsys, "verify", DENSE, "--json", str(tmp_path / "v.json"), "--empirical-budget", "0.5")
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in out
    assert "│ /act1 " in out and "│ /Concat_1 " in out  # the node column broke at "/", not inside a word
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    layers = json.loads((tmp_path / "v.json").read_text())["layers"]
    for layer in layers:  # each row's bounds, gap and status appear whole, on the row's first line
        upper = "-" if layer["upper"] is None else f"{layer['upper']:.7g}"
        lower = "-" if layer["lower"] is None else f"{layer['lower']:.7g}"
        assert [lower, upper, layer["status"]] in [[r[3], r[4], r[7]] for r in rows], (layer, out)
    assert "verdict: PROVEN" in out


def test_pytorch_checkpoint_gets_an_onnx_hint(capsys, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, model)
    for command in (["inspect"], ["verify"], ["report", "--data", DATA]):
        code, _, err = run_main(capsys, *command, str(model))
        assert code == 2 and "export it to ONNX first" in one_line(err) and str(model) in err
    from lipcert.errors import ModelError
    from lipcert.model.loader import load_model

    with pytest.raises(ModelError, match="export it to ONNX first"):  # the API's own policy, not the CLI's
        load_model(model)


def test_linf_default_radii_and_duplicates_dropped(capsys, tmp_path: Path) -> None:
    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--norm", "linf", "--no-attack", "--out",
                              str(tmp_path / "a"), "-q")
    assert code == 0, err
    assert [e["label"] for e in json.loads((tmp_path / "a" / "report.json").read_text())["eps"]] == \
        ["1/255", "2/255", "4/255", "8/255"]
    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "0.5,1/2,36/255,36/255", "--no-attack",
                              "--min-certified-acc", "72/255=0.1", "--min-certified-acc", "0.1411764705882353=0.1",
                              "--out", str(tmp_path / "b"), "-q")
    assert code == 0, err
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [e["label"] for e in rep["eps"]] == ["0.5", "36/255", "72/255"]
    assert out.count("certified@") == 3


# ---------------------------------------------------------------- the Lipschitz claim in report


@pytest.mark.slow
def test_report_fails_on_a_claim_lipcert_cannot_prove(capsys, tmp_path: Path) -> None:
    code, out, err = run_main(capsys, "report", BROKEN, "--data", DATA, "--eps", "36/255", "--no-attack", "--out",
                              str(tmp_path / "a"), "--junit", str(tmp_path / "a.xml"))
    assert code == 1, out + err
    first = out.splitlines()[0]
    assert first.startswith("LIPSCHITZ CLAIM NOT PROVEN: the model is claimed 1-Lipschitz (model metadata), but "
                            "lipcert's sound upper bound is 2.")
    assert "FAILED Lipschitz claim 1 (model metadata) is proven: measured computed upper bound 2." in out
    assert out.splitlines()[-1].endswith("1 gate(s) failed")
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["bound"]["claimed"] == 1.0 and rep["bound"]["claim_proven"] is False
    assert rep["bound"]["claim_source"] == "model metadata"
    assert "> **LIPSCHITZ CLAIM NOT PROVEN" in (tmp_path / "a" / "report.md").read_text()
    assert 'name="Lipschitz claim 1 (model metadata) is proven"' in (tmp_path / "a.xml").read_text()
    # a claim declared with --lipschitz is checked the same way; --no-require-claim keeps the warning, not the gate
    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "36/255", "--no-attack", "--out",
                              str(tmp_path / "b"), "--lipschitz", "0.5")
    assert code == 1 and "FAILED Lipschitz claim 0.5 (lipschitz) is proven" in out
    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "36/255", "--no-attack", "--out",
                              str(tmp_path / "b"), "--lipschitz", "0.5", "--no-require-claim")
    assert code == 0, out + err
    assert out.startswith("LIPSCHITZ CLAIM NOT PROVEN: the model is claimed 0.5-Lipschitz (lipschitz)")
    assert "the certificates use the declared bound, which lipcert cannot confirm" in " ".join(out.split())


def test_report_passes_a_proven_claim_and_needs_one_to_require_it(capsys, tmp_path: Path) -> None:
    import onnx

    code, out, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "36/255", "--no-attack",
                              "--out", str(tmp_path / "a"), "--format", "json")
    gates = {g["name"]: g["passed"] for g in json.loads(out)["gates"]}
    assert code == 0 and gates["Lipschitz claim 1 (model metadata) is proven"] is True
    bare = onnx.load(DENSE)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    code, out, err = run_main(capsys, "report", str(tmp_path / "bare.onnx"), "--data", DATA, "--eps", "36/255",
                              "--no-attack", "--out", str(tmp_path / "b"), "--require-claim")
    assert code == 2 and "--require-claim: the model declares no Lipschitz claim" in one_line(err)
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- checkpoints are never lost


def _interrupted_checkpoint(out: Path) -> int:
    """The checkpoint ``lipcert report DENSE --no-attack --batch-size 64`` leaves when stopped after 3 batches."""
    from lipcert import certify, load_model

    certify(load_model(DENSE), DATA, "36/255,72/255,108/255", batch_size=64, checkpoint_dir=out, attack=False)
    files = sorted((out / ".lipcert-checkpoint").glob("batch-*.npz"))
    for f in files[3:]:
        f.unlink()
    return len(files)


@pytest.mark.slow
def test_refused_runs_keep_the_checkpoint_and_resume_reads_it_back(capsys, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    batches = _interrupted_checkpoint(out)
    folder = out / ".lipcert-checkpoint"
    before = sorted(p.name for p in folder.iterdir())
    args = ["report", DENSE, "--data", DATA, "--no-attack", "--out", str(out)]
    refused = [
        (run_main(capsys, *args, "--batch-size", "32", "--resume"), "was made with --batch-size 64, this run has "
                                                                     "--batch-size 32"),
        (run_main(capsys, *args, "--batch-size", "64", "--eps", "36/255", "--resume"),
         "was made with --eps 36/255,72/255,108/255, this run has --eps 36/255"),
        (run_main(capsys, *args[:3], DATA + ".typo", *args[4:], "--batch-size", "64", "--resume"), "no such"),
    ]
    for (code, _, err), expected in refused:
        assert code == 2 and expected in one_line(err), err
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing deleted
    code, stdout, err = run_main(capsys, *args, "--batch-size", "64", "--resume")
    assert code == 0, stdout + err
    assert f"resumed from {folder}: read back 192 of 540 samples (3 batches)" in err
    assert not folder.exists() and (out / "report.json").is_file() and batches == 9
    assert json.loads((out / "report.json").read_text())["timings"]["samples_read_back"] == 192


def test_resume_without_a_checkpoint_says_so(capsys, tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "report", DENSE, "--data", DATA, "--no-attack", "--out", str(tmp_path), "--resume")
    assert code == 0 and f"resume: no checkpoint in {tmp_path}; starting from the beginning" in err


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    args = [DENSE, "--data", DATA, "--batch-size", "32", "--attack-steps", "50",
            "--attack-restarts", "1", "--backend", "torch", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "lipcert", "report", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    folder = tmp_path / ".lipcert-checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("batch-*.npz")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lipcert: interrupted; rerun with --resume to continue"
    assert list(folder.glob("batch-*.npz")) and not (tmp_path / "report.json").exists()


# ---------------------------------------------------------------- progress


def test_progress_log_lines_name_phases_with_speed_and_move_within_a_batch(capsys, monkeypatch, tmp_path: Path) -> None:
    from lipcert.cli import progress as cli_progress

    monkeypatch.setattr(cli_progress, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(cli_progress, "LOG_TICK", 0.02)
    code, _, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "36/255,72/255", "--batch-size", "1024",
                            "--attack-steps", "10", "--attack-restarts", "1", "--out", str(tmp_path))
    assert code == 0, err
    lines = err.splitlines()
    for phase in ("loading the model", "opening the data", "computing the Lipschitz bound"):
        assert any(re.fullmatch(f"lipcert: {phase}: done in [0-9.]+ s", line) for line in lines), err
    for phase in ("inference", "attack"):
        assert any(re.fullmatch(f"lipcert: {phase}: done, 540 samples in [0-9.]+ s \\([0-9.]+ samples/s\\)", line)
                   for line in lines), err
    # one batch of 540 samples, yet the attack's count moves during it, with a speed and the time left
    counts = [float(m.group(1)) for line in lines
              if (m := re.fullmatch(r"lipcert: attack: (\d+)/540 samples \([0-9.]+%\), [0-9.]+ samples/s(, about .* "
                                    r"left)?", line))]
    assert any(0 < c < 540 for c in counts), err
    assert any(line.endswith(" left") for line in lines if line.startswith("lipcert: attack: ")), err
    # inference waits for the attack batch by batch: only the phase that ends last gives the time left
    assert not any(line.endswith(" left") for line in lines if line.startswith("lipcert: inference: ")), err


def test_progress_is_silent_with_quiet_and_json(capsys, monkeypatch, tmp_path: Path) -> None:
    from lipcert.cli import progress as cli_progress

    monkeypatch.setattr(cli_progress, "LOG_INTERVAL", 0.0)
    for i, flag in enumerate(("-q", "--json=-")):
        code, _, err = run_main(capsys, "report", DENSE, "--data", DATA, "--eps", "36/255", "--no-attack", "--out",
                                str(tmp_path / str(i)), flag)
        assert code == 0 and err == ""


def test_progress_bars_on_a_terminal() -> None:
    from rich.console import Console

    from lipcert.cli.progress import BarProgress, LogProgress, progress_for
    from lipcert.progress import Progress

    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    log = Console(file=io.StringIO(), force_terminal=False)
    assert type(progress_for(True, terminal)) is Progress
    assert isinstance(progress_for(False, log), LogProgress) and not isinstance(progress_for(False, log), BarProgress)
    with progress_for(False, terminal) as bars:
        assert isinstance(bars, BarProgress)
        bars.start("computing the Lipschitz bound")
        bars.end("computing the Lipschitz bound")
        bars.start("attack", 540, 192)
        bars.note("resumed: read back 192 of 540 samples")
        bars.advance("attack", 100.5)
        time.sleep(0.3)
        bars.advance("attack", 100)
        bars.bars.refresh()
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.file.getvalue())
        assert "392/540 samples" in text and "/s" in text and "left" in text
        bars.end("attack")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.file.getvalue())
    assert "✓ computing the Lipschitz bound" in text and "✓ attack" in text and "540/540 samples" in text
    assert "resumed: read back 192 of 540 samples" in text


@pytest.mark.slow
def test_inference_in_chunks_gives_the_same_batches_and_throughput_is_over_the_whole_run(tmp_path: Path) -> None:
    from lipcert import AttackConfig, certify, load_model
    from lipcert.certification.run import chunk_size

    assert chunk_size(256, None, "cpu") == 64 and chunk_size(540, None, "cpu") == 60
    assert chunk_size(97, None, "cpu") == 97
    assert chunk_size(240, 48, "cpu") == 48 and chunk_size(1024, None, "cuda") == 1024
    graph = load_model(DENSE)
    data = np.load(DATA)
    x, y = data["x"].copy(), data["y"]
    x[[70, 300]] = np.nan  # skipped samples inside chunks
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=y)
    kw = dict(backend="torch", skip_bad_samples=True, attack=AttackConfig(steps=3, restarts=1))
    whole = certify(graph, path, "36/255,72/255", batch_size=64, **kw)   # one call per batch
    chunked = certify(graph, path, "36/255,72/255", batch_size=256, **kw)  # 4 calls per batch of 256
    assert torch.equal(whole.samples.indices, chunked.samples.indices)
    assert chunked.skipped is not None and chunked.skipped.count == 2
    assert torch.equal(whole.samples.predictions, chunked.samples.predictions)
    assert torch.allclose(whole.samples.radii, chunked.samples.radii, rtol=1e-6, atol=1e-9)
    t = chunked.timings
    assert t.images_per_second == pytest.approx(538 / t.total_seconds, rel=0.05)
    assert t.images_per_second < t.inference_images_per_second


# ---------------------------------------------------------------- the plot


@pytest.mark.slow
def test_plot_labels_stay_inside_and_apart_and_the_histogram_counts_whole_samples() -> None:
    from lipcert import AttackConfig, certify, load_model
    from lipcert.report.render import figure

    graph = load_model(DENSE)
    for norm, eps in (("linf", "1/255,2/255,4/255,8/255"), ("l2", "36/255,72/255,108/255,1")):
        report = certify(graph, DATA, eps, norm=norm, attack=AttackConfig(steps=2, restarts=1, norm=norm))
        fig = figure(report)
        ax, hx = fig.axes[:2]
        renderer = fig.canvas.get_renderer()
        inside = ax.get_window_extent(renderer)
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == 4
        for i, box in enumerate(boxes):
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            assert not any(box.overlaps(other) for other in boxes[i + 1:]), (norm, i)
        assert all(float(t).is_integer() for t in hx.get_yticks())
        assert hx.get_title() == "gap per attacked point"
        assert any("beyond its certified radius" in t.get_text() for t in hx.texts)
        # the x axis ends just past the largest radius that matters, not far beyond it
        top = max([r for r, a in report.curve if a > 0] + [e.eps for e in report.eps])
        assert top < ax.get_xlim()[1] <= 1.1 * top
