"""Settings: command-line flags over ``lipcert.toml`` or ``[tool.lipcert]`` in ``pyproject.toml`` over the environment.

Top-level keys apply to both commands; ``[verify]`` and ``[report]`` tables (``[tool.lipcert.verify]`` in
pyproject) apply to one. Keys may use dashes or underscores. Every value, wherever it comes from, is checked
here, by the validator of its key in ``VALIDATORS``: a wrong one is a one-line ``ConfigError`` naming the flag,
the key and its file, or the environment variable. This module imports neither torch nor numpy, so that
``lipcert --help`` stays fast.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from lipcert.certification.options import BACKENDS
from lipcert.errors import ConfigError
from lipcert.parse import NORMS, REQUIRE, fraction_problem, parse_eps, parse_gate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMMON = {"model", "arch", "arch_python", "input_shape", "device", "seed", "junit", "json", "format", "quiet",
          "max_lipschitz", "max_elements"}
KEYS = {
    "verify": COMMON | {"bound", "tol", "require", "empirical_budget"},
    "report": COMMON | {"data", "eps", "norm", "batch_size", "out", "mean", "std", "lipschitz", "backend",
                        "layout", "value_range", "skip_bad_samples", "workers", "attack", "attack_steps",
                        "attack_restarts", "attack_precision", "min_clean_acc", "min_certified_acc",
                        "max_violations", "baseline", "max_drop", "require_claim"},
}
PATH_KEYS = {"model", "arch", "data", "out", "json", "junit", "baseline"}
#: the environment variable that sets a key when neither a flag nor the config file does
ENVIRONMENT = {"max_elements": "LIPCERT_MAX_ELEMENTS"}
#: report settings that are ``lipcert.certify`` parameters (``CertifyOptions``) of the same name
CERTIFY_KEYS = ("norm", "device", "batch_size", "backend", "mean", "std", "lipschitz", "layout", "value_range",
                "max_elements", "skip_bad_samples", "workers", "min_clean_acc", "max_violations", "max_lipschitz",
                "require_claim", "baseline", "max_drop", "resume")
#: report settings that are ``AttackConfig`` parameters, and the parameter each sets
ATTACK_KEYS = {"attack_steps": "steps", "attack_restarts": "restarts", "seed": "seed", "attack_precision": "precision"}
FORMATS = ("text", "json")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def flag_name(key: str) -> str:
    """How the command line spells a key: ``batch_size`` -> ``--batch-size`` (the model is an argument)."""
    return "MODEL" if key == "model" else "--" + key.replace("_", "-")


def parameter_flag(parameter: str) -> str:
    """The flag that sets an API parameter an error names: ``batch_size`` -> ``--batch-size``, the attack's
    ``steps`` -> ``--attack-steps``."""
    return flag_name(next((key for key, name in ATTACK_KEYS.items() if name == parameter), parameter))


# ---------------------------------------------------------------- one validator per key
# A validator takes the raw value (a string from a flag or the environment, a TOML value from a file) and
# returns it converted, or raises ValueError saying what was expected.


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file or folder path (a string)")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return check


def _device(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return value


def _module_function(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[\w.]+:\w+", value):
        raise ValueError("expected module:function, e.g. mypkg.models:build")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _positive(value: Any) -> float:
    number = _to_float(value)
    if number <= 0:
        raise ValueError("expected a positive number")
    return number


def _non_negative(value: Any) -> float:
    number = _to_float(value)
    if number < 0:
        raise ValueError("expected a number of at least 0")
    return number


def _fraction(value: Any) -> float:
    number = _to_float(value)
    problem = fraction_problem(number)
    if problem:
        raise ValueError(problem)
    return number


def _whole(low: int, expected: str = "") -> Callable[[Any], int]:
    expected = expected or f"expected a whole number of at least {low}"

    def check(value: Any) -> int:
        text = value.strip().replace("_", "") if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif text and text.lstrip("-").isascii() and text.lstrip("-").isdigit():
            number = int(text)
        else:
            raise ValueError(expected)
        if number < low:
            raise ValueError(expected)
        return number

    return check


def _items(value: Any) -> list[Any]:
    """A comma-separated string, a TOML list, or one number, as a list of items."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise ValueError("expected a list or a comma-separated string")


def _numbers(positive: bool) -> Callable[[Any], list[float]]:
    def check(value: Any) -> list[float]:
        numbers = [_to_float(v) for v in _items(value)]
        if not numbers:
            raise ValueError("expected at least one number")
        if positive and min(numbers) <= 0:
            raise ValueError("expected positive numbers (one per channel, or one for all)")
        return numbers

    return check


def _radii(value: Any) -> list[tuple[str, float]]:
    items = _items(value)
    if any(isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in items):
        raise ValueError("expected radii like 36/255,72/255")
    try:
        return parse_eps(",".join(str(v) for v in items))
    except ConfigError:
        raise ValueError("expected non-negative radii like 36/255,72/255") from None


def _shape(value: Any) -> tuple[int, ...]:
    items = re.split(r"[,x]", value.strip()) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected a sample shape like 3,32,32")
    try:
        dims = tuple(_whole(1)(v) for v in items)
    except ValueError:
        raise ValueError("expected positive whole numbers like 3,32,32") from None
    return dims


