"""The sizes at which bounds change method, declared once, and a trace of the branches taken.

Several bounds pick an exact dense computation for small operators and a structured one (the DFT of a
convolution, Gram iteration, the Schur test, one convolution for a linear region, kernels instead of matrices
for an SLL block) for large ones, and evaluate big computations in chunks. Production code reads the knobs at
call time (``current()``), so that the soundness harness can lower them (``override``) and meet every structured
path on models small enough for its ground truth. ``record`` counts each structured branch taken, under names
each module declares in its ``BRANCHES`` tuple; tests read the counts (``TAKEN``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Thresholds:
    """Every size threshold of the bounds, with its production value."""

    #: spectral: a dense SVD of the explicit matrix when min(in, out) <= dense_limit (and the entries fit
    #: ``dense_max_entries``); a matrix along the last axis: SVD when min(M.shape) <= dense_limit, else Gram iteration
    dense_limit: int = 4096
    #: spectral: at most this many entries in an explicit matrix (2^24 float64: 128 MiB)
    dense_max_entries: int = 2 ** 24
    #: spectral: working set, in elements, of chunked dense construction and of chunked DFT evaluation
    chunk_elems: int = 2 ** 22
    #: patterns: an SLL block's operators are compared as explicit matrices when each has at most this many entries
    sll_dense_entries: int = 2 ** 24
    #: patterns: a residual block is bounded by the S-procedure when its input and hidden sizes sum to at most this
    #: (each step of its search factors and diagonalises matrices of about that side)
    sll_quadratic_side: int = 1536


DEFAULT = Thresholds()
_current = DEFAULT


def current() -> Thresholds:
    """The thresholds in force (read at call time, never captured at import)."""
    return _current


@contextlib.contextmanager
def override(**changes: int) -> Iterator[Thresholds]:
    """Use other thresholds inside the block (tests: lowered, so that structured paths run on small models)."""
    global _current
    previous = _current
    _current = replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous


#: how often each branch was taken since the counter was last cleared (a module's ``BRANCHES`` names its branches)
TAKEN: Counter = Counter()


def record(branch: str) -> None:
    """Count one use of a structured branch (cheap: one dictionary update)."""
    TAKEN[branch] += 1
