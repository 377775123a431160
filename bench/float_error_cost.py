"""What the float error allowance costs: certified accuracy with it (float32-safe radii) and in exact arithmetic
(the exact radii: the same certificate with a zero allowance), on a model and a dataset. Prints the allowance and
the largest accuracy difference over a grid of radii, with the margin at the sample taken from the deployed
logits only (before) and also from a float64 run (after: only the ball needs the float32 allowance).

    python bench/float_error_cost.py sample_models/digits_conv.onnx sample_models/digits_test.npz
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import lipcert
from lipcert.certification.engine import Engine, choose_backend
from lipcert.certification.radii import certificates_from_logits, pair_norms
from lipcert.certification.setup import certificate_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data", help=".npz with x and y")
    parser.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime"])
    parser.add_argument("--grid", type=int, default=400)
    args = parser.parse_args()
    graph = lipcert.load_model(args.model)
    data = np.load(args.data)
    x = torch.tensor(data["x"], dtype=torch.float32).reshape((-1,) + graph.input_shape)
    y = torch.tensor(data["y"])
    setup, info = certificate_setup(graph)
    engine = Engine(graph, setup, backend=args.backend)
    z, norms = choose_backend(graph, args.backend, "cpu", x, None, None, engine.measure)(x)
    x_norm = x.flatten(1).double().norm(dim=1)
    error = engine.error(x_norm, norms)
    pairs = pair_norms(setup.head_weight, setup.head_row_error) if setup.head_weight is not None else None
    centre = engine.exact_logits(x, x_norm)
    before = certificates_from_logits(z, x_norm, setup, pairs, error)
    after = certificates_from_logits(z, x_norm, setup, pairs, error, centre)
    exact = after.radius_exact
    correct = after.prediction == y
    grid = np.linspace(0.0, float(exact.max()), args.grid)

    def cost(radius: torch.Tensor) -> float:
        return max(float(((exact > r) & correct).double().mean() - ((radius > r) & correct).double().mean())
                   for r in grid)

    base = error.base if isinstance(error.base, torch.Tensor) else torch.tensor([error.base])
    e64 = "none" if centre is None else f"{float(centre[1].median()):.2g}"
    print(f"{args.model}: allowance at a sample median {float(base.median()):.2g} "
          f"({'measured' if norms is not None else 'zero-image'} centre), growth {error.slope:.2g} per unit radius; "
          f"zero-image form {info.error_base:.2g} + {info.error_slope:.2g} (||x|| + r); float64 centre error {e64}; "
          f"largest accuracy cost before {100 * cost(before.radius):.2f} points, after "
          f"{100 * cost(after.radius):.2f} points ({round(cost(after.radius) * len(y))} of {len(y)} samples); "
          f"radius lost to the allowance: median {float((exact - after.radius)[correct].median()):.2g}, "
          f"largest {float((exact - after.radius)[correct & torch.isfinite(exact)].max()):.2g}")


if __name__ == "__main__":
    main()
