"""Load any supported model file (ONNX, or safetensors with an architecture) as a checked model graph."""

from __future__ import annotations

import importlib
import io
import json
import struct
import sys
import warnings
from pathlib import Path

import torch

from lipcert import limits
from lipcert.errors import LipcertError, ModelError
from lipcert.graph.core import Graph
from lipcert.model.crosscheck import CrossCheck, crosscheck
from lipcert.model.fold import check_per_sample
from lipcert.model.onnx_loader import graph_from_onnx, load_onnx
from lipcert.model.spec import SPEC_KEY, graph_from_spec

ONNX_SUFFIXES = (".onnx",)
SAFETENSORS_SUFFIXES = (".safetensors",)


#: element sizes of the safetensors dtypes lipcert reads
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1}


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size before anything is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError("not a safetensors file (too short)", source=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelError(f"not a valid safetensors file: header of {n} bytes in a {size}-byte file",
                             source=str(path))
        if n > limits.MAX_HEADER_BYTES:
            raise ModelError(f"not a valid safetensors file: header of {n} bytes (more than "
                             f"{limits.MAX_HEADER_BYTES})", source=str(path))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelError("not a valid safetensors file: the header is not JSON", source=str(path)) from None
    if not isinstance(header, dict):
        raise ModelError("not a valid safetensors file: the header is not an object", source=str(path))
    return header


def check_safetensors_header(header: dict, data_size: int, source: str, max_elements: int | None = None,
                             error: type[LipcertError] = ModelError) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check every tensor entry of a safetensors header before any data is read: a known dtype, a shape of
    non-negative ints within ``max_elements``, and data offsets inside the data section that match the shape
    and do not overlap. Returns name -> (dtype, shape)."""
    limit = limits.resolve(max_elements)
    metadata = header.get("__metadata__", {})
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise error("not a valid safetensors file: __metadata__ must map strings to strings", source=source)
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise error(f"not a valid safetensors file: the entry of {what} is not an object", source=source)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise error(f"{what} has unsupported dtype {dtype!r}", source=source)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise error(f"{what} has an invalid shape {shape!r}", source=source)
        n = limits.check(shape, limit, what, source, error)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise error(f"{what} has invalid data_offsets {offsets!r}", source=source)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise error(f"{what} has data_offsets {offsets} outside the {data_size}-byte data section",
                        source=source)
        if end - begin != n * SAFETENSORS_ITEMSIZE[dtype]:
            raise error(f"{what} has shape {tuple(shape)} ({n * SAFETENSORS_ITEMSIZE[dtype]} bytes of {dtype}) but "
                        f"data_offsets {offsets} hold {end - begin} bytes", source=source)
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise error(f"tensors {n0!r} and {n1!r} overlap in the file (data_offsets)", source=source)
    return out


def read_safetensors(path: Path, max_elements: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (no code runs: the format is plain data).

    The header is checked (sizes, offsets, ``max_elements``) before any tensor is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _safetensors_header(path)
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    check_safetensors_header(header, path.stat().st_size - 8 - header_len, str(path), max_elements)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"not a valid safetensors file: {str(exc).splitlines()[0]}", source=str(path)) from None
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}, metadata


def _spec_document(path: Path, metadata: dict[str, str], arch: str | Path | None) -> object:
    if arch is not None:
        arch_path = Path(arch)
        if not arch_path.is_file():
            raise ModelError("no such architecture spec file", source=str(arch_path))
        text, where = arch_path.read_text(encoding="utf-8", errors="replace"), str(arch_path)
    elif SPEC_KEY in metadata:
        text, where = metadata[SPEC_KEY], f"{path} (metadata {SPEC_KEY})"
    else:
        raise ModelError(f"a safetensors file holds only weights: give its architecture as arch (a JSON spec) "
                         f"or store it under the metadata key {SPEC_KEY!r} (see docs/arch-spec.md)",
                         source=str(path), parameter="arch")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"the architecture spec is not valid JSON ({exc.msg} at line {exc.lineno})",
                         source=where) from None


def _from_python(path: Path, tensors: dict[str, torch.Tensor], target: str,
                 input_shape: tuple[int, ...] | None, max_elements: int | None = None) -> Graph:
    """Build a torch module with the user's own code, fill it from the file and export it to ONNX."""
    import onnx

    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise ModelError(f"arch_python must look like module:function, got {target!r}", parameter="arch_python")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ModelError(f"arch_python {target}: {type(exc).__name__}: {exc}", parameter="arch_python") from None
    finally:
        sys.path.pop(0)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"arch_python {target} returned {type(model).__name__}, not a torch.nn.Module",
                         parameter="arch_python")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"the file does not fit {target}: {str(exc).splitlines()[1:2] or exc}",
                         source=str(path)) from None
    if input_shape is None:
        raise ModelError("arch_python needs input_shape (one sample's shape, e.g. 3,32,32)",
                         parameter=("arch_python", "input_shape"))
    buffer = io.BytesIO()
    model.eval()
    # torch annotates ``f`` as a path, but its TorchScript exporter (dynamo=False) writes to a file object too
    torch.onnx.export(model, (torch.zeros((1,) + tuple(input_shape)),), buffer, dynamo=False,  # type: ignore[arg-type]
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    graph = graph_from_onnx(onnx.load_from_string(buffer.getvalue()), str(path), input_shape, max_elements)
    graph.notes.append(f"architecture from user Python code (arch_python {target})")
    return graph


#: PyTorch checkpoint files, refused with a hint: loading one would mean unpickling it
PYTORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_graph(path: str | Path, *, arch: str | Path | None = None, arch_python: str | None = None,
               input_shape: tuple[int, ...] | None = None, max_elements: int | None = None) -> Graph:
    """Load a model file into a Graph (no onnxruntime check; see ``load_model``).

    ``max_elements`` (default ``lipcert.limits.DEFAULT_MAX_ELEMENTS``) bounds every stored tensor, the input
    and every intermediate value; a larger one is refused, naming it, before it is allocated."""
    limits.resolve(max_elements)
    path = Path(path)
    if path.suffix.lower() in PYTORCH_SUFFIXES:  # never unpickled: a hint to export instead
        raise ModelError(f"a PyTorch checkpoint ({path.suffix}) is not a deployed model lipcert can read: export it "
                         "to ONNX first, e.g. torch.onnx.export(model, (example_input,), 'model.onnx', dynamo=True), "
                         "or save the weights as .safetensors with an architecture spec (docs/arch-spec.md)",
                         source=str(path))
    if not path.exists():
        raise ModelError("no such model file", source=str(path))
    if path.is_dir():
        raise ModelError("is a folder, not a model file", source=str(path))
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return load_onnx(path, input_shape, max_elements)
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = read_safetensors(path, max_elements)
        if arch_python:
            return _from_python(path, tensors, arch_python, input_shape, max_elements)
        graph = graph_from_spec(_spec_document(path, metadata, arch), tensors, str(path), max_elements)
        for key, value in metadata.items():
            if key != SPEC_KEY:
                graph.metadata.setdefault(key, value)
        return graph
    raise ModelError("unknown model format: expected a .onnx or .safetensors file", source=str(path))


def _example(module: torch.nn.Module, example_input: object, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    """The input a module is exported with: ``example_input`` (one batch, as ``torch.onnx.export`` takes it),
    else a zero batch of one sample of ``input_shape``."""
    if example_input is None:
        if input_shape is None:
            raise ModelError(f"a torch.nn.Module ({type(module).__name__}) needs example_input (one batch of "
                             "inputs) or input_shape (one sample's shape) to be exported",
                             parameter=("example_input", "input_shape"))
        return torch.zeros((1,) + tuple(input_shape))
    if isinstance(example_input, torch.Tensor):
        tensor = example_input
    else:
        try:
            tensor = torch.as_tensor(example_input)
        except (TypeError, ValueError, RuntimeError):
            raise ModelError(f"example_input must be a tensor or an array (one batch of inputs), got "
                             f"{type(example_input).__name__}", parameter="example_input") from None
    if tensor.ndim < 2 or not tensor.is_floating_point():
        raise ModelError(f"example_input must be one batch of inputs, floating point with a batch axis first, got "
                         f"{tensor.dtype} of shape {tuple(tensor.shape)}", parameter="example_input")
    return tensor.detach().to("cpu", torch.float32)


def graph_from_module(module: torch.nn.Module, example_input: object = None, *,
                      input_shape: tuple[int, ...] | None = None, max_elements: int | None = None) -> Graph:
    """A torch module exported to ONNX in memory (TorchScript exporter, in eval mode, the batch axis free) and
    loaded: lipcert analyses the exported graph, as it would the file ``torch.onnx.export`` writes."""
    import onnx

    x = _example(module, example_input, input_shape)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the exporter's deprecation notices are about our choice, not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch annotates ``f`` as a path, but its TorchScript exporter (dynamo=False) writes to a file object too
            torch.onnx.export(module, (x,), buffer, dynamo=False,  # type: ignore[arg-type]
                              training=torch.onnx.TrainingMode.EVAL, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - the exporter (and the module it traces) may raise anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"cannot export the {type(module).__name__} module to ONNX: {type(exc).__name__}: {first}",
                         parameter="model") from None
    source = f"<{type(module).__name__} module>"
    return graph_from_onnx(onnx.load_from_string(buffer.getvalue()), source, tuple(x.shape[1:]), max_elements)


def load_model(path: str | Path | torch.nn.Module, arch: str | Path | None = None, *,
               arch_python: str | None = None, input_shape: tuple[int, ...] | None = None, check: bool = True,
               rtol: float | None = None, max_elements: int | None = None, example_input: object = None) -> Graph:
    """Load a model and check lipcert's executor against onnxruntime (the result is in ``graph.crosscheck``).

    ``path`` is a model file, or a ``torch.nn.Module``: that is exported to ONNX in memory with ``example_input``
    (one batch of inputs, else zeros of ``input_shape``), and the exported graph is what lipcert loads, verifies
    and certifies (as the file ``torch.onnx.export`` would write), not the Python module.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        print(graph.input_shape, graph.crosscheck.max_rel_diff)
        graph = lipcert.load_model(net, example_input=torch.rand(1, 1, 8, 8))  # a torch.nn.Module
    """
    if isinstance(path, torch.nn.Module):
        graph = graph_from_module(path, example_input, input_shape=input_shape, max_elements=max_elements)
    elif isinstance(path, (str, Path)):
        graph = load_graph(path, arch=arch, arch_python=arch_python, input_shape=input_shape,
                           max_elements=max_elements)
    else:
        raise ModelError(f"the model must be a model file path or a torch.nn.Module, got {type(path).__name__}",
                         parameter="model")
    check_per_sample(graph)
    result: CrossCheck | None = None
    if check:
        result = crosscheck(graph) if rtol is None else crosscheck(graph, rtol=rtol)
    graph.crosscheck = result
    return graph


def as_graph(model: object, example_input: object = None) -> Graph:
    """The model the API was given: a loaded ``Graph`` as it is, else loaded (a file path, or a ``torch.nn.Module``
    exported with ``example_input``) by ``load_model``; anything else is a one-line ``ModelError``."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, Path, torch.nn.Module)):
        return load_model(model, example_input=example_input)
    raise ModelError(f"the model must be a lipcert Graph (lipcert.load_model), a model file path or a "
                     f"torch.nn.Module, got {type(model).__name__}", parameter="model")
