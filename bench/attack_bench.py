"""Speed of lipcert's PGD schedule against torchattacks' PGDL2 at equal strength, measured in the same run.

Both attacks use the same steps and step size (alpha = 2.5 eps / steps), one restart, on the same correctly
classified points, at every requested eps. torchattacks attacks every point at every eps; lipcert attacks
only the points still unbroken, in increasing eps. Needs the ``bench`` extra (torchattacks).

    python bench/attack_bench.py --model sample_models/digits_conv.onnx --data sample_models/digits_test.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import append_markdown, machine

from lipcert.attack import AttackConfig, attack_batches
from lipcert.device import resolve_device
from lipcert.executor import GraphModule
from lipcert.loader import load_model
from lipcert.report import parse_eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sample_models/digits_conv.onnx")
    parser.add_argument("--data", default="sample_models/digits_test.npz")
    parser.add_argument("--eps", default="36/255,72/255,108/255,1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--our-steps", type=int, help="lipcert's steps (default: --steps); fewer steps of the "
                        "margin loss can match torchattacks' strength")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    import torchattacks

    device = resolve_device(args.device)
    graph = load_model(args.model)
    module = GraphModule(graph).to(device).eval()
    d = np.load(args.data)
    x, y = torch.from_numpy(d["x"]).to(device), torch.from_numpy(d["y"]).long().to(device)
    with torch.no_grad():
        pred = module(x).argmax(1)
    keep = pred == y
    x, y = x[keep], y[keep]
    eps = parse_eps(args.eps)

    start = time.perf_counter()
    theirs = []
    for _, value in eps:
        attack = torchattacks.PGDL2(module, eps=value, alpha=2.5 * value / args.steps, steps=args.steps,
                                    random_start=True)
        adv = attack(x, y)
        with torch.no_grad():
            theirs.append(int((module(adv).argmax(1) != y).sum()))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_theirs = time.perf_counter() - start

    start = time.perf_counter()
    summary = attack_batches(lambda v: module(v), iter([(x.cpu().numpy(), y.cpu().numpy())]), y.cpu(),
                             torch.zeros(len(y)), eps, AttackConfig(steps=args.our_steps or args.steps, restarts=1),
                             device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - start
    ours = [row["broken"] for row in summary.per_eps]

    lines = [f"### PGD-L2: lipcert ({args.our_steps or args.steps} steps) vs torchattacks ({args.steps} steps), "
             f"{Path(args.model).name}, {len(y)} points",
             "", f"Machine: {machine(device)}", "",
             "| eps | broken by torchattacks PGDL2 | broken by lipcert |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {t} | {o} |" for (label, _), t, o in zip(eps, theirs, ours)]
    lines += ["", "| attack | seconds | speed-up |", "| --- | ---: | ---: |",
              f"| torchattacks PGDL2, every point at every eps | {t_theirs:.2f} | 1.00x |",
              f"| lipcert, unbroken points in increasing eps | {t_ours:.2f} | {t_theirs / t_ours:.2f}x |", ""]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
