"""Fuzzing the model loaders with hypothesis: every mutated ONNX or safetensors file either loads correctly
(lipcert's executor agrees with onnxruntime) or fails with a one-line LipcertError; never another exception,
a hang or a memory blow-up.

Profiles: the default ("fast", ~30-60 s) runs a few hundred cases; ``LIPCERT_FUZZ_PROFILE=long`` runs many
more (see docs/security.md). The terminal summary (tests/conftest.py) prints how many cases were tried.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lipcert.errors import LipcertError
from lipcert.model.loader import load_model

from .conftest import SAMPLES

PROFILE = os.environ.get("LIPCERT_FUZZ_PROFILE", "fast")
EXAMPLES = {"fast": 12, "long": 400}[PROFILE]
DEADLINE_MS = 20_000
COMMON = dict(max_examples=EXAMPLES, deadline=DEADLINE_MS, derandomize=PROFILE == "fast",
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large], database=None)
CASES: Counter = Counter()
LIMIT = 2**22  # a small max_elements, so that "huge" cases are refused long before memory matters

ONNX_FILES = ["digits_dense.onnx", "digits_conv.onnx"]
ST_FILES = ["digits_dense.safetensors", "digits_conv.safetensors"]


def _bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def check_load(path: Path) -> str:
    """Load ``path``; a LipcertError or a load that matches onnxruntime passes, anything else fails."""
    CASES[path.suffix.lstrip(".")] += 1
    try:
        graph = load_model(path, max_elements=LIMIT)
    except LipcertError as exc:
        message = str(exc)
        assert "\n" not in message.strip(), message
        return "refused"
    assert graph.crosscheck is not None and graph.crosscheck.max_rel_diff <= graph.crosscheck.tolerance
    return "loaded"


# ------------------------------------------------------------------------------------------ byte mutations


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """Truncate, flip bits, insert, delete or overwrite bytes of ``data``."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
    n = len(data)
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[i:i + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[i:i + len(chunk)] = chunk
        if not buf:
            break
    return bytes(buf)


@pytest.mark.parametrize("name", ONNX_FILES + ST_FILES)
def test_byte_mutations(tmp_path: Path, name: str) -> None:
    data = _bytes(name)
    path = tmp_path / f"m{Path(name).suffix}"

    @settings(**COMMON)
    @given(byte_mutation(data))
    def run(mutated: bytes) -> None:
        path.write_bytes(mutated)
        check_load(path)

    run()


# ------------------------------------------------------------------------------------------ ONNX structure

HUGE = st.sampled_from([2**31 - 1, 2**40, 2**62, 10**6, -1, 0])


def _model(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / name))


