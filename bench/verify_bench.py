"""Time lipcert.verify on a CIFAR-shaped 1-Lipschitz model against orthogonium's and deel-torchlip's own norm tools.

The model: five orthogonium AdaptiveOrthoConv2d convolutions at 32x32 (3 -> 32 -> 64 -> 64 -> 128 -> 128
channels, 3x3, alternating circular and zero padding), MaxMin activations, deel-torchlip's ScaledL2NormPool2d
(8x8, down to 4x4), and two OrthoLinear dense layers (2048 -> 256 -> 10). Parametrizations are baked into plain
weights and the model is exported to ONNX, as a user would ship it; lipcert verifies the ONNX file, and the
libraries' utilities are run on the same layers of the torch model.

What each library offers for the norm of one layer (as installed):

* orthogonium: ``orthogonium.layers.conv.singular_values.get_conv_sv`` (Gram iteration, Delattre et al. 2023
  for circular and 2024 for zero padding); no utility for dense layers (OrthoLinear is orthogonal by
  construction), so the dense rows use ``torch.linalg.matrix_norm(ord=2)`` for reference.
* deel-torchlip: ``deel.torchlip.normalizers.spectral_normalization`` (power iteration on the reshaped weight
  matrix, what SpectralConv2d / SpectralLinear normalise). For a convolution that is the kernel-matrix norm,
  NOT the operator norm of the convolution; it has no convolution operator-norm utility. At network level it has
  ``deel.torchlip.utils.evaluate_lip_const`` (an empirical, local estimate: a lower bound at best).

    python bench/verify_bench.py [--quick] [--device auto] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from common import append_markdown, cifar_model, export, machine, timed

from lipcert.bounds.verify import verify
from lipcert.device import resolve_device
from lipcert.model.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--quick", action="store_true", help="one repeat of each library call, fewer Gram steps")
    parser.add_argument("--markdown", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    from deel.torchlip.normalizers import spectral_normalization
    from deel.torchlip.utils import evaluate_lip_const
    from orthogonium.layers.conv.singular_values import get_conv_sv

    device = resolve_device(args.device)
    repeat = 1 if args.quick else 3
    gram_iters = 4 if args.quick else 6
    model = cifar_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, Path(tmp) / "cifar_ortho.onnx")
        graph, t_load = timed(lambda: load_model(path))
        verify(graph, device=device, empirical=False)  # warm-up (allocations, kernel choice)
        result, t_verify = timed(lambda: verify(graph, device=device))
        _, t_layers = timed(lambda: verify(graph, device=device, empirical=False))
    print(f"lipcert: load {t_load:.1f} s, verify {t_verify:.1f} s, layers only {t_layers:.1f} s", file=sys.stderr,
          flush=True)

    linear = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    steps = [row for row in result.layers if any(op in row.op for op in ("Conv", "Gemm", "MatMul"))]
    rows = []
    t_orth = t_deel = 0.0
    for i, (layer, step) in enumerate(zip(linear, steps)):
        w = layer.weight.detach().to(device)
        if isinstance(layer, torch.nn.Conv2d):
            kind = f"conv {layer.in_channels}->{layer.out_channels}, {layer.padding_mode}, 32x32"
            sv, t_o = timed(lambda layer=layer: float(get_conv_sv(layer.to(device), n_iter=gram_iters,
                                                                  return_stab_rank=False, imsize=32,
                                                                  device=device)))  # once: it takes minutes
            o_name = "get_conv_sv (Gram)"
        else:
            kind = f"dense {layer.in_features}->{layer.out_features}"
            sv, t_o = timed(lambda w=w: float(torch.linalg.matrix_norm(w.double(), ord=2)), repeat)
            o_name = "none (torch SVD shown)"
        mat = w.reshape(w.shape[0], -1)
        (_, _, sigma), t_d = timed(lambda mat=mat: spectral_normalization(mat, None), repeat)
        t_orth += t_o
        t_deel += t_d
        rows.append((i + 1, kind, step, o_name, sv, t_o, float(sigma), t_d))
        print(f"layer {i + 1}: {kind}: orthogonium {t_o:.1f} s, deel-torchlip {t_d:.3f} s", file=sys.stderr, flush=True)

    x = torch.rand(16, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emp, t_emp = timed(lambda: float(evaluate_lip_const(model, x, evaluation_type="jacobian_norm")))

    lines = [f"### lipcert verify vs orthogonium / deel-torchlip norm utilities, CIFAR-shaped model "
             f"({len(rows)} linear layers{', --quick' if args.quick else ''})", "",
             f"Machine: {machine(device)}", "",
             "Model: 5 orthogonium AdaptiveOrthoConv2d 3x3 convolutions at 32x32 (3->32->64->64->128->128, "
             "circular/zero padding alternating), MaxMin, ScaledL2NormPool2d(8), OrthoLinear 2048->256->10; "
             "parametrizations baked in, exported to ONNX.", "",
             "| # | layer | lipcert lower (power it.) | lipcert upper | lipcert upper method | orthogonium | "
             "orthogonium s | deel-torchlip spectral_normalization (weight matrix) | deel-torchlip s |",
             "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for i, kind, step, o_name, sv, t_o, sigma, t_d in rows:
        lower = f"{step.lower:.6f}" if step.lower is not None else "-"
        upper = f"{step.upper:.6f}" if step.upper is not None else "-"
        lines.append(f"| {i} | {kind} | {lower} | {upper} | {step.upper_method} | {sv:.6f} ({o_name}) | "
                     f"{t_o:.3f} | {sigma:.6f} | {t_d:.3f} |")
    lines += ["", "| method | scope | seconds |", "| --- | --- | ---: |",
              f"| lipcert `load_model` (ONNX parse + onnxruntime cross-check) | whole model | {t_load:.2f} |",
              f"| lipcert `verify(empirical=False)` (all layer lower+upper bounds, propagation) | whole model | "
              f"{t_layers:.2f} |",
              f"| lipcert `verify` (same + empirical network lower bound) | whole model | {t_verify:.2f} |",
              f"| orthogonium `get_conv_sv` (convs) + torch SVD (dense) | same layers, upper estimate only | "
              f"{t_orth:.2f} |",
              f"| deel-torchlip `spectral_normalization` | same layers, weight-matrix norm only | {t_deel:.2f} |",
              f"| deel-torchlip `evaluate_lip_const` (jacobian_norm, 16 points) | network, empirical | {t_emp:.2f} |",
              "",
              f"Network: lipcert upper bound {result.network_upper:.6f}, empirical lower bound "
              f"{result.network_lower:.6f} ({result.network_lower_method}), status **{result.status}**; "
              f"deel-torchlip evaluate_lip_const: {emp:.6f}.", "",
              "Library times are the best of " + str(repeat) + " call(s) per layer, summed (orthogonium's "
              "convolution calls: one each); lipcert's are one call after a warm-up. deel-torchlip's number "
              "for a convolution is the norm of the reshaped kernel matrix, which is not the operator norm of the "
              "convolution (it can be off by more than 2x either way); orthogonium's Gram-iteration value is an upper "
              "estimate of the operator norm.", ""]
    append_markdown("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
