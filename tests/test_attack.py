"""PGD sanity checks: the attack is strong where the answer is known, and contradictions fail the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lipcert.certification.attack import (
    AttackConfig,
    attack_batch,
    batch_generator,
    margin_loss,
    pgd,
    summarize_attack,
)
from lipcert.certification.run import certify
from lipcert.model.loader import load_model

from .conftest import SAMPLES, run_cli


def _linear_model(w: torch.Tensor, b: float):
    """Two logits (0, w.x + b): class 1 when w.x + b > 0; the exact robust radius is |w.x + b| / ||w||."""

    def model(x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ w + b
        return torch.stack([torch.zeros_like(s), s], dim=1)

    return model


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_finds_examples_exactly_where_they_exist(norm: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(16)
    model = _linear_model(w, 0.0)
    x = 0.4 + 0.2 * torch.rand(64, 16)
    y = model(x).argmax(1)
    score = (x @ w).abs()
    exact = score / (w.norm() if norm == "l2" else w.abs().sum())
    cfg = AttackConfig(steps=40, restarts=1, norm=norm, lower=-10.0, upper=10.0)
    gen = torch.Generator().manual_seed(0)
    for factor, expect in ((1.05, True), (0.95, False)):
        found_all = []
        for i in range(x.shape[0]):
            adv, found = pgd(model, x[i:i + 1], y[i:i + 1], float(exact[i]) * factor, cfg, gen)
            found_all.append(bool(found))
            dist = (adv - x[i:i + 1]).flatten().norm() if norm == "l2" else (adv - x[i:i + 1]).abs().max()
            assert dist <= float(exact[i]) * factor * (1 + 1e-5)
        assert all(f == expect for f in found_all), (factor, sum(found_all))


def test_margin_loss_is_positive_exactly_when_misclassified() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 0])
    assert margin_loss(logits, y).tolist() == [-1.0, 5.0]


def test_increasing_eps_attacks_only_unbroken_points() -> None:
    torch.manual_seed(1)
    w = torch.randn(8)
    base = _linear_model(w, 0.0)
    seen: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return base(x)

    x = torch.rand(32, 8)
    y = base(x).argmax(1)
    eps = [("a", 0.05), ("b", 0.5), ("c", 5.0)]
    cfg = AttackConfig(steps=5, restarts=1)
    part = attack_batch(model, x, y, y.clone(), torch.zeros(32), 0, eps, cfg, batch_generator(cfg.seed, 0))
    summary = summarize_attack(cfg, eps, part.attack_radius, part.broken_at, part.violations, 0.0)
    broken = [row.broken for row in summary.per_eps]
    assert broken == sorted(broken) and broken[-1] == 32
    first_batch = seen[0]
    assert first_batch == 32 and min(seen) < 32  # later eps see only the points still unbroken


@pytest.mark.slow
def test_good_model_is_consistent_and_deterministic() -> None:
    graph = load_model(SAMPLES / "digits_conv.onnx")
    data = SAMPLES / "digits_test.npz"
    cfg = AttackConfig(steps=10, restarts=1, seed=3)
    a = certify(graph, data, "36/255,72/255", attack=cfg)
    b = certify(graph, data, "36/255,72/255", attack=cfg)
    assert a.attack is not None and a.attack.violation_count == 0 and a.attack.consistent
    for e in a.eps:
        assert e.extra["empirical robust"] >= e.certified_accuracy
    assert torch.equal(a.samples.columns["attack_radius"], b.samples.columns["attack_radius"])
    finite = torch.isfinite(a.samples.columns["attack_radius"]) & (a.samples.labels == a.samples.predictions)
    assert bool((a.samples.columns["attack_radius"][finite] >= a.samples.radii[finite]).all())


@pytest.mark.slow
def test_broken_model_with_its_claimed_bound_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = run_cli("report", str(SAMPLES / "digits_broken.onnx"), "--data", str(SAMPLES / "digits_test.npz"),
                     "--lipschitz", "1", "--eps", "36/255,72/255,108/255", "--attack-steps", "20",
                     "--out", str(out))
    assert result.returncode == 1, result.stderr
    report = json.loads((out / "report.json").read_text())
    violations = report["attack"]["violations"]
    assert len(violations) >= 1
    for v in violations:
        assert v["adversarial_distance"] < v["certified_radius"]
        assert v["adversarial_distance"] <= v["eps"] * (1 + 1e-5)
        assert v["logit_adversarial"] > v["logit_true"]
    assert "Lipschitz claim or the certificate is wrong" in (out / "report.md").read_text()
    rows = (out / "samples.csv").read_text().splitlines()
    assert rows[0].endswith("attack_radius") and len(rows) == report["dataset"]["num_samples"] + 1


def test_lipcert_pgd_at_least_as_strong_as_torchattacks() -> None:
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks (bench extra) is not installed")
    from lipcert.graph.executor import GraphModule

    graph = load_model(SAMPLES / "digits_dense.onnx")
    module = GraphModule(graph).eval()
    d = np.load(SAMPLES / "digits_test.npz")
    x, y = torch.from_numpy(d["x"][:200]), torch.from_numpy(d["y"][:200])
    keep = module(x).argmax(1) == y
    x, y = x[keep], y[keep]
    eps, steps = 72 / 255, 20
    theirs = torchattacks.PGDL2(module, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    adv = theirs(x, y)
    their_found = int((module(adv).argmax(1) != y).sum())
    _, ours = pgd(module, x, y, eps, AttackConfig(steps=steps, restarts=1), torch.Generator().manual_seed(0))
    assert int(ours.sum()) >= their_found


def test_bfloat16_attack_is_rechecked_in_float32() -> None:
    graph = load_model(SAMPLES / "digits_dense.onnx")
    report = certify(graph, SAMPLES / "digits_test.npz", "72/255,1",
                     attack=AttackConfig(steps=10, restarts=1, precision="bfloat16"))
    assert report.attack is not None and report.attack.violation_count == 0
    radius = report.samples.columns["attack_radius"]
    broken = torch.isfinite(radius) & (radius > 0)
    assert int(broken.sum()) > 10  # the bfloat16 steps still find adversarial examples, verified in float32
