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
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from lipcert.certification.options import DEFAULT_BATCH_SIZE, DEFAULT_EPS
from lipcert.cli.config import ATTACK_KEYS, CERTIFY_KEYS, Settings, parameter_flag
from lipcert.errors import ConfigError, LipcertError, ModelError
from lipcert.limits import DEFAULT_MAX_ELEMENTS, ENV_VAR
from lipcert.version import __version__

if TYPE_CHECKING:
    from lipcert.certification.options import CertifyOptions
    from lipcert.graph.core import Graph
    from lipcert.progress import Progress
    from lipcert.report.gates import Gate

#: suffixes of PyTorch checkpoints, which are not a deployed artefact lipcert can certify
PYTORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
LOADING = "loading the model"
#: where ``lipcert report`` writes when --out is not given
DEFAULT_OUT = "lipcert-report"
RESUME_HINT = "rerun with --resume to continue"

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
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

    if s.get("model") is None:
        raise ConfigError("no model given: pass MODEL or set model in the config file")
    path = s.path("model")
    if path.suffix.lower() in PYTORCH_SUFFIXES:
        raise ModelError(f"a PyTorch checkpoint ({path.suffix}) is not a deployed model lipcert can read: export it "
                         "to ONNX first, e.g. torch.onnx.export(model, (example_input,), 'model.onnx', dynamo=True), "
                         "or save the weights as .safetensors with an architecture spec (docs/arch-spec.md)",
                         source=str(path))
    with phase(progress, LOADING):
        return load_model(path, s.path("arch"), arch_python=s.get("arch_python"), input_shape=s.get("input_shape"),
                          max_elements=s.get("max_elements"))


def _json_to_stdout(s: Settings) -> bool:
    return s.get("format") == "json" or s.get("json") == "-"


ARCH = typer.Option(None, "--arch", help="architecture spec (JSON) for a .safetensors model")
ARCH_PY = typer.Option(None, "--arch-python", help="module:function returning a torch.nn.Module for a "
                                                   ".safetensors model (runs your code)")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="one sample's shape, e.g. 3,32,32 (for dynamic inputs)")
MAX_ELEMENTS = typer.Option(None, "--max-elements", metavar="N",
                            help="largest stored tensor, intermediate value or dataset sample, in elements; a "
                                 "file asking for more is refused before anything is allocated (default "
                                 f"${ENV_VAR}, else {DEFAULT_MAX_ELEMENTS:,} = 2**28)")
CONFIG = typer.Option(None, "--config", help="settings file (default: ./lipcert.toml or [tool.lipcert] in "
                                             "./pyproject.toml)")
FORMAT = typer.Option(None, "--format", help="text (default) or json: the result as JSON on stdout, nothing else "
                                             "(the same as --json -)")
JSON_OUT = typer.Option(None, "--json", metavar="FILE", help="write the result (with its gates) as JSON to FILE; "
                                                             "- for stdout")
JUNIT = typer.Option(None, "--junit", metavar="FILE", help="write JUnit XML, one test case per gate")
QUIET = typer.Option(None, "--quiet", "-q", help="print only the verdict line, and no progress")
MAX_LIP = typer.Option(None, "--max-lipschitz", metavar="L",
                       help="gate: fail when the Lipschitz bound is above this")
DEVICE = typer.Option(None, "--device", help="auto (default), cpu or cuda")


