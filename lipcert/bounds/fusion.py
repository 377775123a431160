"""Give a fused chain of linear operators the most precise structure for its upper bound.

The chain's forward and adjoint stay exactly as built; only the description used by ``spectral`` changes,
and every rewrite is an exact identity or a proven bound: a wrap pad followed by an unpadded convolution whose
kernel spans the pad is a circular convolution (how torch exports ``padding_mode="circular"``); scalar and
per-channel scales fold into the neighbouring convolution or matrix (an un-folded batch norm); matrices
multiply; isometries (reshapes, transposes, zero padding) change no norm bound and take the structure of their
neighbour.

A merged structure keeps the shapes it describes under ``core`` (its own input and output shapes), which may
differ from the chain's once an isometry has been absorbed. Two structures only combine when they meet in the
same coordinates: the same core shapes, with at most plain reshapes (which keep the flat order) absorbed
between them. ``loose_in`` / ``loose_out`` mark a side where a transpose or a padding was absorbed, so that
coordinates there are no longer the chain's; ``inexact`` marks a structure whose norm is only an upper bound
of the chain's (an absorbed zero padding, or a ``norm_only`` scalar such as a global average pooling, which
is counted as its norm 1/sqrt(n) but is not a multiple of the identity). Each merge taken is recorded under its
name in ``BRANCHES``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lipcert.bounds.thresholds import record
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    DiagStructure,
    IsometryStructure,
    LinearOperator,
    MatrixStructure,
    NonnegativeStructure,
    ScalarStructure,
    Structure,
)

#: the merges ``refine`` records (``thresholds.record``)
BRANCHES = ("fusion.absorb", "fusion.circular", "fusion.wrap-pair", "fusion.scalar", "fusion.conv-scale",
            "fusion.matrix-scale", "fusion.matrix-product")


def core(op: LinearOperator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input and output shapes that ``op.structure`` describes."""
    return op.structure.core if op.structure.core is not None else (tuple(op.in_shape), tuple(op.out_shape))


def _aligned(a: LinearOperator, b: LinearOperator) -> bool:
    """Whether ``a``'s structure ends in the coordinates where ``b``'s structure starts."""
    return (not a.structure.loose_out and not b.structure.loose_in
            and tuple(core(a)[1]) == tuple(core(b)[0]))


def _wrap(op: LinearOperator) -> bool:
    """Whether ``op`` is a wrap pad (a ``Pad`` in mode wrap, or torch's Slice/Concat export of one)."""
    return isinstance(op.structure, NonnegativeStructure) and op.structure.mode == "wrap"


def _joined(a: LinearOperator, b: LinearOperator, structure: Structure) -> LinearOperator:
    """``b o a`` (structures aligned) described by one ``structure`` running from a's core input to b's output."""
    merged = replace(structure, core=(core(a)[0], core(b)[1]), loose_in=a.structure.loose_in,
                     loose_out=b.structure.loose_out, inexact=a.structure.inexact or b.structure.inexact)
    return replace(a.then(b), structure=merged)


def _with_scalar(a: LinearOperator, b: LinearOperator, structure: Structure) -> LinearOperator:
    """``b o a`` where one side is a scalar: the other side's coordinates, with the scalar's losses on its side."""
    scalar_first = isinstance(a.structure, ScalarStructure)
    scalar, other = (a.structure, b.structure) if scalar_first else (b.structure, a.structure)
    lost = scalar.loose_in or scalar.loose_out
    merged = replace(structure, core=core(b if scalar_first else a),
                     loose_in=other.loose_in or (lost and scalar_first),
                     loose_out=other.loose_out or (lost and not scalar_first),
                     # a pooling counted as its norm: ||X P|| <= ||P|| ||X||, not equal
                     inexact=other.inexact or scalar.inexact or (
                         _norm_only(a if scalar_first else b) and not isinstance(structure, ScalarStructure)))
    if isinstance(merged, ScalarStructure):
        merged = replace(merged, norm_only=_norm_only(a) or _norm_only(b))
    return replace(a.then(b), structure=merged)


def _norm_only(op: LinearOperator) -> bool:
    """Whether ``op`` is a scalar counted as its norm that is not a multiple of the identity."""
    return isinstance(op.structure, ScalarStructure) and op.structure.norm_only


