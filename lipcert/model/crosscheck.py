"""Check lipcert's torch executor against onnxruntime, and name the first node that diverges."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from lipcert.errors import ModelError
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule

DEFAULT_RTOL = 1e-4


@dataclass
class CrossCheck:
    """How closely lipcert's executor matches onnxruntime on random inputs in [0, 1]."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    samples: int
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)


def ort_session(model: onnx.ModelProto, providers: list[str] | None = None, optimize: bool = True):
    """An onnxruntime session for an in-memory model (CPU unless providers say otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=providers or ["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate values ``names``, each with the element type
    onnx's shape inference gives it (float32 when it cannot tell)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.output)}
    except Exception:  # noqa: BLE001 - inference is only a hint here
        types = {}
    known = {o.name for o in copy.graph.output}
    for name in names:
        if name not in known:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy


def _relative(diff: float, ref: np.ndarray) -> float:
    return diff / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)


def _first_divergence(graph: Graph, x: np.ndarray, ours: dict[str, torch.Tensor], rtol: float) -> str:
    """Run onnxruntime with every intermediate value exposed; the first node beyond tolerance."""
    exists = {o for n in graph.onnx_model.graph.node for o in n.output}
    model = with_outputs(graph.onnx_model, [name for node in graph.nodes for name in node.outputs
                                            if name in exists and name in ours and ours[name].is_floating_point()])
    session = ort_session(model, optimize=False)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {graph.input_name: x})))
    for node in graph.nodes:
        for name in node.outputs:
            if name in values and name in ours:
                ref = values[name]
                mine = ours[name].detach().numpy()
                if mine.shape != ref.shape:
                    return f"node {node.name!r} ({node.op}) gives shape {mine.shape}, onnxruntime {ref.shape}"
                diff = float(np.abs(mine - ref).max()) if ref.size else 0.0
                if _relative(diff, ref) > rtol:
                    return f"node {node.name!r} ({node.op}) is the first to diverge (max difference {diff:.3g})"
    return "no single node diverges beyond tolerance; the difference accumulates"


def crosscheck(graph: Graph, *, samples: int = 4, seed: int = 0, rtol: float = DEFAULT_RTOL) -> CrossCheck:
    """Compare float32 outputs with onnxruntime's; a relative difference above ``rtol`` is a ModelError."""
    if graph.onnx_model is None:
        raise ModelError("no ONNX model to compare with", source=graph.source)
    batch = graph.fixed_batch or samples
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch,) + graph.input_shape, generator=gen)
    module = GraphModule(graph)
    with torch.no_grad():
        ours = module.run_all(x) if graph.fixed_batch is None else {graph.output: module(x)}
    try:
        session = ort_session(graph.onnx_model)
        ref = session.run(None, {graph.input_name: x.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}",
                         source=graph.source) from None
    mine = ours[graph.output].detach().numpy()
    if mine.shape != ref.shape:
        raise ModelError(f"lipcert's output shape {mine.shape} differs from onnxruntime's {ref.shape}",
                         source=graph.source)
    bad_mine, bad_ref = int((~np.isfinite(mine)).sum()), int((~np.isfinite(ref)).sum())
    if bad_mine or bad_ref:
        raise ModelError(f"the model's outputs are NaN or Inf on random inputs in [0, 1] ({bad_mine} values in "
                         f"lipcert's executor, {bad_ref} in onnxruntime's): its weights overflow float32, and "
                         "nothing about it can be checked", source=graph.source)
    diff = float(np.abs(mine - ref).max())
    rel = _relative(diff, ref)
    if not rel <= rtol:
        where = _first_divergence(graph, x.numpy(), ours, rtol) if graph.fixed_batch is None else ""
        raise ModelError(f"lipcert's executor differs from onnxruntime by {rel:.3g} (relative, tolerance "
                         f"{rtol:g}); {where}", source=graph.source)
    return CrossCheck(max_abs_diff=diff, max_rel_diff=rel, tolerance=rtol, samples=batch,
                      provider="CPUExecutionProvider")