def _show_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="print lipcert's version and exit")) -> None:
    """Certify the robustness of 1-Lipschitz neural networks from the exported model file."""


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help="model file (.onnx or .safetensors)"),
    arch: Optional[str] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout (as --format json)"),
    fmt: Optional[str] = FORMAT,
) -> None:
    """Show the model's nodes, shapes and parameters, checked against onnxruntime."""
    from lipcert.model.inspect_model import summarize_model
    from lipcert.report.verify_render import shape_cell

    s = Settings("inspect", dict(model=model, arch=arch, arch_python=arch_python, input_shape=input_shape,
                                 max_elements=max_elements, format="json" if as_json else fmt), use_file=False)
    with interruptible(), _progress(_json_to_stdout(s)) as progress:
        graph = _load(s, progress)
    summary = summarize_model(graph)
    if _json_to_stdout(s):
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
        return
    out = console()
    table = Table(title=f"{model}  (input {graph.input_name}: N x {' x '.join(map(str, graph.input_shape))})")
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

    failed = [g for g in gates if not g.passed]
    data = {**data, "gates": [g.to_dict() for g in gates], "passed": not failed}
    document = json.dumps(data, indent=2) + "\n"
    if s.get("json") not in (None, "-"):
        write_text_atomic(s.path("json"), document)
    if s.get("junit"):
        write_text_atomic(s.path("junit"), junit_xml(command, gates, seconds))
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
def verify(
    model: Optional[str] = typer.Argument(None, help="model file (.onnx or .safetensors); or set it in the config"),
    bound: Optional[str] = typer.Option(None, "--bound", metavar="L", help="the claimed Lipschitz bound (default: "
                                        "the model's lipcert.claimed_lipschitz metadata, else 1.0)"),
    tol: Optional[str] = typer.Option(None, "--tol", metavar="T", help="relative tolerance on the claim "
                                      "(default 1e-05)"),
    arch: Optional[str] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    device: Optional[str] = DEVICE,
    json_out: Optional[str] = JSON_OUT,
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N", help="random seed of power iteration and the "
                                       "search"),
    require: Optional[str] = typer.Option(None, "--require", help="gate: proven (default) or not-violated"),
    empirical_budget: Optional[str] = typer.Option(None, "--empirical-budget", metavar="SECONDS",
                                                   help="time limit of the empirical network search (default 60 "
                                                        "on a CPU, 20 on a GPU); the best pair found is kept"),
    max_lipschitz: Optional[str] = MAX_LIP,
    junit: Optional[str] = JUNIT,
    fmt: Optional[str] = FORMAT,
    quiet: Optional[bool] = QUIET,
    config: Optional[str] = CONFIG,
) -> None:
    """Check that the model is really L-Lipschitz: sound per-layer bounds on the exact operators.

    Exit code 0 when the claim is proven (and every gate passes), 1 when a gate fails (the claim violated or
    unproven), 2 on bad input or configuration, 3 on an internal error.
    """
    s = Settings("verify", dict(model=model, bound=bound, tol=tol, arch=arch, arch_python=arch_python,
                                input_shape=input_shape, device=device, json=json_out, seed=seed, require=require,
                                max_lipschitz=max_lipschitz, max_elements=max_elements, junit=junit, format=fmt,
                                quiet=quiet, empirical_budget=empirical_budget), config)
    from lipcert.bounds.verify import verify as run_verify
    from lipcert.progress import Steps
    from lipcert.report.gates import verify_gates
    from lipcert.report.verify_render import render_verify, verify_markdown

    with interruptible(), _progress(bool(s.get("quiet")) or _json_to_stdout(s)) as progress:
        graph = _load(s, progress)
        steps = Steps(progress)
        result = run_verify(graph, s.get("bound"), device=s.get("device", "auto"), progress=steps,
                            **_given(s, "tol", "seed", "empirical_budget"))
        steps.close()
    if "bound" in s.from_config:
        result.claim_source = "bound in the config file"
    gates = verify_gates(result, **_given(s, "require", "max_lipschitz"))
    finish("verify", gates, result.to_dict(), verify_markdown(result), f"verdict: {result.status.upper()}", s,
           lambda out: render_verify(result, out), result.seconds)


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


def _given(s: Settings, *keys: str) -> dict[str, Any]:
    """The settings among ``keys`` that a flag, the config file or the environment gave: the API's defaults apply
    to the others."""
    return {key: s.get(key) for key in keys if key in s.values}


