"""The verify table on a terminal and its Markdown (the GitHub step summary)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lipcert.bounds.results import PROVEN, VerifyResult

STATUS_STYLE = {"proven": "green", "violated": "bold red", "unproven": "yellow", "no rule": "yellow"}

def _num(value: float | None, digits: int = 7) -> str:
    return "-" if value is None else f"{value:.{digits}g}"



def shape_cell(shape: list[int] | None) -> str:
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
        shape = f"{shape_cell(row.in_shape)} -> {shape_cell(row.out_shape)}"
        table.add_row(row.name, row.op, shape, _num(row.lower), _num(row.upper), row.upper_method,
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

