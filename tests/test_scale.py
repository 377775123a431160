"""Scale: torchrun data-parallel runs equal single-process ones; interrupted runs resume to the same report.

Every process runs with one thread, as torchrun's workers do, so that all runs do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SAMPLES, run_cli

pytestmark = pytest.mark.slow  # every test runs lipcert (several times, some under torchrun) as subprocesses

ARGS = [str(SAMPLES / "digits_conv.onnx"), "--data", str(SAMPLES / "digits_test.npz"), "--eps", "36/255,72/255",
        "--attack-steps", "10", "--attack-restarts", "1", "--backend", "torch", "-q"]
VOLATILE = {"timings", "created"}


def _same_report(a: Path, b: Path) -> None:
    ra, rb = json.loads((a / "report.json").read_text()), json.loads((b / "report.json").read_text())
    assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    assert (a / "samples.csv").read_bytes() == (b / "samples.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = run_cli("report", *ARGS, "--batch-size", "32", "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``lipcert report ARGS`` under ``torchrun --nproc-per-node 2`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lipcert", "report", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _kill_after(batches: int, folder: Path, *args: str) -> int:
    """Start ``lipcert report ARGS``, SIGKILL it once ``folder`` holds ``batches`` checkpointed batches (or it
    ended); return how many batches were checkpointed."""
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lipcert", "report", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(folder.glob("batch-*.npz"))) < batches and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(folder.glob("batch-*.npz")))


def test_torchrun_two_processes_gloo_equals_single_process(tmp_path: Path, reference: Path) -> None:
    result = _torchrun(*ARGS, "--batch-size", "32", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    _same_report(tmp_path, reference)
    assert json.loads((tmp_path / "report.json").read_text())["timings"]["processes"] == 2


def test_killed_run_resumes_to_the_same_report(tmp_path: Path, reference: Path) -> None:
    folder = tmp_path / ".lipcert-checkpoint"
    done = _kill_after(3, folder, *ARGS, "--batch-size", "32", "--out", str(tmp_path))
    assert 3 <= done < 17, "the run should have been interrupted part-way"
    assert not (tmp_path / "report.json").exists()
    resumed = run_cli("report", *ARGS, "--batch-size", "32", "--out", str(tmp_path), "--resume",
                      env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _same_report(tmp_path, reference)
    assert not folder.exists()


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "lipcert", "report", *ARGS, "--batch-size", "32", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / ".lipcert-checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("batch-*.npz")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = run_cli("report", *ARGS, "--batch-size", "64", "--out", str(tmp_path), "--resume")
    assert other.returncode == 2
    assert "was made with --batch-size 32, this run has --batch-size 64" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert list(folder.glob("batch-*.npz")), "a refused resume must leave the checkpoint in place"


# ---------------------------------------------------------------- bad samples skipped, image-decoding workers

BAD_IMAGES = (10, 271, 272, 500)  # around the boundary of the two shards (17 batches of 32: 9 + 8)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """The digits as an image folder with corrupt files, and a single-process --skip-bad-samples report of it."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "digits"
    data = np.load(SAMPLES / "digits_test.npz")
    files = []
    for i, (x, y) in enumerate(zip(data["x"], data["y"])):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        files.append(root / str(y) / f"{i:03d}.png")
        Image.fromarray((x[0] * 255).round().astype(np.uint8)).save(files[-1])
    ordered = sorted(files, key=lambda f: (f.parent.name, f.name))  # the loader's order: by class, then name
    for i in BAD_IMAGES:
        ordered[i].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [a if a != str(SAMPLES / "digits_test.npz") else str(root) for a in ARGS] + ["--skip-bad-samples"]
    out = tmp_path_factory.mktemp("bad-single")
    result = run_cli("report", *args, "--batch-size", "32", "--workers", "0", "--out", str(out),
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = json.loads((out / "report.json").read_text())["skipped"]
    assert [s["index"] for s in skipped["samples"]] == list(BAD_IMAGES) and skipped["evaluated"] == 536
    return args, out


def test_torchrun_skips_the_same_samples_with_decoding_workers(tmp_path: Path, bad_folder) -> None:
    args, reference = bad_folder
    result = _torchrun(*args, "--batch-size", "32", "--workers", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    _same_report(tmp_path, reference)


def test_killed_run_with_skipped_samples_resumes_to_the_same_report(tmp_path: Path, bad_folder) -> None:
    args, reference = bad_folder
    folder = tmp_path / ".lipcert-checkpoint"
    done = _kill_after(2, folder, *args, "--batch-size", "32", "--workers", "2", "--out", str(tmp_path))
    assert 2 <= done < 17, "the run should have been interrupted part-way"
    resumed = run_cli("report", *args, "--batch-size", "32", "--out", str(tmp_path), "--resume",
                      env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _same_report(tmp_path, reference)
