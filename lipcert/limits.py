"""Resource limits for untrusted model and data files: refuse oversized tensors *before* allocating them.

Sizes are counted in elements (not bytes) and compared with a maximum: ``max_elements`` when the caller passes
one (the ``max_elements`` setting), else the environment variable ``LIPCERT_MAX_ELEMENTS`` when it is set, else
:data:`DEFAULT_MAX_ELEMENTS`. Counts are exact Python integers, so a declared shape such as
``[2**40, 2**40]`` cannot overflow into a small number.

What is bounded, and by what (``L`` is the limit):

* every tensor stored in a model file (ONNX initializers, Constant values, safetensors tensors): ``L``
  elements, checked from the declared dims before any byte of data is decoded;
* the model's input at the probe batch, and every value the loader computes while folding the graph (the
  *intermediate shapes*): ``L`` elements per value, predicted by ``lipcert.graph.budget`` from the node's
  inputs and attributes (each operator's size rule) *before* the node runs, and checked again on what it produced;
* the working memory a node needs (a convolution's unfolded input, padded copies): ``L`` elements;
* all values held at once while folding: ``TOTAL_FACTOR * L`` elements;
* the multiply-adds of one node (convolutions, matrix products, pooling windows): ``WORK_FACTOR * L``, so that
  a small file cannot ask for hours of arithmetic;
* one dataset sample: ``L`` elements.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from lipcert.errors import ConfigError, LipcertError, ModelError

#: Default largest number of elements of one tensor, declared input, intermediate value or dataset sample
#: (2**28 = 268,435,456: 1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 2**28
#: Environment variable that replaces the default when ``max_elements`` is not given.
ENV_VAR = "LIPCERT_MAX_ELEMENTS"
#: All values held at once while the loader folds a graph: at most this many times the limit.
TOTAL_FACTOR = 4
#: Multiply-adds one node may need while the loader folds a graph: at most this many times the limit.
WORK_FACTOR = 256
#: Largest rank of a shape the loader builds (torch's own limit is 64).
MAX_RANK = 64
#: Largest safetensors JSON header, in bytes (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

UNBOUNDED = 2**200  # what an unbounded or nonsensical size counts as: more than any limit


def resolve(max_elements: int | None) -> int:
    """The limit to apply: ``max_elements`` when given, else ``$LIPCERT_MAX_ELEMENTS``, else the default."""
    if max_elements is None:
        text = os.environ.get(ENV_VAR, "").strip()
        if not text:
            return DEFAULT_MAX_ELEMENTS
        try:
            max_elements = int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{ENV_VAR}={text!r} is not an integer") from None
        if max_elements < 1:
            raise ConfigError(f"{ENV_VAR}={text!r} must be a positive integer")
        return max_elements
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ConfigError(f"max_elements must be a positive integer, got {max_elements!r}")
    return max_elements


def count(shape: Iterable[Any]) -> int:
    """Number of elements of a shape, as an exact Python int (negative dims count as 0)."""
    total = 1
    for d in shape:
        total *= max(int(d), 0)
    return total


def shape_text(shape: Sequence[Any], most: int = 8) -> str:
    """A shape for a one-line message, shortened when it has many dimensions."""
    dims = [str(int(d)) for d in shape]
    if len(dims) > most:
        dims = dims[:most] + [f"... ({len(dims)} dims)"]
    return "(" + ", ".join(dims) + ")"


def check(shape_or_count: Sequence[int] | int, limit: int, what: str, source: str | None = None,
          error: type[LipcertError] = ModelError) -> int:
    """Raise ``error`` naming ``what`` when a shape (or element count) exceeds ``limit``; return the count."""
    n = shape_or_count if isinstance(shape_or_count, int) else count(shape_or_count)
    if n > limit:
        shape = "" if isinstance(shape_or_count, int) else f" (shape {shape_text(shape_or_count)})"
        size = "more than 10**60" if n >= UNBOUNDED else f"{n:,}"
        raise error(f"{what} has {size} elements{shape}, more than the limit of {limit:,} (max_elements; "
                    f"raise it)", source=source, parameter="max_elements")
    return n
