"""Give a fused chain of linear operators the most precise structure for its upper bound.

The chain's forward and adjoint stay exactly as built; only the description used by ``spectral`` changes,
and every rewrite is an exact identity: a wrap pad followed by an unpadded convolution whose kernel spans
the pad is a circular convolution (how torch exports ``padding_mode="circular"``); scalar and per-channel
scales fold into the neighbouring convolution or matrix (an un-folded batch norm); matrices multiply;
isometries (reshapes) change no norm and take the structure of their neighbour.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .linop import LinearOperator


def _circular(pad: LinearOperator, conv: LinearOperator) -> LinearOperator | None:
    """Pad(mode=wrap) then Conv(pads=0) with pad total = effective kernel - 1 per axis: a circular conv."""
    s = conv.structure
    if s.get("transpose") or any(s["pads"]) or pad.structure.get("mode") != "wrap":
        return None
    pads = pad.structure["pads"]
    rank = len(pad.in_shape) + 1
    nd = len(s["input_spatial"])
    if any(pads[i] or pads[rank + i] for i in range(rank - nd)):
        return None
    w = s["weight"]
    for i in range(nd):
        extent = (w.shape[2 + i] - 1) * s["dilation"][i] + 1
        if pads[rank - nd + i] + pads[2 * rank - nd + i] != extent - 1:
            return None
    structure = {**s, "circular": True, "input_spatial": tuple(pad.in_shape[1:]),
                 "pads": tuple(pads[rank - nd:rank]) + tuple(pads[2 * rank - nd:])}
    return replace(pad.then(conv), kind="conv", structure=structure)


def _scale_of(op: LinearOperator) -> torch.Tensor | float | None:
    if op.kind == "scalar":
        return float(op.structure["value"])
    if op.kind == "diag":
        return op.structure["scale"]
    return None


def _scaled_weight(conv: LinearOperator, scale: torch.Tensor | float, before: bool) -> torch.Tensor | None:
    """The conv weight with a scale folded in (per output channel after it, per input channel before)."""
    s = conv.structure
    w = s["weight"].double()
    if isinstance(scale, float):
        return w * scale
    nd = len(s["input_spatial"])
    channel_axis_ok = scale.dim() == nd + 1 and all(d == 1 for d in scale.shape[1:])
    if not channel_axis_ok or s["groups"] != 1:
        return None
    c = scale.reshape(-1).double()
    out_axis, in_axis = (1, 0) if s.get("transpose") else (0, 1)
    axis = in_axis if before else out_axis
    if c.numel() != w.shape[axis]:
        return None
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * c.reshape(shape)


def _merge(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    """One operator for ``b o a`` with a known structure, or None when the pair does not simplify."""
    if b.kind == "isometry" or a.kind == "isometry":
        kept = a if b.kind == "isometry" else b
        return replace(a.then(b), kind=kept.kind, structure=kept.structure)
    if a.kind == "generic" and b.kind == "conv":
        return _circular(a, b)
    if a.structure.get("mode") == "wrap" and b.structure.get("mode") == "wrap":
        pads = [p + q for p, q in zip(a.structure["pads"], b.structure["pads"])]
        return replace(a.then(b), kind="generic", structure={"mode": "wrap", "pads": pads})
    sa, sb = _scale_of(a), _scale_of(b)
    if sa is not None and sb is not None and (isinstance(sa, float) or isinstance(sb, float)):
        if isinstance(sa, float) and isinstance(sb, float):
            return replace(a.then(b), kind="scalar", structure={"value": sa * sb})
        return replace(a.then(b), kind="diag", structure={"scale": torch.as_tensor(sa).double() * sb})
    for conv, scale, before in ((b, sa, True), (a, sb, False)):
        if conv.kind == "conv" and scale is not None:
            weight = _scaled_weight(conv, scale, before)
            if weight is not None:
                return replace(a.then(b), kind="conv", structure={**conv.structure, "weight": weight})
        if conv.kind == "matrix" and isinstance(scale, float):
            return replace(a.then(b), kind="matrix", structure={"matrix": conv.structure["matrix"].double() * scale})
    if a.kind == "matrix" and b.kind == "matrix":
        product = b.structure["matrix"].double() @ a.structure["matrix"].double()
        return replace(a.then(b), kind="matrix", structure={"matrix": product})
    return None


def refine(op: LinearOperator) -> LinearOperator:
    """An equivalent operator whose structure gives the tightest available bound."""
    if op.kind != "chain":
        return op
    merged: list[LinearOperator] = []
    for part in op.structure["parts"]:
        combined = _merge(merged[-1], part) if merged else None
        if combined is not None:
            merged[-1] = combined
        else:
            merged.append(part)
    if len(merged) == 1:
        return replace(op, kind=merged[0].kind, structure=merged[0].structure)
    return replace(op, structure={"parts": merged})
