"""Write a lipcert Graph back out as an ONNX model (for onnxruntime checks and inference)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from lipcert.graph.core import Graph

#: opset 19 is the first with Pad mode "wrap"; IR version 9 is what it needs and onnxruntime reads
WRITE_OPSET = 19
WRITE_IR_VERSION = 9


def _attr(value):
    if isinstance(value, torch.Tensor):
        return numpy_helper.from_array(value.detach().cpu().numpy())
    return value


def graph_to_onnx(graph: Graph) -> onnx.ModelProto:
    """An ONNX model with the graph's nodes, its parameters as initializers and a free batch dimension."""
    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=n.name, **{k: _attr(v) for k, v in n.attrs.items()})
             for n in graph.nodes]
    inits = [numpy_helper.from_array(np.ascontiguousarray(t.detach().cpu().numpy()), name)
             for name, t in graph.params.items()]
    batch = graph.fixed_batch or "N"
    inp = helper.make_tensor_value_info(graph.input_name, onnx.TensorProto.FLOAT, [batch, *graph.input_shape])
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in graph.outputs]
    model = helper.make_model(helper.make_graph(nodes, "lipcert", [inp], outs, inits),
                              opset_imports=[helper.make_opsetid("", WRITE_OPSET)], producer_name="lipcert",
                              ir_version=WRITE_IR_VERSION)
    for key, value in graph.metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model
