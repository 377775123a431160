"""Linear subgraphs bound whole: ``x + conv(x)``, sums and concatenations of linear branches, as one operator.

A *region* is a set of steps (fused linear chains, and plain ``Add``/``Sub``/``Sum``/``Mean``/``Concat`` nodes)
that reads one value u from outside, whose values are read only inside it (but for its last value), and that
ends at a sum or concatenation, or at the one linear chain that alone reads that (its *tail*: the convolution
after a pad written as Slice/Concat). Each of its steps is linear in its data inputs once constants are dropped,
so the region is one linear map A of u, with ||A|| <= the bound propagated through its steps (often far below it:
||I + W|| against 1 + ||W||). ``region_bound`` bounds A by the dense SVD of A when it is small; else by the
smallest of: the DFT bound of one convolution when A is a sum or concatenation of convolutions, identities and
scales on one grid (their kernels add, aligned by their padding, with zero padding or circular padding alike);
the DFT of the composed map when every step commutes with the grid's circular shifts (``transfer``); a pad and
the convolution starting the tail by the tap count (``spectral.padded_conv_bound``); the region before its tail
times the tail; the bound propagated through the steps; a polynomial in one convolution by its spectrum when the
convolution is skew, else by its coefficients (``series``). Which one was used is recorded (``BRANCHES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lipcert.bounds.fusion import refine
from lipcert.bounds.kinds import Combination, Combine, Linear, Region
from lipcert.bounds.series import series_bound
from lipcert.bounds.spectral import (
    UpperBound,
    conv_upper_bound,
    mul_up,
    padded_conv_bound,
    ungrouped_kernel,
    upper_bound,
)
from lipcert.bounds.steps import Context, Step
from lipcert.bounds.thresholds import record
from lipcert.bounds.transfer import transfer_bound
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    DiagStructure,
    LinearOperator,
    NonnegativeStructure,
    ScalarStructure,
    from_function,
)
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.graph.ops.base import CombinationMode

#: how ``region_bound`` bounded a region (``thresholds.record``)
BRANCHES = ("region.dense", "region.conv", "region.dft", "region.pad-conv", "region.split", "region.product",
            "region.series", "region.series-sum")


def _linear_combination(step: Step) -> bool:
    """Whether a step is one node that is linear in its data inputs once constants are dropped: a concatenation,
    or a sum its operator declares a linear combination (``Op.linear_combination``)."""
    match step.details:
        case Combination(node_op=True, mode=CombinationMode.CONCAT):
            return True
        case Combination(node_op=True, mode=CombinationMode.SUM, signs=signs):
            return signs is not None
    return False


def merge_regions(ctx: Context, steps: list[Step]) -> list[Step]:
    """Replace every maximal region (see the module docstring) ending at a linear combination by one linear
    step whose details (``Region``) keep the steps it covers."""
    producer = {s.output: s for s in steps}
    readers: dict[str, list[Step]] = {}
    for s in steps:
        for v in s.inputs:
            readers.setdefault(v, []).append(s)
    taken: set[int] = set()
    regions: dict[int, list[Step]] = {}
    for end in reversed(steps):
        if id(end) in taken or not _linear_combination(end):
            continue
        region = _grow(ctx, end, producer, readers, taken)
        sources = {v for s in region for v in s.inputs if id(producer.get(v)) not in {id(r) for r in region}}
        if len(region) < 2 or len(sources) != 1 or any(ctx.shape(v) is None for s in region
                                                       for v in (*s.inputs, s.output)):
            continue
        ordered = [s for s in steps if any(s is r for r in region)]
        taken.update(id(s) for s in ordered)
        tail = _tail(ctx, ordered[-1], readers, taken)
        if tail is not None:
            ordered.append(tail)
            taken.add(id(tail))
        regions[id(ordered[-1])] = ordered
    out = []
    for s in steps:
        if id(s) in regions:
            out.append(_region_step(ctx, regions[id(s)]))
        elif id(s) not in taken:
            out.append(s)
    return out


def _tail(ctx: Context, end: Step, readers: dict[str, list[Step]], taken: set[int]) -> Step | None:
    """The linear chain that alone reads a region's value (a convolution after a pad written as Slice/Concat),
    which joins the region so that the two are bounded as one operator; None when there is none."""
    users = readers.get(end.output, [])
    if len(users) != 1 or end.output in ctx.graph.outputs:
        return None
    t = users[0]
    if id(t) in taken or not isinstance(t.details, Linear) or isinstance(t.details, Region) \
            or ctx.shape(t.output) is None:
        return None
    return t


def _grow(ctx: Context, end: Step, producer: dict[str, Step], readers: dict[str, list[Step]],
          taken: set[int]) -> list[Step]:
    """The largest region ending at ``end``: add the producer of an input while it is a linear step or a linear
    combination whose value only the region reads (repeated until nothing more joins)."""
    region = [end]
    changed = True
    while changed:
        changed = False
        ids = {id(s) for s in region}
        for v in {v for s in region for v in s.inputs}:
            t = producer.get(v)
            if t is None or id(t) in ids or id(t) in taken or v in ctx.graph.outputs:
                continue
            if not (isinstance(t.details, Linear) or _linear_combination(t)):
                continue
            if all(id(r) in ids for r in readers.get(v, [])):
                region.append(t)
                changed = True
                break
    return region


def _region_step(ctx: Context, region: list[Step]) -> Step:
    """One linear step for a region: its operator runs the region's steps (constants dropped). Its details
    (``Region``) keep the steps, every value's per-sample shape and how a combination step runs."""
    produced = {s.output for s in region}
    source = next(v for s in region for v in s.inputs if v not in produced)
    end = region[-1]
    nodes = {n.name: n for n in ctx.graph.nodes}
    values = {source} | {v for s in region for v in (*s.inputs, s.output)}
    shapes = {v: ctx.known_shape(v) for v in values}

    def combine(s: Step, d: Combination, env: dict[str, torch.Tensor], like: torch.Tensor,
                absolute: bool) -> torch.Tensor:
        """A combination step on the values in ``env``, its constants as zeros: the node itself; with
        ``absolute``, the same map with every sign positive (a sum's inputs added, then broadcast to the node's
        output shape as its constants broadcast them)."""
        out = (like.shape[0],) + shapes[s.output]
        if absolute and d.mode is not CombinationMode.CONCAT:
            total = env[s.inputs[0]]
            for v in s.inputs[1:]:
                total = total + env[v]
            return torch.broadcast_to(total / d.divisor if d.divisor != 1 else total, out)
        node = nodes[s.nodes[0]]
        args = [env[v] if v in env else (None if not v else _zeros(ctx, v, like, len(out))) for v in node.inputs]
        return REGISTRY[node.op].run(node, args, RunContext(like.dtype))[0]

    operator = from_function(_runner(region, source, combine), shapes[source], shapes[end.output], name=end.nodes[0])
    return Step(Region(operator, region, shapes, combine), "linear region", [n for s in region for n in s.nodes],
                [source], end.output)


