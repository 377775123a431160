"""The ``lipcert`` command line: a thin layer over the Python API.

Exit codes: 0 success (all gates pass), 1 a check failed, 2 bad input or configuration, 3 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .atomic import write_text_atomic
from .device import resolve_device
from .errors import ConfigError, LipcertError
from .inspect_model import summarize
from .loader import load_model
from .attack import AttackConfig
from .pipeline import certify
from .render import render_terminal, summary_line
from .verify import DEFAULT_TOL, PROVEN, VIOLATED, VerifyResult, verify as run_verify

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Certify the robustness of 1-Lipschitz neural networks from the exported model file.\n\n"
                       "Exit codes: 0 ok, 1 a check failed, 2 bad input or configuration, 3 internal error.")


def console(stderr: bool = False) -> Console:
    """A rich console; plain text when NO_COLOR is set or the stream is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 140
    return Console(stderr=stderr, no_color="NO_COLOR" in os.environ, highlight=False, width=width)


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``3,32,32`` -> (3, 32, 32): one sample's shape, without the batch dimension."""
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r}: expected integers like 3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"--input-shape {text!r}: expected positive integers like 3,32,32")
    return dims


def _shape_text(shape: Optional[list[int]]) -> str:
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"


ARCH = typer.Option(None, "--arch", help="architecture spec (JSON) for a .safetensors model")
ARCH_PY = typer.Option(None, "--arch-python", help="module:function returning a torch.nn.Module for a "
                                                   ".safetensors model (runs your code)")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="one sample's shape, e.g. 3,32,32 (for dynamic inputs)")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="model file (.onnx or .safetensors)"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Show the model's nodes, shapes and parameters, checked against onnxruntime."""
    graph = load_model(model, arch, arch_python=arch_python, input_shape=parse_shape(input_shape))
    summary = summarize(graph)
    if as_json:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
        return
    out = console()
    table = Table(title=f"{model}  (input {graph.input_name}: N x {' x '.join(map(str, graph.input_shape))})")
    for col in ("node", "op", "input shapes", "output shapes", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for row in summary.nodes:
        table.add_row(row.name, row.op, ", ".join(map(_shape_text, row.input_shapes)),
                      ", ".join(map(_shape_text, row.output_shapes)), f"{row.parameters:,}")
    out.print(table)
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(summary.op_counts.items()))
    out.print(f"{len(summary.nodes)} nodes, {summary.parameters:,} parameters; {ops}")
    if graph.crosscheck:
        cc = graph.crosscheck
        out.print(f"matches onnxruntime: max difference {cc.max_abs_diff:.3g} "
                  f"({cc.max_rel_diff:.3g} relative) on {cc.samples} random inputs")
    for note in graph.notes:
        out.print(f"note: {note}")


STATUS_STYLE = {"proven": "green", "violated": "bold red", "unproven": "yellow", "no rule": "yellow"}


def _num(value: Optional[float], digits: int = 7) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_verify(result: VerifyResult, out: Console) -> None:
    """The verify table and verdict, as a person reads them."""
    table = Table(title=f"{result.model}: is it {result.claimed:g}-Lipschitz (L2)?")
    for col in ("node", "op", "shape", "lower (power it.)", "upper", "method", "gap", "status"):
        table.add_column(col, justify="right" if col in ("lower (power it.)", "upper", "gap") else "left")
    for row in result.layers:
        shape = f"{_shape_text(row.in_shape)} -> {_shape_text(row.out_shape)}"
        status = row.status
        table.add_row(row.name, row.op, shape, _num(row.lower), _num(row.upper), row.upper_method,
                      "-" if row.gap is None else f"{row.gap:.1e}",
                      f"[{STATUS_STYLE[status]}]{status}[/]")
    out.print(table)
    for combo in result.combinations:
        out.print(f"{combo['node']} ({combo['op']}): bound {_num(combo['bound'])} by {combo['rule']}")
    verdict = result.status.upper()
    style = STATUS_STYLE[result.status]
    upper = "unbounded (an op has no rule)" if result.network_upper == float("inf") else _num(result.network_upper)
    out.print(f"network: upper bound {upper}, lower bound {_num(result.network_lower)} "
              f"({result.network_lower_method}); claim {result.claimed:g} ({result.claim_source}), "
              f"tolerance {result.tol:g}")
    for layer in result.breaking_layers:
        out.print(f"[bold red]breaks the claim:[/] {layer.name} ({layer.op}) has operator norm at least "
                  f"{layer.lower:.6g} > {result.claimed:g}")
    for name in result.no_rule:
        out.print(f"[yellow]no rule:[/] {name}: lipcert cannot bound this node, so the claim cannot be proven")
    if result.top_contributors:
        parts = ", ".join(f"{c['layer']} ({c['factor']:.4g})" for c in result.top_contributors)
        out.print(f"largest factors: {parts}")
    out.print(f"verdict: [{style}]{verdict}[/]  ({result.seconds:.1f} s)")


