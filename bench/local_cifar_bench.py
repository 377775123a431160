"""Local certificates on a CIFAR-shaped model trained here: the peers' rule, lipcert exact, float32-safe and local.

The model takes 3x32x32 images: three stride-2 orthogonium convolutions (3 -> 16 -> 32 -> 64 channels, 32 -> 4)
with MaxMin, then three dense layers normalised by their exact spectral norm (1024 -> 256 -> 128 -> 10, MaxMin
between), trained for a few minutes on the CPU with a multiclass hinge loss. The data are scikit-learn's digits
(the only real images the bench may use without a download), upsampled to 32x32 and coloured per image, split
70/30 as the sample models are. Figures at 36/255, 72/255 and 108/255: certified accuracy by the peers' rule
margin / (sqrt(2) L) (L = 1, the construction's claim), by lipcert's exact and float32-safe global radii, and by
``report --local`` on the last one and two blocks; and the CPU and wall time of ``lipcert.certify`` without the
attack, with and without ``local``.

    python bench/local_cifar_bench.py [--epochs 30] [--repeat 2] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from common import append_markdown, export, machine

import lipcert
from lipcert.model.loader import load_model
from lipcert.report.model import Report
from lipcert.report.render import LOCAL

SEED = 0
HINGE_MARGIN = 0.5
EPS = "36/255,72/255,108/255"


class SpectralNormalizer(torch.nn.Module):
    """A dense weight divided by its exact spectral norm."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / torch.linalg.matrix_norm(weight, ord=2)


def cifar_shaped_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits in [0, 1], bilinearly upsampled to 32x32 and tinted by a random dim colour per image (contrast 0.1
    to 0.4, for margins of CIFAR's order), (N, 3, 32, 32)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images / 16.0).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    tint = 0.1 + 0.3 * torch.rand(len(x), 3, 1, 1, generator=torch.Generator().manual_seed(SEED))
    images = (x * tint).numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target.astype(np.int64), test_size=0.3,
                                              stratify=digits.target, random_state=SEED)
    return x_tr, y_tr, x_te, y_te


def model() -> torch.nn.Sequential:
    """Orthogonal stride-2 convolutions, then spectrally normalised dense layers (not orthogonal: room for local)."""
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin

    torch.manual_seed(SEED)
    layers: list[torch.nn.Module] = []
    for cin, cout in ((3, 16), (16, 32), (32, 64)):
        layers += [AdaptiveOrthoConv2d(cin, cout, 3, stride=2, padding=1, padding_mode="zeros"), MaxMin()]
    layers.append(torch.nn.Flatten())
    for i, (fan_in, fan_out) in enumerate(((1024, 256), (256, 128), (128, 10))):
        linear = torch.nn.Linear(fan_in, fan_out)
        parametrize.register_parametrization(linear, "weight", SpectralNormalizer())
        layers += [linear] + ([MaxMin()] if i < 2 else [])
    return torch.nn.Sequential(*layers)


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Adam with cosine decay, batches of 64, multiclass hinge loss; then every parametrisation baked in."""
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    per_epoch = math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            logits = net(x[idx])
            true = logits.gather(1, y[idx, None])
            loss = (torch.relu(HINGE_MARGIN - (true - logits)).sum(1) - HINGE_MARGIN).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    for module in net.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def best_of(run: Callable[[], Report | None], repeat: int) -> tuple[Report, float, float]:
    """The report of ``run()`` and its least CPU time and least wall time over ``repeat`` calls, in seconds."""
    cpu, wall, report = math.inf, math.inf, None
    for _ in range(repeat):
        started, clock = time.process_time(), time.perf_counter()
        report = run()
        cpu, wall = min(cpu, time.process_time() - started), min(wall, time.perf_counter() - clock)
    assert report is not None
    return report, cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many certify runs for each time")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    x_tr, y_tr, x_te, y_te = cifar_shaped_digits()
    net = model()
    train_start = time.perf_counter()
    train(net, torch.from_numpy(x_tr), torch.from_numpy(y_tr), args.epochs)
    train_s = time.perf_counter() - train_start
    with tempfile.TemporaryDirectory() as tmp:
        graph = load_model(export(net, Path(tmp) / "cifar_shaped.onnx"))
    data = (x_te, y_te)
    runs = {depth: best_of(lambda depth=depth: lipcert.certify(graph, data, eps=EPS, attack=False, local=depth > 0,
                                                                local_depth=max(depth, 1)), args.repeat)
            for depth in (0, 1, 2)}
    plain = runs[0][0]
    with torch.no_grad():
        logits = net(torch.from_numpy(x_te))
    top2 = logits.topk(2, dim=1).values
    peer = (top2[:, 0] - top2[:, 1]) / math.sqrt(2)  # L = 1
    correct = logits.argmax(1) == torch.from_numpy(y_te)
    rows = {
        "peer rule margin/(sqrt(2) L), L = 1": ([100 * float((correct & (peer > e.eps)).double().mean())
                                                 for e in plain.eps], None),
        "lipcert global, exact arithmetic": ([100 * e.exact_certified_accuracy for e in plain.eps], None),
        "lipcert global, float32-safe (`--no-attack`)": ([100 * e.certified_accuracy for e in plain.eps], 0),
    }
    for depth in (1, 2):
        rows[f"lipcert local (`--local --local-depth {depth}`)"] = (
            [100 * e.extra[LOCAL] for e in runs[depth][0].eps], depth)
    labels = [e.label for e in plain.eps]
    lines = ["| radius | " + " | ".join(labels) + " | CPU time, s | wall time, s | CPU time / global |",
             "|" + " --- |" * (len(labels) + 4)]
    for name, (accs, run) in rows.items():
        times = "- | - | -" if run is None else (f"{runs[run][1]:.1f} | {runs[run][2]:.1f} | "
                                                 f"{runs[run][1] / runs[0][1]:.2f}x")
        lines.append(f"| {name} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {times} |")
    lines += ["", f"Certified accuracy (%) on the {len(y_te)} test images at L2 radii; clean accuracy "
              f"{100 * plain.clean_accuracy:.1f}%; lipcert's bound {plain.bound.value:.6g} ({plain.bound.method}). "
              f"Trained for {args.epochs} epochs in {train_s:.0f} s. Times: one `lipcert.certify` run without the "
              f"attack (bound, inference, certificates), the best of {args.repeat}; CPU time is the process's "
              "(both torch threads), the figure least disturbed by other jobs on a shared machine.",
              f"Machine: {machine('cpu')}."]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
