"""Every output format of a ``Report`` (JSON, Markdown, CSV, the plot, the terminal table), the verify table, and
the progress of a run on stderr (rich bars on a terminal, log lines elsewhere)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from .atomic import write_bytes_atomic, write_files_atomic
from .errors import ConfigError
from .pipeline import Progress
from .report import Report
from .verify import PROVEN, VerifyResult

FILES = ("report.json", "report.md", "samples.csv", "certified_accuracy.png")
#: log lines (stderr not a terminal): a phase gets its first line after this many seconds, then one as often
LOG_INTERVAL = 10.0
#: how often the log writer looks at the running phases, in seconds
LOG_TICK = 1.0


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def summary_line(report: Report) -> str:
    """One line: clean accuracy and certified accuracy at each eps."""
    parts = [f"clean {_pct(report.clean_accuracy)}"]
    parts += [f"certified@{e.label} {_pct(e.certified_accuracy)}" for e in report.eps]
    return ", ".join(parts)


CLAIM_NOTE = "LIPSCHITZ CLAIM NOT PROVEN"


def claim_text(report: Report) -> str:
    """The Lipschitz claim and what lipcert's bound says of it, e.g. ``claim 1 (model metadata): proven``."""
    b = report.bound
    if b.get("claimed") is None:
        return "no Lipschitz claim declared"
    return f"claim {b['claimed']:g} ({b['claim_source']}): {'proven' if b['claim_proven'] else 'NOT PROVEN'}"


def _claim_warning(report: Report) -> str | None:
    return next((n for n in report.notes if n.startswith(CLAIM_NOTE)), None)


def _speed(report: Report) -> str:
    t = report.timings
    return (f"{t.get('images_per_second', 0):.1f} samples/s over the whole run "
            f"({t.get('inference_images_per_second', 0):.0f}/s inference alone)")


def to_markdown(report: Report) -> str:
    """A summary a person reads, fit for a CI job summary."""
    b, d = report.bound, report.dataset
    warning = _claim_warning(report)
    lines = [
        f"## lipcert report: `{Path(report.model['path']).name}`",
        "",
        *([f"> **{warning}**", ""] if warning else []),
        f"**{summary_line(report)}** on {report.num_samples} samples of `{d['path']}` ({d['format']})"
        + (f"; {report.skipped['count']} unreadable or invalid samples skipped (listed in report.json), "
           "accuracies are over the samples evaluated." if report.skipped and report.skipped["count"] else "."),
        "",
        f"| {report.norm.upper()} radius eps | certified accuracy | certified samples |",
        "| --- | ---: | ---: |",
    ]
    for e in report.eps:
        lines.append(f"| {e.label} ({e.eps:.4g}) | {_pct(e.certified_accuracy)} | {e.certified} |")
    lines += [
        "",
        f"- Lipschitz bound used: **{b['value']:.6g}** ({b['method']}); computed sound upper bound "
        f"{b['computed_upper']:.6g}; {claim_text(report)}.",
        f"- Certificate rule: {b['rule']}; floating-point error bound subtracted from every margin "
        f"({b['error_base']:.2g} + {b['error_slope']:.2g} x (||x|| + r)).",
        f"- Radii are in pixel space ({d['value_range']} input scaled to [0, 1], layout {d['layout']})"
        + (f"; the input normalisation multiplies the bound by {b['normalisation_factor']:.6g}."
           if b["normalisation_factor"] != 1.0 else "."),
    ]
    if report.norm == "linf":
        lines.append(f"- L-infinity radii come from the L2 ones by ||d||_2 <= sqrt({report.input_dim}) ||d||_inf.")
    if report.attack:
        a = report.attack
        lines += ["", f"- PGD attack: {a['summary']}; step rule {a['step_rule']}, seed {a['seed']}."]
        if a.get("median_gap") is not None:
            lines.append(f"- Median gap between attack radius and certified radius: {a['median_gap']:.4g}.")
        if a["violations"]:
            lines += ["", "**The model's Lipschitz claim or the certificate is wrong: the attack broke certified "
                          "points inside their certified radius.**", "",
                      "| sample | label | certified radius | eps | adversarial distance | class | logit true | "
                      "logit adversarial |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for v in a["violations"][:50]:
                lines.append(f"| {v['index']} | {v['label']} | {v['certified_radius']:.4g} | {v['eps']:.4g} | "
                             f"{v['adversarial_distance']:.4g} | {v['adversarial_class']} | "
                             f"{v['logit_true']:.4g} | {v['logit_adversarial']:.4g} |")
    for note in report.notes:
        if note != warning:
            lines.append(f"- {note}")
    lines += ["", f"Model sha256 `{report.model['sha256'][:16]}…`, data sha256 `{d['sha256'][:16]}…`, "
                  f"device {report.device}, backend {report.backend}, {_speed(report)}, "
                  f"lipcert {report.lipcert_version}.", ""]
    return "\n".join(lines)


def to_csv(report: Report) -> str:
    """One row per sample: index, label, prediction, margin, radius (+ any extra columns)."""
    s = report.samples
    extra = list(s.columns)
    buf = io.StringIO()
    buf.write(",".join(["index", "label", "prediction", "margin", "radius"] + extra) + "\n")
    cols = [s.labels.tolist(), s.predictions.tolist(), s.margins.tolist(), s.radii.tolist()]
    cols += [s.columns[c].tolist() for c in extra]
    indices = s.indices.tolist() if s.indices is not None else range(len(cols[0]))
    for i, row in zip(indices, zip(*cols)):
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


def figure(report: Report) -> Any:
    """The plot as a matplotlib figure: certified accuracy against radius with each requested radius marked and
    labelled, the attack's curve dashed, and (when the attack ran) the histogram of its gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    histogram = (report.attack or {}).get("gap_histogram") or {}
    if histogram.get("counts"):
        fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        edges = histogram["edges"]
        hx.bar(edges[:-1], histogram["counts"], width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
               color="tab:orange", alpha=0.7)
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
    ax.plot(radii, accs, label="certified", color="tab:blue")
    attack_curve = (report.attack or {}).get("curve") or []
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
    ax.set_xlabel(f"{report.norm.upper()} radius (pixel space)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{Path(report.model['path']).name}: certified accuracy vs radius")
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="lower left")
    fig.tight_layout()
    _place_labels(fig, ax, labels, [legend])
    return fig


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


def write_all(report: Report, out_dir: Path) -> list[Path]:
    """Render every file, write each to a temporary name, then rename them all into place: a failure while
    rendering or writing leaves the previous report as it was."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    contents = {
        "report.json": to_json(report).encode(),
        "report.md": to_markdown(report).encode(),
        "samples.csv": to_csv(report).encode(),
        "certified_accuracy.png": plot_png(report),
    }
    write_files_atomic({out_dir / name: contents[name] for name in FILES})
    return [out_dir / name for name in FILES]