@app.command()
def verify(
    model: Path = typer.Argument(..., help="model file (.onnx or .safetensors)"),
    bound: Optional[float] = typer.Option(None, "--bound", help="the claimed Lipschitz bound (default: the "
                                          "model's lipcert.claimed_lipschitz metadata, else 1.0)"),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="relative tolerance on the claim"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON to this file"),
    seed: int = typer.Option(0, "--seed", help="random seed of power iteration and the empirical search"),
) -> None:
    """Check that the model is really L-Lipschitz: sound per-layer bounds on the exact operators.

    Exit code 0 when the claim is proven, 1 when it is violated or unproven, 2 on bad input.
    """
    graph = load_model(model, arch, arch_python=arch_python, input_shape=parse_shape(input_shape))
    result = run_verify(graph, bound, tol=tol, device=resolve_device(device), seed=seed)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result.to_dict(), indent=2) + "\n")
    render_verify(result, console())
    if result.status != PROVEN:
        raise typer.Exit(1)


def parse_floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    """``0.5,0.5,0.5`` -> [0.5, 0.5, 0.5]."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected numbers separated by commas") from None


def progress_bar(quiet: bool):
    """A rich progress bar on stderr, or None when quiet or not on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console(stderr=True), transient=True)


@app.command()
def report(
    model: Path = typer.Argument(..., help="model file (.onnx or .safetensors)"),
    data: Path = typer.Option(..., "--data", help="dataset: .npz, .safetensors, CIFAR batches folder, MNIST IDX "
                                                  "files or an image folder"),
    eps: str = typer.Option("36/255,72/255,108/255,1", "--eps", help="radii to certify, e.g. 36/255,72/255"),
    norm: str = typer.Option("l2", "--norm", help="l2 or linf (linf radii via ||d||_2 <= sqrt(d) ||d||_inf)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 256 on CPU, 1024 on GPU"),
    out: Path = typer.Option(Path("lipcert-report"), "--out", help="folder for the report files"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel mean of a normalisation outside the model"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel std of a normalisation outside the model"),
    lipschitz: Optional[float] = typer.Option(None, "--lipschitz", help="certify with this declared bound "
                                              "instead of lipcert's sound one (stated in the report)"),
    backend: str = typer.Option("auto", "--backend", help="auto, torch or onnxruntime"),
    layout: str = typer.Option("auto", "--layout", help="auto, NCHW or NHWC"),
    value_range: str = typer.Option("auto", "--value-range", help="auto, 0-255 or 0-1"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    attack: bool = typer.Option(True, "--attack/--no-attack", help="run the PGD sanity check (default on)"),
    attack_steps: int = typer.Option(50, "--attack-steps", help="PGD steps per restart"),
    attack_restarts: int = typer.Option(2, "--attack-restarts", help="PGD random restarts"),
    seed: int = typer.Option(0, "--seed", help="random seed of the attack"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the summary line"),
) -> None:
    """Certified accuracy versus radius on a dataset: report.json, report.md, samples.csv and a plot.

    With the PGD attack (on by default), exit code 1 when the attack breaks a certified point.
    """
    dev = resolve_device(device)
    if attack_steps < 1 or attack_restarts < 1:
        raise ConfigError("--attack-steps and --attack-restarts must be at least 1")
    graph = load_model(model, arch, arch_python=arch_python, input_shape=parse_shape(input_shape))
    bar = progress_bar(quiet)
    tasks: dict[str, int] = {}

    def started(phase: str, total: int) -> None:
        if bar is not None:
            bar.start()
            tasks[phase] = bar.add_task(phase, total=total)

    def advance(phase: str, n: int) -> None:
        if bar is not None and phase in tasks:
            bar.advance(tasks[phase], n)

    try:
        result = certify(graph, data, eps, norm=norm, device=dev,
                         batch_size=batch_size or (1024 if dev.startswith("cuda") else 256), backend=backend,
                         mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), lipschitz=lipschitz,
                         layout=layout, value_range=value_range, progress=advance, on_start=started,
                         attack=AttackConfig(steps=attack_steps, restarts=attack_restarts, norm=norm, seed=seed)
                         if attack else None)
    finally:
        if bar is not None:
            bar.stop()
    result.write(out)
    if quiet:
        print(summary_line(result))
    else:
        render_terminal(result, console())
        console().print(f"wrote {out}/report.json, report.md, samples.csv, certified_accuracy.png")
    if result.attack and result.attack["violation_count"]:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print lipcert's version."""
    print(__version__)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI and turn every failure into its documented exit code."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="lipcert")
    except LipcertError as exc:
        console(stderr=True).print(f"lipcert: error: {exc}", markup=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        exc.show()
        return 2
    except (typer.Abort, KeyboardInterrupt):
        console(stderr=True).print("lipcert: interrupted", markup=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        console(stderr=True).print(f"lipcert: internal error: {type(exc).__name__}: {exc} "
                                   "(please report this at the lipcert issue tracker with the command you ran)",
                                   markup=False, soft_wrap=True)
        return 3
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
