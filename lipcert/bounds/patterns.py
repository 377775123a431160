"""Subgraphs that 1-Lipschitz libraries export to, recognised from the graph and given exact constants.

Each recogniser is called with the *last* node of its pattern and returns a ``Step`` covering every node
it claims, or None. Patterns: GroupSort/MaxMin (ReduceMax+ReduceMin+Concat, Split+Max+Min+Concat,
Relu/Neg/Concat), L2-norm pooling (Pow/AveragePool/guards/Sqrt), the SLL / SDP residual block and
HouseHolder activations (a selector and two pieces, or the sectors of an exported atan2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lipcert.bounds import spectral
from lipcert.bounds.fusion import core as core_shapes
from lipcert.bounds.fusion import refine
from lipcert.bounds.kinds import Combination, Linear, NoRule, Pattern, Rule
from lipcert.bounds.quadratic import residual_block_bound
from lipcert.bounds.rounding import UNIT_ROUNDOFF, gamma
from lipcert.bounds.signed_zero import never_negative_zero
from lipcert.bounds.spectral import mul_up
from lipcert.bounds.steps import Context, Part, Step, absolute_chain, repetitions
from lipcert.bounds.thresholds import current, record
from lipcert.graph.core import Node
from lipcert.graph.linop import (
    ConvStructure,
    IsometryStructure,
    LinearOperator,
    MatrixStructure,
    NonnegativeStructure,
    ProjectionStructure,
    ScalarStructure,
    Structure,
    from_function,
)
from lipcert.graph.ops import REGISTRY
from lipcert.graph.ops.base import EXACT, TRANSCENDENTAL_ULPS, CombinationMode, Rounding
from lipcert.graph.ops.tensor import Copies

SORT_REASON = "each group's entries come out sorted (a permutation per sample): 1-Lipschitz (Anil et al. 2019)"


def _axis(node: Node, ctx: Context, value: str) -> int | None:
    shape = ctx.shape(value)
    if shape is None:
        return None
    axis = int(node.attr("axis", 0))
    return axis + len(shape) + 1 if axis < 0 else axis


def _reduce_axes(node: Node, ctx: Context) -> list[int] | None:
    axes = node.attr("axes")
    if len(node.inputs) > 1 and node.inputs[1]:
        c = ctx.consts.get(node.inputs[1])
        axes = None if c is None else c.reshape(-1).tolist()
    shape = ctx.shape(node.inputs[0])
    if axes is None or shape is None:
        return None
    return [int(a) + len(shape) + 1 if a < 0 else int(a) for a in axes]


def groupsort_reduce(ctx: Context, node: Node) -> Step | None:
    """Concat(ReduceMax(v, a), ReduceMin(v, a), axis=a): the max and min of each group along axis a."""
    if node.op != "Concat" or len(node.inputs) != 2:
        return None
    prods = [p for p in (ctx.producer.get(i) for i in node.inputs) if p is not None]
    if len(prods) != len(node.inputs) or {p.op for p in prods} != {"ReduceMax", "ReduceMin"}:
        return None
    if prods[0].inputs[0] != prods[1].inputs[0] or prods[0].inputs[0] not in ctx.data:
        return None
    axes = [_reduce_axes(p, ctx) for p in prods]
    axis = _axis(node, ctx, node.inputs[0])
    if axis is None or axes[0] is None or axes[0] != axes[1] or axes[0] != [axis] or axis < 1:
        return None
    if not all(int(p.attr("keepdims", 1)) for p in prods) or not all(ctx.only_user(i, node) for i in node.inputs):
        return None
    shape = ctx.known_shape(prods[0].inputs[0])  # known: ``_reduce_axes`` reads it
    size = shape[axis - 1]
    if size < 2:
        return None  # a group of one gives (x, x): its entry twice, sqrt(2)
    groups = torch.arange(math.prod(shape)).reshape(shape).movedim(axis - 1, -1).reshape(-1, size)
    pairs = torch.combinations(torch.arange(size), 2)  # the group's order changes where two entries tie
    switches = (groups[:, pairs[:, 0]].reshape(-1), groups[:, pairs[:, 1]].reshape(-1))
    return Step(Pattern(1.0, rounding=EXACT, switches=switches), f"GroupSort{size} (ReduceMax/ReduceMin/Concat)",
                [prods[0].name, prods[1].name, node.name], [prods[0].inputs[0]], node.outputs[0], reason=SORT_REASON)


def _slice_range(ctx: Context, node: Node, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(axis, start, end) of a single-axis, step-1 Slice of a value with per-sample ``shape``, as the registry's
    Slice reads it (``ProjectionStructure.select``), or None for any other slice."""
    out_shape = ctx.shape(node.outputs[0])
    if out_shape is None:
        return None
    op = REGISTRY["Slice"].linear(node, ctx.const_inputs(node), 0, shape, out_shape)
    return op.structure.select if op is not None and isinstance(op.structure, ProjectionStructure) else None


def maxmin_concat(ctx: Context, node: Node) -> Step | None:
    """A Concat that reads Max(a, b) and Min(a, b) of the same two equally shaped values (the MaxMin
    activation, alone or with other inputs, as TorchScript merges nested concatenations): per entry,
    (a, b) -> (max, min) is a permutation, 1-Lipschitz in (a, b) jointly, so the concatenation is bounded as
    one of a and b in their place (when a and b are disjoint parts of one value, by its partition profile)."""
    if node.op != "Concat":
        return None
    prods = [ctx.producer.get(i) for i in node.inputs]
    inputs: list[str] = []
    claimed: list[str] = []
    paired: set[int] = set()
    for i, p in enumerate(prods):
        if i in paired or node.inputs[i] not in ctx.data:
            continue
        mate: tuple[int, Node] | None = None
        if p is not None and p.op in ("Max", "Min") and len(p.inputs) == 2 and ctx.only_user(node.inputs[i], node) \
                and ctx.shape(p.inputs[0]) is not None and ctx.shape(p.inputs[0]) == ctx.shape(p.inputs[1]) \
                and all(v in ctx.data for v in p.inputs):
            other = "Min" if p.op == "Max" else "Max"
            mate = next(((j, q) for j, q in enumerate(prods) if j != i and j not in paired and q is not None
                         and q.op == other and sorted(q.inputs) == sorted(p.inputs)
                         and ctx.only_user(node.inputs[j], node)), None)
        if p is None or mate is None:
            inputs.append(node.inputs[i])
            continue
        j, q = mate
        paired.update((i, j))
        inputs += list(p.inputs)
        claimed += [p.name, q.name]
    if not claimed:
        return None
    return Step(Combination(CombinationMode.CONCAT, [1.0] * len(inputs), rounding=EXACT), "Concat (MaxMin pairs)",
                claimed + [node.name], inputs, node.outputs[0],
                reason="each Max/Min pair of the same two values is a permutation of them per entry: bounded "
                       "as the concatenation of those values")


def relu_neg_concat(ctx: Context, node: Node) -> Step | None:
    """Concat(Relu(v), Relu(Neg(v))): the pair (relu(x), relu(-x)) is 1-Lipschitz in x."""
    if node.op != "Concat" or len(node.inputs) != 2:
        return None
    prods = [p for p in (ctx.producer.get(i) for i in node.inputs) if p is not None and p.op == "Relu"]
    if len(prods) != len(node.inputs) or not all(ctx.only_user(i, node) for i in node.inputs):
        return None
    for direct, negated in ((prods[0], prods[1]), (prods[1], prods[0])):
        neg = ctx.producer.get(negated.inputs[0])
        if neg is not None and neg.op == "Neg" and neg.inputs[0] == direct.inputs[0] \
                and ctx.only_user(neg.outputs[0], negated) and direct.inputs[0] in ctx.data:
            shape = ctx.shape(direct.inputs[0])
            width = math.prod(shape) if shape is not None else 0
            switches = (torch.arange(width), torch.full((width,), -1)) if shape is not None else None
            return Step(Pattern(1.0, rounding=EXACT, switches=switches), "MaxMin-style (Relu(x), Relu(-x))",
                        [direct.name, negated.name, neg.name, node.name], [direct.inputs[0]], node.outputs[0],
                        reason="|relu(a)-relu(b)|^2 + |relu(-a)-relu(-b)|^2 <= |a-b|^2")
    return None


def _scalar_const(ctx: Context, node: Node) -> tuple[str, float] | None:
    """For Mul/Div by a positive scalar constant: (the data input, the factor)."""
    data = ctx.data_inputs(node)
    if node.op not in ("Mul", "Div") or len(data) != 1:
        return None
    c = ctx.const_inputs(node)[1 - data[0]]
    if c is None or c.numel() != 1 or (node.op == "Div" and data[0] != 0):
        return None
    value = float(c.reshape(-1)[0])
    value = 1.0 / value if node.op == "Div" else value
    return (node.inputs[data[0]], value) if value > 0 else None


def _guard_degree(ctx: Context, value: str, base: str, seen: list[Node]) -> int | None:
    """Degree of ``value`` as a monomial in ``base`` >= 0 through Abs/Relu/Sign/Mul guards (Sign: 0)."""
    if value == base:
        return 1
    node = ctx.producer.get(value)
    if node is None or value in ctx.graph.outputs:
        return None
    if node.op in ("Abs", "Relu", "Identity"):
        d = _guard_degree(ctx, node.inputs[0], base, seen)
    elif node.op == "Sign":
        d = 0 if _guard_degree(ctx, node.inputs[0], base, seen) is not None else None
    elif node.op == "Mul" and len(ctx.data_inputs(node)) == 2:
        parts = [_guard_degree(ctx, i, base, seen) for i in node.inputs]
        known = [k for k in parts if k is not None]
        d = sum(known) if len(known) == len(parts) else None
    else:
        return None
    if d is not None:
        seen.append(node)
    return d


def _exponent(ctx: Context, node: Node) -> float | None:
    """The constant scalar exponent of a Pow of one data value (its base), or None."""
    if node.op != "Pow" or ctx.data_inputs(node) != [0]:
        return None
    e = ctx.const_inputs(node)[1]
    return None if e is None or e.numel() != 1 else float(e.reshape(-1)[0])


def _root_argument(ctx: Context, node: Node) -> str | None:
    """What a Sqrt, or a Pow by 0.5, takes the square root of; None for any other node."""
    if node.op == "Sqrt" or _exponent(ctx, node) == 0.5:
        return node.inputs[0]
    return None


