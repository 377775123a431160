"""A linear region that is a polynomial p(C) = sum_k c_k C^k in one convolution C (SOC's truncated exponential).

Assumptions, each checked here (``series_bound`` steps aside, None, at the first that fails):
- every value of the region has the shape of its input and is made from it by one convolution C (every conv of the
  region: the same weights, stride, pads, dilation, groups and padding mode), scalar multiples and sums;
- the coefficients c_k are collected exactly (fractions); each scalar of the graph (a ``Div`` by 6 read as 1/6 in
  float64) is taken as exact within a relative 2u, and the error it can make in c_k is added;
- for the spectral bound, C's padding makes a skew kernel a skew matrix: stride 1, odd kernel sizes, symmetric
  padding of exactly d (k - 1) / 2 per axis (zero or circular), as many channels in as out (groups expanded); how far
  the kernel is from skew is bounded, not assumed (below).

With K[o, i, t] = -K[i, o, k - 1 - t] (all spatial axes flipped) the padded convolution's matrix is skew (its entry
between output r and input r + d (t - (k-1)/2) is K[o, i, t]; the transpose's is K[i, o, k - 1 - t]), so normal
with spectrum in i [-rho, rho], rho >= ||S||, and ||p(S)|| = max over the spectrum of |p(i lambda)|
<= max_{|lambda| <= rho} |p(i lambda)|. The kernel is skew only up to rounding: C = S + E with S the convolution
of the exactly skew fl(K - K^T) / 2 and E that of K minus it, ||E|| <= e by the convolution bound, and
||p(S + E) - p(S)|| <= sum_k |c_k| ((rho + e)^k - rho^k). |p(i lambda)|^2 = q(lambda) is an even polynomial: its
maximum on [0, rho] is bounded by its values on a grid, the grid's float error, and h^2 / 8 max |q''| between
points (the distance of q to its chord). Otherwise (C not skew) the general bound sum_k |c_k| ||C||^k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

from lipcert.bounds.fusion import core, refine
from lipcert.bounds.kinds import Combination, Linear, Region
from lipcert.bounds.spectral import U64, conv_upper_bound, ungrouped_kernel
from lipcert.bounds.steps import Step
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    DiagStructure,
    IsometryStructure,
    LinearOperator,
    ScalarStructure,
)
from lipcert.graph.ops.base import CombinationMode

#: the highest power of C read (a longer series is left to the other bounds)
MAX_DEGREE = 64
#: the grid's own error target on q's maximum (absolute, q(0) = c_0^2 is 1 for an exponential)
GRID_TOLERANCE = 1e-10
#: the most grid points for q
MAX_POINTS = 2 ** 20


@dataclass
class _Poly:
    """A value as sum_k coeffs[k] C^k of the region's input; ``size[k]`` sums |products| over the paths that make
    c_k and ``factors`` counts the graph's scalars along the longest path (their float error)."""

    coeffs: list[Fraction]
    size: list[Fraction]
    factors: int


@dataclass
class Series:
    """A region read as p(C): its coefficients, their error bounds and C's convolution operator."""

    coeffs: list[Fraction]
    errors: list[Fraction]
    conv: LinearOperator


def series_bound(step: Step) -> tuple[str, float] | None:
    """The region's bound as a polynomial in one convolution, with its branch (``region.series`` when C is skew,
    ``region.series-sum`` for the general bound); None when an assumption fails."""
    series = read_series(step)
    if series is None:
        return None
    norm = conv_upper_bound(series.conv)
    found = []
    if math.isfinite(norm):
        found.append(("region.series-sum", _up(_sum_bound(series.coeffs, series.errors, Fraction(norm)))))
    skew = _skew_bound(series)
    if skew is not None:
        found.append(("region.series", skew))
    return min(found, key=lambda f: f[1]) if found else None


def read_series(step: Step) -> Series | None:
    """The region as p(C) (see the module docstring), or None when it is not a polynomial in one convolution."""
    region = step.details
    if not isinstance(region, Region):
        return None
    shape = tuple(step.linear.in_shape)
    if len(shape) < 2 or tuple(step.linear.out_shape) != shape or region.shapes.get(step.inputs[0]) != shape:
        return None
    forms: dict[str, _Poly] = {step.inputs[0]: _Poly([Fraction(1)], [Fraction(1)], 0)}
    conv: list[LinearOperator] = []
    for s in region.substeps:
        ins = [forms.get(v) for v in s.inputs]
        if any(f is None for f in ins) or region.shapes.get(s.output) != shape:
            return None
        found = [f for f in ins if f is not None]
        form = None
        match s.details:
            case Linear():
                form = _chain(s, found[0], shape, conv)
            case Combination() as d:
                form = _sum(d, found)
        if form is None or len(form.coeffs) > MAX_DEGREE + 1:
            return None
        forms[s.output] = form
    out = forms.get(step.output)
    if out is None or not conv or len(out.coeffs) < 2:
        return None
    slack = (1 + 2 * Fraction(U64)) ** out.factors - 1
    return Series(out.coeffs, [slack * s for s in out.size], conv[0])


