"""Settings from ``lipcert.toml`` or ``[tool.lipcert]`` in ``pyproject.toml``; command-line flags override them.

Top-level keys apply to both commands; ``[verify]`` and ``[report]`` tables (``[tool.lipcert.verify]`` in
pyproject) apply to one. Keys may use dashes or underscores. An unknown key is an error naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMMON = {"model", "arch", "arch_python", "input_shape", "device", "seed", "junit", "format", "quiet",
          "max_lipschitz", "max_elements"}
KEYS = {
    "verify": COMMON | {"bound", "tol", "json", "require"},
    "report": COMMON | {"data", "eps", "norm", "batch_size", "out", "mean", "std", "lipschitz", "backend",
                        "layout", "value_range", "skip_bad_samples", "workers", "attack", "attack_steps",
                        "attack_restarts", "attack_precision", "min_clean_acc", "min_certified_acc",
                        "max_violations", "baseline", "max_drop"},
}
PATH_KEYS = {"model", "arch", "data", "out", "json", "junit", "baseline"}


def _norm(key: str) -> str:
    return key.replace("-", "_")


def find_config(start: Path | None = None) -> Path | None:
    """``lipcert.toml`` in the working folder, else a ``pyproject.toml`` there with a [tool.lipcert] table."""
    folder = start or Path.cwd()
    if (folder / "lipcert.toml").is_file():
        return folder / "lipcert.toml"
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None
        if "lipcert" in data.get("tool", {}):
            return pyproject
    return None


def load_config(command: str, path: Path | None = None) -> dict[str, Any]:
    """The settings for ``command`` (verify or report), paths resolved against the config file's folder."""
    path = path if path is not None else find_config()
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError("no such config file", source=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file ({type(exc).__name__})", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None
    table = data.get("tool", {}).get("lipcert", {}) if path.name == "pyproject.toml" else data
    where = "[tool.lipcert]" if path.name == "pyproject.toml" else "lipcert.toml"
    settings: dict[str, Any] = {}
    for key, value in table.items():
        name = _norm(key)
        if name in KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key!r} must be a table", source=str(path))
            for sub, sub_value in value.items():
                if _norm(sub) not in KEYS[name]:
                    raise ConfigError(f"{where}: unknown key {key}.{sub}", source=str(path))
                if name == command:
                    settings[_norm(sub)] = sub_value
            continue
        if name not in KEYS["verify"] | KEYS["report"]:
            raise ConfigError(f"{where}: unknown key {key!r}", source=str(path))
        if name in KEYS[command]:
            settings.setdefault(name, value)
    for key in PATH_KEYS & settings.keys():
        if isinstance(settings[key], str):
            settings[key] = str((path.parent / settings[key]))
    return settings
