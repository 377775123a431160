"""Every output format of a ``Report``: JSON, Markdown, CSV, the plot and the terminal table."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from lipcert.atomic import write_bytes_atomic, write_files_atomic
from lipcert.errors import ConfigError

if TYPE_CHECKING:
    from lipcert.report.model import Report

FILES = ("report.json", "report.md", "samples.csv", "certified_accuracy.png")
#: the two radius kinds a report gives (``radii.Certificates``), by the name ``gate_on`` takes
#: the ``EpsResult.extra`` key of the local certificates' certified accuracy (with ``local``)
LOCAL = "certified (local)"
RADIUS_KINDS = {"float": "float32-safe", "exact": "exact arithmetic"}


def to_json(report: Report) -> str:
    return _json_text(report.to_dict())


def _json_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def summary_line(report: Report) -> str:
    """One line: clean accuracy and certified accuracy at each eps (float32-safe; exact in brackets)."""
    parts = [f"clean {_pct(report.clean_accuracy)}"]
    parts += [f"certified@{e.label} {_pct(e.certified_accuracy)}"
              + ("" if e.exact_certified_accuracy is None else f" (exact {_pct(e.exact_certified_accuracy)})")
              for e in report.eps]
    return ", ".join(parts)


def gate_on_text(report: Report) -> str:
    """Which radius kind the gates read, in words."""
    return f"gates read the {RADIUS_KINDS[report.gate_on]} radii (gate_on {report.gate_on})"


def mean_radius_text(report: Report) -> str:
    """The mean certified radius and the signed one (float32-safe, then exact), in words."""
    m, x = report.mean_radius, report.exact_mean_radius
    exact = "" if x is None else f"; exact {x.mean:.4g} (signed {x.signed_mean:.4g})"
    return f"mean certified radius {m.mean:.4g} (signed {m.signed_mean:.4g}){exact}"


CLAIM_NOTE = "LIPSCHITZ CLAIM NOT PROVEN"


def claim_text(report: Report) -> str:
    """The Lipschitz claim and what lipcert's bound says of it, e.g. ``claim 1 (model metadata): proven``."""
    b = report.bound
    if b.claimed is None:
        return "no Lipschitz claim declared"
    return f"claim {b.claimed:g} ({b.claim_source}): {'proven' if b.claim_proven else 'NOT PROVEN'}"


def _claim_warning(report: Report) -> str | None:
    return next((n for n in report.notes if n.startswith(CLAIM_NOTE)), None)


def claim_unproven(report: Report) -> str | None:
    """Why the certificates rest on a bound lipcert did not prove, or None: the model's Lipschitz claim is above
    lipcert's sound bound (the claim gate fails), or lipcert has no finite bound at all."""
    b = report.bound
    if not math.isfinite(b.computed_upper):
        return "no sound Lipschitz bound (an operator has no rule)"
    if b.claim_proven is False:
        return f"sound bound {b.computed_upper / b.normalisation_factor:.4g} > claim {b.claimed:g}"
    return None


def speed_text(report: Report) -> str:
    """Inference throughput over inference time alone (not the run's), then where the run's time went."""
    t = report.timings
    computed = report.num_samples - t.samples_read_back
    inference = (f"inference {t.inference_images_per_second:,.0f} samples/s ({computed} samples in "
                 f"{t.inference_seconds:.3g} s of inference)" if t.inference_seconds > 0 else "no inference run")
    parts = [f"bound {t.bound_seconds:.1f} s"] + ([f"attack {t.attack_seconds:.1f} s"] if report.attack else [])
    return f"{inference}; the whole run {t.total_seconds:.1f} s ({', '.join(parts)})"


#: one line on each certificate rule (``certification.radii``' rules, by how their names begin), in report.md
RULE_MEANING = {
    "sqrt(2)": "a sample's radius is its margin (top logit minus the runner-up) divided by sqrt(2) L",
    "per-pair": "per-pair rule: the margin to each other class j is divided by how fast that pair's logit "
                "difference can change (the bound of the layers before the last dense one times ||w_top - w_j||), "
                "the smallest over j is the radius, and the larger of that and the sqrt(2) radius is kept",
    "binary": "one logit s: the radius is |s| / L, the distance the logit needs to change sign",
}


