"""Local certificates (lipcert.certification.local): never below the global radius, never broken by PGD on the
exact function, equal to the global radius where stability fails, and a reason (never an exception) for tails
they do not cover."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lipcert.certification.local import LocalCertifier, local_radii
from lipcert.certification.radii import certificates_from_logits, pair_norms, sample_norms
from lipcert.certification.setup import certificate_setup
from lipcert.graph.executor import GraphModule
from lipcert.model.loader import load_model
from tests.conftest import SAMPLES, export_onnx


class MaxMin(nn.Module):
    """Sort consecutive pairs of features (ReduceMin/ReduceMax/Concat once exported), as deel-torchlip does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.view(x.shape[0], x.shape[1] // 2, 2)
        return torch.cat([pairs.min(2, keepdim=True)[0], pairs.max(2, keepdim=True)[0]], dim=2).view(x.shape)


def _normalised(layer: nn.Linear) -> nn.Linear:
    """The layer divided by its spectral norm (plus a margin): 1-Lipschitz."""
    with torch.no_grad():
        layer.weight /= torch.linalg.matrix_norm(layer.weight.double(), 2).float() * 1.001
    return layer


def _expanding(n_in: int, width: int, classes: int, activation: nn.Module, seed: int,
               stable: bool = False) -> nn.Module:
    """Linear(n_in -> width) with orthonormal columns, an activation, a 1-Lipschitz head: the margin's gradient
    is the head's row difference projected on an n_in-dimensional subspace, far shorter than the global bound.
    ``stable``: biases of +-3, so that a ReLU keeps its pattern on balls of radius about 1."""
    torch.manual_seed(seed)
    first = nn.Linear(n_in, width)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(width, n_in))
        first.weight.copy_(q)
        first.bias.uniform_(-2.0, 2.0)
        if stable:
            first.bias.copy_(3.0 * torch.sign(first.bias))
    return nn.Sequential(first, activation, _normalised(nn.Linear(width, classes))).eval()


def _setup(tmp_path: Path, model: nn.Module, n_in: int, name: str):
    graph = load_model(export_onnx(model, tmp_path / f"{name}.onnx", (n_in,), dynamo=False))
    setup, _ = certificate_setup(graph)
    return graph, setup