def l2_pool(ctx: Context, node: Node) -> Step | None:
    """sqrt(c * AveragePool(x^2)) with guards: c/K-scaled L2-norm pooling over windows of K entries."""
    t = _root_argument(ctx, node)
    if t is None:
        return None
    claimed: list[Node] = [node]
    factor = 1.0
    while True:
        p = ctx.producer.get(t)
        scaled = _scalar_const(ctx, p) if p is not None else None
        if p is None or scaled is None:
            break
        claimed.append(p)
        t, factor = scaled[0], factor * scaled[1]
    guards: list[Node] = []
    pool = None
    for candidate in [n for n in ctx.graph.nodes if n.op == "AveragePool" and n.outputs[0] in ctx.data]:
        if _guard_degree(ctx, t, candidate.outputs[0], guards) == 1:
            pool = candidate
            break
        guards.clear()
    if pool is None:
        return None
    square = ctx.producer.get(pool.inputs[0])
    if square is None:
        return None
    if square.op == "Pow":
        if _exponent(ctx, square) != 2.0:
            return None
    elif not (square.op == "Mul" and square.inputs[0] == square.inputs[1]):
        return None
    x = square.inputs[0]
    in_shape, pool_shape = ctx.shape(x), ctx.shape(pool.outputs[0])
    inner = guards + [pool, square] + claimed
    if in_shape is None or pool_shape is None or not all(
            all(u in inner for u in ctx.users.get(o, [])) for n in inner if n is not node for o in n.outputs):
        return None
    pooling = REGISTRY["AveragePool"].linear(pool, ctx.const_inputs(pool), 0, in_shape, pool_shape)
    if pooling is None:
        return None  # AveragePool always has its linear map
    # squares, the window sum and division, the scalars and the root: every term non-negative, so each rounding
    # is relative to the output (Pow counted as 4)
    window = math.prod(pool.attr("kernel_shape"))
    with torch.no_grad():
        weights = pooling.adjoint(torch.ones((1,) + tuple(pool_shape), dtype=torch.float64))
    heaviest = float(weights.max()) if weights.numel() else 0.0
    # sums of positive terms: relative error below 1e-12, covered by the factor
    constant = math.nextafter(math.sqrt(factor * heaviest) * (1 + 1e-12), math.inf)
    return Step(Pattern(constant, rounding=Rounding(relative=window + len(claimed) + 8)),
                "L2-norm pool (Pow/AveragePool/Sqrt)", [n.name for n in inner], [x], node.outputs[0],
                reason=f"sqrt(c P(x^2)) with P the average pool and c = {factor:g}: each output is a weighted "
                       f"L2 norm, so the constant is sqrt(c x the largest total weight of one input entry, "
                       f"{heaviest:.6g}); padding, overlap and partial windows included")


def _squares(ctx: Context, value: str, coef: float, nodes: list[Node],
             terms: list[tuple[str, float]]) -> bool:
    """Parse ``value`` as coef x (sum of c_k u_k^2 + non-negative constants) through Add, positive scalar
    Mul/Div, Pow(u, 2) and Mul(u, u), collecting the nodes and the terms (u_k, coef c_k); False otherwise."""
    node = ctx.producer.get(value)
    if node is None or value not in ctx.data or value in ctx.graph.outputs:
        return False
    data, consts = ctx.data_inputs(node), ctx.const_inputs(node)
    nodes.append(node)
    if node.op == "Add":
        if any(c is not None and bool((c < 0).any()) for c in consts):
            return False  # only non-negative constants keep the sum a norm
        return all(_squares(ctx, node.inputs[i], coef, nodes, terms) for i in data)
    scaled = _scalar_const(ctx, node)
    if scaled is not None:
        return _squares(ctx, scaled[0], coef * scaled[1], nodes, terms)
    if node.op == "Pow":
        if _exponent(ctx, node) != 2.0:
            return False
        terms.append((node.inputs[0], coef))
        return True
    if node.op == "Mul" and len(data) == 2 and node.inputs[0] == node.inputs[1]:
        terms.append((node.inputs[0], coef))
        return True
    return False


def l2_norm_combination(ctx: Context, node: Node) -> Step | None:
    """sqrt(sum_k c_k u_k^2 + e) elementwise, c_k > 0, e >= 0 constant (orthogonium's L2NormResidual
    sqrt(0.5 x^2 + 0.5 f(x)^2 + eps), SoftHuber's sqrt(1 + (z/d)^2)): per entry the Euclidean norm of
    (sqrt(c_k) u_k, sqrt(e)), 1-Lipschitz in those, so bounded as the concatenation of the u_k weighted by
    sqrt(c_k k_k), k_k the broadcast repetitions of u_k."""
    arg = _root_argument(ctx, node)
    if arg is None:
        return None
    nodes: list[Node] = []
    terms: list[tuple[str, float]] = []
    if not _squares(ctx, arg, 1.0, nodes, terms) or not terms:
        return None
    out_shape = ctx.shape(node.outputs[0])
    weights = []
    for u, c in terms:
        k = repetitions(ctx.shape(u), out_shape)
        if k is None:
            return None
        weights.append(math.sqrt(c * k))
    inner = {n.name for n in nodes}
    if not all(all(r.name in inner or r is node for r in ctx.users.get(o, [])) for n in nodes for o in n.outputs):
        return None
    # squares, scalings, sums of non-negative terms and the root: relative roundings
    details = Combination(CombinationMode.CONCAT, weights, rounding=Rounding(relative=4 * len(nodes) + 4))
    return Step(details, "L2-norm combination sqrt(sum c u^2 + e)", [n.name for n in nodes] + [node.name],
                [u for u, _ in terms], node.outputs[0],
                reason="per entry the Euclidean norm of (sqrt(c_k) u_k, sqrt(e)): 1-Lipschitz in the weighted u_k")


def wrap_concat(ctx: Context, node: Node) -> Step | None:
    """Concat([Slice(x, -p:),] x [, Slice(x, :q)]) along one axis: torch's export of circular padding."""
    if node.op != "Concat" or len(node.inputs) not in (2, 3):
        return None
    # the centre is the value the other inputs slice (itself possibly a Slice, as after a chunk)
    centre = [i for i, x in enumerate(node.inputs)
              if all(ctx.producer.get(v) is not None and ctx.producer[v].op == "Slice"
                     and ctx.producer[v].inputs[0] == x
                     for j, v in enumerate(node.inputs) if j != i)]
    if len(centre) != 1 or (len(node.inputs) == 3 and centre[0] != 1):
        return None
    x = node.inputs[centre[0]]
    shape, out_shape = ctx.shape(x), ctx.shape(node.outputs[0])
    axis = _axis(node, ctx, x)
    if shape is None or out_shape is None or axis is None or axis < 1 or x not in ctx.data:
        return None
    n = shape[axis - 1]
    parts = {}
    for position, value in enumerate(node.inputs):
        if position == centre[0]:
            continue
        at_end = position < centre[0]
        p = ctx.producer.get(value)
        if p is None or p.op != "Slice" or p.inputs[0] != x or not ctx.only_user(value, node):
            return None
        found = _slice_range(ctx, p, shape)
        if found is None or found[0] != axis or (found[2] != n if at_end else found[1] != 0):
            return None
        _, start, end = found
        parts[at_end] = (p, end - start)
    slices = [p for p, _ in parts.values()]
    p_begin = parts[True][1] if True in parts else 0
    p_end = parts[False][1] if False in parts else 0
    rank = len(shape) + 1
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = p_begin, p_end

    def forward(v: torch.Tensor) -> torch.Tensor:
        size = v.shape[axis]
        return torch.cat([v.narrow(axis, size - p_begin, p_begin), v, v.narrow(axis, 0, p_end)], dim=axis)

    operator = from_function(forward, shape, out_shape, name=node.name,
                             structure=NonnegativeStructure(mode="wrap", pads=tuple(pads)))
    return Step(Linear(operator), "Pad (wrap: Slice/Concat)", [p.name for p in slices] + [node.name], [x],
                node.outputs[0], parts=[Part(operator, Rounding(abs_op=operator), node.outputs[0])])


def _affine_chain(ctx: Context, value: str, stop: Callable[[Node], bool],
                  target: str | None = None) -> tuple[list[tuple[Node, int]], str] | None:
    """Walk back from ``value`` through single-data-input linear nodes, each value read only by the next,
    until reaching ``target`` or a node for which ``stop`` holds. Returns the (node, output index) pairs in
    forward order: each node's linear map is the one of the output the chain goes through."""
    nodes: list[tuple[Node, int]] = []
    reader: Node | None = None
    while True:
        if value == target:
            return nodes[::-1], value
        node = ctx.producer.get(value)
        if node is None or (reader is not None and not ctx.only_user(value, reader)):
            return None
        if stop(node):
            return nodes[::-1], value
        data = ctx.data_inputs(node)
        if len(data) != 1:
            return None
        shape_in, shape_out = ctx.shape(node.inputs[data[0]]), ctx.shape(value)
        if shape_in is None or shape_out is None:
            return None
        output = node.outputs.index(value)
        if REGISTRY[node.op].linear(node, ctx.const_inputs(node), data[0], shape_in, shape_out, output) is None:
            return None
        nodes.append((node, output))
        reader = node
        value = node.inputs[data[0]]


def _chain(ctx: Context, nodes: list[tuple[Node, int]]) -> tuple[LinearOperator, list[Part]] | None:
    """The composed linear map of a chain of (node, output index) pairs, and its parts; None when a node has no
    linear map at known shapes (``_affine_chain`` keeps only nodes that have one)."""
    parts = []
    operators: list[LinearOperator] = []
    for node, output in nodes:
        var = ctx.data_inputs(node)[0]
        consts, in_shape, out = ctx.const_inputs(node), ctx.shape(node.inputs[var]), node.outputs[output]
        out_shape = ctx.shape(out)
        if in_shape is None or out_shape is None:
            return None
        op = REGISTRY[node.op]
        operator = op.linear(node, consts, var, in_shape, out_shape, output)
        if operator is None:
            return None
        operators.append(operator)
        parts.append(Part(operator, op.rounding(node, consts, var, in_shape, out_shape, output), out))
    composed = operators[0]
    for operator in operators[1:]:
        composed = composed.then(operator)
    return composed, parts


#: how an SLL block's condition was checked (``thresholds.record``); above ``thresholds.current().sll_dense_entries``
#: entries an operator is not materialised as a matrix
BRANCHES = ("sll.matrices", "sll.convolutions", "sll.dense", "sll.skip_convolutions", "sll.quadratic")


@dataclass
class SllCheck:
    """The quantities of the SLL condition: bounds on ||S^(1/2) B||, on ||B|| and on the residual
    ||A - B^T S||, and how they were computed."""

    sqrt_s_b: float
    b_norm: float
    residual: float
    method: str
    #: a bound on ||Q||, Q the skip's linear map (1: the skip is x itself)
    skip_norm: float = 1.0


def _plain(op: LinearOperator) -> bool:
    """Whether a refined operator's structure describes exactly the chain, in the chain's own coordinates."""
    s, (c_in, c_out) = op.structure, core_shapes(op)
    return not (s.loose_in or s.loose_out or s.inexact) and \
        tuple(c_in) == tuple(op.in_shape) and tuple(c_out) == tuple(op.out_shape)


def _diagonal_fit(a_cols: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For A with columns a_j and B with rows b_j (one per hidden unit, flattened): the s_j >= 0 with
    A ~ B^T diag(s) by least squares per unit, and the residual's columns; None when some s_j < 0."""
    norms = (b_rows * b_rows).sum(dim=1)
    s = torch.where(norms > 0, (a_cols * b_rows).sum(dim=1) / norms.clamp_min(1e-300), torch.zeros_like(norms))
    if (s < 0).any():
        return None
    return s, a_cols - s[:, None] * b_rows


def _sll_structured(a: LinearOperator, b: LinearOperator) -> SllCheck | None:
    """The SLL quantities without materialising the operators, when A and B are dense layers on the same
    axis (A = B^T S iff the matrix of A is M_B^T diag(s)) or B is a convolution and A the transposed
    convolution with the same geometry (ONNX ConvTranspose is the adjoint of Conv with the same attributes;
    A = B^T S iff A's kernel for each hidden channel h is s_h times B's)."""
    if not (_plain(a) and _plain(b)) or type(a.structure) is not type(b.structure):
        return None
    if isinstance(a.structure, MatrixStructure) and isinstance(b.structure, MatrixStructure):
        ma, mb = a.structure.matrix.double(), b.structure.matrix.double()
        if ma.shape != mb.T.shape:
            return None
        fit = _diagonal_fit(ma.T, mb)
        if fit is None:
            return None
        s, residual = fit
        bound = lambda m: spectral.matrix_upper_bound(m)  # noqa: E731
        record("sll.matrices")
        return SllCheck(bound(s.sqrt()[:, None] * mb), bound(mb), bound(residual), "matrices")
    sa, sb = a.structure, b.structure
    if not isinstance(sa, ConvStructure) or not isinstance(sb, ConvStructure):
        return None
    same = (tuple(sa.stride) == tuple(sb.stride) and tuple(sa.pads) == tuple(sb.pads)
            and tuple(sa.dilation) == tuple(sb.dilation) and sa.groups == sb.groups)
    if not (same and sa.transpose and not sb.transpose and not sa.circular and not sb.circular
            and not any(sa.output_padding) and sa.weight.shape == sb.weight.shape):
        return None
    wa, wb = sa.weight.double(), sb.weight.double()
    fit = _diagonal_fit(wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))
    if fit is None:
        return None
    s, residual = fit
    view = (-1,) + (1,) * (wb.dim() - 1)

    def conv_bound(op: LinearOperator, structure: ConvStructure, weight: torch.Tensor) -> float:
        return spectral.conv_upper_bound(replace(op, structure=replace(structure, weight=weight)))

    record("sll.convolutions")
    return SllCheck(conv_bound(b, sb, s.sqrt().reshape(view) * wb), conv_bound(b, sb, wb),
                    conv_bound(a, sa, residual.reshape(wa.shape)), "convolutions, by DFT")