def _absorb(a: LinearOperator, b: LinearOperator) -> LinearOperator:
    """``b o a`` where one side is an isometry: the other side's structure, the isometry noted on its side."""
    match a.structure, b.structure:
        case IsometryStructure() as first, IsometryStructure() as second:
            structure = IsometryStructure(flat=first.flat and second.flat, onto=first.onto and second.onto)
            return replace(a.then(b), structure=structure)
        case IsometryStructure() as iso, own:
            kept, iso_first = b, True
        case own, IsometryStructure() as iso:
            kept, iso_first = a, False
        case _:
            raise TypeError(f"{a.name!r} then {b.name!r}: neither is an isometry")  # ``_merged`` checks one is
    moved = not iso.flat
    merged = replace(own, core=core(kept), loose_in=own.loose_in or (moved and iso_first),
                     loose_out=own.loose_out or (moved and not iso_first),
                     # ||X P|| <= ||X|| for an isometry P that is not onto (zero padding)
                     inexact=own.inexact or (iso_first and not iso.onto))
    return replace(a.then(b), structure=merged)


def _circular(pad: LinearOperator, conv: LinearOperator) -> LinearOperator | None:
    """Pad(mode=wrap) then Conv(pads=0) with pad total = effective kernel - 1 per axis: a circular conv.

    Assumes: the pad is one wrap pad whose input is the conv's input grid (aligned cores), it pads only the
    conv's spatial axes, by non-negative amounts of at most the axis length, and the conv is not transposed and
    unpadded (all checked). Then
    output o reads x[(s o + d t - begin) mod n], which is what ``spectral`` bounds as circular."""
    s, wrap = conv.structure, pad.structure
    if not isinstance(s, ConvStructure) or not isinstance(wrap, NonnegativeStructure):
        return None  # ``_merged`` calls it on a wrap pad and a convolution
    if s.transpose or any(s.pads) or not _wrap(pad) or not _aligned(pad, conv):
        return None
    pads = wrap.pads
    pad_in = core(pad)[0]
    rank = len(pad_in) + 1
    nd = len(s.input_spatial)
    if len(pads) != 2 * rank or min(pads) < 0 or any(pads[i] or pads[rank + i] for i in range(rank - nd)):
        return None
    w = s.weight
    for i in range(nd):
        extent = (w.shape[2 + i] - 1) * s.dilation[i] + 1
        begin, end = pads[rank - nd + i], pads[2 * rank - nd + i]
        if begin + end != extent - 1 or max(begin, end) > pad_in[1 + i]:
            return None  # a wrap pad longer than the axis copies entries twice: not a circular shift
    structure = replace(s, circular=True, input_spatial=tuple(pad_in[1:]),
                        pads=tuple(pads[rank - nd:rank]) + tuple(pads[2 * rank - nd:]))
    return _joined(pad, conv, structure)


