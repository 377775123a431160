"""A linear region that commutes with every circular shift of its grid, bounded by the DFT of the composed map.

Assumption, checked step by step (``transfer_bound`` steps aside at the first step that fails it): every value of
the region is (channels, *grid), the grid of the region's input, and is made from that input by stride-1 circular
convolutions on the grid, 1x1 convolutions without padding (channel mixes), scalar and per-channel scales,
channel slices, sums and channel concatenations; or it is (channels, 1, ..., 1), a spatial mean or sum over the
whole grid mixed across channels, read only by sums that broadcast it back over the grid. Each such step commutes
with the circular shifts of the grid, so the region does: it is block circulant, the unitary DFT over the grid
block-diagonalises it, and ||A|| = max_f ||T(f)|| exactly, T(f) the c_out x c_in transfer matrix at frequency f
(Sedghi, Gupta, Long, ICLR 2019, for one convolution; each step's T multiplies along a chain and adds along a
sum). Zero padding between two convolutions, a crop or a mask breaks shift-equivariance: those steps are refused.

Transfers at a Fourier mode x[r] = a exp(2 pi i <f, r> / n): a circular convolution whose output o reads
x[(o + d t - b) mod n] multiplies a by K(f) = sum_t K_t exp(2 pi i <f, d t - b> / n); a mean over the grid
followed by its broadcast multiplies it by [f = 0] (n times a sum's weight M0 for a sum). Since A is real,
T(-f) = conj(T(f)): half the frequencies of the last axis suffice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipcert.bounds.fusion import refine
from lipcert.bounds.kinds import Combination, Linear, Region
from lipcert.bounds.spectral import ROUNDING_C, U64, inflate, largest_singular_value, ungrouped_kernel
from lipcert.bounds.steps import Step
from lipcert.bounds.thresholds import current
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    DiagStructure,
    IsometryStructure,
    LinearOperator,
    NonnegativeStructure,
    ProjectionStructure,
    ScalarStructure,
)
from lipcert.graph.ops.base import CombinationMode

#: the most entries of the explicit (c_out, c_in, *grid) matrix read to check that a step is a spatial reduction
REDUCE_ENTRIES = 2 ** 24


@dataclass
class _Form:
    """A value as transfer matrices over a chunk of frequencies, (F, c, c_src) complex; ``size`` (c, c_src) bounds
    |T(f)| entrywise at every frequency, ``terms`` counts the roundings along the way; ``lifted`` for a value of
    one position per channel, represented by its broadcast over the grid."""

    t: torch.Tensor
    size: torch.Tensor
    terms: int
    lifted: bool = False


def transfer_bound(step: Step) -> float | None:
    """A proven upper bound on the norm of a region under the module's assumption, by the DFT of the composed map
    (rounding included); None when a step breaks the assumption."""
    region = step.details
    if not isinstance(region, Region):
        return None
    source = step.inputs[0]
    shape = tuple(step.linear.in_shape)
    if len(shape) < 2 or region.shapes.get(source) != shape:
        return None
    grid = shape[1:]
    half = grid[:-1] + (grid[-1] // 2 + 1,)
    n_freq = math.prod(half)
    widest = max(s[0] for s in region.shapes.values() if len(s) == len(shape))
    chunk = max(1, current().chunk_elems // (widest * shape[0]))
    best, size, terms = 0.0, None, 0
    for start in range(0, n_freq, chunk):
        freqs = torch.stack(torch.unravel_index(torch.arange(start, min(n_freq, start + chunk)), half), dim=1)
        form = _compose(step, region, freqs, grid)
        if form is None or tuple(step.linear.out_shape) != (form.t.shape[1],) + grid:
            return None
        best = max(best, largest_singular_value(form.t))
        size, terms = form.size, form.terms
    if size is None:
        return None
    # every entry of T is a sum of products of weights and phases: its float error is at most gamma_terms times the
    # same sum in absolute values (``size``), so ||E(f)||_2 <= ||E(f)||_F <= 2 gamma_terms ||size||_F (complex)
    err = 2 * ROUNDING_C * terms * U64 * float(torch.linalg.vector_norm(size)) * (1 + 1e-6)
    return inflate(best + err, size.shape[0] * size.shape[1])


def _compose(step: Step, region: Region, freqs: torch.Tensor, grid: tuple[int, ...]) -> _Form | None:
    """The region's output as a form at ``freqs`` (F, nd), or None when a step breaks the assumption."""
    c = step.linear.in_shape[0]
    eye = torch.eye(c, dtype=torch.complex128).expand(freqs.shape[0], c, c)
    forms: dict[str, _Form] = {step.inputs[0]: _Form(eye, torch.eye(c, dtype=torch.float64), 0)}
    for s in region.substeps:
        ins = [forms.get(v) for v in s.inputs]
        found = [f for f in ins if f is not None]
        if len(found) != len(s.inputs):
            return None
        form = None
        match s.details:
            case Linear():
                form = None if found[0].lifted else _chain(refine(s.linear), found[0], freqs, grid)
            case Combination() as d:
                form = _combination(d, found, grid, region.shapes.get(s.output))
        if form is None:
            return None
        expected = (form.t.shape[1],) + ((1,) * len(grid) if form.lifted else grid)
        if region.shapes.get(s.output) != expected:
            return None
        forms[s.output] = form
    out = forms[region.substeps[-1].output]
    return None if out.lifted else out


