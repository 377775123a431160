"""The ``lipcert`` command line: a thin layer over the Python API.

Exit codes: 0 success (all gates pass), 1 a check failed, 2 bad input or configuration, 3 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .atomic import write_text_atomic
from .device import resolve_device
from .errors import ConfigError, LipcertError
from .limits import DEFAULT_MAX_ELEMENTS, ENV_VAR
from .inspect_model import summarize
from .loader import load_model
from .attack import PRECISIONS, AttackConfig
from .checkpoint import clear as clear_checkpoint
from .config import load_config
from .distributed import current_world, join, leave
from .gates import (Gate, gates_markdown, junit_xml, load_baseline, parse_min_certified, report_gates,
                    verify_gates)
from .pipeline import certify
from .render import render_terminal, summary_line, verify_markdown
from .report import parse_eps
from .verify import DEFAULT_TOL, PROVEN, VerifyResult, verify as run_verify

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
MAX_ELEMENTS = typer.Option(None, "--max-elements", metavar="N",
                            help="largest stored tensor, intermediate value or dataset sample, in elements; a "
                                 "file asking for more is refused before anything is allocated (default "
                                 f"${ENV_VAR}, else {DEFAULT_MAX_ELEMENTS:,} = 2**28)")


def parse_max_elements(value: object) -> Optional[int]:
    """``--max-elements`` (or the config's ``max_elements``) as a positive int; None leaves the default."""
    if value is None:
        return None
    text = str(value).strip().replace("_", "")
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"--max-elements {value!r}: expected a positive whole number of elements")
    return int(text)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="model file (.onnx or .safetensors)"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
) -> None:
    """Show the model's nodes, shapes and parameters, checked against onnxruntime."""
    graph = load_model(model, arch, arch_python=arch_python, input_shape=parse_shape(input_shape),
                       max_elements=parse_max_elements(max_elements))
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
    out.print(f"verdict: [{style}]{verdict}[/]  ({result.seconds:.1f} s)")


class Settings:
    """Flags given on the command line, over the config file, over the defaults."""

    def __init__(self, command: str, flags: dict, config: Optional[Path]) -> None:
        given = {k: v for k, v in flags.items() if v is not None}
        self.values = {**load_config(command, config), **given}
        self.from_config = set(self.values) - set(given)

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def path(self, key: str) -> Optional[Path]:
        value = self.values.get(key)
        return None if value is None else Path(value)


def _check_format(fmt: str) -> None:
    if fmt not in ("text", "json"):
        raise ConfigError(f"--format {fmt!r}: expected text or json")


def finish(command: str, gates: list[Gate], data: dict, markdown: str, verdict: str, s: Settings,
           render: Callable[[Console], None], seconds: float) -> None:
    """Write the machine-readable outputs, print the human ones, and exit 1 when any gate failed."""
    failed = [g for g in gates if not g.passed]
    data = {**data, "gates": [g.to_dict() for g in gates], "passed": not failed}
    if s.get("junit"):
        write_text_atomic(s.path("junit"), junit_xml(command, gates, seconds))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(markdown + "\n" + gates_markdown(gates) + "\n")
    line = f"{verdict}: {'all gates pass' if not failed else f'{len(failed)} gate(s) failed'}"
    if s.get("format", "text") == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif s.get("quiet"):
        print(line)
    else:
        out = console()
        render(out)
        for g in failed:
            out.print(f"[bold red]FAILED[/] {g.name}: measured {g.measured}, required {g.required}"
                      + (f" ({g.message})" if g.message else ""))
        out.print(line)
    if failed:
        raise typer.Exit(1)


CONFIG = typer.Option(None, "--config", help="settings file (default: ./lipcert.toml or [tool.lipcert] in "
                                             "./pyproject.toml)")
FORMAT = typer.Option(None, "--format", help="text (default) or json: the result as JSON on stdout, nothing else")
JUNIT = typer.Option(None, "--junit", help="write JUnit XML, one test case per gate")
QUIET = typer.Option(None, "--quiet", "-q", help="print only the verdict line")
MAX_LIP = typer.Option(None, "--max-lipschitz", help="gate: fail when the Lipschitz bound is above this")


