"""A tiny ONNX graph builder that knows every value's shape while the graph is being written.

Each node is added with ``onnx.helper`` and, at the same time, run on sample values (a batch of 2, float64)
by the operator registry, so that the generator can choose the next block from real shapes. The finished
model is checked with onnxruntime (``Builder.model`` / ``ort_outputs``): a model that onnxruntime cannot run,
or whose output shape differs from the one predicted here, is not a valid test case.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lipcert.graph.core import Node
from lipcert.graph.ops import REGISTRY, RunContext

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
              np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int64): TensorProto.INT64,
              np.dtype(np.bool_): TensorProto.BOOL}
#: batch of the sample values the builder runs (2, so that nothing can confuse the batch with a constant)
SAMPLE_BATCH = 2


class Invalid(Exception):
    """The block cannot be applied here (shape or attribute mismatch): the generator skips it."""


def _attr_to_python(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return torch.from_numpy(np.array(numpy_helper.to_array(value), copy=True))
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


class Builder:
    """Writes an ONNX graph with input ``input`` (N, *sample_shape) and tracks sample values of every value."""

    def __init__(self, sample_shape: Sequence[int], opset: int = 21, seed: int = 0, max_numel: int = 4096) -> None:
        self.max_numel = max_numel  # larger sample values make the block not apply (keeps programs tiny)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.vals: dict[str, torch.Tensor] = {}
        self.data: set[str] = {"input"}
        self.log: list[str] = []
        self.ops: Counter = Counter()
        self._count = 0
        self.side: list[str] = []  # values also read elsewhere: the head concatenates them into its features
        gen = torch.Generator().manual_seed(seed)
        self.vals["input"] = torch.rand((SAMPLE_BATCH,) + self.sample_shape, generator=gen, dtype=torch.float64)

    # ------------------------------------------------------------------------------------------ names

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def note(self, text: str) -> None:
        self.log.append(text)

    # ------------------------------------------------------------------------------------------ values

    def shape(self, v: str) -> tuple[int, ...]:
        """Per-sample shape of a data value (full shape of a constant)."""
        t = self.vals[v]
        return tuple(t.shape[1:]) if v in self.data else tuple(t.shape)

    def numel(self, v: str) -> int:
        return math.prod(self.shape(v))

    def const(self, array: np.ndarray | float | Sequence, dtype: Any = np.float32, stem: str = "c") -> str:
        """An initializer (float16/float64 stored as such; Cast them yourself to use them as float32)."""
        arr = np.asarray(array, dtype=dtype)
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(arr, name))
        t = torch.from_numpy(np.array(arr, copy=True))
        if t.dtype == torch.float16:
            t = t.float()
        self.vals[name] = t.double() if t.is_floating_point() else t
        return name

    def ints(self, values: Sequence[int], stem: str = "i") -> str:
        return self.const(np.asarray(values, dtype=np.int64), np.int64, stem)

    def weight(self, array: np.ndarray, storage: str = "float32", stem: str = "w") -> str:
        """A float32 constant, stored as float32, or as float64 / float16 behind a Cast to float32, or made by
        constant arithmetic on initializers (folded at load)."""
        arr = np.asarray(array, dtype=np.float64)
        if storage == "float32":
            return self.const(arr.astype(np.float32), np.float32, stem)
        if storage == "float64":
            return self.node("Cast", [self.const(arr, np.float64, stem)], to=TensorProto.FLOAT)
        if storage == "float16":
            return self.node("Cast", [self.const(arr.astype(np.float16), np.float16, stem)], to=TensorProto.FLOAT)
        if storage == "arith":  # (2 w + 1) / 2 - 0.5 evaluated on initializers
            w2 = self.node("Mul", [self.const(arr.astype(np.float32), np.float32, stem), self.const(2.0)])
            return self.node("Sub", [self.node("Div", [self.node("Add", [w2, self.const(1.0)]), self.const(2.0)]),
                                     self.const(0.5)])
        raise ValueError(storage)

    # ------------------------------------------------------------------------------------------ nodes

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, outputs: Sequence[str] | None = None,
             **attrs: Any) -> Any:
        """Add a node and run it on the sample values; returns its output name (or names when n_out > 1).

        An input name "" is an absent optional input. Raises ``Invalid`` when the registry cannot run it."""
        name = self.fresh(op)
        outs = list(outputs) if outputs is not None else [f"{name}_out{k}" for k in range(n_out)]
        proto = helper.make_node(op, list(inputs), outs, name=name, **attrs)
        py_attrs = {a.name: _attr_to_python(helper.get_attribute_value(a)) for a in proto.attribute}
        node = Node(name=name, op=op, inputs=list(inputs), outputs=outs, attrs=py_attrs)
        args = [self.vals[i] if i else None for i in inputs]
        try:
            with torch.no_grad():
                results = REGISTRY[op].run(node, args, RunContext(torch.float64))
        except Exception as exc:  # noqa: BLE001 - any failure means the block does not apply here
            raise Invalid(f"{op}: {type(exc).__name__}: {exc}") from None
        tainted = any(i in self.data for i in inputs if i)
        for o, r in zip(outs, results):
            if not o:
                continue
            if not isinstance(r, torch.Tensor):
                raise Invalid(f"{op} gave no tensor")
            if tainted and op not in ("Shape", "Size"):
                if r.dim() == 0 or r.shape[0] != SAMPLE_BATCH:
                    raise Invalid(f"{op} output {tuple(r.shape)} lost the batch axis")
                self.data.add(o)
            if r.numel() > self.max_numel:
                raise Invalid(f"{op} output too large ({r.numel()})")
            if r.is_floating_point():
                r = r.double()
            self.vals[o] = r
        self.nodes.append(proto)
        self.ops[op] += 1
        return outs[0] if n_out == 1 and outputs is None else outs

    def mark(self) -> tuple:
        return (len(self.nodes), len(self.inits), set(self.vals), set(self.data), len(self.log), Counter(self.ops),
                len(self.side))

    def undo(self, mark: tuple) -> None:
        """Forget everything written since ``mark`` (a block that did not fit)."""
        n_nodes, n_inits, vals, data, n_log, ops, n_side = mark
        del self.nodes[n_nodes:], self.inits[n_inits:], self.log[n_log:], self.side[n_side:]
        self.vals = {k: v for k, v in self.vals.items() if k in vals}
        self.data = set(data)
        self.ops = ops

    # ------------------------------------------------------------------------------------------ helpers per opset

    def reduce(self, op: str, v: str, axes: Sequence[int] | None, keepdims: int = 1) -> str:
        """Reduce* with axes as an attribute (old opsets) or an input (ReduceSum from 13, the others from 18)."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes is None:
            return self.node(op, [v], keepdims=keepdims)
        if as_input:
            return self.node(op, [v, self.ints(list(axes))], keepdims=keepdims)
        return self.node(op, [v], axes=list(axes), keepdims=keepdims)

    def split(self, v: str, axis: int, sizes: Sequence[int] | None, n_out: int) -> list[str]:
        if sizes is None:
            if self.opset >= 18:
                return self.node("Split", [v], n_out=n_out, axis=axis, num_outputs=n_out)
            return self.node("Split", [v], n_out=n_out, axis=axis)
        return self.node("Split", [v, self.ints(list(sizes))], n_out=n_out, axis=axis)

    def squeeze(self, op: str, v: str, axes: Sequence[int]) -> str:
        return self.node(op, [v, self.ints(list(axes))])

    def slice(self, v: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
              steps: Sequence[int] | None = None) -> str:
        ins = [v, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            ins.append(self.ints(steps))
        return self.node("Slice", ins)

    def pad(self, v: str, pads: Sequence[int], mode: str = "constant", value: float | None = None,
            axes: Sequence[int] | None = None) -> str:
        ins = [v, self.ints(list(pads))]
        if value is not None or axes is not None:
            ins.append(self.const(np.float32(value or 0.0)) if value is not None else "")
        if axes is not None:
            ins.append(self.ints(list(axes)))
        return self.node("Pad", ins, mode=mode)

    def reshape_const(self, v: str, shape: Sequence[int], via_shape_ops: bool = False) -> str:
        """Reshape to (N, *shape); via Shape/Gather/Concat on the input (folded at load) when asked."""
        if not via_shape_ops:
            return self.node("Reshape", [v, self.ints([-1] + list(shape))])
        full = self.node("Shape", [v])
        batch = self.node("Gather", [full, self.ints([0])], axis=0)
        return self.node("Reshape", [v, self.node("Concat", [batch, self.ints(list(shape))], axis=0)])

    # ------------------------------------------------------------------------------------------ the model

    def rename(self, old: str, new: str) -> str:
        for n in self.nodes:
            for seq in (n.input, n.output):
                for k, name in enumerate(seq):
                    if name == old:
                        seq[k] = new
        self.vals[new] = self.vals.pop(old)
        if old in self.data:
            self.data.discard(old)
            self.data.add(new)
        return new

    def model(self, output: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """The model with ``output`` (a data value of per-sample shape (k,)) renamed ``logits``."""
        if output != "logits":
            if output == "input" or output in {i.name for i in self.inits}:
                output = self.node("Identity", [output])
            self.rename(output, "logits")
        k = self.shape("logits")
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *self.sample_shape])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *k])
        graph = helper.make_graph(self.nodes, "soundness", [x], [y], self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets,
                                  ir_version=helper.find_min_ir_version_for(opsets))
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


def ort_session(model: onnx.ModelProto | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
