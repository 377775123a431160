"""The report model: one record of a certification run that every output format renders (see ``report.render``)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lipcert.report import render
from lipcert.version import __version__

SCHEMA = "lipcert.report/1"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EpsResult:
    """Certified accuracy at one requested radius."""

    eps: float
    label: str
    certified_accuracy: float
    certified: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleTable:
    """Per-sample results in dataset order (written to samples.csv, not to report.json)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None  # each row's dataset index when samples were skipped; else 0, 1, 2, ...


@dataclass
class Report:
    """Everything a certification run found, with the settings and hashes that make it reproducible.

    Example::

        report = lipcert.certify(lipcert.load_model("model.onnx"), "test.npz", eps=["36/255"])
        print(report.clean_accuracy, report.eps[0].certified_accuracy)
        report.write("out/")
    """

    model: dict[str, Any]
    dataset: dict[str, Any]
    device: str
    backend: str
    batch_size: int
    norm: str
    input_dim: int
    bound: dict[str, Any]
    clean_accuracy: float
    eps: list[EpsResult]
    curve: list[tuple[float, float]]
    timings: dict[str, float]
    notes: list[str]
    samples: SampleTable
    attack: dict[str, Any] | None = None
    #: with --skip-bad-samples: {"count", "evaluated", "samples": [{"index", "reason"}, ...]}; else None
    skipped: dict[str, Any] | None = None
    gates: list[dict[str, Any]] | None = None
    schema: str = SCHEMA
    lipcert_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def num_samples(self) -> int:
        return int(self.samples.labels.numel())

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``lipcert.report/1``, see docs/report.md)."""
        data = {k: v for k, v in asdict(self).items() if k != "samples"}
        data["curve"] = [list(p) for p in self.curve]
        return _clean(data)

    def to_json(self) -> str:
        return render.to_json(self)

    def to_markdown(self) -> str:
        return render.to_markdown(self)

    def plot(self, path: str | Path) -> None:
        render.plot(self, path)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write report.json, report.md, samples.csv and certified_accuracy.png, each renamed into place only
        once all four are written."""
        return render.write_all(self, Path(out_dir))


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