def _global(graph, setup, x: torch.Tensor, scale: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The deployed logits and the global certificates, with the per-sample error allowance, as the report
    engine computes them (``scale``: its normalisation (x - mean) / std before the model)."""
    module = GraphModule(graph).eval()
    with torch.no_grad():
        model_input = x if scale is None else (x - scale[0]) / scale[1]
        logits, norms = module.forward_norms(model_input, set(setup.error_plan.needed))
    error = setup.error_plan.evaluate(norms)
    pairs = pair_norms(setup.head_weight, setup.head_row_error) if setup.head_weight is not None else None
    cert = certificates_from_logits(logits, sample_norms(x.double()), setup, pairs, error)
    return logits, cert, error


def _pgd(graph, x: torch.Tensor, label: torch.Tensor, radius: torch.Tensor, steps: int = 50,
         restarts: int = 3, scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Whether PGD (L2, margin loss, random starts) finds a point strictly inside each radius where the exact
    (float64) function predicts another class; ``scale`` (mean, std): the model reads (x - mean) / std."""
    graph_module = GraphModule(graph).to(torch.float64).eval()

    def module(v: torch.Tensor) -> torch.Tensor:
        return graph_module(v if scale is None else (v - scale[0].double()) / scale[1].double())

    view = (-1,) + (1,) * (x.dim() - 1)
    x, r = x.double(), radius.double().reshape(view) * (1 - 1e-6)

    def norms(v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1).norm(dim=1).reshape(view).clamp_min(1e-30)

    broken = torch.zeros(len(x), dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(restarts):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        delta = d / norms(d) * r * torch.rand(len(x), generator=gen, dtype=torch.float64).reshape(view)
        for _ in range(steps):
            delta.requires_grad_(True)
            z = module(x + delta)
            other = z.scatter(1, label[:, None], -math.inf).amax(dim=1)
            loss = (other - z.gather(1, label[:, None])[:, 0]).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + 2.5 * r / steps * grad / norms(grad)
                delta = delta * torch.clamp(r / norms(delta), max=1.0)
        with torch.no_grad():
            broken |= module(x + delta).argmax(dim=1) != label
    return broken


def _local(tmp_path: Path, activation: nn.Module, n: int, method: str = "best", stable: bool = False):
    graph, setup = _setup(tmp_path, _expanding(4, 16, 3, activation, seed=1, stable=stable), 4, "expanding")
    x = torch.rand(n, 4, generator=torch.Generator().manual_seed(2))
    logits, cert, error = _global(graph, setup, x)
    certifier = LocalCertifier(graph, setup, method=method)
    found = certifier.radii(x, cert.prediction, cert.radius, torch.as_tensor(error.base), error.slope)
    assert found.reason == ""
    assert bool((found.radius >= cert.radius).all())
    return graph, x, cert, found


@pytest.mark.parametrize("method", ["linear", "lipschitz", "crown"])
def test_local_radius_at_least_global_and_larger_here(tmp_path: Path, method: str) -> None:
    """On the MaxMin network, or for ``linear`` (which needs every activation stable on the ball) on a ReLU
    network whose pattern is stable, the local radius is clearly larger than the global one somewhere."""
    activation = nn.ReLU() if method == "linear" else MaxMin()
    _, _, cert, found = _local(tmp_path, activation, 16, method, stable=method == "linear")
    assert bool((found.methods[method] > cert.radius * 1.2).any())


@pytest.mark.slow
@pytest.mark.parametrize(("activation", "stable"), [(MaxMin(), False), (nn.ReLU(), False), (nn.ReLU(), True),
                                                    (nn.PReLU(16, init=0.3), False)],
                         ids=["maxmin", "relu", "relu-stable", "prelu"])
def test_local_radius_sound_and_larger(tmp_path: Path, activation: nn.Module, stable: bool) -> None:
    graph, x, cert, found = _local(tmp_path, activation, 48, stable=stable)
    gained = found.radius > cert.radius * 1.2
    assert int(gained.sum()) >= 8, "the local radius is not clearly larger than the global one"
    assert not bool(_pgd(graph, x[gained], cert.prediction[gained], found.radius[gained]).any())
    # the attack is not toothless: at twice the local radius it breaks some of those points
    assert bool(_pgd(graph, x[gained], cert.prediction[gained], 3 * found.radius[gained]).any())


@pytest.mark.slow
def test_normalised_input(tmp_path: Path) -> None:
    """With a normalisation before the model, the local radius is in pixel space: sound there, above global."""
    graph = load_model(export_onnx(_expanding(4, 16, 3, MaxMin(), seed=1), tmp_path / "n.onnx", (4,), dynamo=False))
    mean, std = [0.4, 0.5, 0.5, 0.6], [0.5, 0.8, 0.7, 0.9]
    setup, _ = certificate_setup(graph, mean=mean, std=std)
    scale = (torch.tensor(mean), torch.tensor(std))
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(9))
    _, cert, error = _global(graph, setup, x, scale)
    found = LocalCertifier(graph, setup, mean=mean, std=std).radii(x, cert.prediction, cert.radius,
                                                                  torch.as_tensor(error.base), error.slope)
    assert found.reason == "" and bool((found.radius >= cert.radius).all())
    gained = found.radius > cert.radius * 1.2
    assert int(gained.sum()) >= 4
    assert not bool(_pgd(graph, x[gained], cert.prediction[gained], found.radius[gained], scale=scale).any())
    assert bool(_pgd(graph, x[gained], cert.prediction[gained], 3 * found.radius[gained], scale=scale).any())


def test_unstable_point_keeps_the_global_radius(tmp_path: Path) -> None:
    model = _expanding(4, 16, 3, MaxMin(), seed=3)
    graph, setup = _setup(tmp_path, model, 4, "tie")
    first = model[0]
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(4)).double()
    # move each point onto the hyperplane where the first pair of pre-activations ties: no ball is stable there
    a = (first.weight[0] - first.weight[1]).double()
    b = float((first.bias[0] - first.bias[1]).detach())
    x = (x - ((x @ a + b) / (a @ a))[:, None] * a).float()
    logits, cert, error = _global(graph, setup, x)
    certifier = LocalCertifier(graph, setup, method="linear")
    found = certifier.radii(x, cert.prediction, cert.radius, torch.as_tensor(error.base), error.slope)
    assert bool((found.methods["linear"] < 1e-3 * cert.radius.clamp_min(1e-12) + 1e-6).all())
    assert torch.equal(found.radius, cert.radius.double())