def to_markdown(report: Report) -> str:
    """A summary a person reads, fit for a CI job summary."""
    b, d = report.bound, report.dataset
    warning = _claim_warning(report)
    lines = [
        f"## lipcert report: `{Path(report.model.path).name}`",
        "",
        *([f"> **{warning}**", ""] if warning else []),
        f"**{summary_line(report)}** on {report.num_samples} samples of `{d.path}` ({d.format})"
        + (f"; {report.skipped.count} unreadable or invalid samples skipped (listed in report.json), "
           "accuracies are over the samples evaluated." if report.skipped and report.skipped.count else "."),
        "",
        f"| {report.norm.upper()} radius eps | certified accuracy (float32-safe) | certified samples | "
        "certified accuracy (exact) | certified samples (exact) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for e in report.eps:
        exact = ("- | -" if e.exact_certified_accuracy is None
                 else f"{_pct(e.exact_certified_accuracy)} | {e.exact_certified}")
        lines.append(f"| {e.label} ({e.eps:.4g}) | {_pct(e.certified_accuracy)} | {e.certified} | {exact} |")
    lines += [
        "",
        "- Float32-safe radii hold for the deployed float32 model, rounding included; exact radii are the figure "
        f"papers print (the computed logits taken as exact); {gate_on_text(report)}.",
        f"- {mean_radius_text(report).capitalize()}: a wrong prediction counts 0 (signed: minus its radius).",
        f"- Lipschitz bound used: **{b.value:.6g}** ({b.method}); computed sound upper bound "
        f"{b.computed_upper:.6g}; {claim_text(report)}.",
        f"- Certificate rule: {b.rule}; floating-point error bound subtracted from every margin "
        f"({b.error_base:.2g} + {b.error_slope:.2g} x (||x|| + r)).",
        *[f"  ({meaning}.)" for start, meaning in RULE_MEANING.items() if b.rule.startswith(start)],
        f"- Radii are in pixel space ({d.value_range} input scaled to [0, 1], layout {d.layout})"
        + (f"; the input normalisation multiplies the bound by {b.normalisation_factor:.6g}."
           if b.normalisation_factor != 1.0 else "."),
    ]
    if report.norm == "linf":
        lines.append(f"- L-infinity radii come from the L2 ones by ||d||_2 <= sqrt({report.input_dim}) ||d||_inf.")
    if report.attack:
        a = report.attack
        lines += ["", f"- PGD attack: {a.summary}; step rule {a.step_rule}, seed {a.seed}.",
                  "  (Empirical robust accuracy: the share of samples predicted right that the attack did not break "
                  "within eps; an estimate from above of the true robust accuracy, so never below the certified "
                  "accuracy unless a certificate is wrong.)"]
        if a.median_gap is not None:
            lines += [f"- Median gap between attack radius and certified radius: {a.median_gap:.4g}.",
                      "  (Median gap: over the points the attack broke, the median of how far beyond its certified "
                      "radius the attack found an adversarial example: the robustness the certificate leaves "
                      "unproven; below 0 only if a certificate is wrong.)"]
        lines.append("- samples.csv: `attack_radius` is the distance of the adversarial example found (0 for a "
                     "wrong prediction); `attack_radius = inf` means the attack broke the point at none of the "
                     "radii tried: robust as far as the attack can tell, which proves nothing.")
        if a.violations:
            lines += ["", "**The model's Lipschitz claim or the certificate is wrong: the attack broke certified "
                          "points inside their certified radius.**", "",
                      "| sample | label | certified radius | eps | adversarial distance | class | logit true | "
                      "logit adversarial |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for v in a.violations[:50]:
                lines.append(f"| {v.index} | {v.label} | {v.certified_radius:.4g} | {v.eps:.4g} | "
                             f"{v.adversarial_distance:.4g} | {v.adversarial_class} | "
                             f"{v.logit_true:.4g} | {v.logit_adversarial:.4g} |")
    for note in report.notes:
        if note != warning:
            lines.append(f"- {note}")
    lines += ["", f"Timing: {speed_text(report)}.", "",
              f"Model sha256 `{report.model.sha256[:16]}…`, data sha256 `{d.sha256[:16]}…`, "
              f"device {report.device}, backend {report.backend}, lipcert {report.lipcert_version}.", ""]
    return "\n".join(lines)


def to_csv(report: Report) -> str:
    """One row per sample: index, label, prediction, margin, radius (float32-safe), exact_radius (+ any extra
    columns)."""
    s = report.samples
    columns = dict(s.columns)
    if s.exact_radii is not None:
        columns = {"exact_radius": s.exact_radii, **columns}
    extra = list(columns)
    buf = io.StringIO()
    buf.write(",".join(["index", "label", "prediction", "margin", "radius"] + extra) + "\n")
    cols = [s.labels.tolist(), s.predictions.tolist(), s.margins.tolist(), s.radii.tolist()]
    cols += [columns[c].tolist() for c in extra]
    indices = s.indices.tolist() if s.indices is not None else range(len(cols[0]))
    for i, row in zip(indices, zip(*cols, strict=False), strict=False):
        label, pred, margin, radius, *rest = row
        buf.write(",".join([str(i), str(label), str(pred), f"{margin:.9g}", f"{radius:.9g}"]
                           + [f"{v:.9g}" if isinstance(v, float) else str(v) for v in rest]) + "\n")
    return buf.getvalue()


def _place_labels(fig: Any, ax: Any, labels: list[Any], avoid: list[Any]) -> None:
    """Move each radius label (in order of radius) to the first spot beside its point that stays inside the
    axes and overlaps no label placed before it, nor anything in ``avoid`` (the legend)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [a.get_window_extent(renderer) for a in avoid]
    for label in labels:
        spots = [(dx, dy) for dy in (6, -14, 18, -26, 30, -38, 42, -50, 54, -62) for dx in (4, -4)]
        for dx, dy in spots:
            label.set_position((dx, dy))
            label.set_horizontalalignment("left" if dx > 0 else "right")
            box = label.get_window_extent(renderer)
            fits = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                break
        taken.append(label.get_window_extent(renderer))


UNPROVEN_COLOR = "red"


def figure(report: Report) -> Any:
    """The plot as a matplotlib figure: certified accuracy against radius with each requested radius marked and
    labelled, the attack's curve dashed, the distribution of the correct samples' radii shaded behind with the
    mean certified radius marked, (when the attack ran) the histogram of the attack's gaps, and a red "claim not
    proven" box and frame when the certificates rest on a bound lipcert did not prove (``claim_unproven``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    histogram = report.attack.gap_histogram if report.attack else None
    if histogram and histogram.counts:
        fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        edges = histogram.edges
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        hx.bar(edges[:-1], histogram.counts, width=widths, align="edge", color="tab:orange", alpha=0.7)
        hx.set_xlabel("attack radius - certified radius")
        hx.set_ylabel("samples")
        hx.yaxis.set_major_locator(MaxNLocator(integer=True))
        hx.set_title("gap per attacked point", pad=28)
        hx.text(0.5, 1.02, "how far beyond its certified radius PGD broke each point\n(never below 0 unless a "
                "certificate is wrong)", transform=hx.transAxes, ha="center", va="bottom", fontsize=8,
                color="dimgrey")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    radii = [p[0] for p in report.curve]
    accs = [100 * p[1] for p in report.curve]
    ax.plot(radii, accs, label="certified (float32-safe)", color="tab:blue")
    if report.exact_curve:
        ax.plot([p[0] for p in report.exact_curve], [100 * p[1] for p in report.exact_curve],
                label="certified (exact arithmetic)", color="tab:purple", linestyle="-.")
    local = sorted((e.eps, e.extra[LOCAL]) for e in report.eps if LOCAL in e.extra)
    if local:  # local radii are proven at the radii asked only: points there, joined
        ax.plot([p[0] for p in local], [100 * p[1] for p in local], "^-", label="certified (local, at the radii asked)",
                color="tab:brown", markersize=5, linewidth=1)
    attack_curve = report.attack.curve if report.attack else []
    if attack_curve:
        ax.plot([p[0] for p in attack_curve], [100 * p[1] for p in attack_curve], label="empirical (PGD)",
                color="tab:orange", linestyle="--")
    labels = []
    for e in sorted(report.eps, key=lambda e: e.eps):
        ax.axvline(e.eps, color="grey", linestyle=":", linewidth=1)
        ax.plot([e.eps], [100 * e.certified_accuracy], "o", color="tab:blue")
        labels.append(ax.annotate(f"{e.label}: {100 * e.certified_accuracy:.1f}%", (e.eps, 100 * e.certified_accuracy),
                                  textcoords="offset points", xytext=(4, 6), fontsize=8))
    # the useful range: up to the largest requested radius or the last radius that certifies anything
    certified_up_to = max((r for r, a in report.curve if a > 0), default=0.0)
    right = max([certified_up_to] + [e.eps for e in report.eps]) or 1.0
    ax.set_xlim(0, right * 1.08)
    _radius_distribution(ax, report, right * 1.08)
    ax.set_xlabel(f"{report.norm.upper()} radius (pixel space)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{Path(report.model.path).name}: certified accuracy vs radius", pad=18)
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="lower left")
    unproven = claim_unproven(report)
    avoid = [legend]
    if unproven:
        avoid.append(ax.text(0.98, 0.97, f"claim not proven: {unproven}", transform=ax.transAxes, ha="right", va="top",
                color=UNPROVEN_COLOR, fontsize=9, fontweight="bold", zorder=10,
                bbox={"facecolor": "white", "edgecolor": UNPROVEN_COLOR, "boxstyle": "round"}))
        for spine in ax.spines.values():
            spine.set_edgecolor(UNPROVEN_COLOR)
    fig.tight_layout()
    box = ax.get_position()  # the rule under the title, in the room its pad leaves
    fig.text((box.x0 + box.x1) / 2, box.y1 + 0.01, f"certificate rule: {report.bound.rule}", ha="center",
             va="bottom", fontsize=8, color="dimgrey")
    _place_labels(fig, ax, labels, avoid)
    return fig


def _radius_distribution(ax: Any, report: Report, right: float) -> None:
    """Behind the curve: a histogram of the correctly predicted samples' certified radii (on a second axis;
    radii beyond the plot in its last bin), and the mean certified radius as a vertical line."""
    import torch

    s = report.samples
    radii = s.radii.double()[(s.predictions == s.labels) & torch.isfinite(s.radii)]
    if radii.numel():
        dx = ax.twinx()
        dx.hist(radii.clamp(max=right).numpy(), bins=40, range=(0, right), color="tab:blue", alpha=0.15)
        dx.set_ylabel("correct samples per radius bin", color="dimgrey", fontsize=8)
        ax.set_zorder(dx.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.axvline(report.mean_radius.mean, color="tab:green", linestyle="--", linewidth=1,
               label=f"mean certified radius {report.mean_radius.mean:.3g}")


def plot_png(report: Report) -> bytes:
    """The plot (see ``figure``) as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot(report: Report, path: str | Path) -> None:
    write_bytes_atomic(path, plot_png(report))


@dataclass(frozen=True)
class Rendering:
    """A report rendered once in every file format: what ``write_all`` writes, and what the CLI prints and writes
    from (the JSON document, with its ``passed`` key, and the Markdown of a CI job summary)."""

    document: dict[str, Any]  # report.json's content (``Report.to_dict``)
    json: str
    markdown: str
    csv: str
    png: bytes

    def files(self) -> dict[str, bytes]:
        """Each of ``FILES`` by name, as bytes."""
        return {"report.json": self.json.encode(), "report.md": self.markdown.encode(),
                "samples.csv": self.csv.encode(), "certified_accuracy.png": self.png}


def render_all(report: Report) -> Rendering:
    """The report in every file format."""
    document = report.to_dict()
    return Rendering(document, _json_text(document), to_markdown(report), to_csv(report), plot_png(report))


def write_all(report: Report, out_dir: Path) -> Rendering:
    """Render every file (``render_all``), write each to a temporary name, then rename them all into place: a
    failure while rendering or writing leaves the previous report as it was. The rendering written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out {out_dir} exists and is not a folder", parameter="out")
    rendering = render_all(report)
    contents = rendering.files()
    write_files_atomic({out_dir / name: contents[name] for name in FILES})
    return rendering


def render_terminal(report: Report, out: Console) -> None:
    """The summary as a rich table, a claim lipcert cannot prove first and in red."""
    warning = _claim_warning(report)
    if warning:
        out.print(f"[bold red]{CLAIM_NOTE}:[/] " + warning[len(CLAIM_NOTE) + 2:])
    table = Table(title=f"{report.model.path} on {report.dataset.path} ({report.num_samples} samples)")
    table.add_column(f"{report.norm.upper()} eps")
    table.add_column("certified accuracy (float32-safe)", justify="right")
    table.add_column("certified", justify="right")
    table.add_column("certified accuracy (exact)", justify="right")
    for key in (report.eps[0].extra if report.eps else {}):
        table.add_column(key, justify="right")
    for e in report.eps:
        extra = [f"{100 * v:.2f}%" if isinstance(v, float) else str(v) for v in e.extra.values()]
        exact = "-" if e.exact_certified_accuracy is None else _pct(e.exact_certified_accuracy)
        table.add_row(f"{e.label} ({e.eps:.4g})", _pct(e.certified_accuracy), str(e.certified), exact, *extra)
    out.print(table)
    out.print(f"float32-safe radii hold for the deployed float32 model; exact radii are the figure papers print; "
              f"{gate_on_text(report)}")
    b = report.bound
    out.print(f"clean accuracy {_pct(report.clean_accuracy)}; {mean_radius_text(report)}; Lipschitz bound "
              f"{b.value:.6g} ({b.method}); {claim_text(report)}; rule: {b.rule}")
    d = report.dataset
    out.print(f"data: {d.format}, layout {d.layout}, {d.value_range}; backend {report.backend} on {report.device}; "
              f"{speed_text(report)}")
    if report.skipped and report.skipped.count:
        first = report.skipped.samples[0]
        out.print(f"skipped {report.skipped.count} unreadable or invalid sample(s), accuracies over the "
                  f"{report.skipped.evaluated} evaluated; first: sample {first.index}: {first.reason}",
                  markup=False)
    if report.attack:
        out.print(f"attack: {report.attack.summary}")
        for v in report.attack.violations[:20]:
            out.print(f"[bold red]violation:[/] sample {v.index} certified at {v.certified_radius:.4g}, "
                      f"broken at distance {v.adversarial_distance:.4g} (class {v.adversarial_class})")
    for note in report.notes:
        if note != warning:
            out.print(f"note: {note}", markup=False)