def _same_size_conv(st: Structure) -> bool:
    """A plain stride-1 convolution that keeps the spatial size with pads p = (k - 1) / 2 on both sides."""
    return (isinstance(st, ConvStructure) and not st.circular and st.groups == 1 and not any(st.output_padding)
            and all(v == 1 for v in st.stride) and all(v == 1 for v in st.dilation)
            and len(st.pads) == 2 * (st.weight.dim() - 2)
            and all(2 * p == k - 1 for p, k in zip(st.pads, 2 * tuple(st.weight.shape[2:]), strict=True)))


def _sll_skip_structured(a: LinearOperator, b: LinearOperator, skip: LinearOperator) -> SllCheck | None:
    """The SLL quantities for y = Q x - A s(Bx + b) on kernels (orthogonium's fused SLLxAOC block at stride 1):
    Q a 1x1 convolution (its channel matrix M), B a same-size convolution and A a transposed one with B's geometry
    or a convolution (same-size, stride 1, pads p on both sides: Conv(W) = ConvTranspose(flip(W)^T), the adjoint's
    form). Q B^T is the transposed convolution with kernel M W_B (per hidden channel), fitted against A's; the
    residual's float64 rounding is bounded per tap (each tap a shift of norm <= 1): sqrt(taps) gamma_{c+2}
    (||A||_F + max S ||M||_F ||W_B||_F)."""
    ops = (a, b, skip)
    if not all(_plain(op) for op in ops) or not all(_same_size_conv(op.structure) for op in ops):
        return None
    sa, sb, sq = a.structure, b.structure, skip.structure
    assert isinstance(sa, ConvStructure) and isinstance(sb, ConvStructure) and isinstance(sq, ConvStructure)
    wb, wq = sb.weight.double(), sq.weight.double()
    if sb.transpose or sq.transpose or any(k != 1 for k in wq.shape[2:]) or tuple(sa.pads) != tuple(sb.pads) \
            or tuple(skip.in_shape) != tuple(b.in_shape) or tuple(skip.out_shape) != tuple(a.out_shape):
        return None
    spatial = tuple(range(2, wb.dim()))
    kernel = sa.weight.double() if sa.transpose else sa.weight.double().flip(spatial).transpose(0, 1)
    if kernel.shape != wb.shape or wq.shape[:2] != (wb.shape[1], wb.shape[1]) or len(spatial) not in (1, 2, 3):
        return None  # Q square, so that the residual's kernel is bounded in B's geometry
    transposed = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                  torch.nn.functional.conv_transpose3d)[len(spatial) - 1]
    probe = torch.randn((1,) + tuple(a.in_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the form read from the structure is the operator's (a guard on the reading)
        expected = transposed(probe, kernel, padding=tuple(sb.pads[:len(spatial)]))
        if not torch.allclose(a.forward(probe), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())):
            return None
    m = wq.reshape(wq.shape[0], wq.shape[1])
    qbt = torch.einsum("oi,hi...->ho...", m, wb)  # the kernel of Q B^T (as a transposed convolution, h -> c)
    fit = _diagonal_fit(kernel.reshape(kernel.shape[0], -1), qbt.reshape(qbt.shape[0], -1))
    if fit is None:
        return None
    s, residual = fit
    view = (-1,) + (1,) * (wb.dim() - 1)
    taps = math.prod(wb.shape[2:])
    rounding = math.sqrt(taps) * gamma(m.shape[1] + 2, UNIT_ROUNDOFF[torch.float64]) * (
        float(kernel.norm()) + float(s.max()) * float(m.norm()) * float(wb.norm())) * (1 + 1e-12)

    def conv_bound(weight: torch.Tensor) -> float:  # B's geometry: also the adjoint of A's transposed form
        return spectral.conv_upper_bound(replace(b, structure=replace(sb, weight=weight)))

    record("sll.skip_convolutions")
    return SllCheck(conv_bound(s.sqrt().reshape(view) * wb), conv_bound(wb),
                    math.nextafter(conv_bound(residual.reshape(wb.shape)) + rounding, math.inf),
                    "convolutions, by DFT", spectral.matrix_upper_bound(m))


def _sll_dense(a: LinearOperator, b: LinearOperator, skip: LinearOperator | None = None) -> SllCheck | None:
    """The SLL quantities from the explicit matrices, for small operators of any structure. With a skip Q
    (y = Q x - A s(Bx + b)), A is compared with Q B^T S, and the residual's bound carries the float64 rounding of
    Q B^T: |fl(A - S fl(Q B^T)) - (A - S Q B^T)| <= gamma_{n+2} (|A| + S |Q| |B^T|) (Higham 3.5), whose Frobenius
    norm is at most gamma_{n+2} (||A||_F + max S ||Q||_F ||B||_F)."""
    ops = (a, b) if skip is None else (a, b, skip)
    if max(op.in_numel * op.out_numel for op in ops) > current().sll_dense_entries:
        return None
    ma, mb = a.to_dense(), b.to_dense()
    bound = spectral.matrix_upper_bound
    if skip is None:
        fit = _diagonal_fit(ma.T, mb)
        if fit is None:
            return None
        s, residual = fit
        record("sll.dense")
        return SllCheck(bound(s.sqrt()[:, None] * mb), bound(mb), bound(residual), "explicit matrices")
    mq = skip.to_dense()
    fit = _diagonal_fit(ma.T, mb @ mq.T)
    if fit is None:
        return None
    s, residual = fit
    rounding = gamma(mq.shape[1] + 2, UNIT_ROUNDOFF[torch.float64]) * (
        float(ma.norm()) + float(s.max()) * float(mq.norm()) * float(mb.norm())) * (1 + 1e-12)
    record("sll.dense")
    return SllCheck(bound(s.sqrt()[:, None] * mb), bound(mb), math.nextafter(bound(residual) + rounding, math.inf),
                    "explicit matrices", bound(mq))


def sll_block(ctx: Context, node: Node) -> Step | None:
    """y = Q x -/+ A s(B x + b) with A = +/- Q B^T S, S >= 0 diagonal, s slope in [0, 1], Q the skip's linear map
    (the identity when the skip is x itself): y = Q (x - B^T S s(Bx + b)), and the Jacobian of the inner map,
    I - (S^(1/2) B)^T D (S^(1/2) B), is symmetric with eigenvalues in [1 - q^2, 1], q = ||S^(1/2) B||, so the block is
    ||Q|| max(1, q^2 - 1)-Lipschitz (1 for an orthogonal Q under the sqrt(2) condition of Araujo et al., ICLR 2023);
    a residual R = A - Q B^T S adds ||R|| ||B||. A skip other than x is checked on kernels when Q is a 1x1
    convolution and A, B same-size stride-1 convolutions, else with explicit matrices."""
    summed = REGISTRY[node.op].linear_combination(len(node.inputs))
    if summed is None or summed.divisor != 1 or len(ctx.data_inputs(node)) != 2 or len(node.inputs) != 2 \
            or summed.signs[0] != 1.0 or summed.signs[1] not in (1.0, -1.0):
        return None  # x + A s(Bx + b) or x - A s(Bx + b) (either order when both signs are +)
    x, r = node.inputs
    shape = ctx.shape(node.outputs[0])
    if shape is None or ctx.shape(x) != shape or ctx.shape(r) != shape:
        return None  # a broadcast skip or branch is not the block's x or A s(Bx + b)
    subtracts = summed.signs[1] == -1.0
    for skip, branch in ((x, r),) if subtracts else ((x, r), (r, x)):
        found = _sll_branch(ctx, node, skip, branch)
        if found is None:
            continue
        a_nodes, act, b_nodes, s_nodes, source = found
        a_chain, b_chain = _chain(ctx, a_nodes), _chain(ctx, b_nodes)
        s_chain = _chain(ctx, s_nodes) if s_nodes else None
        if a_chain is None or b_chain is None or (s_nodes and s_chain is None):
            continue
        (a_op, a_parts), (b_op, b_parts) = a_chain, b_chain
        a_signed = a_op if subtracts else a_op.then(
            from_function(lambda v: -v, a_op.out_shape, a_op.out_shape,
                          structure=ScalarStructure(value=-1.0), adjoint=lambda v: -v))
        a_ref, b_ref = refine(a_signed), refine(b_op)
        if s_chain is None:
            check = _sll_structured(a_ref, b_ref) or _sll_dense(a_ref, b_ref)
        else:
            check = _sll_skip_structured(a_ref, b_ref, refine(s_chain[0])) or _sll_dense(a_ref, b_ref, s_chain[0])
        allowed = 1e-5 * max(mul_up(check.b_norm, check.skip_norm), 1e-30) if check is not None else 0.0
        form, fit = ("x - B^T S s(Bx + b)", "A = B^T S") if s_chain is None else \
            ("Q x - Q B^T S s(Bx + b)", "A = Q B^T S")
        s_names = [n.name for n, _ in s_nodes]
        if check is None or check.residual > allowed:
            miss = (f"not an SLL block: no diagonal S >= 0 with {fit} was found, or the operators are too large to "
                    "check" if check is None else
                    f"not an SLL block: {fit} only up to {check.residual:.3g} ({allowed:.3g} allowed)")
            quadratic = _sll_quadratic(a_ref, b_ref, s_chain[0] if s_chain is not None else None,
                                       [a_parts, b_parts, s_chain[1] if s_chain is not None else []])
            if isinstance(quadratic, str):
                ctx.near_misses[node.name] = f"{miss}; {quadratic}"
                return None
            constant, reason = quadratic
            label = "residual block (S-procedure) " + ("x - A s(Bx + b)" if s_chain is None else "Q x - A s(Bx + b)")
        else:
            label = f"SLL block {form}"
            slack = mul_up(check.residual, check.b_norm)
            q2 = mul_up(check.sqrt_s_b, check.sqrt_s_b)
            core = max(1.0, math.nextafter(q2 - 1.0, math.inf))
            if s_chain is not None:
                core = mul_up(check.skip_norm, core)
            constant = math.nextafter(core + slack, math.inf)
            reason = ((f"||S^1/2 B|| <= {check.sqrt_s_b:.6g} <= sqrt(2) (Araujo et al. 2023)" if q2 <= 2.0 else
                       f"||S^1/2 B||^2 <= {q2:.10g} > 2: I - B^T S D B has eigenvalues in [1 - {q2:.10g}, 1]")
                      + f", from the {check.method}; {fit} up to {check.residual:.2g}, adding {slack:.2g}"
                      + (f"; the skip {', '.join(s_names)} is Q with ||Q|| <= {check.skip_norm:.10g}"
                         if s_chain is not None else ""))
        names = s_names + [n.name for n, _ in a_nodes] + [act.name] + [n.name for n, _ in b_nodes] + [node.name]
        hidden, act_shape = act.inputs[0], ctx.known_shape(act.outputs[0])  # known: A's chain reads it
        act_rule = REGISTRY[act.op]
        substeps = [  # how the block is computed, for the float error analysis
            Step(Linear(b_op), "B", [], [source], hidden, parts=b_parts),
            Step(Rule(1.0), act.op, [act.name], [hidden], act.outputs[0],
                 parts=[Part(None, act_rule.rounding(act, ctx.const_inputs(act), 0, act_shape, act_shape),
                             act.outputs[0])]),
            Step(Linear(a_op), "A", [], [act.outputs[0]], branch, parts=a_parts),
            Step(Combination(CombinationMode.SUM, [1.0, 1.0], count=2), node.op, [node.name], [skip, branch],
                 node.outputs[0])]
        if s_chain is not None:
            s_op, s_parts = s_chain
            substeps.insert(0, Step(Linear(s_op), "Q", [], [source], skip, parts=s_parts))
        return Step(Pattern(constant, substeps=substeps), label, names, [source], node.outputs[0], reason=reason)
    return None


def _sll_quadratic(a: LinearOperator, b: LinearOperator, skip: LinearOperator | None,
                   parts: list[list[Part]]) -> tuple[float, str] | str:
    """The constant of y = Q x - A s(Bx + b) by the S-procedure (``quadratic.residual_block_bound``) from the
    explicit matrices, and its reason, when it is below the product bound ||Q|| + ||A|| ||B||; else why not.
    ``parts``: the nodes of A, B and Q, whose roundings bound the matrices' own float64 errors."""
    m, h, n = a.out_numel, a.in_numel, b.in_numel
    if (m + h) * (n + h) > current().sll_dense_entries or n + h > current().sll_quadratic_side:
        return f"the block is too large for the S-procedure on explicit matrices ({m + h} x {n + h})"
    errors = [_materialised_error(p) for p in parts]
    if not all(math.isfinite(e) for e in errors):
        return "the rounding of a chain's explicit matrix is unknown (a node without an absolute map)"
    ma, mb = a.to_dense(), b.to_dense()
    mq = skip.to_dense() if skip is not None else torch.eye(n, dtype=torch.float64)
    found = residual_block_bound(mq, ma, mb, (errors[2], errors[0], errors[1]))
    bound = spectral.matrix_upper_bound
    product = (bound(mq) if skip is not None else 1.0) + mul_up(bound(ma), bound(mb))
    if found is None or found.value >= product:
        return (f"the S-procedure gives {found.value:.6g}, not below the product bound {product:.6g}" if found
                else "the S-procedure finds no multiplier")
    record("sll.quadratic")
    return found.value, (f"the S-procedure with multipliers in [{found.lam[0]:.6g}, {found.lam[1]:.6g}] (LipSDP, "
                         "Fazlyab et al. 2019), "
                         f"on the explicit matrices: ||N|| <= {found.nu:.10g} at L = {found.level:.10g}, below the "
                         f"product bound {product:.6g}")


def _materialised_error(parts: list[Part]) -> float:
    """A bound on the Frobenius norm of the float64 error of a chain's explicit matrix (its operator run on the unit
    vectors): gamma_T || |A_k| ... |A_1| ||_F (``absolute_chain``); 0 for no node (the identity); inf when a node
    has no absolute map."""
    if not parts:
        return 0.0
    chain = absolute_chain(parts)
    if chain is None:
        return math.inf
    absolute, terms = chain
    return gamma(terms, UNIT_ROUNDOFF[torch.float64]) * float(absolute.to_dense().norm()) * (1 + 1e-12)


def _slope_01(node: Node) -> bool:
    """Whether a node is an activation whose slopes all lie in [0, 1] (``Op.slope_range``)."""
    slopes = REGISTRY[node.op].slope_range(node)
    return slopes is not None and 0.0 <= slopes[0] and slopes[1] <= 1.0


def _linear_values(ctx: Context, value: str) -> list[str]:
    """``value`` and the values behind it through single-data-input linear nodes, nearest first; the walk stops
    after a value read by another node than the chain's next one (``_affine_chain``'s condition)."""
    values, reader = [value], None
    while True:
        node = ctx.producer.get(value)
        if node is None or (reader is not None and not ctx.only_user(value, reader)):
            return values
        data = ctx.data_inputs(node)
        shape_in, shape_out = (ctx.shape(node.inputs[data[0]]), ctx.shape(value)) if len(data) == 1 else (None, None)
        if shape_in is None or shape_out is None or REGISTRY[node.op].linear(
                node, ctx.const_inputs(node), data[0], shape_in, shape_out, node.outputs.index(value)) is None:
            return values
        reader, value = node, node.inputs[data[0]]
        values.append(value)


def _sll_branch(ctx: Context, node: Node, skip: str, branch: str):
    """Nodes of the branch A s(B x + b) and of the skip's linear chain S from the same x (empty when the skip is
    x itself), and x; None when the block has another form."""
    if not ctx.only_user(branch, node):
        return None
    found = _affine_chain(ctx, branch, _slope_01)
    if found is None or not found[0]:
        return None
    a_nodes, act_out = found
    act = ctx.producer[act_out]
    if not ctx.only_user(act_out, a_nodes[0][0]):
        return None
    skip_values = _linear_values(ctx, skip)
    source = next((v for v in _linear_values(ctx, act.inputs[0]) if v in skip_values), None)
    if source is None or source not in ctx.data:
        return None
    found_b = _affine_chain(ctx, act.inputs[0], lambda n: False, target=source)
    found_s = _affine_chain(ctx, skip, lambda n: False, target=source)
    if found_b is None or not found_b[0] or found_s is None or (found_s[0] and not ctx.only_user(skip, node)):
        return None
    if not ctx.only_user(act.inputs[0], act):
        return None
    return a_nodes, act, found_b[0], found_s[0], source


# ------------------------------------------------------------------------- coordinate selections (MaxMin)

def _copy_ancestors(ctx: Context, value: str) -> list[tuple[str, Node | None, int]]:
    """``value`` and the values it is copied from through single-data-input copy nodes (``Copies``: reshapes,
    slices with any step, splits, gathers at constant indices), nearest first: (value, its producer, the
    producer's output index)."""
    out: list[tuple[str, Node | None, int]] = []
    while True:
        node = ctx.producer.get(value)
        data = ctx.data_inputs(node) if node is not None else []
        if node is None or data != [0] or not isinstance(REGISTRY[node.op], Copies):
            out.append((value, None, 0))
            return out
        out.append((value, node, node.outputs.index(value)))
        value = node.inputs[0]


@dataclass
class Selection:
    """Values that each copy coordinates of one ``source``: ``index[k]`` is, entry by entry, the flat position
    (per sample) of the source coordinate that value k holds; ``nodes`` the copy nodes between them."""

    source: str
    index: list[torch.Tensor]
    nodes: list[Node]

    def repeats(self) -> bool:
        """Whether some source coordinate is held twice, in one value or across them."""
        flat = torch.cat([i.reshape(-1) for i in self.index])
        return int(torch.unique(flat).numel()) != flat.numel()


def coordinate_selection(ctx: Context, values: list[str]) -> Selection | None:
    """``values`` as fixed selections of coordinates of their nearest common source through copy nodes, whatever
    the spelling (``Gather`` at constant indices, ``Slice`` with steps, ``Split``, a reshape then an index,
    ``GatherElements``); None when they share no source or an entry is not a coordinate (a padded zero)."""
    chains = [_copy_ancestors(ctx, v) for v in values]
    common = set.intersection(*({v for v, _, _ in chain} for chain in chains))
    source = next((v for v, _, _ in chains[0] if v in common), None)
    shape = ctx.shape(source) if source is not None else None
    if source is None or shape is None or source not in ctx.data:
        return None
    positions = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape((1,) + tuple(shape))
    index: list[torch.Tensor] = []
    nodes: dict[str, Node] = {}
    for chain in chains:
        links: list[tuple[Node, int]] = []
        for value, node, output in chain:
            if value == source:
                break
            assert node is not None  # only the last value of a chain has no copy producer, and source is in it
            links.append((node, output))
            nodes[node.name] = node
        if not links:
            index.append(positions[0] - 1)
            continue
        composed = _chain(ctx, links[::-1])
        if composed is None:
            return None
        with torch.no_grad():
            picked = composed[0].forward(positions)[0]
        if bool((picked < 1).any()):
            return None  # an entry that is not a source coordinate (zero padding)
        index.append(picked - 1)
    return Selection(source, index, list(nodes.values()))


def _through_isometries(ctx: Context, value: str, reader: Node) -> tuple[str, list[Node]]:
    """Walk back from ``value`` (read by ``reader`` only) through reshapes and unsqueezes that keep every entry
    (``IsometryStructure(onto=True)``), each value read by the next node only."""
    nodes: list[Node] = []
    while ctx.only_user(value, reader):
        node = ctx.producer.get(value)
        shape_in = ctx.shape(node.inputs[0]) if node is not None and node.inputs else None
        shape_out = ctx.shape(value)
        if node is None or ctx.data_inputs(node) != [0] or shape_in is None or shape_out is None:
            break
        op = REGISTRY[node.op].linear(node, ctx.const_inputs(node), 0, shape_in, shape_out)
        if op is None or not isinstance(op.structure, IsometryStructure) or not op.structure.onto:
            break
        nodes.append(node)
        reader, value = node, node.inputs[0]
    return value, nodes


def maxmin_select(ctx: Context, node: Node) -> Step | None:
    """A Concat of Max(a, b) and Min(a, b) pairs (each through reshapes, as a stack writes them), where every a and
    b is a fixed selection of coordinates of one value z, no coordinate selected twice across all of them: per
    entry (max, min) permutes (a, b), and the pairs read disjoint coordinates of z, so the pairs are 1-Lipschitz in
    z. The Concat's other inputs (TorchScript merges nested concatenations) join as in any concatenation. One
    recogniser for every way of selecting the halves (``coordinate_selection``)."""
    if node.op != "Concat" or len(ctx.data_inputs(node)) != len(node.inputs) or len(node.inputs) < 2:
        return None
    claimed: list[Node] = [node]
    others: list[str] = []
    found: dict[tuple[str, str], dict[str, Node]] = {}
    for original in node.inputs:
        value, moved = _through_isometries(ctx, original, node)
        p = ctx.producer.get(value)
        if p is None or p.op not in ("Max", "Min") or len(p.inputs) != 2 \
                or not ctx.only_user(value, moved[-1] if moved else node):
            others.append(original)
            continue
        shapes = [ctx.shape(v) for v in p.inputs]
        if shapes[0] is None or shapes[0] != shapes[1] or p.inputs[0] == p.inputs[1]:
            return None
        pair = found.setdefault((min(p.inputs), max(p.inputs)), {})
        if p.op in pair:
            return None  # the same extremum twice: its entries are read twice
        pair[p.op] = p
        claimed += moved + [p]
    if not found or any(len(pair) != 2 for pair in found.values()):
        return None
    operands = [v for key in found for v in key]
    selection = coordinate_selection(ctx, operands)
    if selection is None or selection.repeats():
        return None
    size = 2 * len(found) * math.prod(ctx.known_shape(operands[0]))
    label = f"MaxMin ({len(found)} pair{'s' * (len(found) > 1)} of values, {size} selected coordinates)"
    names = [n.name for n in selection.nodes + claimed]
    reason = ("(max(a, b), min(a, b)) permutes (a, b) per entry, and a and b are fixed selections of coordinates "
              "of one value, none selected twice: 1-Lipschitz")
    if not others:  # switches: where a pair's two selected coordinates tie
        switches = (torch.cat([selection.index[k].reshape(-1) for k in range(0, len(operands), 2)]).long(),
                    torch.cat([selection.index[k].reshape(-1) for k in range(1, len(operands), 2)]).long())
        return Step(Pattern(1.0, rounding=EXACT, switches=switches), label, names, [selection.source],
                    node.outputs[0], reason=reason)
    return Step(Combination(CombinationMode.CONCAT, [1.0] * (1 + len(others)), rounding=EXACT), f"Concat ({label})",
                names, [selection.source] + others, node.outputs[0],
                reason=reason + "; concatenated with the other inputs")


# ---------------------------------------------------------------------------- HouseHolder activations

#: the comparisons a selector is tested with: (the region where it holds, the side that takes s = 0)
_COMPARE = {"Greater": ("pos", "neg"), "LessOrEqual": ("neg", "neg"), "Less": ("neg", "pos"),
            "GreaterOrEqual": ("pos", "pos")}
_MIRROR = {"Greater": "Less", "Less": "Greater", "LessOrEqual": "GreaterOrEqual", "GreaterOrEqual": "LessOrEqual"}
#: the operators a HouseHolder-like block computes with (its arithmetic on x, y and the selector's comparisons)
_ARITHMETIC = frozenset(_COMPARE) | {"Identity", "Cast", "Not", "Neg", "Where", "Add", "Sub", "Mul", "Div"}
#: and the masks' logic, which the angle form also reads
_ARITHMETIC_AND_MASKS = _ARITHMETIC | {"And", "Or", "Xor"}
#: the largest mismatch of the two pieces on the selector's zero line, relative to their size, that is taken for
#: the rounding of their constants (a larger one is a discontinuity: no rule)
HOUSEHOLDER_TOLERANCE = 1e-5


@dataclass
class _Lin:
    """A value linear in (x, y) on each side of the selector's zero line: ``coef[side, var]`` (side 0: s on the
    side ``neg``, 1: ``pos``), the sums of the absolute values of its products ``absc``, and the longest chain
    of roundings ``depth``."""

    coef: torch.Tensor
    absc: torch.Tensor
    depth: int


@dataclass
class _Mask:
    """A 0/1 value: 1 on the sides (or the angular cells) where ``on[side, ...]`` holds (a bool tensor that
    broadcasts to the entries)."""

    on: torch.Tensor


class _HouseHolderForm:
    """The symbolic evaluation of a HouseHolder-like block from its two inputs x and y, each node once."""

    def __init__(self, ctx: Context, leaves: dict[str, int], shape: tuple[int, ...], sides: int = 2) -> None:
        self.ctx, self.leaves, self.shape, self.sides = ctx, leaves, shape, sides
        self.memo: dict[str, _Lin | _Mask] = {}
        self.nodes: list[Node] = []
        self.selector: str | None = None
        self.tie: str | None = None  # the side that takes s = 0
        self.why = ""

    def const(self, value: str) -> torch.Tensor | None:
        return _entry_const(self.ctx, value, self.shape)

    def fail(self, why: str) -> None:
        if not self.why:
            self.why = why

    def value(self, name: str) -> _Lin | _Mask | None:
        if name in self.memo:
            return self.memo[name]
        if name in self.leaves:
            coef = torch.zeros((self.sides, 2) + self.shape, dtype=torch.float64)
            coef[:, self.leaves[name]] = 1.0
            found: _Lin | _Mask | None = _Lin(coef, coef.clone(), 0)
        else:
            node = self.ctx.producer.get(name)
            if node is None or name not in self.ctx.data or self.ctx.shape(name) is None:
                return None
            found = self.evaluate(node)
            if found is not None:
                self.nodes.append(node)
        if found is not None:
            self.memo[name] = found
        return found

    def compare(self, node: Node) -> _Mask | None:
        op, inputs = node.op, list(node.inputs)
        data = self.ctx.data_inputs(node)
        if data == [1]:
            op, inputs = _MIRROR[op], inputs[::-1]
        elif data != [0]:
            return None
        zero = self.const(inputs[1])
        if zero is None:
            return None
        side, tie = _COMPARE[op]
        # a failed assumption is recorded and the evaluation goes on, so that the refusal names the whole block
        if bool((zero != 0).any()):
            self.fail(f"{node.op} node {node.name!r} compares with a non-zero threshold")
        if self.selector is not None and self.selector != inputs[0]:
            self.fail(f"{node.op} node {node.name!r} tests a second selector")
        if self.tie is not None and self.tie != tie:
            self.fail(f"{node.op} node {node.name!r} gives s = 0 to the other side than the other comparison: "
                      "both pieces (or neither) would be taken on the zero line")
        self.selector, self.tie = self.selector or inputs[0], self.tie or tie
        return _Mask(torch.tensor([side == "neg", side == "pos"]).reshape((2,) + (1,) * len(self.shape)))

    def evaluate(self, node: Node) -> _Lin | _Mask | None:
        ctx, op = self.ctx, node.op
        if op in _COMPARE:
            return self.compare(node)
        if op in ("Identity", "Cast", "Not", "Neg"):
            inner = self.value(node.inputs[0])
            if isinstance(inner, _Mask):
                return _Mask(~inner.on) if op == "Not" else (None if op == "Neg" else inner)
            if inner is None or op == "Not" or (op == "Cast" and int(node.attr("to", 1)) not in (1, 11)):
                return None
            if op == "Cast":  # float to float: at most one rounding (to float32)
                return _Lin(inner.coef, inner.absc, inner.depth + 1)
            return _Lin(-inner.coef, inner.absc, inner.depth) if op == "Neg" else inner
        if op in ("And", "Or", "Xor"):
            p, q = (self.value(v) for v in node.inputs)
            if not isinstance(p, _Mask) or not isinstance(q, _Mask):
                return None
            return _Mask(p.on & q.on if op == "And" else (p.on | q.on if op == "Or" else p.on ^ q.on))
        if op == "Where":
            cond, parts = self.value(node.inputs[0]), [self.value(v) if v in ctx.data else self.zero(v)
                                                       for v in node.inputs[1:]]
            a, b = parts
            if not isinstance(cond, _Mask) or not isinstance(a, _Lin) or not isinstance(b, _Lin):
                return None
            return self.select(cond, a, b, max(a.depth, b.depth))
        if op in ("Add", "Sub"):
            if len(ctx.data_inputs(node)) != 2:
                return None
            a, b = (self.value(v) for v in node.inputs)
            if not isinstance(a, _Lin) or not isinstance(b, _Lin):
                return None
            sign = 1.0 if op == "Add" else -1.0
            return _Lin(a.coef + sign * b.coef, a.absc + b.absc, max(a.depth, b.depth) + 1)
        if op in ("Mul", "Div"):
            data = ctx.data_inputs(node)
            if len(data) == 2 and op == "Mul":
                a, b = (self.value(v) for v in node.inputs)
                lin, mask = (a, b) if isinstance(b, _Mask) else (b, a)
                if not isinstance(lin, _Lin) or not isinstance(mask, _Mask):
                    return None
                return self.select(mask, lin, None, lin.depth)
            if data != [0] and not (op == "Mul" and data == [1]):
                return None
            inner = self.value(node.inputs[data[0]])
            c = self.const(node.inputs[1 - data[0]])
            if not isinstance(inner, _Lin) or c is None or (op == "Div" and bool((c == 0).any())):
                return None
            factor = 1.0 / c if op == "Div" else c
            return _Lin(inner.coef * factor, inner.absc * factor.abs(), inner.depth + 1)
        return None

    def zero(self, value: str) -> _Lin | None:
        c = self.const(value)
        if c is None or bool((c != 0).any()):
            return None
        z = torch.zeros((self.sides, 2) + self.shape, dtype=torch.float64)
        return _Lin(z, z.clone(), 0)

    @staticmethod
    def select(mask: _Mask, a: _Lin, b: _Lin | None, depth: int) -> _Lin:
        """Side by side: ``a`` where the mask is 1, else ``b`` (zero when None); selecting and multiplying by 0
        or 1 are exact."""
        on = mask.on.unsqueeze(1)  # the variable axis
        zero = torch.zeros((), dtype=torch.float64)
        return _Lin(torch.where(on, a.coef, zero if b is None else b.coef),
                    torch.where(on, a.absc, zero if b is None else b.absc), depth)


_U = 2.0 ** -53


def _norm2_up(m: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the spectral norms of 2 x 2 matrices ``m[..., i, j]`` (float64): the largest eigenvalue of
    M^T M = [[p, q], [q, r]] is (p + r) / 2 + sqrt(((p - r) / 2)^2 + q^2), every term bounded with its rounding."""
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    p, r, q = a * a + c * c, b * b + d * d, a * b + c * d
    slack = 8 * _U
    half = (p - r).abs() / 2 + slack * (p + r)
    cross = q.abs() + slack * ((a * b).abs() + (c * d).abs())
    lam = ((p + r) / 2 + torch.sqrt(half * half + cross * cross)) * (1 + 32 * _U)
    return torch.sqrt(lam) * (1 + 1e-12)


def householder(ctx: Context, node: Node) -> Step | None:
    """Concat(a, b) with (a, b) = M_neg (x, y) where s = u . (x, y) is on one side of 0 and M_pos (x, y) on the
    other, per entry, x and y disjoint coordinate selections of one value z, the two sides told apart by
    comparisons of the one selector s with 0 (as ``Mul`` by their casts, or ``Where``): deel-torchlip's and
    orthogonium's HouseHolder (identity and the reflection I - 2 v v^T, v = (sin t/2, -cos t/2), s = v . (x, y)).

    Assumptions, each checked: the comparisons give s = 0 to exactly one side (they partition the plane); the two
    pieces agree on the line s = 0 up to delta (their constants' rounding), so the map is delta from a continuous
    one, the pieces' norms bound its slope on each half-plane, and a segment crosses the line once: the constant
    is max(||M_neg||, ||M_pos|| + delta) over the entries (1 for a unit v; max(1, |1 - 2|v|^2|) for a reflection by
    another v). The error from delta, and from the selector's rounding picking the other piece near the line,
    goes into the pattern's rounding. Pieces that differ by more than ``HOUSEHOLDER_TOLERANCE`` on the line: no rule."""
    if node.op != "Concat" or len(node.inputs) != 2 or len(ctx.data_inputs(node)) != 2:
        return None
    if not all(ctx.only_user(v, node) for v in node.inputs):
        return None
    found = _householder_leaves(ctx, node)
    if found is None:
        return None
    selection, (x, y) = found
    shape = ctx.known_shape(x)  # known: ``_householder_leaves`` compares it
    form = _HouseHolderForm(ctx, {x: 0, y: 1}, shape)
    a, b = (form.value(v) for v in node.inputs)
    if not isinstance(a, _Lin) or not isinstance(b, _Lin) or form.selector is None:
        return None
    s = form.value(form.selector)
    names = [n.name for n in selection.nodes] + [n.name for n in form.nodes] + [node.name]
    if not isinstance(s, _Lin):
        return None

    def refuse(why: str) -> Step:
        return Step(NoRule(), "HouseHolder (selector, two linear pieces)", names, [selection.source],
                    node.outputs[0], reason=f"no rule: {why}")

    if form.why:
        return refuse(form.why)
    if not torch.equal(s.coef[0], s.coef[1]):
        return None
    u = s.coef[0]  # (2, *shape): the selector's weights on x and y
    u_norm = torch.sqrt(u[0] ** 2 + u[1] ** 2)
    if bool((u_norm == 0).any()):
        return refuse(f"the selector {form.selector!r} is identically 0 on some entry")
    # M[side, entry, row (a, b), column (x, y)]
    m = torch.stack([a.coef, b.coef], dim=1).reshape(2, 2, 2, -1).permute(0, 3, 1, 2)  # (side, entry, row, col)
    w = torch.stack([-u[1], u[0]]).reshape(2, -1).T / u_norm.reshape(-1, 1)  # unit direction of the zero line
    gap = torch.einsum("erc,ec->er", m[0] - m[1], w)
    norms = _norm2_up(m)  # (side, entry)
    scale = torch.maximum(norms[0], norms[1])
    delta = torch.sqrt((gap ** 2).sum(-1)) * (1 + 1e-9) + 1e-14 * scale  # float64 evaluation included
    worst = int(torch.argmax(delta / scale.clamp_min(1e-300)))
    if float(delta[worst]) > HOUSEHOLDER_TOLERANCE * max(float(scale[worst]), 1e-30):
        return refuse(f"the two pieces differ by {float(delta[worst]):.3g} on the selector's zero line (entry "
                      f"{worst}): the map is not continuous")
    constant = float(torch.maximum(norms[0], norms[1] + delta).max())
    constant = math.nextafter(constant * (1 + 1e-12), math.inf)
    return Step(Pattern(constant, rounding=_householder_rounding(a, b, s, m, norms, delta, u_norm)),
                "HouseHolder (selector, two linear pieces)", names, [selection.source], node.outputs[0],
                reason=f"piecewise linear in (x, y) on the two sides of s = u.(x, y), s = 0 on one side only, the "
                       f"pieces equal on s = 0 up to {float(delta.max()):.2g}: max over entries of the pieces' "
                       f"norms, {constant:.10g}")


def _householder_leaves(ctx: Context, node: Node) -> tuple[Selection, tuple[str, str]] | None:
    """The two values x and y the block computes from (read by its arithmetic), as coordinate selections of one
    value, disjoint; None otherwise."""
    walked = _block_leaves(ctx, node, "", _ARITHMETIC, 256)
    if walked is None:
        return None
    leaves = walked[0]
    if len(leaves) != 2 or ctx.shape(leaves[0]) is None or ctx.shape(leaves[0]) != ctx.shape(leaves[1]):
        return None
    selection = coordinate_selection(ctx, leaves)
    if selection is None or selection.repeats():
        return None
    return selection, (leaves[0], leaves[1])


def _householder_rounding(a: _Lin, b: _Lin, s: _Lin, m: torch.Tensor, norms: torch.Tensor, delta: torch.Tensor,
                          u_norm: torch.Tensor) -> Rounding | None:
    """Per entry, |fl(y) - y*| <= (gamma_d F + gamma_ds G + delta) |(x, y)| with y* the continuous map: F the
    norm of the pieces' absolute products (their own roundings), G the gap between the pieces times the selector's
    relative rounding (the other piece taken within that distance of the line), delta the mismatch on the line;
    relative to |y*| >= sigma_min |(x, y)|, sigma_min = |det M| / ||M|| of either piece (less delta)."""
    absc = torch.stack([a.absc, b.absc], dim=1).reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
    frob = torch.sqrt((absc ** 2).sum((-1, -2))).max(0).values * (1 + 1e-12)
    abs_u = torch.sqrt((s.absc[0] ** 2).sum(0)).reshape(-1)
    det = (m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]).abs() * (1 - 1e-12)
    sigma = torch.minimum(det[0] / norms[0], det[1] / norms[1] - delta)
    if bool((sigma <= 1e-6).any()):
        return None  # a degenerate piece: the error is not relative to the output
    gap = _norm2_up((m[0] - m[1]).unsqueeze(0))[0] + delta
    own = a.depth if a.depth >= b.depth else b.depth
    relative = own * max(1.0, float((frob / sigma).max())) + \
        s.depth * max(1.0, float((gap * abs_u / u_norm.reshape(-1) / sigma).max()))
    return Rounding(relative=math.ceil(relative * (1 + 1e-9)), fixed=float((delta / sigma).max()) * (1 + 1e-9))


# ---------------------------------------------------------------------------- selections by angle

#: how far the exported atan2's pi and the modulus's 2 pi may be from their true values
ANGLE_CONSTANT_TOLERANCE = 1e-6
#: sectors narrower than this (radians, 8 float32 ulps of 2 pi) are slivers left by the thresholds' rounding: the
#: neighbouring sectors' pieces cover them in the continuous map, and the float evaluation's piece there is rounding
ANGLE_SLIVER = 2.0 ** -18
#: a shift c in [ANGLE_TINY_SHIFT, P] keeps the float angle r in [0, m] (see ``_angle_range``)
ANGLE_TINY_SHIFT = 2.0 ** -100
_TWO_PI = 2 * math.pi
_ORDER = {"Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge}
_ANGLE_LABEL = "HouseHolder by angle (sectors of atan2, linear pieces)"


@dataclass
class _Angle:
    """r = (psi - c) mod m, psi the exported atan2(y, x) of the leaves ``x``, ``y``: ``value`` is r, ``shift`` c,
    ``p`` the graph's pi and ``m`` its 2 pi (each per entry, float64; c is 0 when absent), ``nodes`` its nodes."""

    x: str
    y: str
    value: str
    shift: str | None
    p: str
    m: str
    nodes: list[Node]


def _entry_const(ctx: Context, value: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The float constant ``value`` as float64 broadcast to the per-sample ``shape`` (a leading batch axis of 1
    dropped), or None."""
    c = ctx.consts.get(value) if value not in ctx.data else None
    if c is None or not c.is_floating_point():
        return None
    c = c.double()
    if c.dim() > len(shape):
        if c.dim() > len(shape) + 1 or c.shape[0] != 1:
            return None
        c = c[0]
    try:
        return torch.broadcast_to(c, shape)
    except RuntimeError:
        return None


def _sign_test(ctx: Context, value: str, ops: set[str], shape: tuple[int, ...]) -> tuple[Node, str] | None:
    """The comparison producing ``value`` as ``v op 0`` (op in ``ops``, either spelling), and v; else None."""
    node = ctx.producer.get(value)
    if node is None or node.op not in _COMPARE:
        return None
    op, inputs, data = node.op, list(node.inputs), ctx.data_inputs(node)
    if data == [1]:
        op, inputs = _MIRROR[op], inputs[::-1]
    elif data != [0]:
        return None
    zero = _entry_const(ctx, inputs[1], shape)
    return (node, inputs[0]) if op in ops and zero is not None and not bool((zero != 0).any()) else None


def _offset(ctx: Context, node: Node | None, op: str, value: str) -> str | None:
    """The constant added to (``Add``, either order) or subtracted from (``Sub``) ``value`` by ``node``."""
    if node is None or node.op != op or ctx.data_inputs(node) not in ([0], [1]):
        return None
    k = ctx.data_inputs(node)[0]
    if node.inputs[k] != value or (op == "Sub" and k != 0):
        return None
    return node.inputs[1 - k]


def _exported_atan2(ctx: Context, atan: Node) -> tuple[str, str, str, str, list[Node]] | str | None:
    """(x, y, psi, P, nodes) for ``Where(Less(x, 0), Where(Greater(y, 0), t + P, t - P), t)``, t = Atan(y / x),
    optionally guarded by ``Where(IsNaN(psi), k, psi)`` (dynamo); the failed assumption, or None when ``atan``
    reads no quotient of two data values."""
    div = ctx.producer.get(atan.inputs[0]) if atan.op == "Atan" else None
    if div is None or div.op != "Div" or len(ctx.data_inputs(div)) != 2:
        return None
    y, x = div.inputs
    shape = ctx.shape(x)
    where = f"Atan node {atan.name!r} (of {y!r} / {x!r})"
    if shape is None or ctx.shape(y) != shape:
        return f"{where}: its two values have unknown or different shapes"
    t = atan.outputs[0]
    outer = next((u for u in ctx.users.get(t, []) if u.op == "Where" and u.inputs[2] == t), None)
    if outer is None:
        return f"{where} is not corrected by quadrant (no Where(x < 0, ..., atan)): not an exported atan2"
    less = _sign_test(ctx, outer.inputs[0], {"Less"}, shape)
    inner = ctx.producer.get(outer.inputs[1])
    if less is None or less[1] != x or inner is None or inner.op != "Where":
        return f"{where}: Where node {outer.name!r} does not test x < 0 (strictly) to correct the quadrant"
    greater = _sign_test(ctx, inner.inputs[0], {"Greater", "GreaterOrEqual"}, shape)
    plus, minus = (ctx.producer.get(v) for v in inner.inputs[1:])
    p1, p2 = _offset(ctx, plus, "Add", t), _offset(ctx, minus, "Sub", t)
    if greater is None or greater[1] != y or p1 is None or p2 is None or plus is None or minus is None:
        return f"{where}: Where node {inner.name!r} is not Where(y > 0, atan + P, atan - P)"
    pi1, pi2 = (_entry_const(ctx, v, shape) for v in (p1, p2))
    if pi1 is None or pi2 is None or not torch.equal(pi1, pi2):
        return f"{where}: the quadrant corrections add and subtract different constants"
    if float((pi1 - math.pi).abs().max()) > ANGLE_CONSTANT_TOLERANCE:
        return f"{where}: the quadrant correction P = {float(pi1.reshape(-1)[0]):.9g} is not pi"
    nodes = [div, atan, less[0], greater[0], plus, minus, inner, outer]
    psi = outer.outputs[0]
    guard = next((u for u in ctx.users.get(psi, []) if u.op == "IsNaN"), None)
    if guard is not None:
        clean = next((u for u in ctx.users.get(guard.outputs[0], []) if u.op == "Where"
                      and u.inputs[0] == guard.outputs[0] and u.inputs[2] == psi and u.inputs[1] not in ctx.data),
                     None)
        if clean is None:
            return f"{where}: IsNaN node {guard.name!r} does not guard the angle as Where(IsNaN(a), k, a)"
        nodes += [guard, clean]
        psi = clean.outputs[0]
    return x, y, psi, p1, nodes


def _angle(ctx: Context, atan: Node) -> _Angle | str | None:
    """The angle r = (atan2(y, x) - c) mod m that ``atan`` starts, as ``Sub(a, Mul(Floor(Div(a, m)), m))`` with
    a = psi - c (or psi): its form, the failed assumption, or None when ``atan`` is no exported atan2."""
    found = _exported_atan2(ctx, atan)
    if not isinstance(found, tuple):
        return found
    x, y, psi, p, nodes = found
    shape = ctx.known_shape(x)
    users = ctx.users.get(psi, [])
    where = f"the angle of Atan node {atan.name!r}"
    if len(users) != 1:
        return f"{where} ({psi!r}) is read by {len(users)} nodes, not by one shift or modulus"
    a, shift = psi, None
    for op in ("Sub", "Add"):
        c = _offset(ctx, users[0], op, psi)
        if c is not None and _entry_const(ctx, c, shape) is not None:
            a, shift = users[0].outputs[0], c
            nodes.append(users[0])
            if op == "Add":
                return f"{where} is shifted by Add node {users[0].name!r} (lipcert reads the shift as Sub)"
    readers = ctx.users.get(a, [])
    div = next((u for u in readers if u.op == "Div" and u.inputs[0] == a and ctx.data_inputs(u) == [0]), None)
    sub = next((u for u in readers if u.op == "Sub" and u.inputs[0] == a and len(ctx.data_inputs(u)) == 2), None)
    floor = _sole_user(ctx, div.outputs[0], "Floor") if div is not None else None
    mul = _sole_user(ctx, floor.outputs[0], "Mul") if floor is not None else None
    m2 = _offset(ctx, mul, "Mul", floor.outputs[0]) if mul is not None and floor is not None else None
    if len(readers) != 2 or div is None or sub is None or floor is None or mul is None or m2 is None \
            or sub.inputs[1] != mul.outputs[0]:
        return f"{where} is not reduced as a - Floor(a / m) m (a modulus with a constant m)"
    m, m_again = (_entry_const(ctx, v, shape) for v in (div.inputs[1], m2))
    if m is None or m_again is None or not torch.equal(m, m_again):
        return f"{where}: the modulus divides and multiplies by different constants"
    if float((m - _TWO_PI).abs().max()) > ANGLE_CONSTANT_TOLERANCE:
        return f"{where}: the modulus m = {float(m.reshape(-1)[0]):.9g} is not 2 pi"
    return _Angle(x, y, sub.outputs[0], shift, p, div.inputs[1], nodes + [div, floor, mul, sub])


def _sole_user(ctx: Context, value: str, op: str) -> Node | None:
    users = ctx.users.get(value, [])
    return users[0] if len(users) == 1 and users[0].op == op and value not in ctx.graph.outputs else None


class _AngleForm(_HouseHolderForm):
    """The symbolic evaluation of a block from its two leaves x and y and an angle r that it only compares with
    constants: each value per angular slot (``samples[slot, entry]``, a value of r inside the slot). Constants
    are read as the loader folded them (float32: the deployed run's values, and those of lipcert's float64 run)."""

    def __init__(self, ctx: Context, leaves: dict[str, int], shape: tuple[int, ...], angle: str,
                 samples: torch.Tensor) -> None:
        super().__init__(ctx, leaves, shape, sides=samples.shape[0])
        self.angle, self.samples = angle, samples

    def value(self, name: str) -> _Lin | _Mask | None:
        if name == self.angle:
            self.fail(f"the angle {name!r} is used as a value, not only compared with constants")
            return None
        return super().value(name)

    def compare(self, node: Node) -> _Mask | None:
        op, inputs, data = node.op, list(node.inputs), self.ctx.data_inputs(node)
        if data == [1]:
            op, inputs = _MIRROR[op], inputs[::-1]
        elif data != [0]:
            return None
        t = self.const(inputs[1])
        if inputs[0] != self.angle or t is None:
            self.fail(f"{node.op} node {node.name!r} compares another value than the angle with a constant")
            return None
        return _Mask(_ORDER[op](self.samples, t))


def _block_leaves(ctx: Context, node: Node, stop: str, ops: frozenset[str] = _ARITHMETIC_AND_MASKS,
                  limit: int = 512) -> tuple[list[str], list[str]] | None:
    """The data values the block ending at ``node`` reads through ``ops`` (stopping at ``stop``), and the values
    it walked; None past ``limit`` values."""
    leaves: list[str] = []
    seen: set[str] = set()
    stack = list(node.inputs)
    while stack:
        value = stack.pop()
        if value in seen or value not in ctx.data or value == stop:
            continue
        seen.add(value)
        p = ctx.producer.get(value)
        if p is None or p.op not in ops:
            leaves.append(value)
            continue
        stack += [v for v in p.inputs if v]
        if len(seen) > limit:
            return None
    return leaves, sorted(seen)


def _find_atan(ctx: Context, node: Node) -> Node | None:
    """The one ``Atan`` node that the block ending at ``node`` reaches through its arithmetic and masks (the
    exported atan2 is arithmetic around it), or None."""
    walked = _block_leaves(ctx, node, "")
    if walked is None:
        return None
    found = {p.name: p for p in (ctx.producer.get(v) for v in walked[0]) if p is not None and p.op == "Atan"}
    return next(iter(found.values())) if len(found) == 1 else None


def householder_angle(ctx: Context, node: Node) -> Step | None:
    """Concat(a, b) with (a, b) linear in two disjoint coordinate selections (x, y) of one value on each angular
    sector of r = (atan2(y, x) - c) mod 2 pi, the sectors told apart by comparisons of r with per-entry constant
    thresholds (orthogonium's ``HouseHolder_Order_2``: identity, two reflections and a rotation on four sectors).

    Assumptions, each checked (refused with the one that fails): the angle is the exported atan2 (P = pi and
    m = 2 pi within ``ANGLE_CONSTANT_TOLERANCE``), read only by comparisons with constants; per entry the
    thresholds cut [0, 2 pi) into sectors, each taking one linear piece M_j (a sector no mask covers has the
    piece 0); consecutive pieces agree on their boundary ray up to d (at most ``HOUSEHOLDER_TOLERANCE`` of their
    norms); x is never -0.0 (``never_negative_zero``: the exported atan2 reads y / -0.0 as the opposite infinity
    of y / +0.0 and -0.0 < 0 as false, so it turns such a direction by half a turn, a jump that every input pixel
    at 0 times a negative weight reaches). The constant, with d_b the mismatch (M_j - M_j+1) w_b on the boundary
    ray b ending sector j, and omega_j the sector's width:
    - g(z) = M_j z + |z| rho_j(phi) on sector j, rho_j linear in the angle from (1 - s_(b-1)) d_(b-1) at its start
      to -s_b d_b at its end, s_b = omega_j / (omega_j + omega_j+1) (the wider sector takes more of the gap);
    - g is continuous (the two shares of each mismatch meet) and within max|rho_j| |z| of the block;
    - on sector j, ||Dg|| <= ||M_j|| + ||(rho, rho')||_F <= ||M_j|| + hypot(max|rho_j|, (|rho_start| + |rho_end|)
      / omega_j) (the polar derivatives of |z| rho(phi));
    - a segment crosses each boundary ray once, so g is L-Lipschitz, L the largest of these over sectors and
      entries, and the pairs read disjoint coordinates.
    Sectors narrower than ``ANGLE_SLIVER`` are slivers: the continuous map gives them to their neighbours, and a
    sliver (or a threshold's ray) whose piece does not fit them is refused, since the graph's map jumps there in
    exact arithmetic; angles only the float evaluation reaches (past [0, 2 pi)) go into the rounding, unknown when
    their piece does not fit (a hole) (``_sector_entry``)."""
    if node.op != "Concat" or len(node.inputs) != 2 or len(ctx.data_inputs(node)) != 2:
        return None
    if not all(ctx.only_user(v, node) for v in node.inputs):
        return None
    atan = _find_atan(ctx, node)
    angle = _angle(ctx, atan) if atan is not None else None
    if not isinstance(angle, _Angle) or atan is None:
        return None  # ``angle_selector`` names the failed assumption on the Atan node
    walked = _block_leaves(ctx, node, angle.value)
    if walked is None or sorted(walked[0]) != sorted([angle.x, angle.y]):
        ctx.near_misses[atan.name] = (f"the block ending at Concat node {node.name!r} reads other values than "
                                      f"x, y and the angle through its arithmetic")
        return None
    selection = coordinate_selection(ctx, [angle.x, angle.y])
    if selection is None or selection.repeats():
        ctx.near_misses[atan.name] = f"{angle.x!r} and {angle.y!r} are not disjoint selections of one value"
        return None
    source = selection.source
    names = [n.name for n in selection.nodes] + [n.name for n in angle.nodes]
    shape = _varying_shape(ctx, node, walked[1], angle)

    def refuse(why: str, form: _HouseHolderForm | None = None) -> Step | None:
        """The failed assumption: on this block's step once its nodes are known, else on the Atan node's."""
        ctx.near_misses[atan.name] = why
        if form is None:
            return None
        return Step(NoRule(), _ANGLE_LABEL, names + [n.name for n in form.nodes] + [node.name], [source],
                    node.outputs[0], reason=f"no rule: {why}")

    readers = ctx.users.get(angle.value, [])
    outside = next((u for u in readers if u.op not in _COMPARE), None)
    if outside is not None or angle.value in ctx.graph.outputs:
        return refuse(f"the angle {angle.value!r} is read by {outside.op if outside else 'the graph'} "
                      f"{outside.name if outside else 'output'!r}, not only by comparisons with constants")
    thresholds = []
    for u in readers:
        t = _entry_const(ctx, u.inputs[1 - ctx.data_inputs(u)[0]], shape) \
            if len(ctx.data_inputs(u)) == 1 else None
        if t is None or bool(t.isnan().any()):
            return refuse(f"{u.op} node {u.name!r} compares the angle with something other than a number")
        thresholds.append(t)
    constants = _angle_constants(ctx, angle, shape)
    span = _angle_range(*constants)
    points = torch.sort(torch.stack([span.lo, torch.zeros(shape, dtype=torch.float64),
                                     torch.full(shape, _TWO_PI, dtype=torch.float64), span.hi]
                                    + [t.clamp(span.lo, span.hi) for t in thresholds]), dim=0).values
    samples = torch.cat([points, (points[:-1] + points[1:]) / 2])  # the points, then the open intervals
    form = _AngleForm(ctx, {angle.x: 0, angle.y: 1}, shape, angle.value, samples)
    a, b = (form.value(v) for v in node.inputs)
    if form.why:
        return refuse(form.why, form)
    if not isinstance(a, _Lin) or not isinstance(b, _Lin):
        return refuse(f"the block ending at Concat node {node.name!r} is not linear in x and y on each sector")
    proof = _angle_sectors(points, a, b, constants[0], span)
    if isinstance(proof, str):
        return refuse(proof, form)
    constant, rounding, why = proof
    signed = never_negative_zero(ctx, angle.x)
    if signed is not None:
        return refuse(f"the sectors give {constant:.10g}, but the exported atan2 turns x = -0.0 by half a turn "
                      f"(y / -0.0 is the opposite infinity and x < 0 is false), a jump, and {angle.x!r} is not "
                      f"proven never -0.0: {signed}", form)
    return Step(Pattern(constant, rounding=rounding), _ANGLE_LABEL, names + [n.name for n in form.nodes]
                + [node.name], [source], node.outputs[0],
                reason=f"linear pieces on the sectors of r = (atan2(y, x) - c) mod 2 pi, continuous across each "
                       f"boundary ray up to their constants' rounding: {why}")


def _varying_shape(ctx: Context, node: Node, values: list[str], angle: _Angle) -> tuple[int, ...]:
    """x's per-sample shape with 1 on the axes along which no constant of the block varies (per-channel angles
    over a feature map): the entries there are alike, and are proven once."""
    shape = ctx.known_shape(angle.x)
    readers = [n for v in values + [angle.value] for n in ([ctx.producer[v]] if v in ctx.producer else [])
               + (ctx.users.get(v, []) if v == angle.value else [])]
    names = {i for n in readers + angle.nodes + [node] for i in n.inputs if i and i not in ctx.data}
    varying = [False] * len(shape)
    for name in names:
        c = ctx.consts.get(name)
        if c is None or not c.is_floating_point():
            continue
        size = tuple(c.shape[1:]) if c.dim() > len(shape) else tuple(c.shape)
        if len(size) > len(shape):
            return shape
        size = (1,) * (len(shape) - len(size)) + size
        varying = [v or s != 1 for v, s in zip(varying, size, strict=True)]
    return tuple(n if v else 1 for n, v in zip(shape, varying, strict=True))


@dataclass
class _Span:
    """Per entry: the float angle's range [lo, hi] and its error against the ideal angle, ``fixed`` radians plus
    ``ulps`` times the format's unit roundoff."""

    lo: torch.Tensor
    hi: torch.Tensor
    fixed: torch.Tensor
    ulps: torch.Tensor


def _angle_constants(ctx: Context, angle: _Angle, shape: tuple[int, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, P, m) per entry (c = 0 without a shift); ``_angle`` has read each of them."""
    zero = torch.zeros(shape, dtype=torch.float64)
    c, p, m = (_entry_const(ctx, v, shape) if v is not None else zero
               for v in (angle.shift, angle.p, angle.m))
    assert c is not None and p is not None and m is not None
    return c, p, m


def _angle_range(c: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> _Span:
    """The float angle r against the ideal (atan2(y, x) - c) mod 2 pi, per entry.

    Error (a rounding of a result v errs by at most |v| u): the quotient's relative u moves atan by <= u / 2; Atan
    is within ``TRANSCENDENTAL_ULPS`` ulps (each <= 2 u |v|) of a value <= pi / 2; +-P, - c and the modulus's
    Mul and Sub err by their results' sizes (<= P, P + |c|, |k| m, P + |c| + |k| m) times u, with
    |k| <= (P + |c|) / m + 1 (a floor off by one moves r by m: the same direction); the constants add |P - pi|,
    |k| |m - 2 pi|. Twice that, for slack.
    Range: with c in [ANGLE_TINY_SHIFT, P] and m >= 2 P, psi lies in [-P, P] and a = fl(psi - c) in [-m, P], so
    fl(a / m) is in [-1, 1/2] (not -0: a nonzero a is at least 2^-124 away from 0, an exact Sterbenz difference
    of two floats >= 2^-101, or half of c), the floor is -1 or 0 and r = fl(a + m) or a lies in [0, m]; otherwise
    r may leave [0, 2 pi] by the error."""
    cmax, pmax = c.abs(), p.abs()
    k = (pmax + cmax) / m + 1
    ulps = 2 * (0.5 + TRANSCENDENTAL_ULPS * pmax + pmax + (pmax + cmax) + k * m + (pmax + cmax + k * m))
    fixed = ((p - math.pi).abs() + k * (m - _TWO_PI).abs()) * 2
    eps = fixed + ulps * UNIT_ROUNDOFF[torch.float32]  # float32's, the larger (lipcert's float64 run errs less)
    simple = (c >= ANGLE_TINY_SHIFT) & (c <= p) & (m >= 2 * p)
    top = m.clamp_min(_TWO_PI)
    return _Span(torch.where(simple, torch.zeros_like(eps), -eps), torch.where(simple, top, _TWO_PI + eps),
                 fixed, ulps)


def _direction(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)


def _ray_gap(m: torch.Tensor, angle: float) -> float:
    """|m w| for the unit direction w at ``angle``, rounded up (float64 evaluation of a 2 x 2 product)."""
    return float((m @ _direction(angle)).norm()) * (1 + 1e-9) + 1e-14 * float(m.abs().sum())


@dataclass
class _EntryProof:
    """One entry's sectors: its constant, its pieces' smallest gain, the selection error (``fixed`` relative to
    |z|, ``ulps`` units of u), a hole (None, or why), the largest mismatch."""

    constant: float
    sigma: float
    fixed: float
    ulps: float
    hole: str | None
    mismatch: float


def _sector_entry(p: torch.Tensor, pieces: torch.Tensor, c: float, eps_fixed: float,
                  ulps: float) -> _EntryProof | str:
    """The sectors of one entry: ``p`` its sorted points (slots: point k is slot k, the interval after it slot
    K + k), ``pieces[slot]`` its 2 x 2 pieces; the ray at r = t is at the absolute angle c + t. The float angle is
    within ``eps_fixed`` + ``ulps`` u of the ideal one; each slot's piece is compared with the continuous map at
    its own angles (inside a sector) or at its nearest ray (a point, a sliver, past [0, 2 pi))."""
    k_pts = p.shape[0]
    pts = [float(v) for v in p]
    slots = [(pts[k], pts[k], k) for k in range(k_pts) if k == 0 or pts[k] > pts[k - 1]]
    slots += [(pts[k], pts[k + 1], k_pts + k) for k in range(k_pts - 1) if pts[k + 1] > pts[k]]
    slots.sort(key=lambda s: (s[0], s[1]))
    ideal = [s for s in slots if s[0] >= 0 and s[1] <= _TWO_PI and not (s[0] == s[1] == _TWO_PI)]
    groups: list[list[tuple[float, float, int]]] = []  # runs of one piece (float32 constants)
    for slot in ideal:
        if groups and torch.equal(pieces[groups[-1][-1][2]], pieces[slot[2]]):
            groups[-1].append(slot)
        else:
            groups.append([slot])
    cells = [(g[0][0], g[-1][1], g[0][2]) for g in groups if g[-1][1] - g[0][0] >= ANGLE_SLIVER]
    if not cells:
        return f"no sector is wider than {ANGLE_SLIVER:.3g}"
    n = len(cells)
    mats = torch.stack([pieces[s] for _, _, s in cells])
    norms = [float(v) for v in _norm2_up(mats)]
    gaps = []
    for j in range(n):
        nxt = (j + 1) % n
        d = _ray_gap(mats[j] - mats[nxt], c + cells[j][1])
        if d > HOUSEHOLDER_TOLERANCE * max(norms[j], norms[nxt], 1e-30):
            ray = math.remainder(c + cells[j][1], _TWO_PI)
            return (f"the pieces differ by {d:.3g} on the boundary at angle {ray:.9g} (r = {cells[j][1]:.9g}): the "
                    "map is not continuous there")
        gaps.append(d)
    starts = [cells[j - 1][1] - (_TWO_PI if j == 0 else 0.0) for j in range(n)]
    width = [cells[j][1] - starts[j] for j in range(n)]
    share = [width[j] / (width[j] + width[(j + 1) % n]) for j in range(n)]  # of boundary j's gap, on sector j
    rho_end = [share[j] * gaps[j] for j in range(n)]
    rho_start = [(1 - share[j - 1]) * gaps[j - 1] for j in range(n)]
    rho = [max(rho_start[j], rho_end[j]) for j in range(n)]
    constant = max(norms[j] + math.hypot(rho[j], (rho_start[j] + rho_end[j]) / width[j]) * (1 + 1e-12)
                   for j in range(n))
    det = (mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0]).abs() * (1 - 1e-12)
    sigma = min(float(det[j]) / norms[j] - rho[j] for j in range(n))

    def owner(e: float) -> int:
        """The sector whose extended span (start, end] holds the ray at r = e."""
        return next(j for j in range(n) for shift in (-_TWO_PI, 0.0, _TWO_PI)
                    if starts[j] < e + shift <= cells[j][1])

    fixed, worst_ulps, hole = 0.0, 0.0, None
    slot_norms = _norm2_up(torch.stack([pieces[s] for _, _, s in slots]))
    for (lo, hi, s), ns in zip(slots, slot_norms.tolist(), strict=True):
        inside = next((j for j in range(n) if cells[j][0] <= lo and hi <= cells[j][1]
                       and (lo < hi or cells[j][0] < lo < cells[j][1])), None)
        if inside is not None:  # the float angle is within eps of r, inside the same sector
            j, reach = inside, 0.0
            gap = float(_norm2_up((pieces[s] - mats[j]).unsqueeze(0))[0])
        else:  # a point, a sliver or past [0, 2 pi): compared with the sector at its nearest ray
            e = min(max(lo, 0.0), _TWO_PI)
            j, reach = owner(e), max(hi - e, e - lo)
            gap = _ray_gap(pieces[s] - mats[j], c + e)
        if gap > HOUSEHOLDER_TOLERANCE * max(ns, norms[j], 1e-30) and (lo, hi, s) in ideal:
            # reached in exact arithmetic (a sliver the float32 thresholds leave, or a threshold's own ray):
            # the graph's map itself jumps there, which no rounding allowance covers
            return (f"the piece taken for r in [{lo:.9g}, {hi:.9g}] (exact arithmetic on the graph's float32 "
                    f"thresholds) is {gap:.3g} away from its neighbours' continuous map: the map jumps there")
        if gap > HOUSEHOLDER_TOLERANCE * max(ns, norms[j], 1e-30) and hole is None:
            hole = (f"the float evaluation takes a piece {gap:.3g} away from the continuous map for r in "
                    f"[{lo:.9g}, {hi:.9g}] (a hole, or a piece that does not fit there)")
        fixed = max(fixed, (ns + constant) * (reach + eps_fixed) + gap + rho[j])
        worst_ulps = max(worst_ulps, (ns + constant) * ulps)
    return _EntryProof(constant, sigma, fixed, worst_ulps, hole, max(gaps))


def _angle_sectors(points: torch.Tensor, a: _Lin, b: _Lin, shift: torch.Tensor, span: _Span
                   ) -> tuple[float, Rounding | None, str] | str:
    """The constant and the rounding over every entry (entries with equal points, pieces and constants are
    proven once), or the failed assumption."""
    k_pts = points.shape[0]
    entries = points.reshape(k_pts, -1).shape[1]
    slots = a.coef.shape[0]
    mats = torch.stack([a.coef, b.coef], dim=1).reshape(slots, 2, 2, entries).permute(3, 0, 1, 2)
    frob = torch.sqrt((torch.stack([a.absc, b.absc], dim=1) ** 2).sum((1, 2))).reshape(slots, entries).max(0).values
    c = shift.reshape(-1)
    fixed, ulps = span.fixed.reshape(-1), span.ulps.reshape(-1)
    rows = torch.cat([points.reshape(k_pts, -1).T, mats.reshape(entries, -1),
                      torch.stack([c, fixed, ulps, frob], dim=1)], dim=1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), entries, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(entries), "amin")
    proofs: list[_EntryProof] = []
    for e in first.tolist():
        proof = _sector_entry(points.reshape(k_pts, -1)[:, e], mats[e], float(c[e]), float(fixed[e]), float(ulps[e]))
        if isinstance(proof, str):
            return f"{proof} (entry {e})"
        proofs.append(proof)
    constant = math.nextafter(max(p.constant for p in proofs) * (1 + 1e-12), math.inf)
    mismatch = max(p.mismatch for p in proofs)
    why = f"the pieces agree on the boundaries up to {mismatch:.2g}: max over entries and sectors of " \
          f"||M_j|| + the slope of the correction that closes the gaps, {constant:.10g}"
    hole = next((p.hole for p in proofs if p.hole is not None), None)
    sigma = min(p.sigma for p in proofs)
    if hole is not None:
        return constant, None, f"{why}; float rounding unknown: {hole}"
    if sigma <= 1e-6:
        return constant, None, f"{why}; float rounding unknown: a piece is degenerate"
    relative = max(a.depth, b.depth) * max(1.0, float(frob.max()) / sigma) + max(p.ulps for p in proofs) / sigma
    rounding = Rounding(relative=math.ceil(relative * (1 + 1e-9)),
                        fixed=max(p.fixed for p in proofs) / sigma * (1 + 1e-9))
    return constant, rounding, why


def angle_selector(ctx: Context, node: Node) -> Step | None:
    """An ``Atan`` of a quotient of two data values that no block proof claimed (``householder_angle``): no rule,
    and the reason names the assumption that failed."""
    quotient = ctx.producer.get(node.inputs[0]) if node.op == "Atan" else None
    if quotient is None or quotient.op != "Div" or len(ctx.data_inputs(quotient)) != 2:
        return None
    found = _angle(ctx, node)
    why = found if isinstance(found, str) else ctx.near_misses.get(
        node.name, "its angle does not select among linear pieces of one Concat (the form householder_angle proves)")
    return Step(NoRule(), "Atan (an angle that selects pieces)", [node.name], [node.inputs[0]], node.outputs[0],
                reason=f"no rule: Atan node {node.name!r} computes an angle that selects pieces by sector: {why}")


PATTERNS = [sll_block, householder, householder_angle, wrap_concat, groupsort_reduce, maxmin_select, maxmin_concat,
            relu_neg_concat, l2_pool, l2_norm_combination, angle_selector]
