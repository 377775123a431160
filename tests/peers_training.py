"""Peer-library models trained on scikit-learn's digits, as their users train them: the data, a short training
loop with a margin loss, exact Jacobian norms of the torch model, and the library's own certificate (margin /
sqrt(2), the model taken as 1-Lipschitz) to compare lipcert's report with."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

TRAIN, TEST = 1000, 200  # digits: 1797 samples; the first TRAIN of a fixed permutation train, the next TEST test


@dataclass(frozen=True)
class Digits:
    """Train and test splits of the digits in [0, 1], NCHW (upsampled by ``size``, repeated over ``channels``)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@cache
def digits(size: int = 8, channels: int = 1) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy((data.data / 16).astype(np.float32)).reshape(-1, 1, 8, 8)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).repeat(1, channels, 1, 1).numpy()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:TRAIN], order[TRAIN:TRAIN + TEST]
    return Digits(x[train], data.target[train], x[test], data.target[test])


def margin_loss(offset: float = 0.5, temperature: float = 0.1):
    """orthogonium's ``LossXent``: cross-entropy of the logits with the true one lowered by ``offset`` (the margin
    that a 1-Lipschitz network turns into a radius), at a ``temperature``."""
    from orthogonium.losses import LossXent

    return LossXent(10, offset=offset, temperature=temperature)


def train(model: torch.nn.Module, data: Digits, epochs: int = 3, lr: float = 1e-2, batch: int = 100,
          loss=None, seed: int = 0) -> torch.nn.Module:
    """A few epochs of Adam on the digits with a margin loss; returns the model in eval mode, gradients off.
    Denormals are flushed while it trains (Björck iterations on trained weights otherwise crawl), then not."""
    loss = loss or margin_loss()
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    torch.set_flush_denormal(True)
    try:
        for _ in range(epochs):
            for part in torch.randperm(len(xs), generator=gen).split(batch):
                opt.zero_grad()
                loss(model(xs[part]), ys[part]).backward()
                opt.step()
    finally:
        torch.set_flush_denormal(False)
    model.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


def jacobian_max(model: torch.nn.Module, shape: tuple[int, ...], points: int = 16, seed: int = 8) -> float:
    """The largest ||J(x)||_2 of the torch model (float64) at random points of [0, 1]: a lower bound on its
    Lipschitz constant. One backward pass per logit over the batch of points gives every Jacobian's rows."""
    wide = copy.deepcopy(model).double()
    x = torch.rand((points,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x.requires_grad_(True)
    with torch.enable_grad():
        z = wide(x).reshape(points, -1)
        rows = [torch.autograd.grad(z[:, k].sum(), x, retain_graph=True)[0].reshape(points, -1)
                for k in range(z.shape[1])]
    jac = torch.stack(rows, dim=1)  # points x logits x inputs
    return float(torch.linalg.matrix_norm(jac, ord=2).max())


def library_radii(logits: np.ndarray) -> np.ndarray:
    """The library's own certificate of each sample: (top logit - runner-up) / sqrt(2), the model 1-Lipschitz."""
    top2 = np.sort(logits.astype(np.float64), axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / math.sqrt(2)


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@dataclass(frozen=True)
class Comparison:
    """lipcert's report beside the library's own certificate on the same labelled points, at radii ``eps``."""

    eps: list[float]
    library: list[int]  # points correct with margin / sqrt(2) > eps (torch's logits)
    lipcert: list[int]  # lipcert's float32-safe certified points
    exact: list[int]  # lipcert's certified points in exact arithmetic (what papers print)
    border: list[int]  # library points within lipcert's float allowance (and its bound's excess over 1) of eps
    short: int  # correct points whose lipcert radius is below the library's by more than that allowance
    bound: float
    total: int


def compare_with_library(graph, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                         eps: list[float]) -> Comparison:
    """Certify ``(x, y)`` with lipcert (no attack) and count what the library's certificate margin / sqrt(2)
    certifies from the torch model's logits. lipcert's radius is margin / (sqrt(2) L) less a float allowance,
    so a library point within that allowance of a radius (or within L - 1 of it) is on the border."""
    import lipcert

    logits = torch_logits(model, x)
    theirs = library_radii(logits)
    correct = logits.argmax(1) == y
    report = lipcert.certify(graph, (x, y), eps=[f"{e:.9g}" for e in eps], attack=False)
    ours = report.samples.radii.double().numpy()
    same = correct & (report.samples.predictions.numpy() == logits.argmax(1))
    excess = max(report.bound.value, 1.0)
    allowance = 4 * (report.bound.error_base + report.bound.error_slope * (
        np.linalg.norm(x.reshape(len(x), -1), axis=1).max() + max(eps)))
    return Comparison(
        eps=list(eps), library=[int((correct & (theirs > e)).sum()) for e in eps],
        lipcert=[r.certified for r in report.eps], exact=[int(r.exact_certified or 0) for r in report.eps],
        border=[int((correct & (theirs > e) & (theirs <= excess * (e + allowance))).sum()) for e in eps],
        short=int((same & (ours < theirs / excess - allowance)).sum()), bound=report.bound.value, total=len(x))
