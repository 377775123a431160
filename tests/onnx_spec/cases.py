"""Run ONNX's node test cases through lipcert, at two levels, and say what happened to each.

* ``op``: every node of the case's graph runs through its registry entry (``REGISTRY[op].run``), with the
  case's inputs held as lipcert holds constants (``array_to_torch``) and its attributes read and checked by the
  loader (``node_from_onnx``). Every output is compared with the case's expected output.
* ``model``: the case adapted to lipcert's model contract: the first float32 input of rank >= 1 becomes the
  model's input with axis 0 as a free batch axis, every other input an initializer; the model is loaded by
  ``graph_from_onnx`` and checked by ``check_per_sample`` (what ``load_model`` does before its onnxruntime
  cross-check), then run by ``GraphModule`` in float32, and every graph output is compared.

Each run ends ``pass`` (outputs match), ``refused`` (lipcert raised a ``LipcertError``: an attribute, a type
or a form it does not support, or a model outside its contract), ``skipped`` (the case cannot be put in the
level's form: inputs of a type lipcert does not hold, no float32 input) or ``mismatch`` / ``error`` (a bug).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from lipcert.errors import LipcertError
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY, RunContext
from lipcert.model.fold import check_per_sample
from lipcert.model.onnx_loader import DEFAULT_DOMAINS, array_to_torch, graph_from_onnx, node_from_onnx

LEVELS = ("op", "model")
LIST_FILE = Path(__file__).with_name("not_run.toml")


@dataclass
class Outcome:
    status: str  # pass, refused, skipped, mismatch, error
    detail: str = ""


@lru_cache(maxsize=1)
def registered_cases() -> list:
    """Every node test case whose graph uses only operators in lipcert's registry, by name."""
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases()
    kept = [c for c in cases
            if all(n.domain in DEFAULT_DOMAINS and n.op_type in REGISTRY for n in c.model.graph.node)]
    return sorted(kept, key=lambda c: c.name)


def as_array(value) -> np.ndarray:
    """A case's input or output (a numpy array, or a TensorProto for types numpy lacks) as a numpy array."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _type_name(array: np.ndarray) -> str:
    return str(array.dtype) if array.dtype != object else "object (string or sub-byte type)"


def _same(got: torch.Tensor, want: np.ndarray, rtol: float, atol: float) -> str:
    """Empty when ``got`` is ``want`` (values within the case's tolerances, NaN equal to NaN, the type as lipcert
    holds it); else what differs."""
    mine = got.detach().cpu()
    if mine.dtype == torch.bfloat16:
        mine = mine.float()
    mine = mine.numpy()
    held = array_to_torch(want)
    if held is None:
        return f"expected type {_type_name(want)}, which lipcert does not hold"
    expected = held.numpy()
    if mine.shape != expected.shape:
        return f"shape {mine.shape}, expected {expected.shape}"
    if expected.dtype.kind == "f":
        if mine.dtype.kind != "f":
            return f"type {mine.dtype}, expected a float"
        a, b = mine.astype(np.float64), expected.astype(np.float64)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            diff = np.abs(a - b)
            diff[np.isnan(diff)] = np.inf
            return f"values differ by up to {float(diff.max()):.3g}"
        return ""
    if mine.dtype != expected.dtype:
        return f"type {mine.dtype}, expected {expected.dtype}"
    if not np.array_equal(mine, expected):
        return "values differ"
    return ""


def run_op_level(case) -> Outcome:
    """Every node through its registry entry, on the case's own inputs."""
    graph = case.model.graph
    for inputs, outputs in case.data_sets:
        env: dict[str, torch.Tensor] = {}
        for info, value in zip(graph.input, inputs):
            array = as_array(value)
            tensor = array_to_torch(array) if array.dtype != object else None
            if tensor is None:
                return Outcome("skipped", f"input {info.name!r} has type {_type_name(array)}, which lipcert's "
                                          "loader does not hold")
            env[info.name] = tensor
        opset = next(o.version for o in case.model.opset_import if o.domain in DEFAULT_DOMAINS)
        try:
            for i, proto in enumerate(graph.node):
                node = node_from_onnx(proto, i, case.name, opset=opset)
                args = [env[name] if name else None for name in node.inputs]
                with torch.no_grad():
                    results = REGISTRY[node.op].run(node, args, RunContext(torch.float32))
                for name, value in zip(node.outputs, results):
                    if name:
                        env[name] = value
        except LipcertError as exc:
            return Outcome("refused", exc.text)
        except Exception as exc:  # noqa: BLE001 - any other exception is a bug in lipcert
            return Outcome("error", f"{type(exc).__name__}: {exc}")
        for info, value in zip(graph.output, outputs):
            problem = _same(env[info.name], as_array(value), case.rtol, case.atol)
            if problem:
                return Outcome("mismatch", f"output {info.name!r}: {problem}")
    return Outcome("pass")