def _chain(op: LinearOperator, form: _Form, freqs: torch.Tensor, grid: tuple[int, ...]) -> _Form | None:
    """A linear step applied to a form: each part of its chain in turn."""
    parts = op.structure.parts if isinstance(op.structure, ChainStructure) else (op,)
    for part in parts:
        if form.lifted:
            return None  # a reduced value is only read back by a sum that broadcasts it
        step = _part(part, form.t.shape[1], freqs, grid)
        if step is None:
            return None
        t, size, terms, lifted = step
        form = _Form(t @ form.t, size @ form.size, form.terms + terms, lifted)
    return form


def _part(op: LinearOperator, c: int, freqs: torch.Tensor,
          grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int, bool] | None:
    """One operator's transfer at ``freqs`` (F, c_out, c), its entrywise bound, its roundings and whether its
    output is reduced to one position; None when it is not one of the module's steps in its own coordinates."""
    s = op.structure
    if s.loose_in or s.loose_out or s.inexact or tuple(op.in_shape) != (c,) + grid or (
            s.core is not None and (tuple(s.core[0]), tuple(s.core[1])) != (tuple(op.in_shape), tuple(op.out_shape))):
        return None
    same = tuple(op.out_shape) == tuple(op.in_shape)
    f = freqs.shape[0]
    match s:
        case ScalarStructure(value=value, norm_only=False) if same:
            return _constant(torch.eye(c, dtype=torch.float64) * float(value), f) + (1, False)
        case DiagStructure(scale=scale) if same:
            scale = torch.as_tensor(scale).double()
            if scale.numel() == 1:
                return _constant(torch.eye(c, dtype=torch.float64) * float(scale.reshape(())), f) + (1, False)
            if scale.dim() == len(grid) + 1 and scale.shape[0] == c and all(d == 1 for d in scale.shape[1:]):
                return _constant(torch.diag(scale.reshape(-1)), f) + (1, False)
            return None
        case IsometryStructure(flat=True, onto=True) if same:
            return _constant(torch.eye(c, dtype=torch.float64), f) + (0, False)
        case ProjectionStructure(select=(1, start, end)) if tuple(op.out_shape) == (end - start,) + grid:
            return _constant(torch.eye(c, dtype=torch.float64)[start:end], f) + (0, False)
        case ConvStructure():
            return _conv(s, op, c, freqs, grid)
        case NonnegativeStructure(mode=None):
            return _reduction(op, c, freqs, grid)
    return None


