"""The report of a certify run, built from its typed result: accuracies per eps, the curve, the claim, the attack's
part, the notes and the timings."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lipcert.bounds.results import DEFAULT_TOL
from lipcert.data import DatasetInfo, Labels
from lipcert.data.base import sha256_file
from lipcert.report.model import (
    AttackSection,
    BoundInfo,
    BoundSection,
    DatasetSection,
    EpsResult,
    Histogram,
    MeanRadius,
    ModelSection,
    Report,
    SampleTable,
    SkippedSample,
    SkippedSection,
    TimingsSection,
)
from lipcert.report.render import LOCAL

if TYPE_CHECKING:
    from lipcert.certification.attack import AttackSummary
    from lipcert.graph.core import Graph


@dataclass
class RunTimings:
    """Seconds each phase of a run took, summed over its processes (the cross-check: the slowest one's)."""

    bound: float
    inference: float
    crosscheck: float
    attack: float
    total: float
    computed: int  # samples certified by this run (not read back from a checkpoint)
    processes: int


@dataclass
class RunResult:
    """What a certify run found, merged in dataset order: the report's content before it is a report."""

    model: Graph
    dataset: DatasetInfo
    labels: Labels
    norm: str
    radii: list[tuple[str, float]]
    declared: float | None  # the ``lipschitz`` setting: a bound certified with instead of lipcert's
    device: str
    backend: str
    batch_size: int
    bound: BoundInfo
    samples: SampleTable
    attack: AttackSummary | None
    skipped: list[tuple[int, str]] | None  # None unless bad samples were to be skipped
    timings: RunTimings
    gate_on: str = "float"  # the radius kind the gates read


def model_sha256(model: Graph) -> str:
    """The model file's sha256; for a model that is not a file (a module exported in memory), its ONNX model's
    ("" with neither): what a report names the model by and a checkpoint checks."""
    if Path(model.source).is_file():
        return sha256_file(Path(model.source))
    if model.onnx_model is not None:
        return hashlib.sha256(model.onnx_model.SerializeToString(deterministic=True)).hexdigest()
    return ""


def _bound(model: Graph, info: BoundInfo, declared: float | None, computed: float) -> BoundSection:
    """The bound with the Lipschitz claim (``lipschitz``, else the model's metadata) and whether lipcert's bound
    (``computed``, in the model's input space) proves it."""
    claim = declared if declared is not None else model.claimed_lipschitz()
    if claim is None:
        return BoundSection(**asdict(info), claimed=None, claim_source=None, claim_proven=None)
    return BoundSection(**asdict(info), claimed=claim,
                        claim_source="lipschitz" if declared is not None else "model metadata",
                        claim_proven=computed <= claim * (1.0 + DEFAULT_TOL))


def _notes(run: RunResult, bound: BoundSection, computed_upper: float) -> list[str]:
    """What a reader must know to read the numbers: an unproven claim first, then the model's and the data's."""
    notes = []
    if bound.claim_proven is False:
        upper = ("unbounded (an operator has no rule)" if not math.isfinite(computed_upper)
                 else f"{computed_upper:.6g}")
        notes.append(f"LIPSCHITZ CLAIM NOT PROVEN: the model is claimed {bound.claimed:g}-Lipschitz "
                     f"({bound.claim_source}), but lipcert's sound upper bound is {upper}; "
                     + ("the certificates use the declared bound, which lipcert cannot confirm"
                        if run.declared is not None else "the certificates use lipcert's bound, not the claim")
                     + " (run lipcert verify to find the layer)")
    notes += list(run.model.notes)
    if run.declared is not None:
        notes.append(f"certificates use the Lipschitz bound {run.declared:g} declared with lipschitz, not lipcert's "
                     f"sound bound {computed_upper:.6g}")
    if not math.isfinite(run.bound.value):
        notes.append("lipcert could not bound the model's Lipschitz constant (an operator has no rule): "
                     "nothing is certified; run lipcert verify for details")
    if run.labels.note:
        notes.append(run.labels.note)
    if run.norm == "linf":
        notes.append(f"L-infinity radii are the L2 radii divided by sqrt({math.prod(run.model.input_shape)}) "
                     "(||d||_2 <= sqrt(d) ||d||_inf)")
    if run.skipped:
        notes.append(f"{len(run.skipped)} of {run.dataset.num_samples} samples were skipped as unreadable or "
                     f"invalid (skip_bad_samples; listed in report.json): accuracies are over the "
                     f"{run.samples.labels.numel()} samples evaluated")
    if run.attack is not None and run.attack.violations:
        notes.append(f"SOUNDNESS VIOLATION: the attack broke {len(run.attack.violations)} certified point(s) inside "
                     "their certified radius: the model's Lipschitz claim or the certificate is wrong")
    return notes


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor, eps: float) -> float:
    """Share of samples correctly classified with a certified radius above eps (strictly: a point at radius
    exactly eps could tie)."""
    if radius.numel() == 0:
        return 0.0
    return float(((radius > eps) & correct).double().mean())


def mean_radius(radius: torch.Tensor, correct: torch.Tensor) -> MeanRadius:
    """The mean certified radius (0 for a wrong prediction) and the signed one (minus the radius of a wrong
    prediction), in float64; 0 for no samples."""
    if radius.numel() == 0:
        return MeanRadius(0.0, 0.0)
    r = radius.double()
    return MeanRadius(float(torch.where(correct, r, torch.zeros_like(r)).mean()),
                      float(torch.where(correct, r, -r).mean()))