def _wrap_pair(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """Two wrap pads on disjoint axes (torch pads H, then W): one wrap pad, since each axis' index map
    (p - begin) mod n is independent of the others. The same axis padded twice is not a wrap pad: None."""
    sa, sb = a.structure, b.structure
    if not isinstance(sa, NonnegativeStructure) or not isinstance(sb, NonnegativeStructure):
        return None  # ``_merged`` calls it on two wrap pads
    pa, pb = sa.pads, sb.pads
    rank = len(pa) // 2
    if len(pb) != len(pa) or min(pa + pb, default=0) < 0 \
            or any((pa[i] or pa[rank + i]) and (pb[i] or pb[rank + i]) for i in range(rank)):
        return None
    pads = tuple(p + q for p, q in zip(pa, pb, strict=False))
    return _joined(a, b, NonnegativeStructure(mode="wrap", pads=pads))


def _scale_of(op: LinearOperator) -> torch.Tensor | float | None:
    """The factor of a scalar (a float) or diagonal (a tensor) operator; None for any other kind."""
    match op.structure:
        case ScalarStructure(value=value):
            return float(value)
        case DiagStructure(scale=scale):
            return scale
    return None


def _scaled_weight(s: ConvStructure, scale: torch.Tensor, before: bool) -> torch.Tensor | None:
    """The conv weight with a scale folded in (per output channel after it, per input channel before)."""
    w = s.weight.double()
    nd = len(s.input_spatial)
    channel_axis_ok = scale.dim() == nd + 1 and all(d == 1 for d in scale.shape[1:])
    if not channel_axis_ok or s.groups != 1:
        return None
    c = scale.reshape(-1).double()
    out_axis, in_axis = (1, 0) if s.transpose else (0, 1)
    axis = in_axis if before else out_axis
    if c.numel() != w.shape[axis]:
        return None
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * c.reshape(shape)


def _merge(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """One operator for ``b o a`` with a known structure (its branch recorded), or None when the pair does not
    simplify."""
    merged, branch = _merged(a, b)
    if merged is not None:
        record(branch)
    return merged


def _merged(a: LinearOperator, b: LinearOperator) -> tuple[LinearOperator | None, str]:
    """``_merge``'s operator and the name of the branch that made it."""
    if isinstance(b.structure, IsometryStructure) or isinstance(a.structure, IsometryStructure):
        return _absorb(a, b), "fusion.absorb"
    if _wrap(a) and isinstance(b.structure, ConvStructure):
        return _circular(a, b), "fusion.circular"
    if _wrap(a) and _wrap(b) and _aligned(a, b):
        return _wrap_pair(a, b), "fusion.wrap-pair"
    sa, sb = _scale_of(a), _scale_of(b)
    if isinstance(sa, float):
        return _with_scale(a, b, sa, b, sb)
    if isinstance(sb, float):
        return _with_scale(a, b, sb, a, sa)
    if not _aligned(a, b):
        return None, ""
    for conv, scale, before in ((b, sa, True), (a, sb, False)):
        if isinstance(conv.structure, ConvStructure) and scale is not None:
            weight = _scaled_weight(conv.structure, scale, before)
            if weight is not None:
                return _joined(a, b, replace(conv.structure, weight=weight)), "fusion.conv-scale"
    for mat, scale, before in ((b, sa, True), (a, sb, False)):
        if isinstance(mat.structure, MatrixStructure) and isinstance(scale, torch.Tensor):
            weight = _scaled_matrix(mat.structure.matrix, scale, before)
            if weight is not None:
                return _joined(a, b, MatrixStructure(matrix=weight)), "fusion.matrix-scale"
    if isinstance(a.structure, MatrixStructure) and isinstance(b.structure, MatrixStructure):
        product = b.structure.matrix.double() @ a.structure.matrix.double()
        return _joined(a, b, MatrixStructure(matrix=product)), "fusion.matrix-product"
    return None, ""


def _with_scale(a: LinearOperator, b: LinearOperator, scalar: float, other: LinearOperator,
                other_scale: torch.Tensor | float | None) -> tuple[LinearOperator | None, str]:
    """``_merged`` for ``b o a`` where one side (the first that is) is a scalar, ``other`` the other side and
    ``other_scale`` its factor (``_scale_of``)."""
    if isinstance(other_scale, float):  # both scalars: ``scalar`` is a's
        return _with_scalar(a, b, ScalarStructure(value=scalar * other_scale)), "fusion.scalar"
    if other_scale is not None:
        diagonal = DiagStructure(scale=torch.as_tensor(other_scale).double() * scalar)
        return _with_scalar(a, b, diagonal), "fusion.scalar"
    if isinstance(other.structure, ConvStructure):
        weight = other.structure.weight.double() * scalar
        return _with_scalar(a, b, replace(other.structure, weight=weight)), "fusion.scalar"
    if isinstance(other.structure, MatrixStructure):
        matrix = MatrixStructure(matrix=other.structure.matrix.double() * scalar)
        return _with_scalar(a, b, matrix), "fusion.scalar"
    return None, ""


def _scaled_matrix(matrix: torch.Tensor, scale: torch.Tensor, before: bool) -> torch.Tensor | None:
    """A matrix on the last axis with a scale that varies only along that axis folded in: x d M^T is
    x (M diag(d))^T, and (x M^T) d is x (diag(d) M)^T. None when the scale varies along another axis."""
    m = matrix.double()
    size = m.shape[1] if before else m.shape[0]
    if scale.dim() < 1 or any(d != 1 for d in scale.shape[:-1]) or scale.shape[-1] != size:
        return None
    d = scale.reshape(-1).double()
    return m * d[None, :] if before else d[:, None] * m


def refine(op: LinearOperator) -> LinearOperator:
    """An equivalent operator whose structure gives the tightest available bound."""
    if not isinstance(op.structure, ChainStructure):
        return op
    merged: list[LinearOperator] = []
    for part in op.structure.parts:
        combined = _merge(merged[-1], part) if merged else None
        if combined is not None:
            merged[-1] = combined
        else:
            merged.append(part)
    if len(merged) == 1:
        return replace(op, structure=merged[0].structure)
    return replace(op, structure=ChainStructure(parts=tuple(merged)))
