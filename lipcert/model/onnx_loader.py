"""Load an ONNX model file into lipcert's model graph, safely.

External data is read only from files inside the model's own folder; functions (as the dynamo exporter
emits) are inlined; every operator must be in lipcert's registry, and every unsupported one is listed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from lipcert import limits
from lipcert.errors import ModelError
from lipcert.graph import budget
from lipcert.graph.core import Graph, Node, toposort
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.graph.ops.base import check_attributes
from lipcert.model.fold import PROBE_BATCHES, fold

MIN_OPSET = 11
#: the newest opset whose operators lipcert's registry is checked against (tests/test_onnx_spec.py)
MAX_OPSET = min(28, onnx.defs.onnx_opset_version())
DEFAULT_DOMAINS = ("", "ai.onnx")


# ONNX element types lipcert reads, with their size in bytes (strings, complex and 4-bit types are refused).
_ITEMSIZE: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8, onnx.TensorProto.BFLOAT16: 2,
}
# the repeated field that holds each type's values when they are not in raw_data
_TYPED_FIELD: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data",
}


def check_tensor_proto(proto: onnx.TensorProto, source: str, max_elements: int | None = None,
                       what: str = "tensor") -> int:
    """Check a TensorProto's type, dims and data length before anything is decoded; return its element count.

    Negative dims, a type lipcert does not read, more than ``max_elements`` elements, or stored data whose
    length does not match ``dims x itemsize`` are ModelErrors naming the tensor."""
    limit = limits.resolve(max_elements)
    name = f"{what} {proto.name!r}"
    if proto.data_type not in _ITEMSIZE:
        type_name = onnx.TensorProto.DataType.Name(proto.data_type) if proto.data_type in \
            onnx.TensorProto.DataType.values() else str(proto.data_type)
        raise ModelError(f"{name} has unsupported type {type_name}", source=source)
    if any(d < 0 for d in proto.dims):
        raise ModelError(f"{name} has negative dimensions {list(proto.dims)}", source=source)
    n = limits.check(list(proto.dims), limit, name, source)
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        return n  # the external file's length is checked by _check_external_data
    itemsize = _ITEMSIZE[proto.data_type]
    if proto.HasField("raw_data"):
        if len(proto.raw_data) != n * itemsize:
            raise ModelError(f"{name} declares dims {list(proto.dims)} ({n * itemsize} bytes) but stores "
                             f"{len(proto.raw_data)} bytes", source=source)
        return n
    field = _TYPED_FIELD.get(proto.data_type, "int32_data")
    stored = len(getattr(proto, field))
    if proto.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) and stored == 0:
        stored = len(proto.int32_data)
    if stored != n:
        raise ModelError(f"{name} declares dims {list(proto.dims)} ({n} values) but stores {stored}",
                         source=source)
    return n


def tensor_to_torch(proto: onnx.TensorProto, source: str, max_elements: int | None = None,
                    what: str = "tensor") -> torch.Tensor:
    """An ONNX tensor as a torch tensor; half precision is widened to float32; NaN/Inf are refused.

    The declared size is checked against ``max_elements`` and the stored data before anything is decoded."""
    check_tensor_proto(proto, source, max_elements, what)
    try:
        array = numpy_helper.to_array(proto)
    except (ValueError, TypeError, OverflowError, KeyError) as exc:  # a malformed tensor body
        raise ModelError(f"{what} {proto.name!r} cannot be decoded: {exc}", source=source) from None
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ModelError(f"{what} {proto.name!r} contains NaN or Inf values", source=source)
    tensor = array_to_torch(array)
    if tensor is None:
        raise ModelError(f"{what} {proto.name!r} has unsupported type {array.dtype}", source=source)
    return tensor


def array_to_torch(array: np.ndarray) -> torch.Tensor | None:
    """A numpy array as lipcert's executor holds it: half types widened to float32, unsigned 16/32/64-bit
    integers to int64 (torch has no such tensors in every operation); None for a type it does not read."""
    if array.dtype.kind == "f" and array.dtype.itemsize < 4 or str(array.dtype) == "bfloat16":
        array = array.astype(np.float32)
    if array.dtype.kind not in "fiub":
        return None
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))


def _node_tensors(nodes: Iterable[onnx.NodeProto], what: str | None = None) -> list[tuple[onnx.TensorProto, str]]:
    """The tensor attributes of ``nodes`` and, recursively, the initializers and tensors of their subgraphs
    (the same tensors onnx's external-data loader visits), each labelled ``what`` or by its node."""
    found = []
    for node in nodes:
        label = what or f"tensor of node {node.name or node.op_type!r}"
        for a in node.attribute:
            found += [(a.t, label)] if a.HasField("t") else []
            found += [(t, label) for t in a.tensors]
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                found += [(t, f"subgraph initializer of node {node.name or node.op_type!r}")
                          for t in sub.initializer]
                found += _node_tensors(sub.node, what)
    return found


def _all_tensors(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, str]]:
    """Every tensor stored in the model (initializers, tensor attributes of nodes and functions, subgraphs),
    with what it is."""
    found = [(t, "initializer") for t in model.graph.initializer] + _node_tensors(model.graph.node)
    for function in model.functions:
        found += _node_tensors(function.node, f"tensor of function {function.name!r}")
    return found