def _constant(m: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A transfer equal at every frequency (a channel map), and its entrywise bound."""
    return m.to(torch.complex128).expand(f, *m.shape), m.abs()


def _conv(s: ConvStructure, op: LinearOperator, c: int, freqs: torch.Tensor,
          grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int, bool] | None:
    """A stride-1 circular convolution on the grid, or a 1x1 unpadded one (a channel mix), as a transfer."""
    nd = len(grid)
    w = s.weight.detach().to(torch.float64)
    if s.transpose or w.dim() != nd + 2 or any(v != 1 for v in s.stride) or tuple(s.input_spatial) != grid \
            or tuple(op.out_shape) != (w.shape[0],) + grid or len(s.pads) != 2 * nd:
        return None
    if not s.circular and (any(s.pads) or any(k != 1 for k in w.shape[2:])):
        return None  # zero padding: not shift-equivariant
    if s.circular and any(p > n for p, n in zip(s.pads, grid + grid, strict=False)):
        return None
    full = ungrouped_kernel(w, int(s.groups), c)
    if full is None:
        return None
    w, c_out = full, full.shape[0]
    taps = math.prod(w.shape[2:])
    kernel = w.reshape(c_out, c, taps).to(torch.complex128)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(k) * int(d) - int(b) for k, d, b in
                                           zip(w.shape[2:], s.dilation, s.pads[:nd], strict=False)],
                                         indexing="ij"), dim=-1).reshape(taps, nd)
    angle = torch.zeros(freqs.shape[0], taps, dtype=torch.float64)
    for axis in range(nd):  # (f * offset) mod n in exact integers keeps the angle in [0, 2 pi)
        angle += ((freqs[:, axis:axis + 1] * offsets[None, :, axis]) % grid[axis]).double() * (2 * math.pi / grid[axis])
    phase = torch.polar(torch.ones_like(angle), angle)
    t = torch.einsum("ft,oit->foi", phase, kernel)
    return t, w.abs().reshape(c_out, c, taps).sum(-1), c * taps + 4, False


def _reduction(op: LinearOperator, c: int, freqs: torch.Tensor,
               grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int, bool] | None:
    """A map to one position per channel, x -> sum_r M0 x[:, r] (a spatial mean or sum, channels mixed by M0),
    checked on its explicit matrix: as its broadcast over the grid, the transfer n M0 at f = 0 and 0 elsewhere."""
    c_out = op.out_shape[0]
    n = math.prod(grid)
    if tuple(op.out_shape) != (c_out,) + (1,) * len(grid) or c_out * c * n > REDUCE_ENTRIES:
        return None
    with torch.no_grad():
        rows = op.adjoint(torch.eye(c_out, dtype=torch.float64).reshape((c_out, c_out) + (1,) * len(grid)))
    first = rows.reshape(c_out, c, n)[:, :, :1]
    if not torch.equal(rows.reshape(c_out, c, n), first.expand(c_out, c, n)):
        return None  # not the same weight at every position
    m0 = first[:, :, 0] * n
    t = torch.zeros(freqs.shape[0], c_out, c, dtype=torch.complex128)
    t[(freqs == 0).all(dim=1)] = m0.to(torch.complex128)
    return t, m0.abs(), c + 4, True  # M0 = n x (the stored weight), then a product over c channels


def _combination(d: Combination, forms: list[_Form], grid: tuple[int, ...],
                 out: tuple[int, ...] | None) -> _Form | None:
    """A sum (signs from the node, reduced inputs broadcast back) or a channel concatenation of forms."""
    if out is None or len(out) != len(grid) + 1 or tuple(out[1:]) != grid:
        return None
    terms = max(f.terms for f in forms) + len(forms) + 2
    if d.mode is CombinationMode.CONCAT:
        if d.axis != 1 or any(f.lifted for f in forms):
            return None
        return _Form(torch.cat([f.t for f in forms], dim=1), torch.cat([f.size for f in forms], dim=0), terms)
    signs = d.signs
    if signs is None or len(signs) != len(forms) or len({f.t.shape[1] for f in forms}) != 1 \
            or forms[0].t.shape[1] != out[0]:
        return None
    t = sum(sg * f.t for sg, f in zip(signs, forms, strict=False)) / d.divisor
    size = sum(abs(sg) * f.size for sg, f in zip(signs, forms, strict=False)) / abs(d.divisor)
    if not isinstance(t, torch.Tensor) or not isinstance(size, torch.Tensor):
        return None
    return _Form(t, size, terms)
