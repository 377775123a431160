"""Build a model graph from a lipcert architecture spec (docs/arch-spec.md) and a dict of tensors."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch

from lipcert import limits
from lipcert.errors import ModelError
from lipcert.graph import budget
from lipcert.graph.core import Graph, Node
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.graph.ops.base import check_attributes
from lipcert.model.fold import fold
from lipcert.model.onnx_writer import graph_to_onnx

SPEC_KEY = "lipcert.arch"
SPEC_FORMAT = "lipcert-arch"
SPEC_VERSION = 1


def _pair(value: Any, n: int, name: str, where: str) -> list[int]:
    """An int or list spec field as a list of n ints."""
    if isinstance(value, bool) or value is None:
        raise ModelError(f"{where}: field {name!r} must be an integer or a list of integers")
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, int) for v in value):
        return list(value)
    raise ModelError(f"{where}: field {name!r} must be an integer or a list of {n} integers, got {value!r}")


class SpecBuilder:
    """Turns spec layers into ONNX-operator nodes, checking each tensor against the shape it meets."""

    def __init__(self, tensors: dict[str, torch.Tensor], input_shape: tuple[int, ...], source: str,
                 max_elements: int | None = None) -> None:
        self.tensors = tensors
        self.source = source
        self.limit = limits.resolve(max_elements)
        self.used: set[str] = set()
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {"input": torch.zeros((1,) + input_shape)}
        self.counter = 0

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def const(self, value: torch.Tensor, stem: str = "const") -> str:
        name = self.fresh(stem)
        self.params[name] = value
        self.values[name] = value
        return name

    @overload
    def tensor(self, layer: dict, key: str, where: str, rank: int | None = None,
               required: Literal[True] = True) -> str: ...
    @overload
    def tensor(self, layer: dict, key: str, where: str, rank: int | None = None, *,
               required: bool) -> str | None: ...
    def tensor(self, layer: dict, key: str, where: str, rank: int | None = None,
               required: bool = True) -> str | None:
        name = layer.get(key)
        if name is None:
            if required:
                raise ModelError(f"{where}: field {key!r} (a tensor name) is required", source=self.source)
            return None
        if not isinstance(name, str) or name not in self.tensors:
            raise ModelError(f"{where}: tensor {name!r} is not in the file", source=self.source)
        t = self.tensors[name]
        if rank is not None and t.dim() != rank:
            raise ModelError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {rank} dimensions",
                             source=self.source)
        self.used.add(name)
        self.params[name] = t
        self.values[name] = t
        return name

    def node(self, op: str, inputs: list[str], where: str, n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        node = Node(name=self.fresh(f"{op}"), op=op, inputs=inputs, outputs=outs, attrs=attrs)
        check_attributes(node)
        args = [self.values[i] if i else None for i in inputs]
        budget.check_node(node, args, self.limit, self.source)
        try:
            results = REGISTRY[op].run(node, args, RunContext())
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - a shape clash between a tensor and its input
            tensors = [i for i in inputs if i in self.tensors]
            named = f" (tensor {tensors[0]!r} with shape {tuple(self.tensors[tensors[0]].shape)})" if tensors else ""
            shape = tuple(args[0].shape[1:]) if args and args[0] is not None else ()
            raise ModelError(f"{where}{named} does not fit its input of shape {shape}: "
                             f"{str(exc).splitlines()[0]}", source=self.source) from None
        for name, value in zip(outs, results, strict=False):
            self.values[name] = value
        self.nodes.append(node)
        return outs

    def layers(self, layers: Any, x: str, where: str) -> str:
        if not isinstance(layers, list):
            raise ModelError(f"{where}: 'layers' must be a list", source=self.source)
        for i, layer in enumerate(layers):
            here = f"{where}[{i}]"
            if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
                raise ModelError(f"{here}: each layer must be an object with a 'type'", source=self.source)
            kind = layer["type"]
            method = getattr(self, f"layer_{kind}", None)
            if method is None:
                raise ModelError(f"{here}: unknown layer type {kind!r}", source=self.source)
            x = method(layer, x, f"{here} ({kind})")
        return x

    def int_field(self, layer: dict, key: str, default: int, where: str) -> int:
        """An integer field of a layer (``default`` when absent), refused naming the field when it is not one."""
        value = layer.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"{where}: field {key!r} must be an integer, got {value!r}", source=self.source)
        return value

    def float_field(self, layer: dict, key: str, default: float | None, where: str) -> float:
        """A finite number field of a layer (``default`` when absent), refused naming the field otherwise."""
        value = layer.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ModelError(f"{where}: field {key!r} must be a finite number, got {value!r}", source=self.source)
        return float(value)

    def spatial(self, x: str) -> int:
        return self.values[x].dim() - 2

    def layer_conv(self, layer: dict, x: str, where: str) -> str:
        w = self.tensor(layer, "weight", where)
        nd = self.tensors[w].dim() - 2
        b = self.tensor(layer, "bias", where, rank=1, required=False)
        pad = layer.get("padding", 0)
        pads = _pad_list(pad, nd, where)
        mode = layer.get("padding_mode", "zeros")
        if mode not in ("zeros", "circular", "reflect"):
            raise ModelError(f"{where}: padding_mode {mode!r} is not one of zeros, circular, reflect",
                             source=self.source)
        if mode != "zeros" and any(pads):
            onnx_pads = [0, 0] + pads[:nd] + [0, 0] + pads[nd:]
            x = self.node("Pad", [x, self.const(torch.tensor(onnx_pads))], where,
                          mode="wrap" if mode == "circular" else "reflect")[0]
            pads = [0] * (2 * nd)
        return self.node("Conv", [x, w] + ([b] if b else []), where,
                         strides=_pair(layer.get("stride", 1), nd, "stride", where),
                         dilations=_pair(layer.get("dilation", 1), nd, "dilation", where),
                         group=self.int_field(layer, "groups", 1, where), pads=pads)[0]

    def layer_conv_transpose(self, layer: dict, x: str, where: str) -> str:
        w = self.tensor(layer, "weight", where)
        nd = self.tensors[w].dim() - 2
        b = self.tensor(layer, "bias", where, rank=1, required=False)
        return self.node("ConvTranspose", [x, w] + ([b] if b else []), where,
                         strides=_pair(layer.get("stride", 1), nd, "stride", where),
                         dilations=_pair(layer.get("dilation", 1), nd, "dilation", where),
                         output_padding=_pair(layer.get("output_padding", 0), nd, "output_padding", where),
                         group=self.int_field(layer, "groups", 1, where),
                         pads=_pad_list(layer.get("padding", 0), nd, where))[0]

    def layer_linear(self, layer: dict, x: str, where: str) -> str:
        w = self.tensor(layer, "weight", where, rank=2)
        b = self.tensor(layer, "bias", where, rank=1, required=False)
        return self.node("Gemm", [x, w] + ([b] if b else []), where, transB=1)[0]

    @staticmethod
    def _unary(op: str):  # a factory of methods
        def method(self: SpecBuilder, layer: dict, x: str, where: str) -> str:
            return self.node(op, [x], where)[0]
        return method

    layer_relu = _unary("Relu")
    layer_abs = _unary("Abs")
    layer_sigmoid = _unary("Sigmoid")
    layer_tanh = _unary("Tanh")
    layer_softplus = _unary("Softplus")
    layer_flatten = _unary("Flatten")
    layer_global_avgpool = _unary("GlobalAveragePool")

    def layer_leaky_relu(self, layer: dict, x: str, where: str) -> str:
        return self.node("LeakyRelu", [x], where, alpha=self.float_field(layer, "slope", 0.01, where))[0]

    def layer_groupsort(self, layer: dict, x: str, where: str) -> str:
        g = self.int_field(layer, "group_size", 2, where)
        shape = list(self.values[x].shape)
        if g < 1 or shape[1] % g:
            raise ModelError(f"{where}: {shape[1]} channels do not split into groups of {g}", source=self.source)
        grouped = self.node("Reshape", [x, self.const(torch.tensor([0, shape[1] // g, g] + [-1] * (len(shape) > 2)))],
                            where)[0]
        top = self.node("TopK", [grouped, self.const(torch.tensor([g]))], where, n_out=2, axis=2, largest=0)[0]
        return self.node("Reshape", [top, self.const(torch.tensor([0] + shape[1:]))], where)[0]

    def layer_maxmin(self, layer: dict, x: str, where: str) -> str:
        return self.layer_groupsort({"group_size": 2}, x, where)

    def layer_fullsort(self, layer: dict, x: str, where: str) -> str:
        n = self.values[x].shape[1]
        return self.node("TopK", [x, self.const(torch.tensor([n]))], where, n_out=2, axis=1, largest=0)[0]

    def _pool(self, op: str, layer: dict, x: str, where: str, **extra: Any) -> str:
        nd = self.spatial(x)
        kernel = _pair(layer.get("kernel"), nd, "kernel", where)
        stride = _pair(layer.get("stride", kernel), nd, "stride", where)
        return self.node(op, [x], where, kernel_shape=kernel, strides=stride,
                         pads=_pad_list(layer.get("padding", 0), nd, where), **extra)[0]

    def layer_avgpool(self, layer: dict, x: str, where: str) -> str:
        return self._pool("AveragePool", layer, x, where)

    def layer_maxpool(self, layer: dict, x: str, where: str) -> str:
        return self._pool("MaxPool", layer, x, where)

    def layer_l2pool(self, layer: dict, x: str, where: str) -> str:
        return self._pool("LpPool", layer, x, where, p=2)

    def layer_batchnorm(self, layer: dict, x: str, where: str) -> str:
        names = [self.tensor(layer, k, where, rank=1) for k in ("scale", "bias", "mean", "var")]
        epsilon = self.float_field(layer, "epsilon", 1e-5, where)
        return self.node("BatchNormalization", [x] + names, where, epsilon=epsilon)[0]

    def layer_scale(self, layer: dict, x: str, where: str) -> str:
        value = self.float_field(layer, "value", None, where)
        return self.node("Mul", [x, self.const(torch.tensor(value))], where)[0]

    def layer_residual(self, layer: dict, x: str, where: str) -> str:
        branch = self.layers(layer.get("branch"), x, f"{where}.branch")
        shortcut = self.layers(layer.get("shortcut", []), x, f"{where}.shortcut")
        return self.node("Add", [shortcut, branch], where)[0]

    def layer_concat(self, layer: dict, x: str, where: str) -> str:
        branches = layer.get("branches")
        if not isinstance(branches, list) or not branches:
            raise ModelError(f"{where}: 'branches' must be a non-empty list of layer lists", source=self.source)
        outs = [self.layers(b, x, f"{where}.branches[{i}]") for i, b in enumerate(branches)]
        return self.node("Concat", outs, where, axis=self.int_field(layer, "axis", 1, where))[0]


def _pad_list(value: Any, nd: int, where: str) -> list[int]:
    """Spec padding (int, per-axis list, or begin/end list) as ONNX pads."""
    if isinstance(value, list) and len(value) == 2 * nd and nd > 1:
        begins = [value[i] for i in range(nd)]
        ends = [value[nd + i] for i in range(nd)]
        if all(isinstance(v, int) for v in value):
            return begins + ends
    per_axis = _pair(value, nd, "padding", where)
    return per_axis + per_axis


def graph_from_spec(spec: Any, tensors: dict[str, torch.Tensor], source: str,
                    max_elements: int | None = None) -> Graph:
    """Check a spec document and build the folded Graph it describes, filled with ``tensors``."""
    if not isinstance(spec, dict):
        raise ModelError("the architecture spec must be a JSON object", source=source)
    if spec.get("format") != SPEC_FORMAT or spec.get("version") != SPEC_VERSION:
        raise ModelError(f"the architecture spec must have format {SPEC_FORMAT!r} and version {SPEC_VERSION}",
                         source=source)
    shape = spec.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ModelError("spec field 'input_shape' must be a list of positive integers", source=source)
    limit = limits.resolve(max_elements)
    limits.check(shape, limit // 2, "spec field 'input_shape' (one sample, probed in batches of 2)", source)
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ModelError(f"tensor {name!r} has type {t.dtype}; weights must be floating point", source=source)
        if not torch.isfinite(t).all():
            raise ModelError(f"tensor {name!r} contains NaN or Inf values", source=source)
    builder = SpecBuilder(tensors, tuple(shape), source, max_elements)
    out = builder.layers(spec.get("layers"), "input", "layers")
    unused = sorted(set(tensors) - builder.used)
    if unused:
        raise ModelError(f"tensor {unused[0]!r} is in the file but not used by the architecture spec",
                         source=source)
    metadata = {}
    if "claimed_lipschitz" in spec:
        metadata["lipcert.claimed_lipschitz"] = str(spec["claimed_lipschitz"])
    graph = Graph(nodes=builder.nodes, params=builder.params, input_name="input", input_shape=tuple(shape),
                  outputs=[out], source=source, metadata=metadata)
    graph = fold(graph)
    graph.onnx_model = graph_to_onnx(graph)
    return graph
