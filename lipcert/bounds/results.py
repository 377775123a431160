"""What ``verify`` answers: per-layer rows (``LayerResult``), the verdict (``VerifyResult``, schema
``lipcert.verify/1``) and the statuses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: relative slack on the claim that absorbs float32 rounding of weights normalised to 1 (e.g. 1.0000005)
DEFAULT_TOL = 1e-5



SCHEMA = "lipcert.verify/1"



PROVEN, VIOLATED, UNPROVEN, NO_RULE = "proven", "violated", "unproven", "no rule"



@dataclass
class LayerResult:
    """One step of the network: its bounds, how they were obtained, and its status against the claim."""

    name: str
    op: str
    nodes: list[str]
    in_shape: list[int] | None
    out_shape: list[int] | None
    lower: float | None
    lower_method: str | None
    lower_iterations: int | None  # power-iteration steps taken (stopped on convergence or at the cap)
    upper: float | None
    upper_method: str
    exact: bool | None  # linear steps: the upper bound is the norm (up to rounding); None for rules and patterns
    gap: float | None
    status: str
    reason: str = ""



@dataclass
class VerifyResult:
    """The answer of ``verify``: per-layer bounds, the network bound and the verdict."""

    schema: str
    lipcert_version: str
    model: str
    claimed: float
    claim_source: str
    tol: float
    device: str
    seed: int
    layers: list[LayerResult]
    network_upper: float
    network_lower: float
    network_lower_method: str
    empirical_budget: float | None  # seconds the empirical search may take (None: no limit)
    network_lower_steps: int  # search steps it took
    network_lower_stopped: bool  # it ran out of budget before its last step
    status: str
    top_contributors: list[dict]
    no_rule: list[str]
    combinations: list[dict]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    witness: dict | None = None  # the witness pair of a violated claim (``witness.Witness.summary``)
    #: "node: why" for each step whose form a pattern recognised but could not prove (``Propagation.near_misses``)
    near_misses: list[str] = field(default_factory=list)

    @property
    def why(self) -> str:
        """One line on what keeps the claim from being proven (empty when it is proven)."""
        if self.status == PROVEN:
            return ""
        search = (f"the empirical search ({self.network_lower_method}, {self.network_lower_steps} steps) found "
                  f"pairs with ratio up to {self.network_lower:.6g}")
        if self.status == VIOLATED:
            return f"{search}, above the claim {self.claimed:g}: the claim is false"
        missed = f"; recognised but not proven: {'; '.join(self.near_misses)}" if self.near_misses else ""
        if self.no_rule:
            reasons = {row.name: row.reason.removeprefix("no rule: ") for row in self.layers
                       if row.reason.startswith("no rule: ")}  # the assumption a recognised form failed
            named = ", ".join(f"{name} ({reasons[name]})" if name in reasons else name for name in self.no_rule)
            return f"no rule bounds {named}, so the network bound is unknown{missed}; {search}"
        factors = ", ".join(f"{c['layer']} ({c['factor']:.4g})" for c in self.top_contributors)
        return (f"the sound bound {self.network_upper:.6g} is above the claim {self.claimed:g}"
                + (f"; the factors above 1 are {factors}" if factors else "")
                + f"{missed}; {search}, so the claim may hold with a tighter bound")

    @property
    def breaking_layers(self) -> list[LayerResult]:
        """Layers whose norm is above the claim when the network's claim is not proven: where it breaks.

        In a proven network a layer above the claim is compensated by others below it; see ``layers_above``."""
        return [] if self.status == PROVEN else self.layers_above

    @property
    def layers_above(self) -> list[LayerResult]:
        """Layers whose norm is proven (by their lower bound) to be above the claim on their own."""
        return [layer for layer in self.layers if layer.status == VIOLATED]

    def to_dict(self) -> dict:
        data = asdict(self) | {"why": self.why}
        return _finite(data)



def _finite(value):
    """JSON has no infinity: write unbounded values as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value



def status_of(lower: float | None, upper: float | None, claim: float, tol: float) -> str:
    """proven: upper <= claim (1 + tol); violated: lower > claim (1 + tol); otherwise unproven."""
    limit = claim * (1.0 + tol)
    if lower is not None and lower > limit:
        return VIOLATED
    if upper is not None and upper <= limit:
        return PROVEN
    return UNPROVEN