def _runner(substeps: list[Step], source: str, combine: Combine) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map of ``substeps`` (in order) from the value ``source`` to the last one's output, constants dropped."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        env = {source: x}
        for s in substeps:
            match s.details:
                case Linear():
                    env[s.output] = s.linear.forward(env[s.inputs[0]])
                case Combination() as d:
                    env[s.output] = combine(s, d, env, x, False)
        return env[substeps[-1].output]

    return forward


def absolute_operator(step: Step) -> LinearOperator | None:
    """The region with every matrix replaced by its absolute value (each chain's parts by their |A|, every sum
    by a sum with positive signs, broadcast as the node broadcasts): it bounds, entrywise, what the region's
    float evaluation can err by."""
    region = _region(step)
    substeps = region.substeps
    absolute: dict[str, list[LinearOperator]] = {}
    for s in substeps:
        if isinstance(s.details, Linear):
            maps = [p.rounding.abs_op for p in s.parts if p.rounding is not None and p.rounding.abs_op is not None]
            if len(maps) != len(s.parts):
                return None
            absolute[s.output] = maps
    source, end = step.inputs[0], substeps[-1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        env = {source: x}
        for s in substeps:
            match s.details:
                case Linear():
                    value = env[s.inputs[0]]
                    for op in absolute[s.output]:
                        value = op.forward(value)
                    env[s.output] = value
                case Combination() as d:
                    env[s.output] = region.combine(s, d, env, x, True)
        return env[end.output]

    return from_function(forward, step.linear.in_shape, step.linear.out_shape, structure=NonnegativeStructure())


def _region(step: Step) -> Region:
    """The details of a linear region's step."""
    if not isinstance(step.details, Region):
        raise TypeError(f"step {step.label!r} ({step.kind}) is not a linear region")
    return step.details


def _zeros(ctx: Context, value: str, like: torch.Tensor, rank: int) -> torch.Tensor:
    """A constant input of a combination, as zeros of its shape: the linear part of the node. A constant with the
    batch axis (``rank``, the node output's, and a leading 1: an expanded class token, say) gets ``like``'s batch,
    as a concatenation needs; broadcasting makes that the same for a sum."""
    c = ctx.consts[value]
    shape = tuple(c.shape)
    if len(shape) == rank and shape[:1] == (1,):
        shape = (like.shape[0],) + shape[1:]
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def region_bound(step: Step, bound_of: Callable[[LinearOperator], UpperBound]) -> UpperBound:
    """A proven upper bound on the region's operator norm (see the module docstring); ``bound_of(op)`` bounds
    a linear step's operator (its ``UpperBound``). The smallest of the bounds that apply, its branch recorded."""
    whole = upper_bound(step.linear)  # the dense SVD when small; else inf (kind "region")
    if math.isfinite(whole.value):
        record("region.dense")
        return whole
    branch, best = min(_candidates(step, bound_of), key=lambda c: c[1].value)
    record(branch)
    return best


def _candidates(step: Step, bound_of: Callable[[LinearOperator], UpperBound]) -> list[tuple[str, UpperBound]]:
    """Every bound that applies to a region too large for its dense norm, with its branch: one convolution, the
    DFT of the composed map (``transfer``), a pad and the convolution after it, the region before its tail times
    the tail, the product of its steps (which always applies), and a polynomial in one convolution (``series``)."""
    found = _whole(step, True)
    split = _split(step)
    if split is not None:
        head, tail = split
        pad_conv = _pad_conv(head, tail, bound_of)
        if pad_conv is not None:
            found.append(("region.pad-conv", UpperBound(pad_conv, "pad-conv (region)", False)))
        # the head's product times the tail is the region's product; its DFT is needed only if the whole's failed
        head_bounds = [upper_bound(head.linear).value] + [b.value for _, b in _whole(head, not any(
            branch == "region.dft" for branch, _ in found))]
        value = min(head_bounds)
        if math.isfinite(value):
            for t in tail:
                value = mul_up(value, bound_of(refine(t.linear)).value)
            found.append(("region.split", UpperBound(value, "product(region, tail)", False)))
    found.append(("region.product", UpperBound(_propagated(step, bound_of), "product(region steps)", False)))
    series = series_bound(step)  # after the product: taken only when strictly smaller
    if series is not None:
        found.append((series[0], UpperBound(series[1], "series (region)", False)))
    return found


def _whole(step: Step, composed: bool) -> list[tuple[str, UpperBound]]:
    """The bounds of a region as one operator: one convolution (``as_conv``), and with ``composed`` the DFT of the
    composed map (``transfer``)."""
    found = []
    conv = as_conv(step)
    if conv is not None:
        value = conv_upper_bound(conv)
        if math.isfinite(value):
            circular = isinstance(conv.structure, ConvStructure) and conv.structure.circular  # always a conv
            found.append(("region.conv", UpperBound(value, "fft-circular (region)" if circular
                                                    else "fft-embedding (region)", False)))
    dft = transfer_bound(step) if composed else None
    if dft is not None:
        found.append(("region.dft", UpperBound(dft, "dft (region)", False)))
    return found


def _pad_conv(head: Step, tail: list[Step], bound_of: Callable[[LinearOperator], UpperBound]) -> float | None:
    """The head (a pad) and the convolution that starts the tail bounded as one (``padded_conv_bound``, from the
    head's absolute map), times the bounds of the rest of the tail; None when the tail does not start with one."""
    absolute = absolute_operator(head)
    first = refine(tail[0].linear)
    parts = first.structure.parts if isinstance(first.structure, ChainStructure) else (first,)
    value = None if absolute is None else padded_conv_bound(absolute, parts[0])
    if value is None:
        return None
    for op in [*parts[1:], *(refine(t.linear) for t in tail[1:])]:
        value = mul_up(value, bound_of(op).value)
    return value


def _split(step: Step) -> tuple[Step, list[Step]] | None:
    """A region that ends in linear chains after its last combination (``_tail``): the region up to that
    combination, as a step of its own, and those chains; None when it ends at a combination."""
    region = _region(step)
    substeps = region.substeps
    last = max(i for i, s in enumerate(substeps) if isinstance(s.details, Combination))
    if last == len(substeps) - 1:
        return None
    head, tail = substeps[:last + 1], substeps[last + 1:]
    source, end = step.inputs[0], head[-1]
    operator = from_function(_runner(head, source, region.combine), region.shapes[source], region.shapes[end.output],
                             name=end.nodes[0])
    first = Step(Region(operator, head, region.shapes, region.combine), "linear region",
                 [n for s in head for n in s.nodes], [source], end.output)
    return first, tail


def _propagated(step: Step, bound_of: Callable[[LinearOperator], UpperBound]) -> float:
    """The bound propagated through the region's steps: products along chains, sums (weighted by
    broadcasting) and sqrt of sums of squares for concatenations: the bound without the region."""
    bounds = {step.inputs[0]: 1.0}
    for s in _region(step).substeps:
        incoming = [bounds.get(v, math.inf) for v in s.inputs]
        match s.details:
            case Linear():
                bounds[s.output] = mul_up(incoming[0], bound_of(refine(s.linear)).value)
            case Combination(mode=mode, weights=weights):
                weighted = [mul_up(v, w) for v, w in zip(incoming, weights, strict=False)]
                total = (math.fsum(weighted) if mode is CombinationMode.SUM
                         else math.sqrt(math.fsum(v * v for v in weighted)))
                bounds[s.output] = total * (1 + 1e-12)
    return bounds[step.output]


@dataclass
class _Kernel:
    """y[o] = sum_t W[:, :, t] x[o + t - begin] on one grid (zero or circular padding), stride 1, groups 1."""

    weight: torch.Tensor  # (c_out, c_in, *k), float64
    begin: tuple[int, ...]
    circular: bool | None  # None: an identity or scale, which fits either padding

    def scaled(self, factor: torch.Tensor | float) -> _Kernel:
        f = factor if isinstance(factor, float) else factor.reshape((-1,) + (1,) * (self.weight.dim() - 1))
        return _Kernel(self.weight * f, self.begin, self.circular)


def as_conv(step: Step) -> LinearOperator | None:
    """The region as one convolution when it is a sum or concatenation of convolutions (stride 1, same grid
    in and out, each applied to the region's input), identities and scales; None otherwise.

    Assumes, and checks for every value, that its form describes it in its own coordinates: a value of shape
    (c, *grid), the grid of the region's input, is the form's kernel with c output channels applied to the
    input. A value of any other shape (a reshape, a broadcast, a concatenation with constants) ends the
    rewrite, so no kernel is ever read against the wrong axes."""
    source = step.inputs[0]
    shape = tuple(step.linear.in_shape)
    region = _region(step)
    shapes = region.shapes
    if len(shape) < 2 or shapes.get(source) != shape:
        return None
    channels, grid = shape[0], tuple(shape[1:])
    eye = torch.eye(channels, dtype=torch.float64).reshape((channels, channels) + (1,) * len(grid))
    forms: dict[str, _Kernel | None] = {source: _Kernel(eye, (0,) * len(grid), None)}
    for s in region.substeps:
        ins = [f for f in (forms.get(v) for v in s.inputs) if f is not None]
        form = None
        if len(ins) == len(s.inputs):
            match s.details:
                case Linear():
                    form = _apply(refine(s.linear), ins[0], grid)
                case Combination() as d:
                    form = _combine(d, ins, grid)
        fits = form is not None and form.weight.shape[1] == channels and \
            shapes.get(s.output) == (form.weight.shape[0],) + grid
        forms[s.output] = form if fits else None
    form = forms.get(step.output)
    if form is None or tuple(step.linear.out_shape) != (form.weight.shape[0],) + grid:
        return None
    k = form.weight.shape[2:]
    end = tuple(ki - 1 - b for ki, b in zip(k, form.begin, strict=False))
    if min(form.begin + end, default=0) < 0:
        return None
    structure = ConvStructure(weight=form.weight, stride=(1,) * len(grid), pads=form.begin + end,
                              dilation=(1,) * len(grid), groups=1, circular=bool(form.circular), input_spatial=grid,
                              transpose=False, output_padding=(0,) * len(grid))
    return replace(step.linear, structure=structure)


def _own_coordinates(op: LinearOperator) -> bool:
    """Whether ``op``'s structure describes exactly ``op``, in its own shapes (nothing absorbed that moved entries,
    padded, pooled or reshaped them)."""
    s = op.structure
    if s.loose_in or s.loose_out or s.inexact:
        return False
    return s.core is None or (tuple(s.core[0]), tuple(s.core[1])) == (tuple(op.in_shape), tuple(op.out_shape))


def _apply(op: LinearOperator, form: _Kernel, grid: tuple[int, ...]) -> _Kernel | None:
    """A linear step on a form: a scale of any form, or a convolution of the region's input itself.

    Assumes: the step maps the form's value, of shape (c, *grid), in its own coordinates (checked here); a scale
    keeps the shape (per-channel scales only); a convolution has stride 1, dilation 1, one output per input
    position, and reads c channels (groups expanded to a block-diagonal kernel)."""
    c = form.weight.shape[0]
    if not _own_coordinates(op) or tuple(op.in_shape) != (c,) + grid:
        return None
    s = op.structure
    match s:
        case ScalarStructure(norm_only=True):
            return None
        case ScalarStructure(value=value):
            return form.scaled(float(value)) if tuple(op.out_shape) == tuple(op.in_shape) else None
        case DiagStructure():
            scale = torch.as_tensor(s.scale).double()
            if tuple(op.out_shape) == tuple(op.in_shape) and scale.dim() == len(grid) + 1 \
                    and all(d == 1 for d in scale.shape[1:]) and scale.shape[0] == c:
                return form.scaled(scale.reshape(-1))
            return None
    identity = form.circular is None and all(n == 1 for n in form.weight.shape[2:]) and \
        torch.equal(form.weight.reshape(form.weight.shape[:2]), torch.eye(c, dtype=torch.float64))
    if not isinstance(s, ConvStructure) or not identity or s.transpose or any(v != 1 for v in s.stride) \
            or any(v != 1 for v in s.dilation) or tuple(s.input_spatial) != grid \
            or tuple(op.out_shape[1:]) != grid:
        return None
    w = ungrouped_kernel(s.weight.double(), int(s.groups), c)
    if w is None or op.out_shape[0] != w.shape[0] or len(s.pads) != 2 * len(grid):
        return None
    return _Kernel(w, tuple(int(p) for p in s.pads[:len(grid)]), bool(s.circular))


def _combine(combination: Combination, forms: list[_Kernel], grid: tuple[int, ...]) -> _Kernel | None:
    """A sum (signs from the node) or a channel concatenation of forms on one grid, kernels aligned.

    Assumes: every form reads the same input channels; a Concat joins axis 1 (the channels) and has no constant
    input (``as_conv`` checks the output's shape); a sum's inputs have one shape (no broadcasting), and it is
    sum_i signs_i x_i / divisor over its data inputs (``Op.linear_combination``, one sign per form)."""
    circular = {f.circular for f in forms} - {None}
    if not forms or len(circular) > 1 or len({f.weight.shape[1] for f in forms}) != 1:
        return None
    begin = tuple(max(f.begin[i] for f in forms) for i in range(len(grid)))
    size = tuple(max(begin[i] - f.begin[i] + f.weight.shape[2 + i] for f in forms) for i in range(len(grid)))
    placed = []
    for f in forms:
        w = f.weight.new_zeros(f.weight.shape[:2] + size)
        index = (slice(None), slice(None)) + tuple(slice(begin[i] - f.begin[i], begin[i] - f.begin[i] +
                                                         f.weight.shape[2 + i]) for i in range(len(grid)))
        w[index] = f.weight
        placed.append(w)
    if combination.mode is CombinationMode.CONCAT:
        if combination.axis != 1:
            return None
        weight = torch.cat(placed, dim=0)
    else:
        signs = combination.signs
        if signs is None or any(p.shape != placed[0].shape for p in placed) or len(signs) != len(placed):
            return None  # inputs of different channels would broadcast
        total = sum(sg * p for sg, p in zip(signs, placed, strict=False))
        if not isinstance(total, torch.Tensor):
            return None  # no inputs (``forms`` is not empty: never)
        weight = total * (1.0 / combination.divisor)
    return _Kernel(weight, begin, next(iter(circular)) if circular else None)