@st.composite
def onnx_structural(draw, name: str) -> onnx.ModelProto:
    model = _model(name)
    g = model.graph
    kind = draw(st.sampled_from([
        "dtype", "dims", "huge_dims", "dup_init", "drop_init", "cycle", "dangling", "empty", "extra_input",
        "no_input", "input_dtype", "input_dims", "constant_huge", "constant_of_shape", "expand", "tile", "range",
        "drop_output", "rewire", "attr_garbage", "opset", "raw_len", "pad_huge", "dup_output"]))
    inits = list(g.initializer)
    i = draw(st.integers(0, len(inits) - 1))
    j = draw(st.integers(0, len(g.node) - 1))
    x = g.input[0].name
    if kind == "dtype":
        inits[i].data_type = draw(st.sampled_from([0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 23, 99]))
    elif kind == "dims":
        dims = list(inits[i].dims)
        del inits[i].dims[:]
        inits[i].dims.extend(draw(st.lists(st.integers(0, 70), max_size=4)) or dims[::-1])
    elif kind == "huge_dims":
        inits[i].dims.append(draw(HUGE))
    elif kind == "dup_init":
        g.initializer.append(inits[i])
    elif kind == "drop_init":
        g.initializer.remove(inits[i])
    elif kind == "cycle":
        k = draw(st.integers(j, len(g.node) - 1))
        if g.node[j].input and g.node[k].output:
            g.node[j].input[0] = g.node[k].output[0]
    elif kind == "dangling":
        g.node.append(helper.make_node(draw(st.sampled_from(["Relu", "Neg", "Identity", "Abs"])),
                                       [g.node[j].output[0]], ["unused_out"], name="unused"))
    elif kind == "empty":
        del g.node[:]
        if draw(st.booleans()):
            del g.output[:]
    elif kind == "extra_input":
        g.input.append(helper.make_tensor_value_info("second", TensorProto.FLOAT, ["N", 3]))
    elif kind == "no_input":
        del g.input[:]
    elif kind == "input_dtype":
        g.input[0].type.tensor_type.elem_type = draw(st.sampled_from([2, 6, 7, 8, 9, 10, 11]))
    elif kind == "input_dims":
        dims = g.input[0].type.tensor_type.shape.dim
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(HUGE)
    elif kind in ("constant_huge", "constant_of_shape", "expand", "tile", "range", "pad_huge"):
        big = draw(st.sampled_from([2**20, 2**31, 2**45, 2**62]))
        shape_vec = numpy_helper.from_array(np.array([big, big], dtype=np.int64), "bigshape")
        if kind == "constant_huge":
            t = TensorProto(name="cbig", data_type=TensorProto.FLOAT, dims=[big, 4])
            node = helper.make_node("Constant", [], ["dead"], value=t, name="huge_const")
        elif kind == "constant_of_shape":
            node = helper.make_node("ConstantOfShape", ["bigshape"], ["dead"], name="huge_cos")
            g.initializer.append(shape_vec)
        elif kind == "expand":
            node = helper.make_node("Expand", [x, "bigshape4"], ["dead"], name="huge_expand")
            g.initializer.append(numpy_helper.from_array(np.array([1, 1, big, 8], dtype=np.int64), "bigshape4"))
        elif kind == "tile":
            node = helper.make_node("Tile", [x, "reps"], ["dead"], name="huge_tile")
            g.initializer.append(numpy_helper.from_array(np.array([1, big, 1, 1], dtype=np.int64), "reps"))
        elif kind == "range":
            g.initializer.extend([numpy_helper.from_array(np.array(v, dtype=np.float32), n)
                                  for v, n in ((0.0, "r0"), (float(big), "r1"), (1.0, "r2"))])
            node = helper.make_node("Range", ["r0", "r1", "r2"], ["dead"], name="huge_range")
        else:
            g.initializer.append(numpy_helper.from_array(np.array([0, 0, big, 0, 0, 0, big, 0], dtype=np.int64),
                                                         "pads"))
            node = helper.make_node("Pad", [x, "pads"], ["dead"], name="huge_pad")
        g.node.insert(0, node)
        if draw(st.booleans()):  # make it feed the output, so that pruning cannot hide it
            g.node.append(helper.make_node("ReduceSum", ["dead"], ["dead_sum"], keepdims=0, name="dead_sum"))
            g.node.append(helper.make_node("Add", [g.output[0].name, "dead_sum"], ["out2"], name="join"))
            g.output[0].name = "out2"
    elif kind == "drop_output":
        del g.node[-1]
    elif kind == "rewire":
        node = g.node[j]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(
                [x, inits[i].name, "nowhere", ""] + [o for n in g.node for o in n.output][:50]))
    elif kind == "attr_garbage":
        node = g.node[j]
        node.attribute.append(helper.make_attribute(draw(st.sampled_from(
            ["axis", "pads", "strides", "kernel_shape", "group", "dilations", "transB", "value", "to"])),
            draw(st.one_of(st.integers(-2**40, 2**40), st.lists(st.integers(-5, 10**6), min_size=1, max_size=6),
                           st.text(max_size=4)))))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.sampled_from([1, 7, 10, 11, 12, 13, 99, -1]))
    elif kind == "raw_len":
        t = inits[i]
        if t.raw_data:
            t.raw_data = t.raw_data[:draw(st.integers(0, len(t.raw_data) - 1))]
    elif kind == "dup_output":
        k = draw(st.integers(0, len(g.node) - 1))
        if g.node[j].output and g.node[k].output and j != k:
            g.node[k].output[0] = g.node[j].output[0]
    return model


@pytest.mark.parametrize("name", ONNX_FILES)
def test_onnx_structural_mutations(tmp_path: Path, name: str) -> None:
    @settings(**{**COMMON, "max_examples": EXAMPLES * 3})
    @given(onnx_structural(name))
    def run(model: onnx.ModelProto) -> None:
        path = tmp_path / "m.onnx"
        path.write_bytes(model.SerializeToString())
        check_load(path)

    run()


# ------------------------------------------------------------------------------------------ safetensors header


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                    max_size=4), max_leaves=8)