def render_terminal(report: Report, out: Console) -> None:
    """The summary as a rich table, a claim lipcert cannot prove first and in red."""
    warning = _claim_warning(report)
    if warning:
        out.print(f"[bold red]{CLAIM_NOTE}:[/] " + warning[len(CLAIM_NOTE) + 2:])
    table = Table(title=f"{report.model['path']} on {report.dataset['path']} ({report.num_samples} samples)")
    table.add_column(f"{report.norm.upper()} eps")
    table.add_column("certified accuracy", justify="right")
    table.add_column("certified", justify="right")
    for key in (report.eps[0].extra if report.eps else {}):
        table.add_column(key, justify="right")
    for e in report.eps:
        extra = [f"{100 * v:.2f}%" if isinstance(v, float) else str(v) for v in e.extra.values()]
        table.add_row(f"{e.label} ({e.eps:.4g})", _pct(e.certified_accuracy), str(e.certified), *extra)
    out.print(table)
    b = report.bound
    out.print(f"clean accuracy {_pct(report.clean_accuracy)}; Lipschitz bound {b['value']:.6g} ({b['method']}); "
              f"{claim_text(report)}; rule: {b['rule']}")
    out.print(f"data: {report.dataset['format']}, layout {report.dataset['layout']}, "
              f"{report.dataset['value_range']}; backend {report.backend} on {report.device}, {_speed(report)}")
    if report.skipped and report.skipped["count"]:
        first = report.skipped["samples"][0]
        out.print(f"skipped {report.skipped['count']} unreadable or invalid sample(s), accuracies over the "
                  f"{report.skipped['evaluated']} evaluated; first: sample {first['index']}: {first['reason']}",
                  markup=False)
    if report.attack:
        out.print(f"attack: {report.attack['summary']}")
        for v in report.attack["violations"][:20]:
            out.print(f"[bold red]violation:[/] sample {v['index']} certified at {v['certified_radius']:.4g}, "
                      f"broken at distance {v['adversarial_distance']:.4g} (class {v['adversarial_class']})")
    for note in report.notes:
        if note != warning:
            out.print(f"note: {note}", markup=False)