@app.command()
def verify(
    model: Optional[Path] = typer.Argument(None, help="model file (.onnx or .safetensors); or set it in the config"),
    bound: Optional[float] = typer.Option(None, "--bound", help="the claimed Lipschitz bound (default: the "
                                          "model's lipcert.claimed_lipschitz metadata, else 1.0)"),
    tol: Optional[float] = typer.Option(None, "--tol", help=f"relative tolerance on the claim (default {DEFAULT_TOL})"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON to this file"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed of power iteration and the search"),
    require: Optional[str] = typer.Option(None, "--require", help="gate: proven (default) or not-violated"),
    max_lipschitz: Optional[float] = MAX_LIP,
    junit: Optional[Path] = JUNIT,
    fmt: Optional[str] = FORMAT,
    quiet: Optional[bool] = QUIET,
    config: Optional[Path] = CONFIG,
) -> None:
    """Check that the model is really L-Lipschitz: sound per-layer bounds on the exact operators.

    Exit code 0 when the claim is proven (and every gate passes), 1 when a gate fails (the claim violated or
    unproven), 2 on bad input or configuration, 3 on an internal error.
    """
    s = Settings("verify", dict(model=model, bound=bound, tol=tol, arch=arch, arch_python=arch_python,
                                input_shape=input_shape, device=device, json=json_out, seed=seed, require=require,
                                max_lipschitz=max_lipschitz, max_elements=max_elements, junit=junit, format=fmt,
                                quiet=quiet), config)
    _check_format(s.get("format", "text"))
    if s.get("model") is None:
        raise ConfigError("no model given: pass MODEL or set model in the config file")
    limit = parse_max_elements(s.get("max_elements"))
    graph = load_model(s.path("model"), s.path("arch"), arch_python=s.get("arch_python"),
                       input_shape=parse_shape(s.get("input_shape")), max_elements=limit)
    result = run_verify(graph, s.get("bound"), tol=float(s.get("tol", DEFAULT_TOL)),
                        device=resolve_device(s.get("device", "auto")), seed=int(s.get("seed", 0)))
    if "bound" in s.from_config:
        result.claim_source = "bound in the config file"
    if s.get("json"):
        write_text_atomic(s.path("json"), json.dumps(result.to_dict(), indent=2) + "\n")
    gates = verify_gates(result, require=s.get("require", "proven"), max_lipschitz=s.get("max_lipschitz"))
    finish("verify", gates, result.to_dict(), verify_markdown(result), f"verdict: {result.status.upper()}", s,
           lambda out: render_verify(result, out), result.seconds)


def parse_floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    """``0.5,0.5,0.5`` (or a list from the config) -> [0.5, 0.5, 0.5]."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = ",".join(str(v) for v in text)
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected numbers separated by commas") from None


def progress_bar(quiet: bool):
    """A rich progress bar on stderr, or None when quiet or not on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console(stderr=True), transient=True)


def relaunch(launcher: str, processes: int) -> int:
    """Run this same command again under torchrun with ``processes`` processes; its exit code."""
    import subprocess

    if launcher != "torchrun":
        raise ConfigError(f"--launcher {launcher!r}: only torchrun is supported")
    if processes < 1:
        raise ConfigError("--gpus must be at least 1")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--gpus"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--gpus=")):
            continue
        args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "lipcert", *args]
    return subprocess.call(cmd)


def _eps_with_gates(eps: str, min_certified: list[tuple[str, float, float]]) -> str:
    """The requested radii plus every radius a --min-certified-acc gate names."""
    values = [v for _, v in parse_eps(eps)]
    extra = [label for label, value, _ in min_certified if not any(abs(value - v) <= 1e-12 for v in values)]
    return ",".join([eps] + extra)


