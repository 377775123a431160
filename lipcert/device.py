"""Choose the torch device: the GPU when there is one and the user did not say otherwise."""

from __future__ import annotations

import torch

from lipcert.errors import ConfigError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit ``cuda`` without a GPU is an error."""
    base = name.split(":")[0]
    if base not in CHOICES:
        raise ConfigError(f"device {name!r}: expected one of auto, cpu, cuda (or cuda:N)", parameter="device")
    if base == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA GPU is available to torch on this machine", parameter="device")
    return name