STATUS_STYLE = {"proven": "green", "violated": "bold red", "unproven": "yellow", "no rule": "yellow"}


def _num(value: float | None, digits: int = 7) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def shape_text(shape: list[int] | None) -> str:
    """``[1, 8, 8]`` -> ``1x8x8`` (``scalar`` for ``[]``, ``-`` when unknown)."""
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"


def render_verify(result: VerifyResult, out: Console) -> None:
    """The verify table and verdict, as a person reads them. The bounds, gap and status are never cut short;
    on a narrow terminal the node, op, shape and method columns fold onto more lines first."""
    table = Table(title=f"{result.model}: is it {result.claimed:g}-Lipschitz (L2)?",
                  caption="lower: power iteration; upper: sound bound", padding=(0, 1), collapse_padding=True)
    for col in ("node", "op", "shape"):
        table.add_column(col, overflow="fold")
    for col in ("lower", "upper"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("method", overflow="fold")
    table.add_column("gap", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in result.layers:
        shape = f"{shape_text(row.in_shape)} -> {shape_text(row.out_shape)}"
        table.add_row(row.name, row.op, shape, _num(row.lower), _num(row.upper), row.upper_method,
                      "-" if row.gap is None else f"{row.gap:.1e}", f"[{STATUS_STYLE[row.status]}]{row.status}[/]")
    out.print(table)
    for combo in result.combinations:
        out.print(f"{combo['node']} ({combo['op']}): bound {_num(combo['bound'])} by {combo['rule']}")
    upper = "unbounded (an op has no rule)" if result.network_upper == float("inf") else _num(result.network_upper)
    out.print(f"network: upper bound {upper}, lower bound {_num(result.network_lower)} "
              f"({result.network_lower_method}); claim {result.claimed:g} ({result.claim_source}), "
              f"tolerance {result.tol:g}")
    for layer in result.breaking_layers:
        out.print(f"[bold red]breaks the claim:[/] {layer.name} ({layer.op}) has operator norm at least "
                  f"{layer.lower:.6g} > {result.claimed:g}")
    if result.status == PROVEN:
        for layer in result.layers_above:
            out.print(f"note: {layer.name} ({layer.op}) has operator norm at least {layer.lower:.6g} > "
                      f"{result.claimed:g} on its own; other layers compensate, and the network bound holds")
    for name in result.no_rule:
        out.print(f"[yellow]no rule:[/] {name}: lipcert cannot bound this node, so the claim cannot be proven")
    if result.top_contributors:
        parts = ", ".join(f"{c['layer']} ({c['factor']:.4g})" for c in result.top_contributors)
        out.print(f"largest factors: {parts}")
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"verdict: [{STATUS_STYLE[result.status]}]{result.status.upper()}[/]  ({result.seconds:.1f} s)")


def verify_markdown(result: VerifyResult) -> str:
    """The verify verdict as Markdown, for a CI job summary."""
    upper = "unbounded" if result.network_upper == float("inf") else f"{result.network_upper:.6g}"
    lines = [f"## lipcert verify: `{Path(result.model).name}` is **{result.status.upper()}** "
             f"(claim {result.claimed:g}, {result.claim_source})", "",
             f"Network upper bound {upper}, empirical lower bound {result.network_lower:.6g}.", "",
             "| node | op | lower | upper | method | status |", "| --- | --- | ---: | ---: | --- | --- |"]
    for row in result.layers:
        lower = "-" if row.lower is None else f"{row.lower:.6g}"
        up = "-" if row.upper is None else f"{row.upper:.6g}"
        lines.append(f"| {row.name} | {row.op} | {lower} | {up} | {row.upper_method} | {row.status} |")
    if result.notes:
        lines += [""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    """``75.3`` -> ``1 min 15 s``; ``4.21`` -> ``4.2 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


class _Count(ProgressColumn):
    """``123/540 samples``; nothing for a phase of unknown length."""

    def render(self, task: Any) -> Text:
        return Text(f"{int(task.completed)}/{int(task.total)} samples" if task.fields["counted"] else "")


class _Rate(ProgressColumn):
    """Samples per second over the last half minute."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.fields["counted"] and task.speed else "")


class _Left(ProgressColumn):
    """``about 3 min 10 s left``, from the recent speed, on the phase that ends last (see ``BarProgress``)."""

    def render(self, task: Any) -> Text:
        left = task.time_remaining
        return Text(f"about {duration(left)} left" if task.fields["last"] and not task.finished
                    and left is not None else "")


class BarProgress(Progress):
    """Progress bars on a terminal: one row per phase with its count, speed and elapsed time. The time left is
    shown on the counted phase started last: phases that run together (inference feeds the attack, batch by
    batch) end together, at the pace of the last one. The rows stay on the screen when the run ends or is
    interrupted."""

    def __init__(self, console: Console) -> None:
        self.bars = RichProgress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
                                 BarColumn(), _Count(), _Rate(), TimeElapsedColumn(), _Left(), console=console,
                                 refresh_per_second=4)
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: float | None = None, done: float = 0.0) -> None:
        if not self.tasks:
            self.bars.start()
        if total is not None:
            for task in self.bars.tasks:
                self.bars.update(task.id, last=False)
        self.tasks[phase] = self.bars.add_task(phase, total=total, completed=done, counted=total is not None,
                                               last=total is not None)

    def advance(self, phase: str, amount: float) -> None:
        self.bars.advance(self.tasks[phase], amount)

    def end(self, phase: str) -> None:
        task = self.tasks[phase]
        total = next(t.total for t in self.bars.tasks if t.id == task)
        self.bars.update(task, total=total or 1, completed=total or 1)
        self.bars.stop_task(task)

    def note(self, text: str) -> None:
        self.bars.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.bars.stop()