@app.command()
def report(
    model: Optional[Path] = typer.Argument(None, help="model file (.onnx or .safetensors); or set it in the config"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset: .npz, .safetensors, CIFAR batches folder, "
                                                             "MNIST IDX files or an image folder"),
    eps: Optional[str] = typer.Option(None, "--eps", help="radii to certify (default 36/255,72/255,108/255,1)"),
    norm: Optional[str] = typer.Option(None, "--norm", help="l2 (default) or linf"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 256 on CPU, 1024 on GPU"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the report files (default lipcert-report)"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel mean of a normalisation outside the model"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel std of a normalisation outside the model"),
    lipschitz: Optional[float] = typer.Option(None, "--lipschitz", help="certify with this declared bound "
                                              "instead of lipcert's sound one (stated in the report)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto (default), torch or onnxruntime"),
    layout: Optional[str] = typer.Option(None, "--layout", help="auto (default), NCHW or NHWC"),
    value_range: Optional[str] = typer.Option(None, "--value-range", help="auto (default), 0-255 or 0-1"),
    skip_bad_samples: Optional[bool] = typer.Option(None, "--skip-bad-samples", help="leave out (and list in the "
                                                    "report) samples that cannot be read or are invalid, instead "
                                                    "of stopping; accuracies are then over the samples evaluated"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes decoding an image folder (default: "
                                          "one per core, at most 4; 0 decodes in the main process)"),
    arch: Optional[Path] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    attack: Optional[bool] = typer.Option(None, "--attack/--no-attack", help="run the PGD sanity check (default on)"),
    attack_steps: Optional[int] = typer.Option(None, "--attack-steps", help="PGD steps per restart (default 50)"),
    attack_restarts: Optional[int] = typer.Option(None, "--attack-restarts", help="PGD random restarts (default 2)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed of the attack"),
    attack_precision: Optional[str] = typer.Option(None, "--attack-precision", help="float32 (default) or "
                                                   "bfloat16 for the attack's steps; examples are re-checked in "
                                                   "float32, certificates always use float32"),
    min_clean_acc: Optional[float] = typer.Option(None, "--min-clean-acc", help="gate: minimum clean accuracy"),
    min_certified_acc: Optional[list[str]] = typer.Option(None, "--min-certified-acc",
                                                          help="gate EPS=ACC, e.g. 36/255=0.60 (repeatable)"),
    max_violations: Optional[int] = typer.Option(None, "--max-violations", help="gate: attack contradictions "
                                                 "allowed (default 0)"),
    max_lipschitz: Optional[float] = MAX_LIP,
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="gate: a previous report.json to compare with"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="largest allowed drop in certified accuracy "
                                             "against the baseline (default 0)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from the checkpoint in --out"),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="torchrun: start --gpus processes with "
                                           "torch.distributed (or run this command under torchrun yourself)"),
    gpus: int = typer.Option(1, "--gpus", help="processes to start with --launcher torchrun"),
    junit: Optional[Path] = JUNIT,
    fmt: Optional[str] = FORMAT,
    quiet: Optional[bool] = QUIET,
    config: Optional[Path] = CONFIG,
) -> None:
    """Certified accuracy versus radius on a dataset: report.json, report.md, samples.csv and a plot.

    Exit code 0 when every gate passes, 1 when one fails (the attack breaking a certified point always
    does unless --max-violations allows it), 2 on bad input or configuration, 3 on an internal error.
    """
    s = Settings("report", dict(
        model=model, data=data, eps=eps, norm=norm, device=device, batch_size=batch_size, out=out, mean=mean,
        std=std, lipschitz=lipschitz, backend=backend, layout=layout, value_range=value_range, arch=arch,
        arch_python=arch_python, input_shape=input_shape, attack=attack, attack_steps=attack_steps,
        attack_restarts=attack_restarts, seed=seed, attack_precision=attack_precision, min_clean_acc=min_clean_acc,
        min_certified_acc=min_certified_acc or None, max_violations=max_violations, max_lipschitz=max_lipschitz,
        baseline=baseline, max_drop=max_drop, max_elements=max_elements, skip_bad_samples=skip_bad_samples,
        workers=workers, junit=junit, format=fmt, quiet=quiet),
        config)
    _check_format(s.get("format", "text"))
    if launcher is not None:
        raise typer.Exit(relaunch(launcher, gpus))
    for key, flag in (("model", "MODEL"), ("data", "--data")):
        if s.get(key) is None:
            raise ConfigError(f"no {key} given: pass {flag} or set {key} in the config file")
    world = current_world()
    dev = join(world, resolve_device(s.get("device", "auto")))
    steps, restarts = int(s.get("attack_steps", 50)), int(s.get("attack_restarts", 2))
    if steps < 1 or restarts < 1:
        raise ConfigError("--attack-steps and --attack-restarts must be at least 1")
    precision = s.get("attack_precision", "float32")
    if precision not in PRECISIONS:
        raise ConfigError(f"--attack-precision {precision!r}: expected float32 or bfloat16")
    skip_bad, workers_value = s.get("skip_bad_samples", False), s.get("workers")
    if not isinstance(skip_bad, bool):
        raise ConfigError(f"skip_bad_samples {skip_bad!r}: expected true or false")
    if workers_value is not None and (isinstance(workers_value, bool) or not isinstance(workers_value, int)
                                      or workers_value < 0):
        raise ConfigError(f"--workers {workers_value!r}: expected 0 (decode in the main process) or more")
    min_certified = parse_min_certified(s.get("min_certified_acc", []))
    baseline_data = load_baseline(s.path("baseline")) if s.get("baseline") else None
    max_drop_value = float(s.get("max_drop", 0.0))
    if max_drop_value < 0:
        raise ConfigError("--max-drop must be non-negative")
    eps_text = _eps_with_gates(str(s.get("eps", "36/255,72/255,108/255,1")), min_certified)
    limit = parse_max_elements(s.get("max_elements"))
    graph = load_model(s.path("model"), s.path("arch"), arch_python=s.get("arch_python"),
                       input_shape=parse_shape(s.get("input_shape")), max_elements=limit)
    out_dir = s.path("out") or Path("lipcert-report")
    quiet_run = bool(s.get("quiet")) or s.get("format") == "json" or not world.is_main
    bar = progress_bar(quiet_run)
    tasks: dict[str, int] = {}

    def started(phase: str, total: int) -> None:
        if bar is not None:
            bar.start()
            tasks[phase] = bar.add_task(phase, total=total)

    def advance(phase: str, n: int) -> None:
        if bar is not None and phase in tasks:
            bar.advance(tasks[phase], n)

    norm_value = s.get("norm", "l2")
    try:
        result = certify(graph, s.path("data"), eps_text, norm=norm_value, device=dev,
                         batch_size=int(s.get("batch_size") or (1024 if dev.startswith("cuda") else 256)),
                         backend=s.get("backend", "auto"), mean=parse_floats(s.get("mean"), "--mean"),
                         std=parse_floats(s.get("std"), "--std"), lipschitz=s.get("lipschitz"),
                         layout=s.get("layout", "auto"), value_range=s.get("value_range", "auto"), progress=advance,
                         on_start=started,
                         attack=AttackConfig(steps=steps, restarts=restarts, norm=norm_value,
                                             seed=int(s.get("seed", 0)), precision=precision)
                         if s.get("attack", True) else None,
                         checkpoint_dir=out_dir, resume=resume, world=world, max_elements=limit,
                         skip_bad_samples=skip_bad, workers=workers_value)
    except LipcertError:
        if world.is_main:
            clear_checkpoint(out_dir)  # bad input: a resume would be refused (other data) or fail the same way
        raise
    finally:
        if bar is not None:
            bar.stop()
    leave(world)
    if result is None:
        return
    gates = report_gates(result, min_clean_acc=s.get("min_clean_acc"), min_certified=min_certified,
                         max_violations=int(s.get("max_violations", 0)), max_lipschitz=s.get("max_lipschitz"),
                         baseline=baseline_data, max_drop=max_drop_value)
    result.gates = [g.to_dict() for g in gates]
    result.write(out_dir)
    clear_checkpoint(out_dir)

    def render(out: Console) -> None:
        render_terminal(result, out)
        out.print(f"wrote {out_dir}/report.json, report.md, samples.csv, certified_accuracy.png")

    finish("report", gates, result.to_dict(), result.to_markdown(), summary_line(result), s, render,
           result.timings.get("total_seconds", 0.0))


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
