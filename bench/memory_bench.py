"""Peak memory of ``lipcert report`` on an image folder does not grow with the number of images.

For each N (default 1,000 and 20,000) the bench writes N random 32x32 RGB PNG images into 10 class folders,
then runs ``lipcert report`` (no attack) on them in a fresh process with a small CIFAR-shaped 1-Lipschitz
model (two strided orthogonium convolutions, MaxMin, a dense layer) exported to ONNX, so that reading the
images, not the model, is the work to measure (``--model cifar`` takes bench/common.py's larger network,
whose onnxruntime arena dominates the memory). While it runs, the whole process tree (lipcert and its image-decoding
workers) is sampled every 50 ms from /proc: the peak of the sum of the processes' PSS (proportional set size:
pages shared between lipcert and its forked workers are counted once) is the memory the run needs. The
lipcert process's own peak RSS (``ru_maxrss`` from ``wait4``) is shown beside it. Goal: the peaks of the
largest and smallest N within 10% of each other.

    python bench/memory_bench.py [--sizes 1000,20000] [--workers auto|0|N[,...]] [--batch-size 256]
                                 [--model small|cifar] [--markdown docs/BENCHMARKS.md]

Linux only (/proc). A run's images/s is N over its time after the network bound (opening and hashing the
folder, decoding, inference, certificates, the report); the bound, computed once per model, is shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import append_markdown, cifar_model, export, machine
from PIL import Image

EPS = "36/255,72/255"
POLL_SECONDS = 0.05


def small_model() -> torch.nn.Module:
    """Two stride-2 orthogonium convolutions (3 -> 16 -> 32 channels, 32 -> 8 pixels) with MaxMin and an
    OrthoLinear head to 10 classes; parametrizations baked into plain weights, as shipped."""
    import torch.nn.utils.parametrize as parametrize
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(AdaptiveOrthoConv2d(3, 16, 3, stride=2, padding=1, padding_mode="zeros"), MaxMin(),
                                AdaptiveOrthoConv2d(16, 32, 3, stride=2, padding=1, padding_mode="zeros"), MaxMin(),
                                torch.nn.Flatten(), OrthoLinear(32 * 8 * 8, 10)).eval()
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name)
    return model


def write_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` random 32x32 RGB PNG files, spread over 10 class folders."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % 10}" / f"{i:06d}.png", compress_level=1)


def _children() -> dict[int, list[int]]:
    """Every process's children, from the parent ids in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _memory_kib(pid: int, field: str) -> int:
    """One field (``Pss``, ``Rss``) of /proc/PID/smaps_rollup in KiB, 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """(sum of PSS, sum of RSS, number of processes) of ``root`` and all its descendants, in KiB."""
    tree, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += tree.get(pid, [])
    return (sum(_memory_kib(p, "Pss") for p in pids), sum(_memory_kib(p, "Rss") for p in pids), len(pids))


def run_report(model: Path, data: Path, out: Path, workers: str, batch_size: int) -> dict:
    """Run ``lipcert report`` in a fresh process while sampling its tree's memory; its measurements."""
    cmd = [sys.executable, "-m", "lipcert", "report", str(model), "--data", str(data), "--out", str(out),
           "--eps", EPS, "--no-attack", "--backend", "onnxruntime", "--batch-size", str(batch_size), "-q"]
    if workers != "auto":
        cmd += ["--workers", workers]
    peaks = {"pss": 0, "rss": 0, "processes": 0}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            pss, rss, count = tree_memory(proc.pid)
            peaks["pss"], peaks["rss"] = max(peaks["pss"], pss), max(peaks["rss"], rss)
            peaks["processes"] = max(peaks["processes"], count)
            time.sleep(POLL_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own ru_maxrss (Popen.wait would not return it)
    wall = time.perf_counter() - start
    finished.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"lipcert report failed ({proc.returncode}): {log.read_text()}")
    report = json.loads((out / "report.json").read_text())
    timings = report["timings"]
    return {"wall": wall, "bound": timings["bound_seconds"],
            "data": timings["total_seconds"] - timings["bound_seconds"], "maxrss": usage.ru_maxrss / 1024,
            "pss": peaks["pss"] / 1024, "rss": peaks["rss"] / 1024, "processes": peaks["processes"]}


def main() -> None:
    """Generate the image folders, run the reports, print (and append) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000", help="numbers of images, comma-separated")
    parser.add_argument("--workers", default="auto", help="--workers values to run, comma-separated (auto: "
                                                          "lipcert's default)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", choices=("small", "cifar"), default="small")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="lipcert-memory-") as tmp:
        root = Path(tmp)
        model = export(small_model() if args.model == "small" else cifar_model(), root / "model.onnx")
        rows = []
        for n in sizes:
            data = root / f"images-{n}"
            write_images(data, n)
            for workers in args.workers.split(","):
                result = run_report(model, data, root / f"out-{n}-{workers}", workers, args.batch_size)
                rows.append((n, workers, result))
                print(f"N={n} workers={workers}: {result}", file=sys.stderr)
    what = "small CIFAR-shaped" if args.model == "small" else "CIFAR-shaped (bench/common.py)"
    lines = [f"Peak memory of `lipcert report` on an image folder of N random 32x32 RGB PNGs (10 classes), {what} "
             f"1-Lipschitz model (ONNX, onnxruntime), batch size {args.batch_size}, no attack:", "",
             "| N | --workers | processes | wall (s) | bound (s) | images/s | peak RSS, lipcert process (MiB) | "
             "peak PSS, process tree (MiB) | PSS ratio to the smallest N |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = {w: r["pss"] for n, w, r in rows if n == sizes[0]}
    for n, workers, r in rows:
        lines.append(f"| {n:,} | {workers} | {r['processes']} | {r['wall']:.1f} | {r['bound']:.1f} | "
                     f"{n / r['data']:.0f} | {r['maxrss']:.0f} | {r['pss']:.0f} | {r['pss'] / base[workers]:.3f} |")
    lines += ["", f"Machine: {machine('cpu')}.", ""]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
