"""``certify``: a loaded model and a dataset in, a ``Report`` out (what ``lipcert report`` runs)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

from .attack import AttackConfig, AttackSummary, attack_batches
from .certify import accuracy_curve, certified_accuracy
from .data import Dataset, check_fits, open_dataset
from .errors import ConfigError
from .evaluate import certificate_setup, evaluate
from .graph import Graph
from .report import EpsResult, Report, SampleTable, parse_eps, sha256_file

NORMS = ("l2", "linf")


def certify(model: Graph, data: str | Path | Dataset, eps: Sequence[str | float] | str = "36/255", *,
            norm: str = "l2", device: str = "cpu", batch_size: int = 256, backend: str = "auto",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            lipschitz: float | None = None, layout: str = "auto", value_range: str = "auto",
            attack: AttackConfig | None = None, progress: Callable[[str, int], None] | None = None,
            on_start: Callable[[str, int], None] | None = None) -> Report:
    """Certify every sample of ``data`` at each radius in ``eps`` and return the report.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        report = lipcert.certify(graph, "sample_models/digits_test.npz", eps="36/255,72/255")
        print(report.eps[0].certified_accuracy)
    """
    started = time.perf_counter()
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: expected l2 or linf")
    eps_list = parse_eps(eps) if isinstance(eps, str) else parse_eps(",".join(str(e) for e in eps))
    if lipschitz is not None and (not math.isfinite(lipschitz) or lipschitz <= 0):
        raise ConfigError(f"--lipschitz must be a positive number, got {lipschitz}")
    dataset = data if not isinstance(data, (str, Path)) else open_dataset(data, layout=layout,
                                                                           value_range=value_range)
    classes = model.value_shapes.get(model.output, (0,))[-1]
    check_fits(dataset, sample_shape=tuple(model.input_shape), num_classes=max(2, classes))
    t_bound = time.perf_counter()
    setup, info = certificate_setup(model, device=device, declared=lipschitz, std=std)
    bound_seconds = time.perf_counter() - t_bound
    if on_start:
        on_start("certifying", dataset.info.num_samples)
    run = evaluate(model, dataset, setup, device=device, batch_size=batch_size, backend=backend, mean=mean,
                   std=std, progress=(lambda n: progress("certifying", n)) if progress else None)
    correct = run.predictions == run.labels
    input_dim = math.prod(model.input_shape)
    radii = run.radii / math.sqrt(input_dim) if norm == "linf" else run.radii
    results = [EpsResult(value, label, certified_accuracy(radii, correct, value),
                         int(((radii > value) & correct).sum())) for label, value in eps_list]
    notes = list(model.notes)
    if lipschitz is not None:
        notes.append(f"certificates use the Lipschitz bound {lipschitz:g} declared with --lipschitz, not lipcert's "
                     f"sound bound {info.computed_upper / info.normalisation_factor:.6g}")
    if not math.isfinite(info.value):
        notes.append("lipcert could not bound the model's Lipschitz constant (an operator has no rule): "
                     "nothing is certified; run lipcert verify for details")
    info_dict = dict(info.__dict__)
    attack_part, columns = None, {}
    if attack is not None:
        if on_start:
            on_start("attacking", dataset.info.num_samples)
        summary = run_attack(model, dataset, run.predictions, radii, eps_list, attack, device, run.batch_size,
                             mean, std, (lambda n: progress("attacking", n)) if progress else None)
        attack_part = attack_report(summary, radii, correct, results)
        columns["attack_radius"] = summary.attack_radius
        if summary.violations:
            notes.append(f"SOUNDNESS VIOLATION: the attack broke {len(summary.violations)} certified point(s) inside "
                         "their certified radius: the model's Lipschitz claim or the certificate is wrong")
    total = time.perf_counter() - started
    d = dataset.info
    return Report(
        model={"path": model.source, "sha256": sha256_file(model.source) if Path(model.source).is_file() else "",
               "format": Path(model.source).suffix.lstrip(".")},
        dataset={"path": d.path, "format": d.format, "sha256": d.sha256, "num_samples": d.num_samples,
                 "layout": d.layout, "value_range": d.value_range, "num_classes": d.num_classes,
                 "sample_shape": list(d.sample_shape)},
        device=device, backend=run.backend, batch_size=run.batch_size, norm=norm, input_dim=input_dim,
        bound=info_dict, clean_accuracy=float(correct.double().mean()) if run.count else 0.0, eps=results,
        curve=accuracy_curve(radii, correct),
        timings={"bound_seconds": bound_seconds, "inference_seconds": run.seconds, "total_seconds": total,
                 "images_per_second": run.images_per_second},
        notes=notes, attack=attack_part,
        samples=SampleTable(run.labels, run.predictions, run.margins, radii, columns))


def run_attack(model: Graph, dataset: Dataset, predictions, radii, eps_list, cfg: AttackConfig, device: str,
               batch_size: int, mean, std, progress) -> AttackSummary:
    """PGD on lipcert's torch executor (float32), in pixel space through the input normalisation."""
    import torch

    from .executor import GraphModule

    module = GraphModule(model).to(device).eval()
    view = (1, -1) + (1,) * (len(model.input_shape) - 1)
    m = torch.tensor(mean, dtype=torch.float32, device=device).reshape(view) if mean else None
    s = torch.tensor(std, dtype=torch.float32, device=device).reshape(view) if std else None

    def forward(x):
        return module(x if m is None else (x - m) / s).reshape(x.shape[0], -1)

    return attack_batches(forward, dataset.batches(batch_size), predictions, radii, eps_list, cfg, device, progress)


