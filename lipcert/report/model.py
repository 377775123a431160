"""The report model: one record of a certification run that every output format renders (see ``report.render``).

Each section of report.json is a dataclass here; ``Report.to_dict`` writes their fields in declaration order, so
the order of the fields is the order of the keys in report.json (docs/report.md)."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lipcert.errors import spell
from lipcert.report import render
from lipcert.version import __version__

if TYPE_CHECKING:
    from lipcert.certification.attack import EpsAttack, Violation

SCHEMA = "lipcert.report/1"


@dataclass
class ModelSection:
    """The model file certified."""

    path: str
    sha256: str  # "" for a model that is not a file
    format: str  # the file's suffix: onnx, safetensors


@dataclass
class DatasetSection:
    """The data certified on, as ``data.DatasetInfo`` describes it."""

    path: str
    format: str
    sha256: str
    num_samples: int
    layout: str
    value_range: str
    num_classes: int | None
    sample_shape: list[int]


@dataclass
class BoundInfo:
    """The Lipschitz bound a report certifies with, where it comes from, and the input-space factor."""

    value: float
    method: str
    computed_upper: float
    declared: float | None
    normalisation_factor: float
    rule: str
    error_base: float  # the deployed logits err by at most error_base + error_slope R, R = ||x|| + radius
    error_slope: float


@dataclass
class BoundSection(BoundInfo):
    """The bound, and the model's Lipschitz claim (the ``lipschitz`` setting, else its metadata; all three None
    without one) with whether lipcert's sound bound proves it."""

    claimed: float | None
    claim_source: str | None  # "lipschitz" or "model metadata"
    claim_proven: bool | None


@dataclass
class MeanRadius:
    """Per-sample certified radii averaged: ``mean`` counts a wrong prediction as 0, ``signed_mean`` as minus its
    radius (the mean signed distance to the decision boundary; for one logit, deel-lip's E[y f(x)] / L)."""

    mean: float
    signed_mean: float


@dataclass
class TimingsSection:
    """Seconds each phase took, and the speeds they give (over the samples this run certified)."""

    bound_seconds: float
    inference_seconds: float
    attack_seconds: float
    crosscheck_seconds: float
    total_seconds: float
    images_per_second: float
    inference_images_per_second: float
    samples_read_back: int  # from a checkpoint, by a resumed run
    processes: int


@dataclass
class Histogram:
    """Counts of values between consecutive edges (one more edge than counts; both empty without values)."""

    edges: list[float]
    counts: list[int]


@dataclass
class AttackSection:
    """The PGD attack's part: its settings, per-eps empirical robust accuracy, the violations and the gaps."""

    method: str
    steps: int
    restarts: int
    step_rule: str
    seed: int
    per_eps: list[EpsAttack]  # ``AttackSummary.per_eps``
    violations: list[Violation]
    summary: str
    violation_count: int
    consistent: bool  # no violation, and empirical robust accuracy never below the certified one
    median_gap: float | None  # of attack radius - certified radius over the attacked points; None without any
    gap_histogram: Histogram
    curve: list[tuple[float, float]]  # empirical robust accuracy against radius


@dataclass
class SkippedSample:
    """A sample left out as unreadable or invalid (``skip_bad_samples``)."""

    index: int
    reason: str


@dataclass
class SkippedSection:
    """The samples left out with ``skip_bad_samples``, and how many were evaluated."""

    count: int
    evaluated: int
    samples: list[SkippedSample]


@dataclass
class Gate:
    """One check a CI step can fail on."""

    name: str
    passed: bool
    measured: str
    required: str
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def spelled(self, parameters: tuple[str, ...], names: Callable[[str], str]) -> Gate:
        """The gate with each of ``parameters`` (API names) its text names spelled ``names(parameter)``."""
        return replace(self, measured=spell(self.measured, parameters, names),
                       required=spell(self.required, parameters, names), message=spell(self.message, parameters, names))


@dataclass
class EpsResult:
    """Certified accuracy at one requested radius: float32-safe (``certified_accuracy``) and in exact arithmetic
    (``exact_certified_accuracy``, the figure papers print; None for a report without exact radii)."""

    eps: float
    label: str
    certified_accuracy: float
    certified: int
    extra: dict[str, Any] = field(default_factory=dict)
    exact_certified_accuracy: float | None = None
    exact_certified: int | None = None

    def accuracy(self, kind: str) -> float | None:
        """The certified accuracy of one radius kind (``render.RADIUS_KINDS``)."""
        return self.exact_certified_accuracy if kind == "exact" else self.certified_accuracy

    def count(self, kind: str) -> int | None:
        """The number of samples certified by one radius kind."""
        return self.exact_certified if kind == "exact" else self.certified


@dataclass
class SampleTable:
    """Per-sample results in dataset order (written to samples.csv, not to report.json)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor  # float32-safe
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None  # each row's dataset index when samples were skipped; else 0, 1, 2, ...
    exact_radii: torch.Tensor | None = None  # in exact arithmetic (the deployed logits taken as exact)


@dataclass
class Report:
    """Everything a certification run found, with the settings and hashes that make it reproducible.

    Example::

        report = lipcert.certify(lipcert.load_model("model.onnx"), "test.npz", eps=["36/255"])
        print(report.clean_accuracy, report.eps[0].certified_accuracy)
        report.write("out/")
    """

    model: ModelSection
    dataset: DatasetSection
    device: str
    backend: str
    batch_size: int
    norm: str
    input_dim: int
    bound: BoundSection
    clean_accuracy: float
    mean_radius: MeanRadius
    eps: list[EpsResult]
    curve: list[tuple[float, float]]
    timings: TimingsSection
    notes: list[str]
    samples: SampleTable
    attack: AttackSection | None = None
    skipped: SkippedSection | None = None  # only with skip_bad_samples
    gates: list[Gate] = field(default_factory=list)
    exact_mean_radius: MeanRadius | None = None  # None for a report without exact radii
    exact_curve: list[tuple[float, float]] = field(default_factory=list)
    gate_on: str = "float"  # the radius kind the gates read (``render.RADIUS_KINDS``)
    schema: str = SCHEMA
    lipcert_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self._written: render.Rendering | None = None  # not a field: neither in report.json nor compared

    @property
    def passed(self) -> bool:
        """Every gate passes."""
        return all(g.passed for g in self.gates)

    @property
    def num_samples(self) -> int:
        return int(self.samples.labels.numel())

    def radius_mean(self, kind: str) -> MeanRadius | None:
        """The mean certified radius of one radius kind (``render.RADIUS_KINDS``)."""
        return self.exact_mean_radius if kind == "exact" else self.mean_radius

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``lipcert.report/1``, see docs/report.md)."""
        data = {k: v for k, v in asdict(self).items() if k != "samples"}
        data["curve"] = [list(p) for p in self.curve]
        data["exact_curve"] = [list(p) for p in self.exact_curve]
        return _clean(data)

    def to_json(self) -> str:
        return render.to_json(self)

    def to_markdown(self) -> str:
        return render.to_markdown(self)

    def plot(self, path: str | Path) -> None:
        render.plot(self, path)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write report.json, report.md, samples.csv and certified_accuracy.png, each renamed into place only
        once all four are written; ``rendered`` returns what was written."""
        out = Path(out_dir)
        self._written = render.write_all(self, out)
        return [out / name for name in render.FILES]

    def rendered(self) -> render.Rendering:
        """The report in every file format: the rendering the last ``write`` wrote (what ``lipcert report``
        prints and writes besides the files), else one made now, for a report never written."""
        return self._written if self._written is not None else render.render_all(self)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
