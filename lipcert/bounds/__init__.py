"""Lipschitz bounds of a loaded graph: steps, patterns, fusion, spectral bounds, power iteration, empirical search,
propagation, the float error plan and ``verify``."""