@st.composite
def safetensors_structural(draw, name: str) -> bytes:
    header, body = _split(_bytes(name))
    names = sorted(k for k in header if k != "__metadata__")
    t = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["not_json", "metadata", "dtype", "shape", "huge_shape", "offsets", "overlap",
                                 "drop", "duplicate", "extra", "spec", "spec_field", "header_len", "garbage_entry"]))
    if kind == "not_json":
        return _join(None, body, draw(st.binary(max_size=64)))
    if kind == "metadata":
        header["__metadata__"] = draw(JSONISH)
    elif kind == "dtype":
        header[t]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "C64", "F8_E4M3",
                                                   "X", 3, None]))
    elif kind == "shape":
        header[t]["shape"] = draw(st.lists(st.integers(0, 300), max_size=4) | JSONISH)
    elif kind == "huge_shape":
        header[t]["shape"] = [draw(HUGE), draw(HUGE)]
    elif kind == "offsets":
        header[t]["data_offsets"] = draw(st.lists(st.integers(-10, len(body) + 10) | HUGE, max_size=3) | JSONISH)
    elif kind == "overlap":
        other = header[draw(st.sampled_from(names))]
        header[t]["data_offsets"] = list(other["data_offsets"])
        header[t]["shape"], header[t]["dtype"] = list(other["shape"]), other["dtype"]
    elif kind == "drop":
        del header[t]
    elif kind == "duplicate":
        text = json.dumps(header)
        entry = json.dumps({t: header[t]})[1:-1]
        return _join(None, body, (text[:-1] + ", " + entry + "}").encode())
    elif kind == "extra":
        header["extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif kind in ("spec", "spec_field"):
        meta = header.setdefault("__metadata__", {})
        spec = json.loads(meta.get("lipcert.arch", "{}"))
        if kind == "spec":
            meta["lipcert.arch"] = draw(st.text(max_size=30)) if draw(st.booleans()) else json.dumps(draw(JSONISH))
        else:
            layers = spec.get("layers") or [{}]
            layer = layers[draw(st.integers(0, len(layers) - 1))]
            key = draw(st.sampled_from(["type", "weight", "bias", "padding", "stride", "groups", "slope",
                                        "group_size", "kernel", "dilation", "value", "padding_mode", "branch"]))
            layer[key] = draw(JSONISH | HUGE)
            if draw(st.booleans()):
                spec["input_shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=4) | JSONISH)
            meta["lipcert.arch"] = json.dumps(spec)
    elif kind == "header_len":
        raw = json.dumps(header).encode()
        n = draw(st.integers(0, 2**64 - 1))
        return struct.pack("<Q", n) + raw + body
    elif kind == "garbage_entry":
        header[t] = draw(JSONISH)
    return _join(header, body)


@pytest.mark.parametrize("name", ST_FILES)
def test_safetensors_structural_mutations(tmp_path: Path, name: str) -> None:
    @settings(**{**COMMON, "max_examples": EXAMPLES * 3})
    @given(safetensors_structural(name))
    def run(data: bytes) -> None:
        path = tmp_path / "m.safetensors"
        path.write_bytes(data)
        check_load(path)

    run()


# ------------------------------------------------------------------------------------------ CLI, memory-capped

CAP = 4 << 30


def _capped_cli(*args: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lipcert", *args], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=300)


def _huge_cases(tmp: Path) -> dict[str, Path]:
    cases = {}
    m = _model("digits_dense.onnx")
    m.graph.initializer[1].dims[0] = 2**40
    onnx.save(m, str(tmp / "huge_init.onnx"))
    cases["initializer with huge dims"] = tmp / "huge_init.onnx"
    m = _model("digits_dense.onnx")
    m.graph.initializer.append(numpy_helper.from_array(np.array([2**16, 2**16, 2**8], dtype=np.int64), "s"))
    m.graph.node.insert(0, helper.make_node("ConstantOfShape", ["s"], ["big"], name="blowup"))
    m.graph.node.append(helper.make_node("ReduceSum", ["big"], ["bs"], keepdims=0, name="sum"))
    m.graph.node.append(helper.make_node("Add", [m.graph.output[0].name, "bs"], ["o2"], name="join"))
    m.graph.output[0].name = "o2"
    onnx.save(m, str(tmp / "cos.onnx"))
    cases["ConstantOfShape 2**40"] = tmp / "cos.onnx"
    m = _model("digits_dense.onnx")
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**31
    onnx.save(m, str(tmp / "input.onnx"))
    cases["huge input"] = tmp / "input.onnx"
    header, body = _split(_bytes("digits_dense.safetensors"))
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["shape"] = [2**20, 2**20]
    (tmp / "huge.safetensors").write_bytes(_join(header, body))
    cases["safetensors huge shape"] = tmp / "huge.safetensors"
    (tmp / "meta.safetensors").write_bytes(_join(None, body, b"{not json"))
    cases["safetensors header not JSON"] = tmp / "meta.safetensors"
    return cases


@pytest.mark.slow
def test_cli_refuses_huge_models_within_4gib(tmp_path: Path) -> None:
    for what, path in _huge_cases(tmp_path).items():
        CASES["cli"] += 1
        result = _capped_cli("inspect", str(path))
        assert result.returncode == 2, (what, result.stdout, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (what, result.stderr[-2000:])
        assert str(path) in lines[0], (what, lines[0])
