"""Certified accuracy of local certificates (``lipcert.certification.local``) against the global rules.

For each model and radius, three figures: the peers' rule margin / (sqrt(2) L) with the model's claimed L (1
when it claims none) and exact arithmetic; lipcert's global radius (sound for float32: per-pair head and float
error allowance); and lipcert's local radius by each method (``linear``: exact local linearity of the last
blocks; ``lipschitz``: the margin's Lipschitz bound over the ball, by bisection or tested at the radii asked;
``crown``: CROWN over the L2 ball on the last block), which is never below the global one. Times: the
global setup (bound and error plan) and the certification pass; the local certifier's setup and its pass.

    python bench/local_bench.py [--model sample_models/digits_dense.onnx --data sample_models/digits_test.npz]
                                [--eps 0.25,0.5,1.0] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import append_markdown, machine, timed

from lipcert.certification.engine import Runner
from lipcert.certification.local import LocalCertifier
from lipcert.certification.radii import SQRT2, certificates_from_logits, pair_norms, sample_norms
from lipcert.certification.setup import certificate_setup
from lipcert.model.loader import load_model
from lipcert.parse import parse_eps


def run(model: Path, data: Path, eps: list[float], labels: list[str], repeat: int) -> list[str]:
    """The table rows of one model; each local time is the best of ``repeat`` runs."""
    graph = load_model(model)
    arrays = np.load(data)
    x, y = torch.from_numpy(arrays["x"]).float(), torch.from_numpy(arrays["y"]).long()
    start = time.perf_counter()
    setup, _ = certificate_setup(graph)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    runner = Runner(graph, "torch", "cpu", None, None, setup.error_plan.needed)
    logits, norms = runner(x)
    logits = logits.reshape(x.shape[0], -1)
    x_norm = sample_norms(x.double())
    error = setup.error_plan.evaluate(norms)
    pairs = pair_norms(setup.head_weight, setup.head_row_error) if setup.head_weight is not None else None
    cert = certificates_from_logits(logits, x_norm, setup, pairs, error)
    global_s = time.perf_counter() - start
    claimed = graph.claimed_lipschitz() or 1.0
    peer = cert.margin / (SQRT2 * claimed)
    correct = cert.prediction == y
    rows = []
    figures = {"peer rule margin/(sqrt(2) L)": (peer, 0.0, 0.0), "lipcert global": (cert.radius, setup_s, global_s)}
    for method, at in (("linear", None), ("lipschitz", None), ("lipschitz", eps), ("crown", None)):
        local, build_s = timed(lambda method=method, at=at: LocalCertifier(graph, setup, method=method, at=at),
                               repeat)
        found, pass_s = timed(lambda local=local: local.radii(x, cert.prediction, cert.radius,
                                                              torch.as_tensor(error.base), error.slope), repeat)
        name = f"lipcert local ({method}{', at the radii asked' if at else ''})"
        figures[name] = (found.radius, build_s, pass_s)
        assert bool((found.radius >= cert.radius).all()), "a local radius below the global one"
        if found.reason:
            print(f"{model.name} {method}: {found.reason}")
    for name, (radius, build, certify) in figures.items():
        accs = [f"{100 * float((correct & (radius > e)).double().mean()):.1f}" for e in eps]
        times = "-" if name.startswith("peer") else f"{build:.2f} + {certify:.2f}"
        rows.append(f"| {model.name} | {name} | " + " | ".join(accs) + f" | {times} |")
    header = "| model | radius | " + " | ".join(labels) + " | time, s (setup + pass) |"
    return [header, "|" + " --- |" * (len(labels) + 3)] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path)
    parser.add_argument("--data", type=Path, default=Path("sample_models/digits_test.npz"))
    parser.add_argument("--eps", default="0.25,0.5,1.0")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs for each local method")
    args = parser.parse_args()
    models = args.model or [Path("sample_models/digits_dense.onnx"), Path("sample_models/digits_conv.onnx")]
    parsed = parse_eps(args.eps)
    labels, eps = [label for label, _ in parsed], [value for _, value in parsed]
    torch.manual_seed(0)
    lines = []
    for model in models:
        lines += run(model, args.data, eps, labels, args.repeat) + [""]
    lines.append(f"Certified accuracy (%) at each L2 radius, {len(np.load(args.data)['y'])} samples of "
                 f"{args.data.name}. Machine: {machine('cpu')}; 2 cores shared with other jobs, so times are "
                 f"indicative only; local times are the best of {args.repeat} runs.")
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