def _external_location(tensor: onnx.TensorProto, what: str, folder: Path, source: str) -> tuple[Path, int, int | None]:
    """(file, offset, length) of a tensor's external data, confined to the model's folder."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"external data of {what} {tensor.name!r}"
    if (not location or "\0" in location or "://" in location or location.lower().startswith("file:")
            or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]):
        raise ModelError(f"{where} has location {location!r}, which is not a path inside the model's folder",
                         source=source)
    root = folder.resolve()
    try:
        target = (folder / location).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, a bad name
        raise ModelError(f"{where} has location {location!r}, which cannot be resolved: {exc}",
                         source=source) from None
    if root not in target.parents:
        raise ModelError(f"{where} points to {location!r}, outside the model's folder", source=source)
    if not target.is_file():
        raise ModelError(f"external data file {location!r} of {what} {tensor.name!r} is missing", source=source)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise ModelError(f"{where} has a non-integer offset or length", source=source) from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where} has a negative offset or length", source=source)
    return target, offset, length


def _check_external_data(model: onnx.ModelProto, folder: Path, source: str, max_elements: int | None = None) -> None:
    """Refuse external-data locations that leave the model's folder (.., absolute paths, URLs, NUL bytes,
    symlinks pointing out), and data ranges that do not match the tensor's dims or the file's size."""
    for tensor, what in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        n = check_tensor_proto(tensor, source, max_elements, what)
        target, offset, length = _external_location(tensor, what, folder, source)
        needed = n * _ITEMSIZE[tensor.data_type]
        if length is not None and length != needed:
            raise ModelError(f"external data of {what} {tensor.name!r} has length {length} but its dims "
                             f"{list(tensor.dims)} need {needed} bytes", source=source)
        size = target.stat().st_size
        if offset + needed > size:
            raise ModelError(f"external data of {what} {tensor.name!r} needs bytes {offset}..{offset + needed} "
                             f"but the file holds {size}", source=source)


def _check_names(model: onnx.ModelProto, source: str) -> None:
    """Each value is defined once: no duplicate initializers, no node output redefining another value."""
    g = model.graph
    defined: dict[str, str] = {}
    for t in g.initializer:
        if t.name in defined:
            raise ModelError(f"initializer {t.name!r} is declared twice", source=source)
        defined[t.name] = "an initializer"
    for i in g.input:
        defined.setdefault(i.name, "a graph input")
    for k, node in enumerate(g.node):
        for out in node.output:
            if not out:
                continue
            if out in defined:
                raise ModelError(f"node {node.name or '#' + str(k)!r} ({node.op_type}) writes {out!r}, which is "
                                 f"already {defined[out]}", source=source)
            defined[out] = f"the output of node {node.name or '#' + str(k)!r}"


def read_model(path: str | Path, max_elements: int | None = None) -> onnx.ModelProto:
    """Parse an ONNX file, load its external data safely and inline its local functions."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelError("no such model file", source=source)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"not a valid ONNX model ({type(exc).__name__})", source=source) from None
    if not model.graph.node:
        raise ModelError("not a valid ONNX model: the graph has no nodes", source=source)
    _check_external_data(model, path.parent, source, max_elements)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"cannot read external data: {exc}", source=source) from None
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"ONNX opset {opset} is not supported (supported: {MIN_OPSET} to {MAX_OPSET})",
                         source=source)
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as exc:  # noqa: BLE001 - the inliner reports malformed functions this way
            raise ModelError(f"cannot inline the model's functions: {exc}", source=source) from None
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _attr_value(attr: onnx.AttributeProto, source: str, max_elements: int | None = None, where: str = ""):
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise ModelError(f"{where}: attribute {attr.name!r} holds a subgraph (control flow is not supported)",
                         source=source)
    try:
        value = helper.get_attribute_value(attr)
    except ValueError as exc:  # an attribute whose type field does not match its contents
        raise ModelError(f"{where}: attribute {attr.name!r} is malformed: {exc}", source=source) from None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return tensor_to_torch(value, source, max_elements, f"tensor of {where}")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


