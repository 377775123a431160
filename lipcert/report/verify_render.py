"""The verify table on a terminal and its Markdown (the GitHub step summary)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from lipcert.bounds.results import PROVEN, VerifyResult

STATUS_STYLE = {"proven": "green", "violated": "bold red", "unproven": "yellow", "no rule": "yellow"}
#: where a name may break across lines: after ``_ . : -`` or a space, before ``/`` (``onnx::`` stays whole)
_BREAKS = re.compile(r"(?<=[_.:\s-])(?!:)|(?=/)")
ELLIPSIS = "…"


def _shorten(piece: str, width: int) -> str:
    """``piece`` cut to ``width`` cells in its middle (``/encod…ection``): both ends of a name tell layers apart."""
    if cell_len(piece) <= width:
        return piece
    keep = max(width - 1, 0)
    head = (keep + 1) // 2
    return piece[:head] + ELLIPSIS + (piece[len(piece) - (keep - head):] if keep > head else "")


def wrap_name(name: str, width: int) -> list[str]:
    """``name`` on lines of at most ``width`` cells, broken only between its parts (``/block_1/`` + ``MatMul``),
    never inside one; a part wider than ``width`` is shortened in its middle with an ellipsis."""
    lines: list[str] = []
    line = ""
    for piece in (p for p in _BREAKS.split(name) if p):
        if line and cell_len(line + piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece.lstrip() if not line else piece
        if cell_len(line.rstrip()) > width:
            lines.append(_shorten(line.rstrip(), width))
            line = ""
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


class NameCell:
    """A table cell for a node name or an operator: rich folds long words at any character (``/conv1/Co`` +
    ``nv``); this cell wraps at the name's separators instead (see ``wrap_name``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        longest = max((cell_len(p.strip()) for p in _BREAKS.split(self.text)), default=0)
        return Measurement(longest, cell_len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        yield Text("\n".join(wrap_name(self.text, max(options.max_width, 1))), no_wrap=True, overflow="crop")


def _num(value: float | None, digits: int = 7) -> str:
    return "-" if value is None else f"{value:.{digits}g}"



def shape_cell(shape: list[int] | None) -> str:
    """``[1, 8, 8]`` -> ``1x8x8`` (``scalar`` for ``[]``, ``-`` when unknown)."""
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"



def render_verify(result: VerifyResult, out: Console) -> None:
    """The verify table and verdict, as a person reads them. The bounds, gap and status are never cut short;
    on a narrow terminal the node, op, shape and method columns take more lines first, names broken between
    their parts (``NameCell``)."""
    table = Table(title=f"{result.model}: is it {result.claimed:g}-Lipschitz (L2)?",
                  caption="lower: power iteration; upper: sound bound", padding=(0, 1), collapse_padding=True)
    for col in ("node", "op", "shape"):
        table.add_column(col, overflow="fold")  # a shape folds (1x8x8), a name breaks at separators
    for col in ("lower", "upper"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("method", overflow="fold")
    table.add_column("gap", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in result.layers:
        shape = f"{shape_cell(row.in_shape)} -> {shape_cell(row.out_shape)}"
        table.add_row(NameCell(row.name), NameCell(row.op), shape, _num(row.lower), _num(row.upper),
                      NameCell(row.upper_method),
                      "-" if row.gap is None else f"{row.gap:.1e}", f"[{STATUS_STYLE[row.status]}]{row.status}[/]")
    out.print(table)
    for combo in result.combinations:
        out.print(f"{combo['node']} ({combo['op']}): bound {_num(combo['bound'])} by {combo['rule']}")
    upper = ("unbounded (an operator has no rule)" if result.network_upper == float("inf")
             else _num(result.network_upper))
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
    if result.why:
        out.print(f"why: {result.why}", markup=False)
    if result.witness is not None and result.witness["file"]:
        out.print(f"witness: {result.witness['file']}: onnxruntime measures a ratio of {result.witness['ratio']:.6g} "
                  f"> {result.claimed:g} on this pair of float32 inputs", markup=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"verdict: [{STATUS_STYLE[result.status]}]{result.status.upper()}[/]  ({result.seconds:.1f} s)")



def verify_markdown(result: VerifyResult) -> str:
    """The verify verdict as Markdown, for a CI job summary."""
    upper = "unbounded" if result.network_upper == float("inf") else f"{result.network_upper:.6g}"
    lines = [f"## lipcert verify: `{Path(result.model).name}` is **{result.status.upper()}** "
             f"(claim {result.claimed:g}, {result.claim_source})", "",
             f"Network upper bound {upper}, empirical lower bound {result.network_lower:.6g}."
             + (f" Why: {result.why}." if result.why else ""), "",
             "| node | op | lower | upper | method | status |", "| --- | --- | ---: | ---: | --- | --- |"]
    for row in result.layers:
        lower = "-" if row.lower is None else f"{row.lower:.6g}"
        up = "-" if row.upper is None else f"{row.upper:.6g}"
        lines.append(f"| {row.name} | {row.op} | {lower} | {up} | {row.upper_method} | {row.status} |")
    if result.notes:
        lines += [""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"

