"""The size-dependent paths of lipcert's bounds, for the harness: lowered thresholds and what must be reached.

lipcert bounds small operators densely (an SVD of the explicit matrix) and large ones by their structure (the DFT
of a convolution, Gram iteration, the Schur test, one convolution for a linear region, kernels for an SLL
block), in chunks when big. The harness keeps programs small, so it lowers the thresholds
(``lipcert.bounds.thresholds.override``) to send small programs down the structured paths, where the oracles
compare every bound with the dense Jacobian norm.
"""

from __future__ import annotations

from lipcert.bounds import fusion, patterns, propagate, regions, spectral

#: threshold settings the harness runs programs under: every operator structured and every evaluation chunked
#: to one column or frequency; a mix (small operators dense, others structured, SLL blocks either way); the
#: production sizes with small chunks
LOWERED: dict[str, dict[str, int]] = {
    "structured": {"dense_limit": 0, "dense_max_entries": 0, "chunk_elems": 1, "sll_dense_entries": 0,
                   "sll_quadratic_side": 0},
    "mixed": {"dense_limit": 6, "dense_max_entries": 300, "chunk_elems": 40, "sll_dense_entries": 300,
              "sll_quadratic_side": 12},
    "chunked": {"chunk_elems": 16},
}

#: every method a row's upper bound can name (``LayerResult.upper_method``; "product(" stands for any product
#: of parts' bounds)
METHODS = ("svd", "fft-circular", "fft-embedding", "gram", "schur", "structural", "product(",
           "fft-circular (region)", "fft-embedding (region)", "product(region steps)", "pad-conv", "dft (region)",
           "pad-conv (region)", "product(region, tail)", "series (region)")

#: every structured branch the bounds declare
BRANCHES = spectral.BRANCHES + regions.BRANCHES + fusion.BRANCHES + patterns.BRANCHES + propagate.BRANCHES


def methods_of(upper_method: str) -> set[str]:
    """The entries of ``METHODS`` a row's method uses: itself, and for a product of parts' bounds "product(" and
    the method of each factor (each factor's bound enters the row's bound, which the oracles check)."""
    if upper_method.startswith("product(") and not upper_method.startswith("product(region"):
        return {"product("} | set(upper_method[len("product("):-1].split(","))
    return {upper_method}