def test_unsupported_tails_give_the_global_radius_with_a_reason(tmp_path: Path) -> None:
    torch.manual_seed(5)
    cases = {
        "tanh": (nn.Sequential(_normalised(nn.Linear(4, 8)), nn.Tanh(), _normalised(nn.Linear(8, 3))),
                 "not a piecewise-linear activation"),
        "one_layer": (nn.Sequential(_normalised(nn.Linear(4, 3))), "no further block"),
        "binary": (nn.Sequential(_normalised(nn.Linear(4, 8)), nn.ReLU(), _normalised(nn.Linear(8, 1))),
                   "one logit"),
    }
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(6))
    for name, (model, reason) in cases.items():
        graph, setup = _setup(tmp_path, model.eval(), 4, name)
        logits, cert, _ = _global(graph, setup, x)
        found = local_radii(graph, setup, x, logits, cert.radius)
        assert reason in found.reason, (name, found.reason)
        assert torch.equal(found.radius, cert.radius.double()), name


def test_groups_above_two_are_refused_by_the_relu_form_only(tmp_path: Path) -> None:
    """GroupSort of 4: the exact local linearity covers it (all pairs of a group as switches); the relu form
    of ``lipschitz`` and ``crown`` does not, and says so."""

    class GroupSort4(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            groups = x.view(x.shape[0], x.shape[1] // 4, 4)
            return torch.cat([groups.min(2, keepdim=True)[0], groups.max(2, keepdim=True)[0]], dim=2).view(
                x.shape[0], -1)

    torch.manual_seed(7)
    model = nn.Sequential(_normalised(nn.Linear(4, 16)), GroupSort4(), _normalised(nn.Linear(8, 3))).eval()
    graph, setup = _setup(tmp_path, model, 4, "groupsort4")
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(8))
    logits, cert, _ = _global(graph, setup, x)
    found = local_radii(graph, setup, x, logits, cert.radius)
    assert "GroupSort groups above 2" in found.reason
    assert bool((found.radius >= cert.radius).all())


def test_requested_radii_only(tmp_path: Path) -> None:
    """With ``at``, the searched method tests just above each requested radius: every radius is the global one
    or just above a requested one, and it certifies at those radii what the bisection certifies."""
    graph, setup = _setup(tmp_path, _expanding(4, 16, 3, MaxMin(), seed=1), 4, "expanding")
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(2))
    _, cert, error = _global(graph, setup, x)
    asked = [0.3, 0.6, 0.9]
    found = {at is None: LocalCertifier(graph, setup, method="lipschitz", at=at).radii(
        x, cert.prediction, cert.radius, torch.as_tensor(error.base), error.slope) for at in (None, asked)}
    tested = found[False].radius
    on_asked = torch.stack([torch.isclose(tested, torch.tensor(v * (1 + 1e-9), dtype=torch.float64), rtol=1e-12)
                            for v in asked]).any(dim=0)
    assert bool((on_asked | (tested == cert.radius.double())).all())
    assert bool((tested >= cert.radius).all())
    for v in asked:
        assert int((tested > v).sum()) >= int((found[True].radius > v).sum())
    assert sum(int((tested > v).sum()) for v in asked) > sum(int((cert.radius > v).sum()) for v in asked)


def test_report_local_radius_beside_the_global_ones(tmp_path: Path) -> None:
    """``local=True``: a third radius per sample, never below the float32-safe one, its certified accuracy beside
    the others, the attack held to it, and a checkpoint that keeps it."""
    import numpy as np

    import lipcert
    from lipcert.certification.checkpoint import BatchResult

    report = lipcert.certify(lipcert.load_model(SAMPLES / "digits_dense.onnx"), SAMPLES / "digits_test.npz",
                             eps="0.25,0.5", local=True, attack=lipcert.AttackConfig(steps=10, restarts=1),
                             out=tmp_path / "run")
    local, radius = report.samples.columns["local_radius"], report.samples.radii
    assert bool((local >= radius).all()) and bool((local > radius).any())
    for e in report.eps:
        assert e.extra["certified (local)"] >= e.certified_accuracy
        assert e.extra["empirical robust"] >= e.extra["certified (local)"]
    assert report.eps[1].extra["certified (local)"] > report.eps[1].certified_accuracy
    assert report.attack is not None and report.attack.violation_count == 0
    header = (tmp_path / "run" / "samples.csv").read_text().splitlines()[0].split(",")
    assert "local_radius" in header
    plain = lipcert.certify(lipcert.load_model(SAMPLES / "digits_dense.onnx"), SAMPLES / "digits_test.npz",
                            eps="0.25,0.5", attack=False)
    assert "local_radius" not in plain.samples.columns and "certified (local)" not in plain.eps[0].extra
    stored = BatchResult(np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones(2), np.ones(2), "torch",
                         exact_radii=np.ones(2), local_radii=np.full(2, 2.0))
    assert np.array_equal(BatchResult.stored(stored.arrays(), stored.extra()).local_radii, np.full(2, 2.0))


