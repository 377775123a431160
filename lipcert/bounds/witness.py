"""Evidence for ``violated``: a pair of float32 inputs whose outputs, computed by onnxruntime, are further apart
than the claim allows, saved so that a user can check it in their own runtime.

The empirical search measures its ratios on lipcert's executor in float64; the witness is that pair rounded to
the model's float32 inputs and measured again on the deployed model in onnxruntime. The pair is also tried at
larger separations along the same direction (a secant of 1e-4 is within float32 noise of the outputs), and the
largest ratio onnxruntime gives is kept. A witness is confirmed only when that ratio exceeds the claim.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipcert.atomic import write_bytes_atomic
from lipcert.graph.core import Graph
from lipcert.model.crosscheck import ort_session, runtime_batches

#: input distances tried along the pair's direction, besides the pair's own
SEPARATIONS = (1e-3, 1e-2, 1e-1)


@dataclass
class Witness:
    """Two inputs and the deployed model's outputs at them: ``ratio`` = output distance / input distance (L2)."""

    x: np.ndarray
    x_prime: np.ndarray
    output: np.ndarray
    output_prime: np.ndarray
    ratio: float
    claim: float
    confirmed: bool  # ratio > claim (1 + tol), measured by onnxruntime on the float32 inputs

    def summary(self, file: str | None) -> dict:
        """What a result records of the witness (the arrays are in the file)."""
        return {"file": file, "ratio": self.ratio, "claim": self.claim, "confirmed": self.confirmed,
                "input_distance": _distance(self.x, self.x_prime),
                "output_distance": _distance(self.output, self.output_prime), "runtime": "onnxruntime"}

    def save(self, path: str | Path) -> None:
        """Write the witness as .npz (x, x_prime, output, output_prime, ratio, claim), atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, x=self.x, x_prime=self.x_prime, output=self.output, output_prime=self.output_prime,
                 ratio=np.float64(self.ratio), claim=np.float64(self.claim))
        write_bytes_atomic(path, buffer.getvalue())


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64).ravel() - b.astype(np.float64).ravel()))


def _candidates(a: torch.Tensor, b: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pair in float32, and the pairs at ``SEPARATIONS`` from ``b`` along the pair's direction."""
    base = b.detach().cpu().to(torch.float64)
    direction = a.detach().cpu().to(torch.float64) - base
    norm = float(direction.norm())
    pairs = [(a, b)] + ([(base + direction * (s / norm), base) for s in SEPARATIONS] if norm > 0 else [])
    return [(p.detach().cpu().to(torch.float32).numpy(), q.detach().cpu().to(torch.float32).numpy())
            for p, q in pairs]


def find_witness(graph: Graph, pair: tuple[torch.Tensor, torch.Tensor], claim: float, tol: float) -> Witness:
    """The pair (or a pair along its direction) with the largest ratio onnxruntime measures on the deployed
    model; confirmed when that ratio is above ``claim (1 + tol)``."""
    session = ort_session(graph.onnx_model)
    best: Witness | None = None
    for x, x_prime in _candidates(*pair):
        if _distance(x, x_prime) == 0.0:
            continue
        both = torch.from_numpy(np.concatenate([x, x_prime]))
        outputs = np.concatenate([np.asarray(session.run([graph.output], {graph.input_name: chunk.numpy()})[0])[:n]
                                  for chunk, n in runtime_batches(graph, both)])
        out, out_prime = outputs[:1], outputs[1:2]
        ratio = _distance(out, out_prime) / _distance(x, x_prime)
        if math.isfinite(ratio) and (best is None or ratio > best.ratio):
            best = Witness(x, x_prime, out, out_prime, ratio, claim, ratio > claim * (1.0 + tol))
    if best is None:
        x, x_prime = _candidates(*pair)[0]
        return Witness(x, x_prime, x[:0], x_prime[:0], 0.0, claim, False)
    return best
