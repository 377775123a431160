"""Check that lipcert's executor computes what onnxruntime computes, value by value, and name the first node that
does not.

lipcert proves facts about its own executor; the deployed model is the ONNX file as onnxruntime runs it. The
check ties the two at every intermediate value, not only at the output, so that a large value elsewhere (a big
constant logit, a big channel) cannot hide a difference:

* **node by node**: onnxruntime (graph optimisations off) returns every value of the model; each of lipcert's
  nodes is run on onnxruntime's own inputs, and each entry of its outputs is compared with onnxruntime's within
  a tolerance of that entry's own magnitude (``tolerance``): exact for operators that only move, select or
  compare entries (``Op.exact``), the float error of two implementations of one accumulation otherwise. Values
  lipcert folded into constants at load are compared the same way.
* **end to end**: lipcert's float32 output against onnxruntime's (graph optimisations on, as deployed), per
  sample, relative to that sample's largest output or the largest magnitude its output node accumulates
  (|W| |x| + |b| for a product), whichever is larger: a single logit near 0 cancels large terms.

The points (``probe_points``) are inputs in [0, 1] as data would be, points on balls around them, and points far
outside [0, 1]; ``lipcert report`` checks its own first samples and their certified balls
(``certification.engine``). A mismatch anywhere is a ``ModelError`` naming the first node that differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from lipcert.errors import ModelError
from lipcert.graph import budget
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY, RunContext

#: end-to-end tolerance: the output's difference relative to each sample's largest output entry
DEFAULT_RTOL = 1e-4
#: radii of the balls around the data-like points, and the half-widths of the far boxes (points uniform in
#: [-w, w] per entry)
BALL_RADII = (0.25, 1.0)
FAR_WIDTHS = (10.0, 100.0)
#: ulps two implementations of one elementwise function may differ by (libm, MLAS and CUDA are within a few)
ELEMENTWISE_ULPS = 64


@dataclass
class CrossCheck:
    """How closely lipcert's executor matched onnxruntime: the output's largest difference (absolute and
    relative to each sample's largest output), on how many points, and how many values were compared."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    samples: int
    provider: str
    values: int = 0
    points: str = ""
    #: folded constants this check replaced by onnxruntime's values (``_compare_constants``)
    adopted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def ort_session(model: onnx.ModelProto, providers: list[str | tuple[str, dict[str, int]]] | None = None,
                optimize: bool = True):
    """An onnxruntime session for an in-memory model (CPU unless providers say otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=providers or ["CPUExecutionProvider"])


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every value onnx's shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is only a hint here
        return {}
    found = list(inferred.value_info) + list(inferred.output) + list(inferred.input)
    return {v.name: v.type.tensor_type.elem_type for v in found if v.type.tensor_type.elem_type}


def with_outputs(model: onnx.ModelProto, names: list[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate values ``names``, each with the element type
    onnx's shape inference gives it (float32 when it cannot tell)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = value_types(model) if types is None else types
    known = {o.name for o in copy.graph.output}
    for name in names:
        if name not in known:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT),
                                                                        None))
    return copy


def probe_points(graph: Graph, samples: int = 4, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Groups of points to compare at, each with what it is: ``samples`` inputs uniform in [0, 1], a point on each
    ball of ``BALL_RADII`` around each of them, and ``samples`` points uniform in [-w, w] per ``FAR_WIDTHS``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (samples,) + tuple(graph.input_shape)
    data = torch.rand(shape, generator=gen)
    groups = [("random inputs in [0, 1]", data)]
    for radius in BALL_RADII:
        groups.append((f"points at distance {radius:g} from them", data + radius * unit_directions(shape, gen)))
    groups += [(f"points in [-{width:g}, {width:g}]", (torch.rand(shape, generator=gen) * 2 - 1) * width)
               for width in FAR_WIDTHS]
    return groups


def unit_directions(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random directions of unit L2 norm, one per sample."""
    direction = torch.randn(shape, generator=gen)
    norms = direction.reshape(shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return direction / norms.reshape((-1,) + (1,) * (len(shape) - 1))


def _unit_roundoff(dtype: np.dtype) -> float:
    if dtype == np.float16:
        return 2.0 ** -11
    if str(dtype) == "bfloat16":
        return 2.0 ** -8
    if dtype == np.float64:
        return 2.0 ** -53
    return 2.0 ** -24


def tolerance(node, inputs: list[torch.Tensor | None], theirs: np.ndarray, output: int,
              with_magnitude: bool = True) -> np.ndarray:
    """How far lipcert's value of one output of ``node`` may lie from onnxruntime's, entry by entry, when both ran
    on the same inputs: 0 for an exact operator (``Op.exact``: copies, selections, comparisons); otherwise the
    rounding of two accumulations of n terms in any order, 2 gamma_n (|y| + m), m the entry's magnitude
    (``Op.magnitude``: |W| |x| for a product, 0 when the error is relative to y alone), n the operator's
    multiply-adds per output entry (``budget.node_bounds``), plus ``ELEMENTWISE_ULPS`` ulps of |y| (and of 1 for
    functions whose error is absolute, such as tanh). Without ``with_magnitude``, m is left out: a tolerance
    never above the full one, which is all a passing entry needs (the magnitude costs a float64 run)."""
    entry = REGISTRY[node.op]
    if entry.exact or theirs.dtype.kind not in "f":
        return np.zeros(theirs.shape)
    u = _unit_roundoff(theirs.dtype)
    size = max(int(theirs.size), 1)
    try:
        bounds = budget.node_bounds(node.op, node.attrs, inputs, node.name)
    except (TypeError, ValueError, OverflowError, IndexError, RuntimeError, AttributeError):
        bounds = None
    terms = max(1, math.ceil(bounds[1] / size)) + 2 if bounds else 2
    gamma = terms * u / max(1.0 - terms * u, 1e-3)
    y = np.abs(theirs.astype(np.float64))
    try:
        m = entry.magnitude(node, inputs, output) if with_magnitude else None
    except Exception:  # noqa: BLE001 - inputs the absolute run cannot take: the tolerance is relative to y alone
        m = None
    if m is not None and m.numel() != theirs.size:
        m = None
    magnitude = y if m is None else y + np.abs(m.detach().cpu().double().numpy()).reshape(theirs.shape)
    floor = ELEMENTWISE_ULPS * u * (1.0 if entry.absolute_error else 0.0)
    return 2 * gamma * magnitude + ELEMENTWISE_ULPS * u * y + floor + 1e-37


def _differs(mine: torch.Tensor, theirs: np.ndarray, tol: np.ndarray) -> str:
    """Empty when ``mine`` matches ``theirs`` within ``tol`` entry by entry (NaN matches NaN, equal infinities
    match), else what differs."""
    cpu = mine.detach().cpu()
    ours = (cpu.float() if cpu.dtype == torch.bfloat16 else cpu).numpy()
    if ours.shape != theirs.shape:
        return f"has shape {ours.shape} where onnxruntime's has {theirs.shape}"
    if theirs.dtype.kind not in "f" or ours.dtype.kind not in "f":
        if theirs.dtype.kind == "f" or ours.dtype.kind == "f" or not np.array_equal(ours.astype(np.int64),
                                                                                     theirs.astype(np.int64)):
            return "has other values than onnxruntime's"
        return ""
    a, b = ours.astype(np.float64), theirs.astype(np.float64)
    # both overflowed or are NaN (inf - inf may be NaN in one order and inf in another), or the magnitude of a
    # finite value did
    same = (a == b) | (~np.isfinite(a) & ~np.isfinite(b)) | (~np.isfinite(tol) & np.isfinite(b))
    with np.errstate(invalid="ignore"):
        gap = np.where(same, 0.0, np.abs(a - b))
    over = ~same & ~(gap <= tol)
    if not over.any():
        return ""
    worst = np.unravel_index(int(np.argmax(np.where(over, gap / np.maximum(tol, 1e-300), 0))), gap.shape)
    return (f"is {a[worst]:.9g} at entry {tuple(int(i) for i in worst)} where onnxruntime gives {b[worst]:.9g} "
            f"(tolerance {tol[worst]:.3g})")


def runtime_batches(graph: Graph, points: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """``points`` as the batches the model runs (padded with zeros to a fixed batch), with their real sizes."""
    fixed = graph.fixed_batch
    if fixed is None:
        return [(points, len(points))]
    out = []
    for chunk in torch.split(points, fixed):
        n = chunk.shape[0]
        out.append((torch.cat([chunk, chunk.new_zeros((fixed - n,) + tuple(chunk.shape[1:]))]) if n < fixed
                    else chunk, n))
    return out


def _exposed(graph: Graph, types: dict[str, int]) -> list[str]:
    """The values onnxruntime can return that lipcert also holds: node outputs of the ONNX model that lipcert
    computes or folded into a constant, with a type onnx's inference knows."""
    ours = {o for node in graph.nodes for o in node.outputs if o} | set(graph.params)
    produced = [o for n in graph.onnx_model.graph.node for o in n.output if o]
    return [name for name in produced if name in ours and name in types]


def check_points(graph: Graph, groups: list[tuple[str, torch.Tensor]], *, rtol: float = DEFAULT_RTOL) -> CrossCheck:
    """Compare lipcert's executor with onnxruntime at each group of points (model inputs, with what they are),
    node by node and end to end (see the module docstring); a ``ModelError`` names the first node that differs
    and the points where it does."""
    if graph.onnx_model is None:
        raise ModelError("no ONNX model to compare with", source=graph.source)
    types = value_types(graph.onnx_model)
    names = _exposed(graph, types)
    try:
        exposed = ort_session(with_outputs(graph.onnx_model, names, types), optimize=False)
        deployed = ort_session(graph.onnx_model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}",
                         source=graph.source) from None
    order = [o.name for o in exposed.get_outputs()]
    module = GraphModule(graph)
    constants = module.constants()
    worst, largest, compared, total = 0.0, 0.0, 0, 0
    adopted: list[str] = []
    for what, points in groups:
        for chunk, n in runtime_batches(graph, points.float().cpu()):
            try:
                theirs = dict(zip(order, exposed.run(None, {graph.input_name: chunk.numpy()}), strict=False))
                final = deployed.run([graph.output], {graph.input_name: chunk.numpy()})[0]
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ModelError(f"onnxruntime cannot run the model at {what}: {str(exc).splitlines()[0]}",
                                 source=graph.source) from None
            if compared == 0:
                folded, found = _compare_constants(graph, theirs)
                compared += folded
                adopted += found
                if found:  # run with onnxruntime's constants from here on
                    module = GraphModule(graph)
                    constants = module.constants()
            with torch.no_grad():
                values = module.run_all(chunk)
            if what == groups[0][0]:
                _require_finite(graph, values[graph.output][:n], final[:n], what)
            compared += _compare_nodes(graph, chunk, constants, theirs, values, what)
            rel, gap = _compare_output(graph, values[graph.output][:n], final[:n], rtol, what,
                                       _output_magnitude(graph, values, n))
            worst, largest, total = max(worst, rel), max(largest, gap), total + n
    return CrossCheck(max_abs_diff=largest, max_rel_diff=worst, tolerance=rtol, samples=total,
                      provider="CPUExecutionProvider", values=compared,
                      points="; ".join(f"{len(p)} {what}" for what, p in groups), adopted=adopted)


def _require_finite(graph: Graph, mine: torch.Tensor, deployed: np.ndarray, what: str) -> None:
    """Refuse a model whose outputs are NaN or Inf on data-like inputs: its weights overflow float32."""
    bad_mine = int((~torch.isfinite(mine.detach().double())).sum())
    bad_ref = int((~np.isfinite(np.asarray(deployed, dtype=np.float64))).sum())
    if bad_mine or bad_ref:
        raise ModelError(f"the model's outputs are NaN or Inf on {what} ({bad_mine} values in "
                         f"lipcert's executor, {bad_ref} in onnxruntime's): its weights overflow float32, and "
                         "nothing about it can be checked", source=graph.source)


def _output_magnitude(graph: Graph, values: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
    """Per sample, the largest magnitude the output's own node accumulates (``Op.magnitude``: |W| |x| + |b| for
    a product), which bounds how far two evaluation orders of it may differ, and at least 1 for a function whose
    error is absolute (sigmoid, tanh: ``Op.absolute_error``); None when it has none."""
    node = next((nd for nd in graph.nodes if graph.output in nd.outputs), None)
    if node is None:
        return None
    entry = REGISTRY[node.op]
    floor = torch.ones((n, 1), dtype=torch.float64) if entry.absolute_error else None
    args = [None if not name else values.get(name, graph.params.get(name)) for name in node.inputs]
    try:
        m = entry.magnitude(node, args, node.outputs.index(graph.output))
    except Exception:  # noqa: BLE001 - inputs the absolute run cannot take: the output alone is the scale
        return floor
    if m is None or m.dim() == 0 or m.shape[0] < n:
        return floor
    largest = m[:n].detach().double().cpu().reshape(n, -1).amax(dim=1, keepdim=True)
    return largest if floor is None else torch.maximum(largest, floor)


def _compare_output(graph: Graph, mine: torch.Tensor, deployed: np.ndarray, rtol: float,
                    what: str, magnitude: torch.Tensor | None = None) -> tuple[float, float]:
    """lipcert's float32 output against the deployed onnxruntime output: per sample, relative to the sample's
    largest output entry; (largest relative difference, largest absolute difference)."""
    if tuple(mine.shape) != tuple(deployed.shape):
        raise ModelError(f"lipcert's output shape {tuple(mine.shape)} differs from onnxruntime's "
                         f"{tuple(deployed.shape)}", source=graph.source)
    a = mine.detach().double().reshape(len(mine), -1)
    b = torch.from_numpy(np.asarray(deployed, dtype=np.float64)).reshape(len(mine), -1)
    finite = torch.isfinite(a) & torch.isfinite(b)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool((finite | same).all()):
        raise ModelError(f"lipcert's executor and onnxruntime disagree on which outputs are NaN or Inf at {what}",
                         source=graph.source)
    scale = torch.where(finite, b.abs(), torch.zeros_like(b)).amax(dim=1, keepdim=True)
    if magnitude is not None:  # a logit that cancels to almost nothing is compared at the size of its terms
        scale = torch.maximum(scale, torch.where(torch.isfinite(magnitude), magnitude, torch.zeros_like(magnitude)))
    scale = scale.clamp_min(1e-12)
    gap = torch.where(finite, (a - b).abs(), torch.zeros_like(a))
    rel = float((gap / scale).max()) if gap.numel() else 0.0
    if not rel <= rtol:
        raise ModelError(f"lipcert's output differs from onnxruntime's by {rel:.3g} of the largest output at {what} "
                         f"(tolerance {rtol:g}), although no single node does: the difference accumulates",
                         source=graph.source)
    return rel, float(gap.max()) if gap.numel() else 0.0


def constant_tolerance(ref: np.ndarray) -> np.ndarray:
    """How far a float constant lipcert folded (through a chain of nodes, or onnx's reference evaluator) may lie
    from onnxruntime's, entry by entry: 2^-13 of the entry, plus 2^-20 of the tensor's median magnitude for
    entries that cancel to almost nothing (a median, which a few large entries cannot raise)."""
    magnitude = np.abs(ref.astype(np.float64))
    finite = magnitude[np.isfinite(magnitude)]
    median = float(np.median(finite)) if finite.size else 0.0
    return 2.0 ** -13 * magnitude + 2.0 ** -20 * median + 1e-37


#: a float constant lipcert folded that differs from onnxruntime's by at most this much of its largest entry is
#: the same computation in another order of summation (an ill-conditioned chain, such as a kernel composed at run
#: time, moves its small entries): onnxruntime's values, which the deployed model runs, are taken, so that the
#: bounds are about them
ADOPT_TOLERANCE = 2.0 ** -12


def _compare_constants(graph: Graph, theirs: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """Values lipcert computed at load and holds as constants (folding), against onnxruntime's; a float one that
    differs at all, but only within ``ADOPT_TOLERANCE`` of its largest entry, is replaced by onnxruntime's (noted on
    the graph). Returns how many were compared and the names replaced."""
    producers = {o: n for n in graph.onnx_model.graph.node for o in n.output}
    count, adopted = 0, []
    for name, value in list(graph.params.items()):
        if name not in theirs or name not in producers or name in graph.value_shapes:
            continue
        node = producers[name]
        ref = theirs[name]
        ours = value.detach().cpu()
        where = f"the constant {name!r} that lipcert folded from node {node.name or node.op_type!r} ({node.op_type})"
        count += 1
        if ref.dtype.kind == "f" and ours.is_floating_point() and tuple(ours.shape) == ref.shape \
                and np.isfinite(ref).all() and not np.array_equal(ours.numpy(), ref):
            scale = float(np.abs(ref.astype(np.float64)).max())
            gap = float(np.abs(ours.double().numpy() - ref.astype(np.float64)).max())
            if gap <= ADOPT_TOLERANCE * scale:
                graph.params[name] = torch.from_numpy(np.array(ref)).to(value.dtype)
                graph.notes.append(f"{where} is taken from onnxruntime: lipcert's own folding differs by up to "
                                   f"{gap:.3g} ({gap / scale:.2g} of its largest entry), another order of summation")
                adopted.append(name)
                continue
        problem = _differs(value, ref, np.zeros(ref.shape) if ref.dtype.kind != "f" else constant_tolerance(ref))
        if problem:
            raise ModelError(f"{where} {problem}", source=graph.source)
    return count, adopted


def _compare_nodes(graph: Graph, chunk: torch.Tensor, constants: dict[str, torch.Tensor],
                   theirs: dict[str, np.ndarray], values: dict[str, torch.Tensor], what: str) -> int:
    """Each node run on onnxruntime's inputs (lipcert's own values where onnxruntime has none), its outputs
    compared with onnxruntime's entry by entry; returns how many values were compared."""
    from lipcert.model.onnx_loader import array_to_torch

    ctx = RunContext(torch.float32)
    count = 0
    for node in graph.nodes:
        checked = [(k, name) for k, name in enumerate(node.outputs) if name in theirs]
        if not checked:
            continue
        args: list[torch.Tensor | None] = []
        for name in node.inputs:
            if not name:
                args.append(None)
            elif name == graph.input_name:
                args.append(chunk)
            elif name in constants:
                args.append(constants[name])
            elif name in theirs:
                args.append(array_to_torch(theirs[name]))
            else:
                args.append(values[name])
        try:
            with torch.no_grad():
                outs = REGISTRY[node.op].run(node, args, ctx)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's values are not what lipcert's own run gives
            raise ModelError(f"node {node.name!r} ({node.op}) cannot run on onnxruntime's values of its inputs at "
                             f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             source=graph.source) from None
        for k, name in checked:
            # the tolerance without the magnitude is never above the full one: entries within it pass as they are
            problem = _differs(outs[k], theirs[name], tolerance(node, args, theirs[name], k, with_magnitude=False))
            if problem:
                problem = _differs(outs[k], theirs[name], tolerance(node, args, theirs[name], k))
            if problem:
                raise ModelError(f"node {node.name!r} ({node.op}) is the first to differ from onnxruntime at {what}: "
                                 f"its output {name!r} {problem}", source=graph.source)
            count += 1
    return count


def crosscheck(graph: Graph, *, samples: int = 4, seed: int = 0, rtol: float = DEFAULT_RTOL) -> CrossCheck:
    """Compare lipcert's executor with onnxruntime at ``probe_points``: inputs in [0, 1], points on balls
    around them and far outside [0, 1]; a mismatch is a ModelError naming the first node that differs."""
    return check_points(graph, probe_points(graph, samples, seed), rtol=rtol)
