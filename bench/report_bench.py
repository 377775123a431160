"""Throughput of lipcert's certification pass against plain inference of the same model, in the same run.

The model is one of bench/common.py's 1-Lipschitz networks, exported to ONNX: ``--shape cifar`` (default;
5 convolutions at 32x32, 3 -> 128 channels, two dense layers) or ``--shape imagenet`` (5 stride-2 convolutions
from 224x224, 1000 classes). The data are N generated images of that shape (uint8, NHWC, as CIFAR is stored)
in an ``.npz``. For each backend (torch, onnxruntime), with the same batch size:

* plain inference: the arrays already in memory, converted to float32 NCHW in [0, 1] batch by batch and run
  through the original torch module (``torch.inference_mode``) or an onnxruntime session of the ONNX file;
* lipcert: ``lipcert.certify`` on the ``.npz`` file (reading, validation, inference on lipcert's graph,
  margins, float error bound and radii for every sample, the report), without the attack. The network bound
  is computed once per model, not per image: its time is shown on its own and left out of the throughput.

Each figure is the best of ``--repeat`` runs, alternating plain and lipcert. Goal: lipcert >= 0.9 x plain.

    python bench/report_bench.py [--shape cifar|imagenet] [--n 10000] [--batch-size 256] [--device auto]
                                 [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import append_markdown, cifar_model, export, imagenet_model, machine

from lipcert.certification.run import certify
from lipcert.device import resolve_device
from lipcert.model.loader import load_model

EPS = "36/255,72/255,108/255,1"
SHAPES = {"cifar": (cifar_model, 32, 10), "imagenet": (imagenet_model, 224, 1000)}


def plain_torch(model: torch.nn.Module, x: np.ndarray, batch_size: int, device: str) -> float:
    """Seconds to run ``model`` over ``x`` (uint8 NHWC) in batches, as a user's own evaluation loop would."""
    model = model.to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)
            model(batch).argmax(1).cpu()
    return time.perf_counter() - start


def plain_ort(session: onnxruntime.InferenceSession, x: np.ndarray, batch_size: int) -> float:
    """Seconds to run an onnxruntime session over ``x`` (uint8 NHWC) in batches."""
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[i:i + batch_size].transpose(0, 3, 1, 2), dtype=np.float32) / 255
        session.run(None, {name: batch})[0].argmax(1)
    return time.perf_counter() - start


def lipcert_pass(graph, data: Path, batch_size: int, device: str, backend: str) -> tuple[float, float, float, str]:
    """(seconds without the bound, bound seconds, cross-check seconds, backend used) of one ``lipcert.certify``
    run; the cross-check with onnxruntime (the first samples and their balls, once per run) is in the first
    figure."""
    start = time.perf_counter()
    report = certify(graph, data, eps=EPS, device=device, batch_size=batch_size, backend=backend,
                     attack=False)
    total = time.perf_counter() - start
    timings = report.timings
    return total - timings.bound_seconds, timings.bound_seconds, timings.crosscheck_seconds, report.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cifar", help="model and image size")
    parser.add_argument("--n", type=int, default=10_000, help="number of images (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts")
    parser.add_argument("--markdown", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    build, size, classes = SHAPES[args.shape]
    model = build()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, size=args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(model, Path(tmp) / f"{args.shape}_ortho.onnx", (3, size, size))
        data, warm = Path(tmp) / f"{args.shape}_like.npz", Path(tmp) / "warm-up.npz"
        np.savez(data, x=x, y=y)
        np.savez(warm, x=x[:2 * args.batch_size], y=y[:2 * args.batch_size])
        graph = load_model(onnx_path)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        session = onnxruntime.InferenceSession(str(onnx_path), providers=providers)
        for backend in ("torch", "onnxruntime"):
            plain = (lambda part: plain_torch(model, part, args.batch_size, device)) if backend == "torch" else (
                lambda part: plain_ort(session, part, args.batch_size))
            plain(x[:2 * args.batch_size])  # warm-up: allocations, kernel choice
            lipcert_pass(graph, warm, args.batch_size, device, backend)
            t_plain = t_ours = t_check = float("inf")
            for _ in range(args.repeat):
                t_plain = min(t_plain, plain(x))
                seconds, bound_seconds, check_seconds, used = lipcert_pass(graph, data, args.batch_size, device,
                                                                           backend)
                t_ours, t_check = min(t_ours, seconds), min(t_check, check_seconds)
            rows.append((backend, used, args.n / t_plain, args.n / t_ours, bound_seconds, t_check))
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "lipcert", "report", str(onnx_path), "--data", str(data),
                              "--eps", EPS, "--no-attack", "--quiet", "--device", device, "--batch-size",
                              str(args.batch_size), "--out", str(Path(tmp) / "out")], capture_output=True, text=True)
        t_cli = time.perf_counter() - start
    if cli.returncode not in (0, 1):
        sys.exit(f"lipcert report failed: {cli.stderr.strip()}")
    lines = [f"### lipcert report throughput vs plain inference, {args.shape}-shaped model ({size}x{size}), "
             f"{args.n} images, batch "
             f"{args.batch_size}, device {device}", "", f"Machine: {machine(device)}", "",
             "| backend | plain inference (images/s) | lipcert certify pass (images/s) | ratio | cross-check (s, once "
             "per run, in the pass) | ratio without it | bound (s, once per model) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {backend}{'' if used == backend else f' (ran {used})'} | {p:.1f} | {o:.1f} | {o / p:.3f} | "
              f"{c:.2f} | {args.n / (args.n / o - c) / p:.3f} | {b:.1f} |" for backend, used, p, o, b, c in rows]
    lines += ["", f"`lipcert report --no-attack` end to end from the command line (start-up, load and onnxruntime "
              f"cross-check, bound, certification, all output files): {t_cli:.1f} s for {args.n} images.", ""]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