def adapt(case, inputs: list[np.ndarray]) -> tuple[onnx.ModelProto, str] | None:
    """The case as a one-input model: the first float32 input of rank >= 1 is the input (axis 0 a free batch
    axis), the others initializers; None when it has no such input."""
    graph = case.model.graph
    chosen = next((i for i, a in enumerate(inputs) if a.dtype == np.float32 and a.ndim >= 1), None)
    if chosen is None:
        return None
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    g = model.graph
    x = graph.input[chosen]
    inits = [numpy_helper.from_array(a, info.name) for k, (info, a) in enumerate(zip(graph.input, inputs))
             if k != chosen]
    shape = ["N"] + list(inputs[chosen].shape[1:])
    del g.input[:]
    g.input.append(helper.make_tensor_value_info(x.name, onnx.TensorProto.FLOAT, shape))
    g.initializer.extend(inits)
    return model, x.name


def run_model_level(case) -> Outcome:
    """The case adapted to lipcert's model contract, loaded and run as a model."""
    for inputs, outputs in case.data_sets:
        arrays = [as_array(v) for v in inputs]
        if any(a.dtype == object for a in arrays):
            return Outcome("skipped", "an input has a string or sub-byte type, which lipcert's loader refuses")
        adapted = adapt(case, arrays)
        if adapted is None:
            return Outcome("skipped", "no float32 input of rank >= 1 to take as the model's input")
        model, name = adapted
        x = next(a for a, info in zip(arrays, case.model.graph.input) if info.name == name)
        try:
            graph = graph_from_onnx(model, case.name)
            check_per_sample(graph)
            if graph.fixed_batch not in (None, x.shape[0]):
                return Outcome("skipped", f"the model runs at a fixed batch of {graph.fixed_batch} (its output "
                                          f"does not follow the batch axis), the case at {x.shape[0]}")
            with torch.no_grad():
                values = GraphModule(graph).run_all(torch.from_numpy(np.array(x)))
        except LipcertError as exc:
            return Outcome("refused", exc.text)
        except Exception as exc:  # noqa: BLE001 - any other exception is a bug in lipcert
            return Outcome("error", f"{type(exc).__name__}: {exc}")
        for info, value in zip(case.model.graph.output, outputs):
            if info.name not in values:
                return Outcome("error", f"output {info.name!r} is not computed")
            problem = _same(values[info.name], as_array(value), case.rtol, case.atol)
            if problem:
                return Outcome("mismatch", f"output {info.name!r}: {problem}")
    return Outcome("pass")


RUNNERS = {"op": run_op_level, "model": run_model_level}


def read_list(path: Path = LIST_FILE) -> dict[str, dict[str, str]]:
    """The cases listed as not run to the end, per level: name -> "refused: reason" or "skipped: reason"."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    with path.open("rb") as f:
        data = tomllib.load(f)
    return {level: dict(data.get(level, {})) for level in LEVELS}


def write_list(results: dict[str, dict[str, Outcome]], path: Path = LIST_FILE) -> None:
    """Write the list from a full run (``python -m tests.onnx_spec.cases``): each case not passed, with the
    message lipcert gave; a maintainer then replaces messages by reasons where they are not self-explanatory."""
    lines = ["# ONNX node test cases (onnx.backend.test.case.node) that lipcert does not run to a matching output,",
             "# per level (tests/onnx_spec/cases.py). Each entry is 'refused: why' (lipcert raised a one-line error)",
             "# or 'skipped: why' (the case cannot take that level's form). tests/test_onnx_spec.py fails on any",
             "# case not listed here that does not pass, and on any listed case that now passes.", ""]
    for level in LEVELS:
        lines.append(f"[{level}]")
        for name, outcome in sorted(results[level].items()):
            if outcome.status in ("refused", "skipped"):
                text = outcome.detail.replace("\\", "\\\\").replace('"', "'")
                lines.append(f'{name} = "{outcome.status}: {text}"')
        lines.append("")
    path.write_text("\n".join(lines))


def run_all() -> dict[str, dict[str, Outcome]]:
    return {level: {c.name: RUNNERS[level](c) for c in registered_cases()} for level in LEVELS}


if __name__ == "__main__":
    import sys
    from collections import Counter

    found = run_all()
    for level in LEVELS:
        print(level, dict(Counter(o.status for o in found[level].values())))
        for name, o in sorted(found[level].items()):
            if o.status in ("mismatch", "error"):
                print(f"  {o.status} {name}: {o.detail}")
    if "--write" in sys.argv:
        write_list(found)
