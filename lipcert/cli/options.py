"""The typer options of a command, made from ``settings.SETTINGS``: each setting's flag, help and metavar."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

from lipcert.certification.settings import SETTINGS, Setting

MODEL_HELP = "model file (.onnx or .safetensors); or set it in the config"
DEBUG_HELP = "print the full traceback of an error (for a bug report)"


class Debug:
    """Whether ``--debug`` was given to this run (``main`` resets it; the option's callback sets it while parsing,
    so that an error raised afterwards, even in another option's callback, is shown with its traceback)."""

    on = False


def _set_debug(value: bool | None) -> None:
    if value:
        Debug.on = True


def debug_option() -> Any:
    """The ``--debug`` option of the app and of every command."""
    return typer.Option(False, "--debug", callback=_set_debug, is_eager=True, help=DEBUG_HELP)


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
    of ``command``, ``--debug`` and the model as its argument: typer reads the signature made here, and calls it
    with each setting by name (None when not given); ``--debug`` is read by ``main``, not passed on."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        parameters = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str | None,
                                        default=typer.Argument(None, help=MODEL_HELP))]
        parameters += [p for p in inspect.signature(function).parameters.values() if p.kind == p.KEYWORD_ONLY]
        for name, setting in SETTINGS.items():
            if command in setting.commands and name != "model" and name not in exclude:
                annotation, default = _option(setting)
                parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                                    default=default))
        parameters.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                            default=debug_option()))

        @functools.wraps(function)
        def run(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate
