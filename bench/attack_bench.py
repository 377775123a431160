"""Speed of lipcert's PGD schedule against torchattacks' PGDL2 at equal strength, measured in the same run.

Both attacks use the same steps and step size (alpha = 2.5 eps / steps), one restart, on the same correctly
classified points, at every requested eps. torchattacks attacks every point at every eps; lipcert attacks
only the points still unbroken, in increasing eps. Needs the ``bench`` extra (torchattacks).

    python bench/attack_bench.py --model sample_models/digits_conv.onnx --data sample_models/digits_test.npz
    python bench/attack_bench.py --torch-model cifar-sll --n 256   # the original torch module of a scale model

With ``--torch-model`` both attacks run on the original torch module (built as in ``scale_bench.py``, random
initialisation) on ``--n`` random images labelled by the module's own predictions, not on lipcert's executor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import append_markdown, machine

from lipcert.certification.attack import AttackConfig, attack_batch, batch_generator, summarize_attack
from lipcert.device import resolve_device
from lipcert.graph.executor import GraphModule
from lipcert.model.loader import load_model
from lipcert.parse import parse_eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sample_models/digits_conv.onnx")
    parser.add_argument("--data", default="sample_models/digits_test.npz")
    parser.add_argument("--eps", default="36/255,72/255,108/255,1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--our-steps", type=int, help="lipcert's steps (default: --steps); fewer steps of the "
                        "margin loss can match torchattacks' strength")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--torch-model", help="a scale_bench model (cifar-sll, liresnet, imagenet-aoc), attacked as "
                        "its original torch module")
    parser.add_argument("--n", type=int, default=256, help="random images for --torch-model")
    parser.add_argument("--markdown", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    import torchattacks

    device = resolve_device(args.device)
    if args.torch_model:
        from scale_bench import MODELS

        from tests.conftest import strip_parametrizations

        built, shape = MODELS[args.torch_model]()
        module = strip_parametrizations(built.eval()).to(device)
        name = f"{args.torch_model} (original torch module)"
        x = torch.rand((args.n,) + shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            y = module(x).argmax(1)
    else:
        module = GraphModule(load_model(args.model)).to(device).eval()
        name = Path(args.model).name
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
    cfg = AttackConfig(steps=args.our_steps or args.steps, restarts=1)
    part = attack_batch(lambda v: module(v), x, y, y, torch.zeros(len(y)), 0, eps, cfg, batch_generator(cfg.seed, 0))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - start
    summary = summarize_attack(cfg, eps, part.attack_radius, part.broken_at, part.violations, t_ours)
    ours = [row.broken for row in summary.per_eps]

    lines = [f"### PGD-L2: lipcert ({args.our_steps or args.steps} steps) vs torchattacks ({args.steps} steps), "
             f"{name}, {len(y)} points",
             "", f"Machine: {machine(device)}", "",
             "| eps | broken by torchattacks PGDL2 | broken by lipcert |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {t} | {o} |" for (label, _), t, o in zip(eps, theirs, ours)]
    lines += ["", "| attack | seconds | speed-up |", "| --- | ---: | ---: |",
              f"| torchattacks PGDL2, every point at every eps | {t_theirs:.2f} | 1.00x |",
              f"| lipcert, unbroken points in increasing eps | {t_ours:.2f} | {t_theirs / t_ours:.2f}x |", ""]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
