"""The values users type, parsed without torch: eps lists, gate items, fractions and the verify requirements."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from lipcert.errors import ConfigError

#: what ``verify`` may require of a model
REQUIRE = ("proven", "not-violated")
#: the norms a radius is measured in
NORMS = ("l2", "linf")
#: how a dataset's samples may be laid out, and the ranges their values may be stored in
LAYOUTS = ("auto", "NCHW", "NHWC")
VALUE_RANGES = ("auto", "0-255", "0-1")
#: other names a choice may be given by (any case): ``ort`` for ``onnxruntime``
ALIASES = {"ort": "onnxruntime"}


def choice(value: Any, options: Sequence[str]) -> str:
    """The option ``value`` names, whatever its case (``L2`` -> ``l2``, ``nchw`` -> ``NCHW``) or by an alias in
    ``ALIASES``; ValueError listing the options."""
    folded = value.strip().casefold() if isinstance(value, str) else None
    folded = ALIASES.get(folded, folded) if folded is not None else None
    match = next((option for option in options if option.casefold() == folded), None)
    if match is None:
        raise ValueError(f"expected one of {', '.join(options)}")
    return match


def parse_eps(text: str) -> list[tuple[str, float]]:
    """``36/255,72/255,1`` -> [("36/255", 0.1411...), ...]: fractions or decimals, non-negative, duplicates dropped."""
    values: list[tuple[str, float]] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"eps {part!r}: expected a number or a fraction like 36/255", parameter="eps") from None
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"eps {part!r}: must be a non-negative number", parameter="eps")
        if not any(math.isclose(value, v, rel_tol=1e-9, abs_tol=1e-12) for _, v in values):
            values.append((part, value))
    if not values:
        raise ConfigError("eps needs at least one value, e.g. 36/255,72/255", parameter="eps")
    return values


def fraction_problem(value: float) -> str | None:
    """Why ``value`` is not an accuracy (a fraction in [0, 1]), with a hint when it looks like a percentage."""
    if 0.0 <= value <= 1.0:
        return None
    hint = f"; {value:g} looks like a percentage: write {value / 100:g}" if 1.0 < value <= 100.0 else ""
    return f"expected a fraction between 0 and 1{hint}"


def parse_gate(item: str) -> tuple[str, float, float]:
    """``36/255=0.60`` -> ("36/255", 0.1412, 0.60); ValueError saying what is wrong."""
    eps_text, sep, acc_text = str(item).partition("=")
    try:
        eps = float(Fraction(eps_text.strip()))
        acc = float(acc_text)
    except (ValueError, ZeroDivisionError):
        eps = acc = math.nan
    if not sep or not eps >= 0 or not math.isfinite(eps) or not math.isfinite(acc):
        raise ValueError("expected EPS=ACCURACY, e.g. 36/255=0.60")
    problem = fraction_problem(acc)
    if problem:
        raise ValueError(f"expected EPS=ACCURACY with the accuracy {problem.removeprefix('expected ')}")
    return eps_text.strip(), eps, acc

