"""Several reports side by side (``lipcert compare``): one table, the certified-accuracy curves, the
accuracy-versus-robustness scatter of the deel-lip poster and a radar of normalised axes, one entry per model.

Each entry is read from a ``report.json`` (or a folder holding one) and checked against the others: reports of
different datasets or norms are refused, since their figures do not compare; radii that not every report has
are named, never matched to a neighbour.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lipcert.atomic import write_files_atomic
from lipcert.errors import ConfigError

SCHEMA = "lipcert.compare/1"
REPORT_SCHEMA = "lipcert.report/1"


@dataclass
class Entry:
    """What one report says, in the terms the comparison shows."""

    name: str
    path: str
    model: str
    clean_accuracy: float
    certified: dict[str, float]  # radius label -> certified accuracy
    radii: dict[str, float]  # radius label -> radius
    mean_radius: float | None  # mean certified radius, 0 for a wrong prediction
    signed_mean_radius: float | None  # mean signed radius: negative for a wrong prediction
    lipschitz: float | None
    lipschitz_source: str
    float_allowance: float  # the float error allowance at the sample (error_base)
    seconds_per_image: float | None  # of the certification pass (inference, margins, radii), attack left out
    curve: list[list[float]] = field(default_factory=list)  # (radius, certified accuracy)


@dataclass
class Comparison:
    """Every entry, the radii all of them share, and those only some have."""

    entries: list[Entry]
    dataset: str
    norm: str
    radii: list[str]  # radius labels every report has, in order of radius
    unmatched: dict[str, list[str]]  # radius label -> the entries that have it, when not every entry does

    def to_json(self) -> dict[str, Any]:
        """The comparison as compare.json holds it."""
        return {"schema": SCHEMA, "dataset": self.dataset, "norm": self.norm, "radii": self.radii,
                "unmatched_radii": self.unmatched, "models": [asdict(e) for e in self.entries]}


def _report_path(path: Path) -> Path:
    """The report.json a path names: the file itself, or the one inside a folder."""
    found = path / "report.json" if path.is_dir() else path
    if not found.is_file():
        raise ConfigError(f"no report.json {'in this folder' if path.is_dir() else 'at this path'}",
                          source=str(path))
    return found


def _mean_radii(report: dict[str, Any]) -> tuple[float | None, float | None]:
    """The report's mean and signed mean radius (``report.build.mean_radius``); None for a report written before
    lipcert recorded them."""
    stored = report.get("mean_radius")
    if not isinstance(stored, dict):
        return None, None
    return _number(stored.get("mean")), _number(stored.get("signed_mean"))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def read_entry(path: str | Path, name: str | None = None) -> tuple[Entry, dict[str, Any]]:
    """One report as a comparison entry, with the report's dataset and norm fields; a one-line error naming the
    file when it is not a lipcert report."""
    found = _report_path(Path(path))
    try:
        report = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the report: {exc}", source=str(found)) from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise ConfigError(f"not a lipcert report (schema {REPORT_SCHEMA!r} expected)", source=str(found))
    try:
        eps = sorted(report["eps"], key=lambda e: e["eps"])
        bound = report["bound"]
        timings = report.get("timings", {})
        per_second = _number(timings.get("inference_images_per_second"))
        mean, signed = _mean_radii(report)
        entry = Entry(
            name=name or (found.parent.name if found.name == "report.json" else found.stem),
            path=str(found), model=str(report["model"]["path"]),
            clean_accuracy=float(report["clean_accuracy"]),
            certified={e["label"]: float(e["certified_accuracy"]) for e in eps},
            radii={e["label"]: float(e["eps"]) for e in eps},
            mean_radius=mean, signed_mean_radius=signed,
            lipschitz=_number(bound.get("value")), lipschitz_source=str(bound.get("method", "")),
            float_allowance=float(bound.get("error_base", 0.0)),
            seconds_per_image=1.0 / per_second if per_second else None,
            curve=[[float(r), float(a)] for r, a in report.get("curve", [])])
        dataset = report["dataset"]
        return entry, {"dataset": dataset.get("sha256") or dataset.get("path"),
                       "dataset_name": dataset.get("path"), "norm": report["norm"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the report lacks or mangles the field {exc}", source=str(found)) from None


def compare(paths: list[str | Path], out: str | Path | None = None) -> Comparison:
    """Read every report, check that they compare (same dataset, same norm), line up their radii, and write
    compare.md, compare.json and the plots to ``out`` when given."""
    if len(paths) < 1:
        raise ConfigError("nothing to compare: give report.json files or the folders that hold them",
                          parameter="reports")
    entries, seen = [], []
    names: set[str] = set()
    for path in paths:
        entry, facts = read_entry(path)
        base, k = entry.name, 2
        while entry.name in names:  # two runs from folders of the same name
            entry.name, k = f"{base} ({k})", k + 1
        names.add(entry.name)
        entries.append(entry)
        seen.append(facts)
    first = seen[0]
    for entry, facts in zip(entries[1:], seen[1:], strict=True):
        if facts["norm"] != first["norm"]:
            raise ConfigError(f"the reports use different norms ({first['norm']} in {entries[0].path}, "
                              f"{facts['norm']} here): their radii do not compare", source=entry.path)
        if facts["dataset"] != first["dataset"]:
            raise ConfigError(f"the reports are of different datasets ({first['dataset_name']} in "
                              f"{entries[0].path}, {facts['dataset_name']} here, by content hash): their "
                              "accuracies do not compare", source=entry.path)
    labels: dict[str, float] = {}
    for entry in entries:
        labels.update(entry.radii)
    ordered = sorted(labels, key=lambda label: labels[label])
    shared = [label for label in ordered if all(label in e.certified for e in entries)]
    unmatched = {label: [e.name for e in entries if label in e.certified] for label in ordered if label not in shared}
    result = Comparison(entries, str(first["dataset_name"]), str(first["norm"]), shared, unmatched)
    if out is not None:
        write(result, Path(out))
    return result


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number_text(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def table(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows), which the terminal and compare.md both show."""
    labels = result.radii + list(result.unmatched)
    header = ["model", "clean"] + [f"certified @ {label}" for label in labels] + [
        "mean radius", "signed mean radius", "Lipschitz bound", "bound source", "float allowance", "ms / image"]
    rows = []
    for e in result.entries:
        rows.append([e.name, _percent(e.clean_accuracy)] + [_percent(e.certified.get(label)) for label in labels]
                    + [_number_text(e.mean_radius), _number_text(e.signed_mean_radius),
                       _number_text(e.lipschitz, 7) if e.lipschitz is not None else "unbounded", e.lipschitz_source,
                       _number_text(e.float_allowance, 3),
                       _number_text(None if e.seconds_per_image is None else 1000 * e.seconds_per_image, 3)])
    return header, rows


