"""The ``lipcert`` command line: a thin layer over the Python API.

Each command merges its settings (``config.Settings``, which checks what was typed before anything runs), maps
the ones given onto the API call, whose defaults and checks apply, renders the result and exits: 0 success (all
gates pass), 1 a check failed, 2 bad input or configuration (an API error's parameter spelled as its flag), 3
internal error, 130 interrupted. torch and the API are imported inside the commands, so that ``lipcert --help``
and ``lipcert --version`` answer at once.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from lipcert.certification.settings import SETTINGS
from lipcert.cli.config import Settings, parameter_flag
from lipcert.cli.options import Debug, debug_option, with_settings
from lipcert.errors import ConfigError, LipcertError
from lipcert.version import __version__

if TYPE_CHECKING:
    from lipcert.graph.core import Graph
    from lipcert.progress import Progress
    from lipcert.report.gates import Gate

#: suffixes of PyTorch checkpoints, which are not a deployed artefact lipcert can certify
LOADING = "loading the model"
RESUME_HINT = "rerun with --resume to continue"

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Certify the robustness of 1-Lipschitz neural networks from the exported model file.\n\n"
                       "Exit codes: 0 ok, 1 a check failed, 2 bad input or configuration, 3 internal error, "
                       "130 interrupted.")


class Interrupted(Exception):
    """Ctrl-C during a command: ``main`` prints the hint and exits 130."""


@contextmanager
def interruptible(hint: str = "") -> Iterator[None]:
    """Turn Ctrl-C into ``Interrupted`` (typer would swallow a KeyboardInterrupt into a silent exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(hint) from None


def console(stderr: bool = False) -> Console:
    """A rich console; plain text when NO_COLOR is set or the stream is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 140
    return Console(stderr=stderr, no_color="NO_COLOR" in os.environ, highlight=False, width=width)


def _progress(silent: bool) -> Progress:
    from lipcert.cli.progress import progress_for

    return progress_for(silent, console(stderr=True))


def _load(s: Settings, progress: Progress) -> Graph:
    """The model the settings name, loaded and checked, with a hint for a PyTorch checkpoint."""
    from lipcert.model.loader import load_model
    from lipcert.progress import phase

    path = s.path("model")
    if path is None:
        raise ConfigError("no model given: pass MODEL or set model in the config file")
    with phase(progress, LOADING):
        return load_model(path, s.path("arch"), arch_python=s.get("arch_python"), input_shape=s.get("input_shape"),
                          max_elements=s.get("max_elements"))


def _json_to_stdout(s: Settings) -> bool:
    return s.get("format") == "json" or s.get("json") == "-"


def _show_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", "-V", callback=_show_version, is_eager=True,
                                          help="print lipcert's version and exit"),
             debug: bool = debug_option()) -> None:
    """Certify the robustness of 1-Lipschitz neural networks from the exported model file."""


@app.command()
@with_settings("inspect")
def inspect(*, json_file: str | None = typer.Option(None, "--json", metavar="FILE",
                                                    help="write the summary as JSON to FILE; - for stdout (as "
                                                         "--format json)"), **flags: Any) -> None:
    """Show the model's nodes, shapes and parameters, checked against onnxruntime."""
    from lipcert.atomic import write_text_atomic
    from lipcert.model.inspect_model import summarize_model
    from lipcert.report.verify_render import shape_cell

    s = Settings("inspect", {**flags, "json": json_file}, use_file=False)
    with interruptible(), _progress(_json_to_stdout(s)) as progress:
        graph = _load(s, progress)
    summary = summarize_model(graph)
    document = json.dumps(summary.to_dict(), indent=2) + "\n"
    if _json_to_stdout(s):
        sys.stdout.write(document)
        return
    if s.get("json") is not None:
        write_text_atomic(Path(s.get("json")), document)
    out = console()
    table = Table(title=f"{flags['model']}  (input {graph.input_name}: N x {' x '.join(map(str, graph.input_shape))})")
    for col in ("node", "op", "input shapes", "output shapes", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for row in summary.nodes:
        table.add_row(row.name, row.op, ", ".join(map(shape_cell, row.input_shapes)),
                      ", ".join(map(shape_cell, row.output_shapes)), f"{row.parameters:,}")
    out.print(table)
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(summary.op_counts.items()))
    out.print(f"{len(summary.nodes)} nodes, {summary.parameters:,} parameters; {ops}")
    if graph.crosscheck:
        cc = graph.crosscheck
        out.print(f"matches onnxruntime value by value ({cc.values} values of every node compared at {cc.points}); "
                  f"output: max difference {cc.max_abs_diff:.3g} ({cc.max_rel_diff:.3g} relative)")
    for note in graph.notes:
        out.print(f"note: {note}")


def finish(command: str, gates: list[Gate], data: dict, markdown: str, verdict: str, s: Settings,
           render: Callable[[Console], None], seconds: float) -> None:
    """Write the machine-readable outputs, print the human ones, and exit 1 when any gate failed."""
    from lipcert.atomic import write_text_atomic
    from lipcert.report.gates import gates_markdown, junit_xml

    named = tuple(name for name in SETTINGS if "_" in name)  # settings a gate's text may name (none a plain word)
    gates = [g.spelled(named, parameter_flag) for g in gates]  # as flags, in what people read
    failed = [g for g in gates if not g.passed]
    document = json.dumps(data, indent=2) + "\n"
    json_file, junit_file = s.get("json"), s.get("junit")
    if json_file not in (None, "-"):
        write_text_atomic(Path(json_file), document)
    if junit_file:
        write_text_atomic(Path(junit_file), junit_xml(command, gates, seconds))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as f:
                f.write(markdown + "\n" + gates_markdown(gates) + "\n")
        except OSError as exc:
            raise ConfigError(f"GITHUB_STEP_SUMMARY={summary_file}: cannot append the summary "
                             f"({exc.strerror or type(exc).__name__})") from None
    line = f"{verdict}: {'all gates pass' if not failed else f'{len(failed)} gate(s) failed'}"
    if _json_to_stdout(s):
        sys.stdout.write(document)
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


@app.command()
@with_settings("verify")
def verify(**flags: Any) -> None:
    """Check that the model is really L-Lipschitz: sound per-layer bounds on the exact operators.

    Exit code 0 when the claim is proven (and every gate passes), 1 when a gate fails (the claim violated or
    unproven), 2 on bad input or configuration, 3 on an internal error.
    """
    s = Settings("verify", flags, flags.pop("config"))
    from lipcert.progress import Steps
    from lipcert.report.verified import verify as run_verify
    from lipcert.report.verify_render import render_verify, verify_markdown

    with interruptible(), _progress(bool(s.get("quiet")) or _json_to_stdout(s)) as progress:
        graph = _load(s, progress)
        steps = Steps(progress)
        result = run_verify(graph, progress=steps, bound_in_config="bound" in s.from_config,
                            **s.given("bound", "device", "tol", "seed", "empirical_budget", "require",
                                      "max_lipschitz", "witness"))
        steps.close()
    finish("verify", result.gates, result.to_dict() | {"passed": result.passed}, verify_markdown(result),
           f"verdict: {result.status.upper()}", s, lambda out: render_verify(result, out), result.seconds)


def relaunch(processes: int) -> int:
    """Run this same command again under torchrun with ``processes`` processes; its exit code."""
    import subprocess

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


@app.command()
@with_settings("report")
def report(**flags: Any) -> None:
    """Certified accuracy versus radius on a dataset: report.json, report.md, samples.csv and a plot.

    Exit code 0 when every gate passes, 1 when one fails (the attack breaking a certified point always does
    unless --max-violations allows it, and so does a Lipschitz claim lipcert cannot prove unless
    --no-require-claim), 2 on bad input or configuration, 3 on an internal error, 130 when interrupted.
    """
    s = Settings("report", flags, flags.pop("config"))
    if s.get("launcher"):
        raise typer.Exit(relaunch(s.get("gpus", 1)))
    data = s.path("data")
    if data is None:
        raise ConfigError("no data given: pass --data or set data in the config file")
    from lipcert.certification.distributed import current_world
    from lipcert.certification.options import CertifyOptions
    from lipcert.certification.run import certify
    from lipcert.report.render import render_terminal, summary_line

    options = CertifyOptions.of_command(s.given())
    world = current_world()
    with interruptible(RESUME_HINT), _progress(bool(s.get("quiet")) or _json_to_stdout(s)
                                               or not world.is_main) as progress:
        graph = _load(s, progress)
        result = certify(graph, data, options=options, progress=progress, world=world)
    if result is None:
        return

    def render(out: Console) -> None:
        render_terminal(result, out)
        out.print(f"wrote {options.out}/report.json, report.md, samples.csv, certified_accuracy.png")

    rendering = result.rendered()  # the files certify wrote: printed from, not rendered again
    finish("report", result.gates, rendering.document | {"passed": result.passed}, rendering.markdown,
           summary_line(result), s, render, result.timings.total_seconds)


@app.command()
def compare(reports: list[Path] = typer.Argument(..., metavar="REPORT_OR_DIR...",
                                                 help="report.json files, or the folders that hold them"),
            out: Path | None = typer.Option(None, "--out", metavar="DIR",
                                            help="write compare.md, compare.json and the plots to DIR"),
            json_file: str | None = typer.Option(None, "--json", metavar="FILE",
                                                 help="write the comparison as JSON to FILE (- for stdout)"),
            debug: bool = debug_option()) -> None:
    """Several reports side by side: accuracy, certified accuracy at each radius, mean radii, bounds, speed."""
    from lipcert.atomic import write_text_atomic
    from lipcert.report.compare import compare as compare_reports
    from lipcert.report.compare import table

    result = compare_reports(list(reports), out=out)
    document = json.dumps(result.to_json(), indent=2) + "\n"
    if json_file == "-":
        sys.stdout.write(document)
        return
    if json_file is not None:
        write_text_atomic(json_file, document)
    header, rows = table(result)
    view = Table(title=f"{len(result.entries)} models on {result.dataset} ({result.norm.upper()})")
    for k, col in enumerate(header):
        view.add_column(col, justify="left" if k == 0 or col == "bound source" else "right", no_wrap=k == 0)
    for row in rows:
        view.add_row(*row)
    out_console = console()
    out_console.print(view)
    for label, names in result.unmatched.items():
        out_console.print(f"note: radius {label} is only in {', '.join(names)}: not compared with the others")
    if out is not None:
        out_console.print(f"wrote {out / 'compare.md'}, compare.json and the plots")


@app.command()
def version(debug: bool = debug_option()) -> None:
    """Print lipcert's version."""
    print(__version__)


def bug_report(argv: list[str], exc: BaseException, debug: bool) -> str:
    """What an internal error prints: the error, then what a bug report needs (the command line, lipcert's and its
    platform's versions, and the traceback: printed above it with ``--debug``, else how to get it)."""
    torch = sys.modules.get("torch")  # its version only when the command loaded it: --help stays torch-free
    versions = f"lipcert {__version__}, Python {platform.python_version()}" + (
        f", torch {torch.__version__}" if torch is not None else "") + f", {platform.system()} {platform.machine()}"
    last = ("the traceback is above" if debug else
            "rerun with --debug for the traceback")
    return (f"lipcert: internal error: {type(exc).__name__}: {exc}\n"
            "lipcert: this is a bug in lipcert; please report it at the lipcert issue tracker with:\n"
            f"  command: {shlex.join(['lipcert', *argv])}\n"
            f"  version: {versions}\n"
            f"  {last}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into its documented exit code (with ``--debug``, an error
    also prints its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    Debug.on = False
    try:
        code = app(args=argv, standalone_mode=False, prog_name="lipcert")
    except LipcertError as exc:
        if Debug.on:
            traceback.print_exc()
        console(stderr=True).print(f"lipcert: error: {exc.spelled(parameter_flag)}", markup=False, soft_wrap=True)
        return exc.exit_code
    except Interrupted as exc:
        console(stderr=True).print("lipcert: interrupted" + (f"; {exc}" if str(exc) else ""), markup=False)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:
        console(stderr=True).print(f"lipcert: error: {exc.format_message()} (see lipcert --help)", markup=False,
                                   soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        console(stderr=True).print("lipcert: interrupted", markup=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a traceback only with --debug
        if Debug.on:
            traceback.print_exc()
        console(stderr=True).print(bug_report(argv, exc, Debug.on), markup=False, soft_wrap=True)
        return 3
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