def accuracy_curve(radius: torch.Tensor, correct: torch.Tensor, points: int = 101) -> list[tuple[float, float]]:
    """Certified accuracy as a function of the radius, from 0 to the largest certified radius."""
    top = float(radius[correct].max()) if bool(correct.any()) else 0.0
    if top <= 0:
        return [(0.0, certified_accuracy(radius, correct, 0.0))]
    grid = torch.linspace(0, top, points, dtype=torch.float64)
    return [(float(r), certified_accuracy(radius, correct, float(r))) for r in grid]


def _histogram(values: torch.Tensor, bins: int = 30) -> Histogram:
    """Counts of the gaps between attack radius and certified radius, for the plot."""
    if values.numel() == 0:
        return Histogram([], [])
    hi = float(values.max())
    lo = min(0.0, float(values.min()))
    hi = hi if hi > lo else lo + 1e-9
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    return Histogram(torch.linspace(lo, hi, bins + 1).tolist(), [int(c) for c in counts.tolist()])


def attack_section(summary: AttackSummary, radii: torch.Tensor, correct: torch.Tensor,
                   results: list[EpsResult]) -> AttackSection:
    """The attack's part of the report: per-eps empirical accuracy beside the certified one, gaps, curve."""
    for res, row in zip(results, summary.per_eps, strict=False):
        res.extra["empirical robust"] = row.robust_accuracy
    inconsistent = [r.label for r, row in zip(results, summary.per_eps, strict=False)
                    if row.robust_accuracy < r.certified_accuracy]
    attacked = correct & torch.isfinite(summary.attack_radius)
    gaps = (summary.attack_radius - radii.double())[attacked]
    finite = summary.attack_radius[torch.isfinite(summary.attack_radius)]
    top = float(finite.max()) if finite.numel() else 0.0
    grid = torch.linspace(0, max(top, max((r.eps for r in results), default=0.0)), 101, dtype=torch.float64)
    curve = [(float(g), float((summary.attack_radius > g).double().mean())) for g in grid]
    n = len(summary.violations)
    verdict = (f"{n} soundness violation(s): certified points broken inside their certified radius"
               if n else "no certified point was broken (consistent)")
    per = ", ".join(f"{row.label}: {100 * row.robust_accuracy:.2f}%" for row in summary.per_eps)
    return AttackSection(
        summary.method, summary.steps, summary.restarts, summary.step_rule, summary.seed, summary.per_eps,
        summary.violations,
        summary=f"{summary.method}, {summary.steps} steps x {summary.restarts} restarts; empirical robust "
                f"accuracy {per}; {verdict}",
        violation_count=n, consistent=n == 0 and not inconsistent,
        median_gap=float(gaps.median()) if gaps.numel() else None, gap_histogram=_histogram(gaps), curve=curve)


def _timings(t: RunTimings, count: int) -> TimingsSection:
    return TimingsSection(bound_seconds=t.bound, inference_seconds=t.inference, attack_seconds=t.attack,
                          crosscheck_seconds=t.crosscheck, total_seconds=t.total,
                          images_per_second=t.computed / t.total if t.total > 0 else 0.0,
                          inference_images_per_second=t.computed / t.inference if t.inference > 0 else 0.0,
                          samples_read_back=count - t.computed, processes=t.processes)


def build_report(run: RunResult) -> Report:
    """The report of a run (its gates come after: ``gates.report_gates``)."""
    samples = run.samples
    correct = samples.predictions == samples.labels
    exact = samples.exact_radii
    results = [EpsResult(value, label, certified_accuracy(samples.radii, correct, value),
                         int(((samples.radii > value) & correct).sum()),
                         exact_certified_accuracy=None if exact is None else certified_accuracy(exact, correct, value),
                         exact_certified=None if exact is None else int(((exact > value) & correct).sum()))
               for label, value in run.radii]
    if (local := samples.columns.get("local_radius")) is not None:
        for result in results:
            result.extra[LOCAL] = certified_accuracy(local, correct, result.eps)
    computed_upper = run.bound.computed_upper / run.bound.normalisation_factor
    bound = _bound(run.model, run.bound, run.declared, computed_upper)
    notes = _notes(run, bound, computed_upper)
    attack = None
    if run.attack is not None:
        attack = attack_section(run.attack, samples.radii, correct, results)
        samples.columns["attack_radius"] = run.attack.attack_radius
    d = run.dataset
    count = int(samples.labels.numel())
    return Report(
        model=ModelSection(run.model.source, model_sha256(run.model), Path(run.model.source).suffix.lstrip(".")),
        dataset=DatasetSection(d.path, d.format, d.sha256, d.num_samples, d.layout, d.value_range, d.num_classes,
                               list(d.sample_shape)),
        device=run.device, backend=run.backend, batch_size=run.batch_size, norm=run.norm,
        input_dim=math.prod(run.model.input_shape), bound=bound,
        clean_accuracy=float(correct.double().mean()) if count else 0.0,
        mean_radius=mean_radius(samples.radii, correct),
        eps=results, curve=accuracy_curve(samples.radii, correct), timings=_timings(run.timings, count),
        notes=notes, attack=attack,
        skipped=None if run.skipped is None else SkippedSection(
            len(run.skipped), count, [SkippedSample(i, why) for i, why in run.skipped]),
        samples=samples, exact_mean_radius=None if exact is None else mean_radius(exact, correct),
        exact_curve=[] if exact is None else accuracy_curve(exact, correct), gate_on=run.gate_on)
