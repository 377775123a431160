"""`lipcert verify` at the sizes people certify: time, peak memory and verdict on three orthogonium-built models.

* cifar-sll: 3x32x32 input, AdaptiveOrthoConv2d lift to 32 channels, four SDP-based Lipschitz residual blocks
  (SLL), a strided AOC convolution, MaxMin, a dense head.
* liresnet: 3x32x32 input, lift to 128 channels, eight LiResNet-style blocks (x + conv(x), circular padding,
  each normalised by the exact norm of I + W), MaxMin between blocks, average pooling, a dense head.
* imagenet-aoc: 3x224x224 input, stride-2 AOC stages up to 512 channels, MaxMin, global average pooling, a
  dense 1000-way head.

Random initialisation (the parametrizations make every layer 1-Lipschitz). Each model is exported to ONNX and
verified in a fresh process (so peak memory is that of one run):

    python bench/scale_bench.py [--models cifar-sll,liresnet,imagenet-aoc] [--device cpu] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_markdown, export, machine

from lipcert.bounds.spectral import conv_circular_norm


def cifar_sll() -> tuple[torch.nn.Module, tuple[int, ...]]:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
    from orthogonium.layers.conv.SLL.sll_layer import SDPBasedLipschitzResBlock

    torch.manual_seed(0)
    layers = [AdaptiveOrthoConv2d(3, 32, 3, padding="same")]
    layers += [SDPBasedLipschitzResBlock(32, 2, 3) for _ in range(4)]
    layers += [AdaptiveOrthoConv2d(32, 64, 2, stride=2, padding=0), MaxMin(), torch.nn.Flatten(),
               OrthoLinear(64 * 16 * 16, 10)]
    return torch.nn.Sequential(*layers), (3, 32, 32)


class LiResBlock(torch.nn.Module):
    """(x + conv(x)) / ||I + W||, circular padding: the norm is exact by the DFT of the kernel plus identity."""

    def __init__(self, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, padding_mode="circular")
        torch.nn.init.normal_(self.conv.weight, std=0.5 / (3 * channels ** 0.5))
        kernel = self.conv.weight.detach().double().clone()
        kernel[:, :, 1, 1] += torch.eye(channels, dtype=torch.float64)
        self.scale = conv_circular_norm(kernel, grid) * (1 + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.conv(x)) / self.scale


def liresnet() -> tuple[torch.nn.Module, tuple[int, ...]]:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(1)
    layers: list[torch.nn.Module] = [AdaptiveOrthoConv2d(3, 128, 3, padding="same"), MaxMin()]
    for _ in range(8):
        layers += [LiResBlock(128, (32, 32)), MaxMin()]
    layers += [torch.nn.AvgPool2d(4), torch.nn.Flatten(), OrthoLinear(128 * 8 * 8, 10)]
    return torch.nn.Sequential(*layers), (3, 32, 32)


def imagenet_aoc() -> tuple[torch.nn.Module, tuple[int, ...]]:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(2)
    widths = [3, 64, 128, 256, 512, 512]
    layers: list[torch.nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [AdaptiveOrthoConv2d(c_in, c_out, 2, stride=2, padding=0), MaxMin()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), OrthoLinear(512, 1000)]
    return torch.nn.Sequential(*layers), (3, 224, 224)


MODELS = {"cifar-sll": cifar_sll, "liresnet": liresnet, "imagenet-aoc": imagenet_aoc}


def run_one(path: str, device: str) -> None:
    """In a child process: load and verify, then print the figures as JSON."""
    from lipcert.bounds.verify import verify
    from lipcert.model.loader import load_model

    start = time.perf_counter()
    graph = load_model(path)
    loaded = time.perf_counter()
    result = verify(graph, device=device)
    done = time.perf_counter()
    print(json.dumps({"status": result.status, "upper": result.network_upper, "lower": result.network_lower,
                      "load_s": loaded - start, "verify_s": done - loaded, "empirical": result.network_lower_method,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "layers": len(result.layers), "no_rule": result.no_rule}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(*args.child)
        return
    from tests.conftest import strip_parametrizations  # noqa: E402 - the repository's own helper

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, shape = MODELS[name]()
            path = export(strip_parametrizations(model.eval()), Path(tmp) / f"{name}.onnx", shape)
            out = subprocess.run([sys.executable, __file__, "--child", str(path), args.device], capture_output=True,
                                 text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, figures, file=sys.stderr, flush=True)
            rows.append((name, figures))
    lines = [f"### lipcert verify at scale ({args.device})", "", f"Machine: {machine(args.device)}", "",
             "| model | verdict | upper | lower (empirical) | load (s) | verify (s) | peak memory (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, f in rows:
        lines.append(f"| {name} | {f['status']} | {f['upper']:.6f} | {f['lower']:.4f} | {f['load_s']:.1f} | "
                     f"{f['verify_s']:.1f} | {f['peak_mib']:.0f} |")
    append_markdown("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