def markdown(result: Comparison) -> str:
    """compare.md: the table, the radii not every report has, and the plots."""
    header, rows = table(result)
    lines = [f"# lipcert compare: {len(result.entries)} models on {result.dataset} ({result.norm.upper()})", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if result.unmatched:
        lines += ["", "Radii not in every report (not matched to a neighbour): " + "; ".join(
            f"{label} in {', '.join(names)}" for label, names in result.unmatched.items()) + "."]
    lines += ["", "Mean radius: the average certified radius, 0 for a wrong prediction; signed mean radius: the same "
              "with a wrong prediction's radius counted negative (for a one-logit model, E[y f(x)] / L); ms / image: "
              "the certification pass (inference, margins, radii), the attack left out.", "",
              f"![certified accuracy]({PLOTS['curves']})", "", f"![accuracy vs robustness]({PLOTS['scatter']})", "",
              f"![radar]({PLOTS['radar']})", ""]
    return "\n".join(lines)


PLOTS = {"curves": "compare_curves.png", "scatter": "compare_scatter.png", "radar": "compare_radar.png"}


def radar_axes(result: Comparison) -> tuple[list[str], list[list[float]]]:
    """The radar's axes and each entry's values on them, each axis scaled to [0, 1] by its largest value (time
    per image inverted, so that outward is better on every axis)."""
    axes = ["clean"] + [f"cert @ {label}" for label in result.radii] + ["mean radius", "speed"]
    raw = []
    for e in result.entries:
        speed = 1.0 / e.seconds_per_image if e.seconds_per_image else 0.0
        raw.append([e.clean_accuracy] + [e.certified[label] for label in result.radii]
                   + [max(e.mean_radius or 0.0, 0.0), speed])
    tops = [max((row[i] for row in raw), default=0.0) for i in range(len(axes))]
    return axes, [[v / t if t > 0 else 0.0 for v, t in zip(row, tops, strict=True)] for row in raw]


def figures(result: Comparison) -> dict[str, Any]:
    """The three plots as matplotlib figures, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, ax = plt.subplots(figsize=(7, 4.5))
    for e in result.entries:
        if e.curve:
            ax.plot([p[0] for p in e.curve], [p[1] for p in e.curve], label=e.name)
    for label in result.radii:
        ax.axvline(result.entries[0].radii[label], color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"{result.norm.upper()} radius (pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.set_title("certified accuracy vs radius")
    ax.legend(fontsize=8)
    scatter, sx = plt.subplots(figsize=(6, 4.5))
    for e in result.entries:
        if e.mean_radius is not None:
            sx.scatter([e.mean_radius], [e.clean_accuracy])
            sx.annotate(e.name, (e.mean_radius, e.clean_accuracy), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    sx.set_xlabel("mean certified radius")
    sx.set_ylabel("clean accuracy")
    sx.set_title("accuracy vs robustness")
    axes, values = radar_axes(result)
    radar = plt.figure(figsize=(6, 6))
    rx = radar.add_subplot(projection="polar")
    angles = [2 * math.pi * i / len(axes) for i in range(len(axes))] + [0.0]
    for e, row in zip(result.entries, values, strict=True):
        rx.plot(angles, row + row[:1], label=e.name)
        rx.fill(angles, row + row[:1], alpha=0.1)
    rx.set_xticks(angles[:-1], axes, fontsize=8)
    rx.set_ylim(0, 1)
    rx.set_title("each axis scaled by its best model")
    rx.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.25, -0.1))
    return {PLOTS["curves"]: curves, PLOTS["scatter"]: scatter, PLOTS["radar"]: radar}


def write(result: Comparison, out: Path) -> list[Path]:
    """compare.md, compare.json and the plots in ``out``, all or none."""
    import matplotlib.pyplot as plt

    files: dict[Path, bytes] = {out / "compare.md": markdown(result).encode(),
                                out / "compare.json": (json.dumps(result.to_json(), indent=2) + "\n").encode()}
    for name, fig in figures(result).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        files[out / name] = buf.getvalue()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder: {exc.strerror}", source=str(out)) from None
    write_files_atomic(files)
    return list(files)
