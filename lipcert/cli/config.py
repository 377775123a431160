"""Settings: command-line flags over ``lipcert.toml`` or ``[tool.lipcert]`` in ``pyproject.toml`` over the environment.

Top-level keys apply to both commands; ``[verify]`` and ``[report]`` tables (``[tool.lipcert.verify]`` in
pyproject) apply to one. Keys may use dashes or underscores. Every value, wherever it comes from, is checked
here by its setting's parser (``settings.SETTINGS``): a wrong one is a one-line ``ConfigError`` naming the flag,
the key and its file, or the environment variable. This module imports neither torch nor numpy, so that
``lipcert --help`` stays fast.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lipcert.certification.settings import SETTINGS, keys, setting_of
from lipcert.cli.options import flag_of
from lipcert.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: the config-file keys of each command (``settings.SETTINGS`` says which a file may set)
KEYS = {"verify": keys("verify"), "report": keys("report")}


def _norm(key: str) -> str:
    return key.replace("-", "_")


def flag_name(key: str) -> str:
    """How the command line spells a setting: ``batch_size`` -> ``--batch-size`` (the model is an argument)."""
    return "MODEL" if key == "model" else flag_of(key)


def parameter_flag(parameter: str) -> str:
    """The flag that sets an API parameter an error names: ``batch_size`` -> ``--batch-size``, the attack's
    ``steps`` -> ``--attack-steps``."""
    setting = setting_of(parameter)
    return flag_name(setting.name if setting is not None else parameter)


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


def _unknown(key: str, known: set[str], prefix: str = "") -> str:
    """``unknown key "max-lipshitz"; did you mean "max-lipschitz"?``: the nearest known key spelled as the user
    spells keys (dashes or underscores), when one is close enough."""
    match = difflib.get_close_matches(_norm(key), sorted(known), n=1, cutoff=0.75)
    hint = ""
    if match:
        spelled = match[0].replace("_", "-") if "-" in key else match[0]
        hint = f'; did you mean "{prefix}{spelled}"?'
    return f'unknown key "{prefix}{key}"{hint}'


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
                    raise ConfigError(_unknown(sub, KEYS[name], f"{key}."), source=str(path))
                if name == command:
                    settings[_norm(sub)] = (sub_value, f"{sub_where} {sub}")
            continue
        if name not in KEYS["verify"] | KEYS["report"]:
            raise ConfigError(_unknown(key, KEYS["verify"] | KEYS["report"] | set(KEYS)), source=str(path))
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
        for key, (value, label) in raw.items():  # settings come only with a file: ``path`` is not None
            self.values[key] = self._check(key, value, label, str(path))
            if SETTINGS[key].path and value != "-" and path is not None:  # "-" is stdout, not a file by the config
                self.values[key] = str(path.parent / self.values[key])
            self.from_config.add(key)
        for key, setting in SETTINGS.items():
            variable = setting.environment
            text = environ.get(variable, "").strip() if variable and command in setting.commands else ""
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
            return SETTINGS[key].parse(value)
        except ValueError as exc:
            if source:
                shown = f"{label} = {_toml(value)}"
            elif not shown:
                shown = f"{label} {', '.join(map(repr, value)) if isinstance(value, list) else repr(value)}"
            raise ConfigError(f"{shown}: {exc}", source=source) from None

    def given(self, *names: str) -> dict[str, Any]:
        """The settings among ``names`` (default: all) that a flag, the config file or the environment gave: the
        API's defaults apply to the others."""
        return {key: value for key, value in self.values.items() if not names or key in names}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def path(self, key: str) -> Path | None:
        value = self.values.get(key)
        return None if value is None else Path(value)