def _histogram(values, bins: int = 30) -> dict:
    """Counts of the gaps between attack radius and certified radius, for the plot."""
    import torch

    if values.numel() == 0:
        return {"edges": [], "counts": []}
    hi = float(values.max())
    lo = min(0.0, float(values.min()))
    counts = torch.histc(values, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-9)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-9, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


def attack_report(summary: AttackSummary, radii, correct, results: list[EpsResult]) -> dict:
    """The attack's part of the report: per-eps empirical accuracy beside the certified one, gaps, curve."""
    import torch

    for res, row in zip(results, summary.per_eps):
        res.extra["empirical robust"] = row["robust_accuracy"]
    inconsistent = [r.label for r, row in zip(results, summary.per_eps)
                    if row["robust_accuracy"] < r.certified_accuracy]
    attacked = correct & torch.isfinite(summary.attack_radius)
    gaps = (summary.attack_radius - radii.double())[attacked]
    top = float(summary.attack_radius[torch.isfinite(summary.attack_radius)].max()) if attacked.any() else 0.0
    grid = torch.linspace(0, max(top, max((r.eps for r in results), default=0.0)), 101, dtype=torch.float64)
    curve = [(float(g), float((summary.attack_radius > g).double().mean())) for g in grid]
    data = summary.to_dict()
    n = len(summary.violations)
    verdict = (f"{n} soundness violation(s): certified points broken inside their certified radius"
               if n else "no certified point was broken (consistent)")
    per = ", ".join(f"{row['label']}: {100 * row['robust_accuracy']:.2f}%" for row in summary.per_eps)
    data.update({
        "summary": f"{summary.method}, {summary.steps} steps x {summary.restarts} restarts; empirical robust "
                   f"accuracy {per}; {verdict}",
        "violation_count": n, "consistent": n == 0 and not inconsistent,
        "median_gap": float(gaps.median()) if gaps.numel() else None,
        "gap_histogram": _histogram(gaps), "curve": curve,
    })
    return data


def attack(model: Graph, data: str | Path | Dataset, eps: Sequence[str | float] | str = "36/255", *,
           steps: int = 50, restarts: int = 2, norm: str = "l2", seed: int = 0, device: str = "cpu",
           batch_size: int = 256, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None) -> AttackSummary:
    """Run the PGD attack alone on every correctly classified sample (no certificates, so no violations).

    Example::

        summary = lipcert.attack(lipcert.load_model("model.onnx"), "test.npz", eps="36/255,72/255")
        print([row["robust_accuracy"] for row in summary.per_eps])
    """
    import torch

    from .executor import GraphModule

    if norm not in NORMS:
        raise ConfigError(f"norm {norm!r}: expected l2 or linf")
    eps_list = parse_eps(eps) if isinstance(eps, str) else parse_eps(",".join(str(e) for e in eps))
    dataset = data if not isinstance(data, (str, Path)) else open_dataset(data)
    check_fits(dataset, sample_shape=tuple(model.input_shape),
               num_classes=max(2, model.value_shapes.get(model.output, (0,))[-1]))
    module = GraphModule(model).to(device).eval()
    view = (1, -1) + (1,) * (len(model.input_shape) - 1)
    preds = []
    with torch.no_grad():
        for xb, _ in dataset.batches(batch_size):
            x = torch.from_numpy(xb).to(device)
            if mean:
                x = (x - torch.tensor(mean, device=device).reshape(view)) / torch.tensor(std, device=device).reshape(view)
            preds.append(module(x).reshape(x.shape[0], -1).argmax(1).cpu())
    predictions = torch.cat(preds)
    cfg = AttackConfig(steps=steps, restarts=restarts, norm=norm, seed=seed)
    return run_attack(model, dataset, predictions, torch.zeros(predictions.numel()), eps_list, cfg, device,
                      batch_size, mean, std, None)
