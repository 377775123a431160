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
from .errors import ConfigError, LipcertError
from .inspect_model import summarize
from .loader import load_model

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Certify the robustness of 1-Lipschitz neural networks from the exported model file.\n\n"
                       "Exit codes: 0 ok, 1 a check failed, 2 bad input or configuration, 3 internal error.")


def console(stderr: bool = False) -> Console:
    """A rich console; plain text when NO_COLOR is set or the stream is not a terminal."""
    return Console(stderr=stderr, no_color="NO_COLOR" in os.environ, highlight=False)


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


@app.command()
def version() -> None:
    """Print lipcert's version."""
    print(__version__)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: run the CLI and turn every failure into its documented exit code."""
    try:
        app(args=argv, standalone_mode=False, prog_name="lipcert")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