def node_from_onnx(proto: onnx.NodeProto, index: int, source: str, max_elements: int | None = None,
                   opset: int | None = None) -> Node:
    """One ONNX node of a registered operator as a lipcert ``Node``: attributes decoded, and refused when the
    registry entry does not implement them or the operator has no such attribute in ``opset``
    (``check_attributes``)."""
    where = f"node {proto.name or '#' + str(index)!r} ({proto.op_type})"
    attrs = {a.name: _attr_value(a, source, max_elements, where) for a in proto.attribute}
    node = Node(name=proto.name or f"{proto.op_type}_{index}", op=proto.op_type, inputs=list(proto.input),
                outputs=list(proto.output), attrs=attrs)
    try:
        check_attributes(node, opset)
    except ModelError as exc:
        raise ModelError(str(exc), source=source) from None
    return node


def _legacy_softmax(nodes: list[Node], opset: int) -> list[Node]:
    """Before opset 13, (Log)Softmax flattens its input to 2-D at ``axis`` (default 1) and normalises each row:
    spell that out with Flatten and Reshape, so that every node has its opset-13 meaning."""
    if opset >= 13:
        return nodes
    out: list[Node] = []
    for node in nodes:
        axis = int(node.attrs.get("axis", 1))
        if node.op not in ("Softmax", "LogSoftmax") or axis == -1:
            out.append(node)
            continue
        base = node.name
        x, shape, flat, rows = node.inputs[0], f"{base}/shape:0", f"{base}/flat:0", f"{base}/rows:0"
        out += [Node(f"{base}/shape", "Shape", [x], [shape]),
                Node(f"{base}/flatten", "Flatten", [x], [flat], {"axis": axis}),
                Node(base, node.op, [flat], [rows], {"axis": 1}),
                Node(f"{base}/reshape", "Reshape", [rows, shape], list(node.outputs[:1]))]
    return out


def _input_shape(value_info: onnx.ValueInfoProto, override: tuple[int, ...] | None, source: str,
                 max_elements: int | None = None) -> tuple[int, ...]:
    shape = _declared_input_shape(value_info, override, source)
    limit = limits.resolve(max_elements)
    limits.check(list(shape), limit // max(PROBE_BATCHES), f"input {value_info.name!r} (one sample, probed in "
                 f"batches of {max(PROBE_BATCHES)})", source)
    return shape


def _declared_input_shape(value_info: onnx.ValueInfoProto, override: tuple[int, ...] | None,
                          source: str) -> tuple[int, ...]:
    if not value_info.type.HasField("tensor_type"):
        raise ModelError(f"input {value_info.name!r} is not a tensor", source=source)
    elem = value_info.type.tensor_type.elem_type
    if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED):
        type_name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem
        raise ModelError(f"input {value_info.name!r} has element type {type_name}; lipcert analyses models "
                         "with a float32 input", source=source)
    dims = value_info.type.tensor_type.shape.dim
    if override is not None:
        if dims and len(dims) != len(override) + 1:
            raise ModelError(f"input_shape has {len(override)} dimensions but input {value_info.name!r} "
                             f"has {len(dims) - 1} besides the batch", source=source, parameter="input_shape")
        if not all(isinstance(d, int) and d > 0 for d in override):
            raise ModelError(f"input_shape {tuple(override)} must hold positive integers", source=source,
                             parameter="input_shape")
        return tuple(override)
    if not dims:
        raise ModelError(f"input {value_info.name!r} has no declared shape; give input_shape", source=source,
                         parameter="input_shape")
    shape = []
    for d in list(dims)[1:]:
        if d.HasField("dim_value") and d.dim_value <= 0:
            raise ModelError(f"input {value_info.name!r} has a dimension of size {d.dim_value} besides the batch",
                             source=source)
        if not d.HasField("dim_value"):
            raise ModelError(f"input {value_info.name!r} has a dynamic dimension {d.dim_param or '?'!r} besides "
                             "the batch; give input_shape", source=source, parameter="input_shape")
        shape.append(int(d.dim_value))
    return tuple(shape)