def _maps(s: Step) -> list[LinearOperator]:
    """A linear step's maps in order: its nodes' own operators (one per node, the last making the step's value),
    else the parts of its refined chain."""
    ops = [p.operator for p in s.parts]
    if ops and len(ops) == len(s.nodes) and s.parts[-1].output == s.output and all(op is not None for op in ops):
        return [op for op in ops if op is not None]
    op = refine(s.linear)
    return list(op.structure.parts) if isinstance(op.structure, ChainStructure) else [op]


def _chain(s: Step, form: _Poly, shape: tuple[int, ...], conv: list[LinearOperator]) -> _Poly | None:
    """A linear step on a polynomial: each map a scalar multiple (exact, or within 2u), an identity, or C."""
    for op in _maps(s):
        st = op.structure
        if st.loose_in or st.loose_out or st.inexact or tuple(op.in_shape) != shape \
                or tuple(op.out_shape) != shape or core(op) != (shape, shape):
            return None
        match st:
            case ScalarStructure(value=value, norm_only=False) if math.isfinite(float(value)):
                form = _scaled(form, float(value))
            case DiagStructure(scale=scale) if torch.as_tensor(scale).numel() == 1 \
                    and math.isfinite(float(torch.as_tensor(scale).reshape(()))):
                form = _scaled(form, float(torch.as_tensor(scale).reshape(())))
            case IsometryStructure(flat=True, onto=True):
                pass
            case ConvStructure():
                if not _same_conv(op, conv, shape):
                    return None
                form = _Poly([Fraction(0)] + form.coeffs, [Fraction(0)] + form.size, form.factors)
            case _:
                return None
    return form


def _scaled(form: _Poly, value: float) -> _Poly:
    """``value`` times a polynomial; ``value`` counts as a scalar of the graph (within 2u of the real one)."""
    f = Fraction(value)
    return _Poly([f * c for c in form.coeffs], [abs(f) * c for c in form.size], form.factors + 1)


def _same_conv(op: LinearOperator, conv: list[LinearOperator], shape: tuple[int, ...]) -> bool:
    """Whether ``op`` is C: the first convolution met becomes C (stride 1, same grid in and out, forward); every
    later one must have its weights and every attribute."""
    s = op.structure
    if not isinstance(s, ConvStructure) or s.transpose or any(v != 1 for v in s.stride) \
            or tuple(s.input_spatial) != shape[1:] or len(s.pads) != 2 * (len(shape) - 1):
        return False
    if not conv:
        conv.append(op)
        return True
    r = conv[0].structure
    assert isinstance(r, ConvStructure)
    return (tuple(s.pads), tuple(s.dilation), int(s.groups), bool(s.circular), tuple(s.output_padding)) == \
        (tuple(r.pads), tuple(r.dilation), int(r.groups), bool(r.circular), tuple(r.output_padding)) and \
        s.weight.shape == r.weight.shape and torch.equal(s.weight.double(), r.weight.double())


def _sum(d: Combination, forms: list[_Poly]) -> _Poly | None:
    """sum_i signs_i x_i / divisor over the data inputs, all of the region's one shape (no broadcasting)."""
    if d.mode is not CombinationMode.SUM or d.signs is None or len(d.signs) != len(forms):
        return None
    n = max(len(f.coeffs) for f in forms)
    coeffs, size = [Fraction(0)] * n, [Fraction(0)] * n
    divisor = Fraction(d.divisor)
    for sign, f in zip(d.signs, forms, strict=True):
        w = Fraction(sign) / divisor
        for k, (c, z) in enumerate(zip(f.coeffs, f.size, strict=True)):
            coeffs[k] += w * c
            size[k] += abs(w) * z
    return _Poly(coeffs, size, max(f.factors for f in forms))


def _sum_bound(coeffs: list[Fraction], errors: list[Fraction], norm: Fraction) -> Fraction:
    """sum_k (|c_k| + err_k) norm^k: a bound on ||p(C)|| for any C with ||C|| <= norm."""
    return sum(((abs(c) + e) * norm ** k for k, (c, e) in enumerate(zip(coeffs, errors, strict=True))), Fraction(0))


