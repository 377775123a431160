"""Error types: every user-facing failure is a LipcertError with a one-line message (exit code 2)."""

from __future__ import annotations


class LipcertError(Exception):
    """Bad input or configuration: the CLI prints the message on one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        text = " ".join(str(message).split())
        super().__init__(f"{source}: {text}" if source else text)


class ModelError(LipcertError):
    """The model file or its architecture cannot be loaded or is not supported."""


class DataError(LipcertError):
    """The dataset cannot be read or does not fit the model."""


class ConfigError(LipcertError):
    """A flag or configuration value is invalid."""


class SelfCheckError(RuntimeError):
    """lipcert contradicts itself (a measured lower bound above a proven upper bound): a bug in lipcert, never a
    verdict or a certificate. The CLI reports it as an internal error (exit code 3)."""