def _certify_options(s: Settings) -> CertifyOptions:
    """The report settings as ``lipcert.certify``'s options (checked there: a wrong one names its flag)."""
    from lipcert.certification.attack import AttackConfig
    from lipcert.certification.options import CertifyOptions

    mapped = {"eps": [label for label, _ in s.get("eps")]} if s.get("eps") else {}
    if s.get("min_certified_acc"):
        mapped["min_certified_acc"] = [(label, acc) for label, _, acc in s.get("min_certified_acc")]
    attack = {name: s.get(key) for key, name in ATTACK_KEYS.items() if key in s.values}
    mapped["attack"] = False if s.get("attack") is False else AttackConfig(**attack)
    return CertifyOptions(**_given(s, *CERTIFY_KEYS), **mapped, out=s.path("out") or Path(DEFAULT_OUT))


@app.command()
def report(
    model: Optional[str] = typer.Argument(None, help="model file (.onnx or .safetensors); or set it in the config"),
    data: Optional[str] = typer.Option(None, "--data", help="dataset: .npz, .safetensors, CIFAR batches folder, "
                                                            "MNIST IDX files or an image folder"),
    eps: Optional[str] = typer.Option(None, "--eps", help=f"radii to certify (default {DEFAULT_EPS['l2']}, with "
                                                          f"--norm linf {DEFAULT_EPS['linf']})"),
    norm: Optional[str] = typer.Option(None, "--norm", help="l2 (default) or linf"),
    device: Optional[str] = DEVICE,
    batch_size: Optional[str] = typer.Option(None, "--batch-size", metavar="N",
                                             help=f"default {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                                                  f"{DEFAULT_BATCH_SIZE['cuda']} on GPU"),
    out: Optional[str] = typer.Option(None, "--out", metavar="DIR", help="folder for the report files (default "
                                                                         f"{DEFAULT_OUT})"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel mean of a normalisation outside the model"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel std of a normalisation outside the model"),
    lipschitz: Optional[str] = typer.Option(None, "--lipschitz", metavar="L", help="certify with this declared bound "
                                            "instead of lipcert's sound one (stated in the report)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto (default), torch or onnxruntime"),
    layout: Optional[str] = typer.Option(None, "--layout", help="auto (default), NCHW or NHWC"),
    value_range: Optional[str] = typer.Option(None, "--value-range", help="auto (default), 0-255 or 0-1"),
    skip_bad_samples: Optional[bool] = typer.Option(None, "--skip-bad-samples", help="leave out (and list in the "
                                                    "report) samples that cannot be read or are invalid, instead "
                                                    "of stopping; accuracies are then over the samples evaluated"),
    workers: Optional[str] = typer.Option(None, "--workers", metavar="N", help="processes decoding an image folder "
                                          "(default: one per core, at most 4; 0 decodes in the main process)"),
    arch: Optional[str] = ARCH,
    arch_python: Optional[str] = ARCH_PY,
    input_shape: Optional[str] = INPUT_SHAPE,
    max_elements: Optional[str] = MAX_ELEMENTS,
    attack: Optional[bool] = typer.Option(None, "--attack/--no-attack", help="run the PGD sanity check (default on)"),
    attack_steps: Optional[str] = typer.Option(None, "--attack-steps", metavar="N", help="PGD steps per restart "
                                               "(default 50)"),
    attack_restarts: Optional[str] = typer.Option(None, "--attack-restarts", metavar="N", help="PGD random restarts "
                                                  "(default 2)"),
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N", help="random seed of the attack"),
    attack_precision: Optional[str] = typer.Option(None, "--attack-precision", help="float32 (default) or "
                                                   "bfloat16 for the attack's steps; examples are re-checked in "
                                                   "float32, certificates always use float32"),
    min_clean_acc: Optional[str] = typer.Option(None, "--min-clean-acc", metavar="ACC", help="gate: minimum clean "
                                                "accuracy, a fraction such as 0.9"),
    min_certified_acc: Optional[list[str]] = typer.Option(None, "--min-certified-acc", metavar="EPS=ACC",
                                                          help="gate, e.g. 36/255=0.60 (repeatable)"),
    max_violations: Optional[str] = typer.Option(None, "--max-violations", metavar="N", help="gate: attack "
                                                 "contradictions allowed (default 0)"),
    max_lipschitz: Optional[str] = MAX_LIP,
    require_claim: Optional[bool] = typer.Option(None, "--require-claim/--no-require-claim", help="gate: fail when "
                                                 "lipcert's sound bound is above the model's Lipschitz claim (its "
                                                 "metadata or --lipschitz); on by default when there is a claim"),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="FILE", help="gate: a previous report.json to "
                                           "compare with"),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", metavar="D", help="largest allowed drop in certified "
                                           "accuracy against the baseline, a fraction (default 0)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from the checkpoint in --out"),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="torchrun: start --gpus processes with "
                                           "torch.distributed (or run this command under torchrun yourself)"),
    gpus: Optional[str] = typer.Option(None, "--gpus", metavar="N", help="processes to start with --launcher "
                                       "torchrun (default 1)"),
    json_out: Optional[str] = JSON_OUT,
    junit: Optional[str] = JUNIT,
    fmt: Optional[str] = FORMAT,
    quiet: Optional[bool] = QUIET,
    config: Optional[str] = CONFIG,
) -> None:
    """Certified accuracy versus radius on a dataset: report.json, report.md, samples.csv and a plot.

    Exit code 0 when every gate passes, 1 when one fails (the attack breaking a certified point always does
    unless --max-violations allows it, and so does a Lipschitz claim lipcert cannot prove unless
    --no-require-claim), 2 on bad input or configuration, 3 on an internal error, 130 when interrupted.
    """
    s = Settings("report", dict(
        model=model, data=data, eps=eps, norm=norm, device=device, batch_size=batch_size, out=out, mean=mean,
        std=std, lipschitz=lipschitz, backend=backend, layout=layout, value_range=value_range, arch=arch,
        arch_python=arch_python, input_shape=input_shape, attack=attack, attack_steps=attack_steps,
        attack_restarts=attack_restarts, seed=seed, attack_precision=attack_precision, min_clean_acc=min_clean_acc,
        min_certified_acc=min_certified_acc, max_violations=max_violations, max_lipschitz=max_lipschitz,
        require_claim=require_claim, baseline=baseline, max_drop=max_drop, max_elements=max_elements,
        skip_bad_samples=skip_bad_samples, workers=workers, json=json_out, junit=junit, format=fmt, quiet=quiet,
        resume=resume, launcher=launcher, gpus=gpus), config)
    if s.get("launcher"):
        raise typer.Exit(relaunch(s.get("gpus", 1)))
    if s.get("data") is None:
        raise ConfigError("no data given: pass --data or set data in the config file")
    from lipcert.certification.distributed import current_world
    from lipcert.certification.run import certify
    from lipcert.report.gates import Gate
    from lipcert.report.render import render_terminal, summary_line

    options = _certify_options(s)
    world = current_world()
    with interruptible(RESUME_HINT), _progress(bool(s.get("quiet")) or _json_to_stdout(s)
                                               or not world.is_main) as progress:
        graph = _load(s, progress)
        result = certify(graph, s.path("data"), options=options, progress=progress, world=world)
    if result is None:
        return

    def render(out: Console) -> None:
        render_terminal(result, out)
        out.print(f"wrote {options.out}/report.json, report.md, samples.csv, certified_accuracy.png")

    finish("report", [Gate(**g) for g in result.gates], result.to_dict(), result.to_markdown(), summary_line(result),
           s, render, result.timings.get("total_seconds", 0.0))


@app.command()
def version() -> None:
    """Print lipcert's version."""
    print(__version__)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI and turn every failure into its documented exit code."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="lipcert")
    except LipcertError as exc:
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
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        console(stderr=True).print(f"lipcert: internal error: {type(exc).__name__}: {exc} "
                                   "(please report this at the lipcert issue tracker with the command you ran)",
                                   markup=False, soft_wrap=True)
        return 3
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