def _skew_bound(series: Series) -> float | None:
    """The spectral bound of p(S) plus the perturbation by E (module docstring); None when C's padding, shape or
    kernel size would not make a skew kernel a skew matrix."""
    op = series.conv
    s = op.structure
    assert isinstance(s, ConvStructure)
    c = op.in_shape[0]
    nd = len(op.in_shape) - 1
    w = ungrouped_kernel(s.weight.detach().double(), int(s.groups), c)
    if w is None or w.shape[0] != c or any(k % 2 == 0 for k in w.shape[2:]) or any(
            s.pads[i] != s.pads[nd + i] or s.pads[i] != s.dilation[i] * (w.shape[2 + i] - 1) // 2 for i in range(nd)):
        return None
    axes = list(range(2, 2 + nd))

    def flipped(k: torch.Tensor) -> torch.Tensor:
        return k.transpose(0, 1).flip(axes)

    skew = (w - flipped(w)) * 0.5  # fl(a - b) = -fl(b - a): exactly skew, unless halving underflows (checked)
    if not torch.equal(skew, -flipped(skew)):
        return None
    rest = w - skew
    rho = conv_upper_bound(replace(op, structure=replace(s, weight=skew, groups=1)))
    if not math.isfinite(rho):
        return None
    if torch.count_nonzero(rest) == 0:
        e = 0.0
    else:  # |fl(w - skew) - (w - skew)| <= u |fl(...)| / (1 - u): a conv of norm <= sum_t ||Delta_t||_F
        e = conv_upper_bound(replace(op, structure=replace(s, weight=rest, groups=1)))
        e += 2 * U64 * float(torch.linalg.vector_norm(rest.flatten(2), dim=(0, 1)).sum())
        if not math.isfinite(e):
            return None
    r, err = Fraction(rho), Fraction(e)
    peak = max_on_imaginary_axis(series.coeffs, r)
    moved = sum((abs(ck) * ((r + err) ** k - r ** k) for k, ck in enumerate(series.coeffs)), Fraction(0))
    return _up(peak + moved + _sum_bound([Fraction(0)] * len(series.coeffs), series.errors, r + err))


def max_on_imaginary_axis(coeffs: list[Fraction], rho: Fraction) -> Fraction:
    """An upper bound on max_{|lambda| <= rho} |p(i lambda)| for real coefficients (the module docstring)."""
    real = [Fraction(0)] * len(coeffs)
    imag = [Fraction(0)] * len(coeffs)
    for k, ck in enumerate(coeffs):
        (real if k % 2 == 0 else imag)[k] = ck * (-1) ** (k // 2)
    q = _add(_mul(real, real), _mul(imag, imag))
    while len(q) > 1 and q[-1] == 0:
        q.pop()
    degree = len(q) - 1
    absolute = sum((abs(a) * rho ** j for j, a in enumerate(q)), Fraction(0))
    curvature = sum((j * (j - 1) * abs(a) * rho ** (j - 2) for j, a in enumerate(q) if j >= 2), Fraction(0))
    rho_f = float(rho)
    wanted = rho_f * math.sqrt(float(curvature) / (8 * GRID_TOLERANCE))
    points = MAX_POINTS if not wanted < MAX_POINTS else max(1024, math.ceil(wanted) + 1)
    x = np.linspace(0.0, rho_f, points + 1)
    x[-1] = rho_f  # the grid covers [0, rho] (rho is a float)
    values = np.zeros_like(x)
    with np.errstate(over="ignore", invalid="ignore"):
        for a in reversed(q):  # Horner: error <= gamma_{2 degree + 2} sum_j |q_j| x^j (coefficients rounded too)
            values = values * x + float(a)
    if not (math.isfinite(float(absolute)) and np.isfinite(values).all()):
        return sum((abs(c) * rho ** k for k, c in enumerate(coeffs)), Fraction(0))  # |p(i lambda)| <= sum |c_k| rho^k
    gap = Fraction(float(np.diff(x).max())) * (1 + Fraction(1, 10 ** 9))
    top = Fraction(float(values.max()))
    grid_err = (2 * degree + 4) * Fraction(U64) * Fraction(101, 100) * absolute
    peak_sq = max(Fraction(0), top + grid_err + gap * gap / 8 * curvature)
    return _sqrt_up(peak_sq)


def _mul(a: list[Fraction], b: list[Fraction]) -> list[Fraction]:
    """The product of two polynomials (coefficients from degree 0)."""
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] += x * y
    return out


def _add(a: list[Fraction], b: list[Fraction]) -> list[Fraction]:
    """The sum of two polynomials."""
    n = max(len(a), len(b))
    zero = Fraction(0)
    return [(a[i] if i < len(a) else zero) + (b[i] if i < len(b) else zero) for i in range(n)]


def _sqrt_up(v: Fraction) -> Fraction:
    """A float >= sqrt(v), as a fraction."""
    s = math.sqrt(float(v))
    while Fraction(s) ** 2 < v:
        s = math.nextafter(s, math.inf)
    return Fraction(s)


def _up(v: Fraction) -> float:
    """The least float >= v."""
    f = float(v)
    return math.nextafter(f, math.inf) if Fraction(f) < v else f