def _supported(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in REGISTRY


def _as_probe_tensor(value) -> torch.Tensor | None:
    """A reference-evaluator value as a tensor that bound_node_output can read (shape, and small values)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind in "fiub" and array.size <= 64:
        return torch.from_numpy(np.array(array, dtype=np.float64 if array.dtype.kind == "f" else np.int64))
    return torch.empty(array.shape, device="meta")


def _guard_reference_node(rt_node, limit: int, source: str) -> None:
    """Wrap one reference-evaluator node so that its output size is bounded before it runs."""
    run = rt_node.run
    node = Node(name=rt_node.onnx_node.name or rt_node.onnx_node.op_type, op=rt_node.onnx_node.op_type,
                inputs=list(rt_node.onnx_node.input), outputs=list(rt_node.onnx_node.output),
                attrs={a.name: helper.get_attribute_value(a) for a in rt_node.onnx_node.attribute
                       if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)})

    def guarded(*args, **kwargs):
        budget.check_node(node, [_as_probe_tensor(a) for a in args], limit, source)
        outputs = run(*args, **kwargs)
        listed = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        for name, value in zip(node.outputs, listed, strict=False):
            limits.check(int(np.asarray(value).size), limit, f"output {name!r} of node {node.name!r}", source)
        return outputs

    rt_node.run = guarded


def _fold_with_reference(model: onnx.ModelProto, input_name: str, source: str,
                         max_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Evaluate the nodes that do not depend on the input with onnx's reference evaluator, when some of them
    are operators lipcert does not run (weight-only computations such as a parametrisation's normaliser).

    Returns the constant values that input-dependent nodes read; the evaluated nodes are removed from
    ``model``. onnx's reference evaluator implements the standard operators itself: nothing from the model
    file is executed as code."""
    g = model.graph
    depends = {input_name}
    for node in g.node:
        if node.op_type in ("Shape", "Size") or any(i in depends for i in node.input if i):
            depends.update(o for o in node.output if o)
    constant = [n for n in g.node if not any(o in depends for o in n.output)]
    if all(_supported(n) for n in constant):
        return {}
    needed = sorted({i for n in g.node if n not in constant for i in n.input if i}
                    & {o for n in constant for o in n.output if o})
    needed += [o.name for o in g.output if o.name in {x for n in constant for x in n.output}]
    sub = onnx.helper.make_graph(constant, "constants", [],
                                 [onnx.helper.make_empty_tensor_value_info(v) for v in needed],
                                 list(g.initializer))
    sub_model = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    for node in constant:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ModelError(f"node {node.name or node.op_type!r} ({node.op_type}) holds a subgraph (control flow "
                             "is not supported)", source=source)
    limit = limits.resolve(max_elements)
    try:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(sub_model)
        for rt_node in evaluator.rt_nodes_:
            _guard_reference_node(rt_node, limit, source)
        values = evaluator.run(None, {})
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises many types
        raise ModelError(f"cannot evaluate the model's constant subgraph: {type(exc).__name__}: {exc}",
                         source=source) from None
    keep = [n for n in g.node if n not in constant]
    del g.node[:]
    g.node.extend(keep)
    folded = {}
    for name, value in zip(needed, values, strict=False):
        folded[name] = tensor_to_torch(numpy_helper.from_array(np.asarray(value), name), source, max_elements)
    return folded


def guarded_probe(graph: Graph, max_elements: int | None = None) -> None:
    """Run the graph on zero inputs of the probe batch sizes, bounding every node's output size *before* the
    node runs (``lipcert.graph.budget.check_node``) and checking it after; the ordinary fold probe that
    follows then only runs computations already known to stay within the limit.

    Errors other than the size limit are left to the fold probe, which reports them the usual way."""
    limit = limits.resolve(max_elements)
    module = GraphModule(graph)
    for batch in sorted(PROBE_BATCHES, reverse=True):
        env = module.constants()
        env[graph.input_name] = torch.zeros((batch,) + graph.input_shape, dtype=torch.float32)
        ctx = RunContext(torch.float32)
        with torch.no_grad():
            for node in graph.nodes:
                args = [env.get(name) if name else None for name in node.inputs]
                budget.check_node(node, args, limit, graph.source)
                try:
                    outs = REGISTRY[node.op].run(node, args, ctx)
                except ModelError:
                    raise
                except Exception:  # noqa: BLE001 - reported with its context by the fold probe
                    break
                for name, value in zip(node.outputs, outs, strict=False):
                    if name and isinstance(value, torch.Tensor):
                        limits.check(int(value.numel()), limit, f"output {name!r} of node {node.name!r} "
                                     f"({node.op})", graph.source)
                        env[name] = value


def graph_from_onnx(model: onnx.ModelProto, source: str, input_shape: tuple[int, ...] | None = None,
                    max_elements: int | None = None) -> Graph:
    """Convert a parsed (function-free) ONNX model to a folded lipcert Graph."""
    g = model.graph
    _check_names(model, source)
    params = {t.name: tensor_to_torch(t, source, max_elements, "initializer") for t in g.initializer}
    inputs = [i for i in g.input if i.name not in params]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelError(f"lipcert analyses models with exactly one input; this one has {names}", source=source)
    original, model = model, _copy(model)
    g = model.graph
    params.update(_fold_with_reference(model, inputs[0].name, source, max_elements))
    unsupported = [f"{n.name or '#' + str(i)!s} ({n.op_type})" for i, n in enumerate(g.node)
                   if not _supported(n)]
    if unsupported:
        raise ModelError(f"unsupported operators: {', '.join(unsupported)}", source=source)
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), MAX_OPSET)
    nodes = [node_from_onnx(n, i, source, max_elements, opset) for i, n in enumerate(g.node)]
    nodes = _legacy_softmax(nodes, opset)
    for node in nodes:
        value = node.attrs.get("value")
        if node.op == "Constant" and isinstance(value, torch.Tensor) and value.is_floating_point():
            if not torch.isfinite(value).all():
                raise ModelError(f"constant {node.outputs[0]!r} contains NaN or Inf values", source=source)
    if not g.output:
        raise ModelError("the graph declares no outputs", source=source)
    input_info = inputs[0]
    shape = _input_shape(input_info, input_shape, source, max_elements)
    ordered = toposort(nodes, set(params) | {input_info.name}, source)
    graph = Graph(nodes=ordered, params=params, input_name=input_info.name, input_shape=shape,
                  outputs=[o.name for o in g.output], source=source,
                  metadata={p.key: p.value for p in model.metadata_props}, onnx_model=original)
    produced = {o for n in ordered for o in n.outputs} | set(params) | {input_info.name}
    missing = [o for o in graph.outputs if o not in produced]
    if missing:
        raise ModelError(f"graph output {missing[0]!r} is produced by no node", source=source)
    dims = input_info.type.tensor_type.shape.dim
    declared_batch = int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else 0
    if declared_batch > 0:
        limits.check(declared_batch * limits.count(shape), limits.resolve(max_elements),
                     f"input {input_info.name!r} (declared batch of {declared_batch})", source)
    guarded_probe(graph, max_elements)
    graph = fold(graph)
    if declared_batch > 0:
        graph.fixed_batch = declared_batch  # onnxruntime enforces the declared batch size
    return graph


def load_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None,
              max_elements: int | None = None) -> Graph:
    """Load an ONNX file as a lipcert Graph (see module docstring for the safety rules)."""
    return graph_from_onnx(read_model(path, max_elements), str(path), input_shape, max_elements)
