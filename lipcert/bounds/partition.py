"""Partition-aware bounds: values that depend on disjoint parts of one tensor combine better than by a sum.

A ``Profile`` says that a value v depends on disjoint slices s_p = [start, end) of a base value s along one
axis, with gains g_p:  ||dv||^2 <= sum_p g_p^2 ||ds_p||^2. Since the slices are disjoint,
sum_p ||ds_p||^2 <= ||ds||^2, so ||dv|| <= max_p g_p L(s) ||dx||. The rules, each with its reason:

- a linear chain that starts with a selection P_p of s (a ``Slice`` of step 1 on one axis, a ``Split``
  output), bounded by L: gain L on part p, since ||A P_p ds|| <= ||A P_p|| ||ds_p|| and P_p P_p^T = I;
- a step of one input with factor L: every gain times L;
- a concatenation (or an elementwise max/min) of values with profiles on the same base and axis:
  ||d[v_1; ...]||^2 = sum_k w_k^2 ||dv_k||^2, so g_p = sqrt(sum_k (w_k g_kp)^2);
- a sum: for any weights l_k > 0 with sum 1, ||sum_k w_k dv_k||^2 <= sum_k w_k^2 ||dv_k||^2 / l_k (Cauchy-Schwarz),
  so g_p^2 = sum_k (w_k g_kp)^2 / l_k (l_k chosen by the gains; the plain sum rule is kept when better);
- rebasing: when s itself has a profile on a base t, ||dv|| <= max_p g_p ||ds|| gives v the profile of s
  on t times max_p g_p. Inputs of a combination are rebased until they share one base, else no profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lipcert.graph.ops.base import CombinationMode

Segment = tuple[int, int, float]


@dataclass(frozen=True)
class Profile:
    """||dv||^2 <= sum_p gain_p^2 ||d base_p||^2 over disjoint slices [start, end) of ``base`` on ``axis``
    (an axis of the batched tensor, never 0)."""

    base: str
    axis: int
    parts: tuple[Segment, ...]

    @property
    def top(self) -> float:
        return max((g for _, _, g in self.parts), default=0.0)

    def scaled(self, factor: float) -> Profile:
        return Profile(self.base, self.axis, tuple((a, b, _mul(g, factor)) for a, b, g in self.parts))


def _mul(a: float, b: float) -> float:
    return 0.0 if a == 0.0 or b == 0.0 else math.nextafter(a * b, math.inf)


def selection(base: str, select: tuple[int, int, int], gain: float) -> Profile | None:
    """The profile of a chain that starts by selecting [start, end) of ``base`` on one axis, bounded by ``gain``."""
    axis, start, end = select
    return Profile(base, axis, ((start, end, gain),)) if end > start else None


def union(base: str, selects: Sequence[tuple[int, int, int]], gain: float) -> Profile | None:
    """A linear map that reads only the selected parts of ``base`` (one axis): gain ``gain`` (its norm) on the
    union of those parts, since v = A P_U^T P_U s for the union U."""
    axis = selects[0][0]
    merged: list[list[int]] = []
    for _, start, end in sorted(selects, key=lambda t: t[1]):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return Profile(base, axis, tuple((a, b, gain) for a, b in merged)) if merged else None


def _rebase(profile: Profile, profiles: Mapping[str, Profile]) -> Profile | None:
    parent = profiles.get(profile.base)
    return None if parent is None else parent.scaled(profile.top)


def _gain_at(profile: Profile, a: int, b: int) -> float:
    """The gain of the part holding the segment [a, b) (0 if none: the value does not depend on it)."""
    return next((g for s, e, g in profile.parts if s <= a and b <= e), 0.0)


def combine(mode: CombinationMode, inputs: Sequence[str], weights: Sequence[float], profiles: Mapping[str, Profile],
            order: Mapping[str, int], lengths: Mapping[tuple[str, int], int]) -> Profile | None:
    """The profile of a concatenation, max or sum of ``inputs`` (weighted), or None.

    Inputs are merged base by base, deepest first: those on the latest base (an input that is that base
    itself counts as its whole axis with gain 1) are combined into one profile, which is then rebased onto
    its base's own profile; so parts that are disjoint in an inner value stay disjoint. ``lengths[(v, axis)]``
    is the length of an axis of a value."""
    items: list[tuple[str, Profile | None, float]] = [(v, profiles.get(v), w)
                                                     for v, w in zip(inputs, weights, strict=False)]
    while True:
        with_profile = [p for _, p, _ in items if p is not None]
        if not with_profile:
            return None
        base = max((p.base for p in with_profile), key=lambda b: order.get(b, -1))
        axis = next(p.axis for p in with_profile if p.base == base)
        group = [(v, p, w) for v, p, w in items if (p is not None and p.base == base) or (p is None and v == base)]
        if any(p is not None and p.axis != axis for _, p, _ in group) or (base, axis) not in lengths:
            return None
        whole = Profile(base, axis, ((0, lengths[(base, axis)], 1.0),))
        merged = _merge(mode, [p or whole for _, p, _ in group], [w for _, _, w in group])
        rest = [item for item in items if item not in group]
        if not rest:
            return merged
        rebased = _rebase(merged, profiles)
        if rebased is None:
            return None
        items = rest + [("", rebased, 1.0)]


def _merge(mode: CombinationMode, found: list[Profile], weights: Sequence[float]) -> Profile:
    """Profiles on one base and axis, combined segment by segment."""
    base, axis = found[0].base, found[0].axis
    cuts = sorted({c for p in found for s, e, _ in p.parts for c in (s, e)})
    segments = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    table = [[_mul(w, _gain_at(p, a, b)) for a, b in segments] for p, w in zip(found, weights, strict=False)]
    if mode in (CombinationMode.CONCAT, CombinationMode.MAX):
        gains = [math.sqrt(math.fsum(row[i] ** 2 for row in table)) * (1 + 1e-12) for i in range(len(segments))]
    else:
        gains = _sum_gains(table)
    return Profile(base, axis, tuple((a, b, g) for (a, b), g in zip(segments, gains, strict=False) if g > 0))


def _sum_gains(table: list[list[float]]) -> list[float]:
    """Gains of a sum: g_p^2 = sum_k t_kp^2 / l_k, for the weights l (by max gain, or by its square) that give
    the smaller largest gain."""
    best: list[float] | None = None
    for power in (1, 2):
        size = [max(row, default=0.0) ** power for row in table]
        total = math.fsum(size)
        if total == 0:
            return [0.0] * (len(table[0]) if table else 0)
        lam = [s / total for s in size]
        gains = [math.sqrt(math.fsum(row[i] ** 2 / share for row, share in zip(table, lam, strict=False) if share > 0))
                 * (1 + 1e-12)
                 for i in range(len(table[0]))]
        if best is None or max(gains, default=0.0) < max(best, default=0.0):
            best = gains
    return best or []
