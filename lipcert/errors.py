"""Error types: every user-facing failure is a LipcertError with a one-line message (exit code 2)."""

from __future__ import annotations

import re
from collections.abc import Callable


class LipcertError(Exception):
    """Bad input or configuration: the CLI prints the message on one line and exits with code 2.

    ``parameter`` names the API parameter(s) the message is about, as the message spells them (``batch_size``),
    so that the command line can spell them as its flags instead (see ``spelled``)."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None,
                 parameter: str | tuple[str, ...] | None = None) -> None:
        self.source = source
        self.text = " ".join(str(message).split())
        self.parameter: tuple[str, ...] = (parameter,) if isinstance(parameter, str) else tuple(parameter or ())
        super().__init__(self._line(self.text))

    def _line(self, text: str) -> str:
        return f"{self.source}: {text}" if self.source else text

    def spelled(self, names: Callable[[str], str]) -> str:
        """The one-line message with each of its parameters spelled ``names(parameter)`` (the source, a path, is
        left as it is)."""
        return self._line(spell(self.text, self.parameter, names))


def spell(text: str, parameters: tuple[str, ...], names: Callable[[str], str]) -> str:
    """``text`` with each parameter spelled ``names(parameter)`` wherever it is a word of its own (the command
    line's flags for the API's names)."""
    for name in parameters:
        flag = names(name).replace("\\", "\\\\")  # a replacement string: its backslashes kept as they are
        text = re.sub(rf"(?<![\w./\\-]){re.escape(name)}(?![\w/\\-])", flag, text)
    return text


class ModelError(LipcertError):
    """The model file or its architecture cannot be loaded or is not supported."""


class DataError(LipcertError):
    """The dataset cannot be read or does not fit the model."""


class ConfigError(LipcertError):
    """A flag or configuration value is invalid."""


class SelfCheckError(RuntimeError):
    """lipcert contradicts itself (a measured lower bound above a proven upper bound): a bug in lipcert, never a
    verdict or a certificate. The CLI reports it as an internal error (exit code 3)."""