def test_a_tail_wider_than_the_limit_keeps_the_global_radius(monkeypatch) -> None:
    import lipcert.certification.local as local_module

    graph = load_model(SAMPLES / "digits_dense.onnx")
    setup, _ = certificate_setup(graph)
    assert LocalCertifier(graph, setup).tails
    monkeypatch.setattr(local_module, "MAX_SWITCHES", 4)
    narrow = LocalCertifier(graph, setup)
    assert not narrow.tails and "more than the 4 local certificates analyse" in narrow.reason
    x = torch.rand((3,) + graph.input_shape)
    radius = torch.full((3,), 0.1, dtype=torch.float64)
    found = narrow.radii(x, torch.zeros(3, dtype=torch.long), radius, 0.0, 0.0)
    assert torch.equal(found.radius, radius) and found.reason == narrow.reason


class IndexedMaxMin(nn.Module):
    """MaxMin on interleaved halves selected by indexing: a Slice with a step or a Gather, whatever the exporter."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spelling == "step":
            a, b = x[:, 0::2], x[:, 1::2]
        elif self.spelling == "index":
            pairs = x.reshape(x.shape[0], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
        else:
            a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


@pytest.mark.parametrize(("spelling", "dynamo"), [("step", False), ("index", False), ("index", True),
                                                  ("chunk", True)])
def test_every_maxmin_spelling_gets_a_local_radius(tmp_path: Path, spelling: str, dynamo: bool) -> None:
    """The tail's switches come from the pattern that proved the activation (``Pattern.switches``), so a MaxMin
    written by indexing (orthogonium's) is analysed like deel-torchlip's: a tail, and larger radii somewhere."""
    model = _expanding(4, 16, 3, IndexedMaxMin(spelling), seed=1)
    graph = load_model(export_onnx(model, tmp_path / f"{spelling}.onnx", (4,), dynamo=dynamo))
    setup, _ = certificate_setup(graph)
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(2))
    _, cert, error = _global(graph, setup, x)
    found = LocalCertifier(graph, setup, method="lipschitz").radii(x, cert.prediction, cert.radius,
                                                                   torch.as_tensor(error.base), error.slope)
    assert found.reason == ""
    assert bool((found.radius >= cert.radius).all()) and bool((found.radius > cert.radius * 1.2).any())


@pytest.mark.parametrize("at", [None, [0.3, 0.6, 0.9]], ids=["searched", "asked"])
def test_the_screen_drops_no_certificate(tmp_path: Path, monkeypatch, at: list[float] | None) -> None:
    """The searched methods skip the samples whose own activation pattern cannot certify a radius left to prove;
    with the screen open (every sample searched) the radii are the same."""
    import lipcert.certification.local as local_module

    graph, setup = _setup(tmp_path, _expanding(4, 16, 3, MaxMin(), seed=1), 4, "expanding")
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(3))
    _, cert, error = _global(graph, setup, x)

    def radii() -> torch.Tensor:
        return LocalCertifier(graph, setup, method="lipschitz", at=at).radii(
            x, cert.prediction, cert.radius, torch.as_tensor(error.base), error.slope).radius

    screened = radii()
    monkeypatch.setattr(local_module, "SCREEN_SLACK", math.inf)
    assert torch.equal(screened, radii())
    assert bool((screened > cert.radius).any())


@pytest.mark.slow
def test_local_depth_reaches_the_block_before() -> None:
    """``local_depth`` 2 analyses the last two MaxMin blocks of digits_dense too: at least as many points as one
    block, and more at radius 0.25."""
    import lipcert

    graph = lipcert.load_model(SAMPLES / "digits_dense.onnx")
    accuracy = {depth: lipcert.certify(graph, SAMPLES / "digits_test.npz", eps="0.25,0.5", local=True,
                                       local_depth=depth, attack=False).eps for depth in (1, 2)}
    for one, two in zip(accuracy[1], accuracy[2]):
        assert two.extra["certified (local)"] >= one.extra["certified (local)"] >= one.certified_accuracy
    assert accuracy[2][0].extra["certified (local)"] > accuracy[1][0].extra["certified (local)"]