def _gate_list(value: Any) -> list[tuple[str, float, float]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError('expected EPS=ACCURACY strings, e.g. ["36/255=0.60"]')
    return [parse_gate(item) for item in items]


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "model": _path, "arch": _path, "data": _path, "out": _path, "json": _path, "junit": _path, "baseline": _path,
    "config": _path, "arch_python": _module_function, "input_shape": _shape, "device": _device,
    "seed": _whole(0), "format": _choice(*FORMATS), "quiet": _flag, "max_lipschitz": _positive,
    "max_elements": _whole(1, "expected a positive whole number of elements"), "bound": _positive, "tol": _non_negative,
    "require": _choice(*REQUIRE), "empirical_budget": _positive,
    "eps": _radii, "norm": _choice(*NORMS), "batch_size": _whole(1), "mean": _numbers(False),
    "std": _numbers(True), "lipschitz": _positive, "backend": _choice(*BACKENDS),
    "layout": _choice("auto", "NCHW", "NHWC"), "value_range": _choice("auto", "0-255", "0-1"),
    "skip_bad_samples": _flag, "workers": _whole(0), "attack": _flag, "attack_steps": _whole(1),
    "attack_restarts": _whole(1), "attack_precision": _choice("float32", "bfloat16"), "min_clean_acc": _fraction,
    "min_certified_acc": _gate_list, "max_violations": _whole(0), "max_drop": _fraction, "require_claim": _flag,
    "resume": _flag, "launcher": _choice("torchrun"), "gpus": _whole(1),
}


def _toml(value: Any) -> str:
    """A value as TOML writes it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---------------------------------------------------------------- config files


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file ({type(exc).__name__})", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None


def find_config(start: Path | None = None) -> Path | None:
    """``lipcert.toml`` in the working folder, else a ``pyproject.toml`` there with a [tool.lipcert] table.

    A ``pyproject.toml`` that is not valid TOML is an error, as a broken ``lipcert.toml`` is: it may hold the
    settings the user expects."""
    folder = start or Path.cwd()
    if (folder / "lipcert.toml").is_file():
        return folder / "lipcert.toml"
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file() and "lipcert" in _read_toml(pyproject).get("tool", {}):
        return pyproject
    return None


def load_config(command: str, path: Path | None = None) -> tuple[Path | None, dict[str, tuple[Any, str]]]:
    """The config file used (``path``, else the one found) and its raw settings for ``command`` (verify or
    report): key -> (value, how an error names the key)."""
    path = path if path is not None else find_config()
    if path is None:
        return None, {}
    if not path.is_file():
        raise ConfigError("no such config file", source=str(path))
    data = _read_toml(path)
    pyproject = path.name == "pyproject.toml"
    table = data.get("tool", {}).get("lipcert", {}) if pyproject else data
    where = "[tool.lipcert]" if pyproject else ""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'the file'}: expected a table of settings", source=str(path))
    settings: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        name = _norm(key)
        if name in KEYS:
            sub_where = f"[tool.lipcert.{key}]" if pyproject else f"[{key}]"
            if not isinstance(value, dict):
                raise ConfigError(f"{sub_where}: must be a table", source=str(path))
            for sub, sub_value in value.items():
                if _norm(sub) not in KEYS[name]:
                    raise ConfigError(f"unknown key {key}.{sub}", source=str(path))
                if name == command:
                    settings[_norm(sub)] = (sub_value, f"{sub_where} {sub}")
            continue
        if name not in KEYS["verify"] | KEYS["report"]:
            raise ConfigError(f"unknown key {key!r}", source=str(path))
        if name in KEYS[command]:
            settings.setdefault(name, (value, f"{where} {key}".strip()))
    return path, settings


class Settings:
    """Flags given on the command line, over the config file, over the environment; every value validated."""

    def __init__(self, command: str, flags: Mapping[str, Any], config: str | Path | None = None, *,
                 use_file: bool = True, environ: Mapping[str, str] = os.environ) -> None:
        self.values: dict[str, Any] = {}
        self.from_config: set[str] = set()
        config_path = Path(self._check("config", config, "--config")) if config is not None else None
        path, raw = load_config(command, config_path) if use_file else (None, {})
        for key, (value, label) in raw.items():
            self.values[key] = self._check(key, value, label, str(path))
            if key in PATH_KEYS and value != "-":  # "-" is stdout, not a file next to the config
                self.values[key] = str(path.parent / self.values[key])
            self.from_config.add(key)
        for key, variable in ENVIRONMENT.items():
            text = environ.get(variable, "").strip()
            if key not in self.values and text:
                self.values[key] = self._check(key, text, variable, shown=f"{variable}={text!r}")
        for key, value in flags.items():
            if value is not None and value != []:
                self.values[key] = self._check(key, value, flag_name(key))
                self.from_config.discard(key)

    @staticmethod
    def _check(key: str, value: Any, label: str, source: str | None = None, shown: str = "") -> Any:
        """``value`` converted by its key's validator, or a one-line ConfigError naming where it came from: the
        key and its table in ``source`` (a config file), else the flag (or ``shown``, for the environment)."""
        try:
            return VALIDATORS[key](value)
        except ValueError as exc:
            if source:
                shown = f"{label} = {_toml(value)}"
            elif not shown:
                shown = f"{label} {', '.join(map(repr, value)) if isinstance(value, list) else repr(value)}"
            raise ConfigError(f"{shown}: {exc}", source=source) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def path(self, key: str) -> Path | None:
        value = self.values.get(key)
        return None if value is None else Path(value)
