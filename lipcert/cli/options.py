"""The typer options of a command, made from ``settings.SETTINGS``: each setting's flag, help and metavar."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from lipcert.certification.settings import SETTINGS, Setting

MODEL_HELP = "model file (.onnx or .safetensors); or set it in the config"


def flag_of(name: str) -> str:
    """How the command line spells a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _option(setting: Setting) -> tuple[Any, Any]:
    """The annotation and typer default of one setting's option (every value arrives as text, parsed later)."""
    annotation: Any = bool | None if setting.switch else list[str] | None if setting.repeat else str | None
    flag = flag_of(setting.name)
    flags = [f"{flag}/--no-{flag[2:]}" if setting.negatable else flag] + ([setting.short] if setting.short else [])
    return annotation, typer.Option(None, *flags, help=setting.help, metavar=setting.metavar)


def with_settings(command: str, *, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give ``function`` (which takes ``**flags``, and keyword-only options of its own) an option for every setting
    of ``command`` and the model as its argument: typer reads the signature made here, and calls it with each
    setting by name (None when not given)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        parameters = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str | None,
                                        default=typer.Argument(None, help=MODEL_HELP))]
        parameters += [p for p in inspect.signature(function).parameters.values() if p.kind == p.KEYWORD_ONLY]
        for name, setting in SETTINGS.items():
            if command in setting.commands and name != "model" and name not in exclude:
                annotation, default = _option(setting)
                parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                                    default=default))
        function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        function.__annotations__ = {p.name: p.annotation for p in parameters}
        return function

    return decorate