class _Phase:
    """One phase as the log writer follows it."""

    def __init__(self, total: float | None, done: float) -> None:
        self.total, self.done, self.base = total, done, done
        self.began = self.last = time.monotonic()
        self.printed = False


class LogProgress(Progress):
    """Progress as plain lines on a stream that is not a terminal (a CI log): a phase that has run for
    ``LOG_INTERVAL`` seconds gets a line (count, speed, and on the counted phase started last the time left, as
    for ``BarProgress``), then one every ``LOG_INTERVAL`` seconds, and a closing line; phases shorter than that
    print nothing."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.phases = stream, {}
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _line(self, text: str) -> None:
        self.stream.write(f"lipcert: {text}\n")
        self.stream.flush()

    def _status(self, name: str, p: _Phase, now: float, last: bool) -> str:
        elapsed = now - p.began
        if p.total is None:
            return f"{name}: {duration(elapsed)} so far"
        rate = (p.done - p.base) / elapsed if elapsed > 0 else 0.0
        left = f", about {duration((p.total - p.done) / rate)} left" if rate > 0 and last else ""
        share = f" ({100 * p.done / p.total:.1f}%)" if p.total else ""
        return f"{name}: {p.done:.0f}/{p.total:.0f} samples{share}, {rate:.1f} samples/s{left}"

    def _watch(self) -> None:
        while not self.stopped.wait(LOG_TICK):
            with self.lock:
                now = time.monotonic()
                last = [name for name, p in self.phases.items() if p.total is not None][-1:]
                for name, p in list(self.phases.items()):
                    if now - p.last >= LOG_INTERVAL:
                        self._line(self._status(name, p, now, [name] == last))
                        p.last, p.printed = now, True

    def start(self, phase: str, total: float | None = None, done: float = 0.0) -> None:
        with self.lock:
            self.phases[phase] = _Phase(total, done)

    def advance(self, phase: str, amount: float) -> None:
        with self.lock:
            self.phases[phase].done += amount

    def end(self, phase: str) -> None:
        with self.lock:
            p = self.phases.pop(phase)
            elapsed = time.monotonic() - p.began
            if not p.printed and elapsed < LOG_INTERVAL:
                return
            if p.total is None:
                self._line(f"{phase}: done in {duration(elapsed)}")
            else:
                count = p.done - p.base
                self._line(f"{phase}: done, {count:.0f} samples in {duration(elapsed)} "
                           f"({count / elapsed if elapsed > 0 else 0.0:.1f} samples/s)")

    def note(self, text: str) -> None:
        with self.lock:
            self._line(text)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


def progress_for(quiet: bool, console: Console) -> Progress:
    """Progress on stderr: nothing when ``quiet``, bars on a terminal, log lines elsewhere."""
    if quiet:
        return Progress()
    if console.is_terminal:
        return BarProgress(console)
    return LogProgress(console.file)
