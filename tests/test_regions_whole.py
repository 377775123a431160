"""Linear regions bound whole: a pad and the convolution reading it as one operator (deel-torchlip's PadConv2d in
every padding mode), and a region too large for its dense norm by the DFT of its composed map (orthogonium's
PatchBasedCNN blocks); each bound compared with the exact norm, with the thresholds lowered so that the structured
paths run at sizes where the dense norm is cheap."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lipcert import load_model
from lipcert.bounds import thresholds
from lipcert.bounds.propagate import propagate
from lipcert.bounds.spectral import padded_conv_bound, upper_bound
from lipcert.graph.linop import ConvStructure, NonnegativeStructure, from_function

from .conftest import dense_norm, export_onnx, strip_parametrizations
from .soundness.paths import LOWERED

STRUCTURED = LOWERED["structured"]


def _pad_then_conv(mode: str, pad: int, k: int, stride: int, dilation: int, groups: int, c: int, c_out: int,
                   zero: int, size: tuple[int, int], seed: int):
    """A pad of ``mode`` and a convolution, as operators with their structures, and the exact norm of the two."""
    torch.manual_seed(seed)
    w = torch.randn(c_out, c // groups, k, k, dtype=torch.float64)
    padded = (c, size[0] + 2 * pad, size[1] + 2 * pad)

    def pad_f(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (pad,) * 4, mode=mode)

    def conv_f(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, stride=stride, padding=zero, dilation=dilation, groups=groups)

    out = tuple(conv_f(torch.zeros((1,) + padded, dtype=torch.float64)).shape[1:])
    pad_op = from_function(pad_f, (c, *size), padded, structure=NonnegativeStructure(mode=mode, pads=(pad,) * 8))
    conv_op = from_function(conv_f, padded, out, structure=ConvStructure(
        weight=w, input_spatial=padded[1:], stride=(stride,) * 2, pads=(zero,) * 4, dilation=(dilation,) * 2,
        groups=groups))
    exact = dense_norm(lambda x: conv_f(pad_f(x)), (c, *size))
    return pad_op, conv_op, exact


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
@pytest.mark.parametrize("seed", range(6))
def test_pad_conv_bound_is_sound(mode: str, seed: int) -> None:
    """The tap-count bound of a pad and a convolution (every stride, dilation, group, zero padding drawn) is at
    least the exact norm of the two, and at most the norm of the kernel matrix times the most taps one entry
    feeds (k taps per copy, at most pad + 1 copies of one entry per axis for these pads)."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    c, k, stride, dilation, zero = draw(1, 3), draw(1, 3), draw(1, 2), draw(1, 2), draw(0, 1)
    groups = c if draw(0, 1) else 1
    pad = draw(0, 2)
    lo = max(pad + 1, dilation * (k - 1) + 1)
    size = (draw(lo, 6), draw(lo, 6))
    pad_op, conv_op, exact = _pad_then_conv(mode, pad, k, stride, dilation, groups, c, groups * draw(1, 2), zero,
                                            size, seed)
    bound = padded_conv_bound(pad_op, conv_op)
    assert bound is not None
    assert bound >= exact * (1 - 1e-12)
    w = conv_op.structure.weight
    kernel = w.reshape(groups, w.shape[0] // groups, -1)
    crude = max(float(torch.linalg.matrix_norm(b, 2)) for b in kernel) * k * (pad + 1)
    assert bound <= crude * (1 + 1e-6)


def test_pad_conv_bound_is_exact_for_a_single_tap() -> None:
    """A 1x1 kernel reads each padded entry once: the bound is ||W|| times sqrt(the most copies of one entry), the
    exact norm (an edge pad of 1 copies a corner entry 4 times)."""
    pad_op, conv_op, exact = _pad_then_conv("replicate", 1, 1, 1, 1, 1, 2, 3, 0, (4, 5), 0)
    bound = padded_conv_bound(pad_op, conv_op)
    assert bound is not None and math.isclose(bound, exact, rel_tol=1e-8)
    assert math.isclose(exact, 2 * float(torch.linalg.matrix_norm(conv_op.structure.weight[:, :, 0, 0], 2)),
                        rel_tol=1e-9)


def test_pad_conv_steps_aside_for_a_transposed_or_circular_convolution() -> None:
    """The argument reads (output, tap) pairs of a forward, zero-padded convolution: no bound for other kinds."""
    pad_op, conv_op, _ = _pad_then_conv("reflect", 1, 3, 1, 1, 1, 2, 2, 0, (4, 4), 1)
    for changes in ({"transpose": True}, {"circular": True}):
        s = conv_op.structure
        other = from_function(conv_op.forward, conv_op.in_shape, conv_op.out_shape, structure=ConvStructure(
            weight=s.weight, input_spatial=s.input_spatial, stride=s.stride, pads=s.pads, dilation=s.dilation,
            **changes))
        assert padded_conv_bound(pad_op, other) is None


MODES = ["zeros", "reflect", "replicate", "symmetric", "circular"]


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["torchscript", "dynamo"])
def test_torchlip_padconv_every_mode_is_bound_as_one_operator(tmp_path: Path, dynamo: bool) -> None:
    """deel-torchlip's SpectralConv2d (a PadConv2d) in every padding mode, both exporters: the network bound is at
    least the exact norm of pad + conv; dense (small) it is that norm; structured it is never above the product of
    the pad's and the convolution's bounds, and at most 1 (torchlip's own figure) for the copying pads of one
    entry, which the product (the pad's norm is 2 for symmetric padding) is not."""
    import deel.torchlip as tl

    for mode in MODES:
        for pad, k in ((1, 3), (2, 5)):
            torch.manual_seed(0)
            layer = tl.SpectralConv2d(3, 3, k, padding=pad, padding_mode=mode, bias=False)
            model = torch.nn.Sequential(layer.vanilla_export(), torch.nn.Flatten()).eval()
            path = export_onnx(model, tmp_path / f"{mode}{k}.onnx", (3, 8, 8), dynamo)
            wide = model.double()
            exact = dense_norm(lambda v, m=wide: m(v), (3, 8, 8))
            graph = load_model(path)
            dense = propagate(graph, lower_bounds=False).upper
            assert math.isclose(dense, exact, rel_tol=1e-6), (mode, k, dense, exact)
            with thresholds.override(**STRUCTURED):
                result = propagate(graph, lower_bounds=False)
            structured = result.upper
            assert structured >= exact * (1 - 1e-9), (mode, k, structured, exact)
            if mode in ("replicate", "symmetric") and pad == 1:  # each copy of an edge entry: k taps in all
                assert structured <= 1 + 1e-6, (mode, k, structured, [r.upper_method for r in result.layers])


def _patch_cnn(dim: int, hw: int, depth: int) -> torch.nn.Module:
    from orthogonium.layers.normalization import LayerCentering2D
    from orthogonium.model_factory.classparam import ClassParam
    from orthogonium.model_factory.models_factory import PatchBasedCNN

    torch.manual_seed(0)
    model = PatchBasedCNN(img_shape=(3, hw, hw), dim=dim, depth=depth,
                          norm=ClassParam(LayerCentering2D, num_features=dim))
    return strip_parametrizations(model.eval())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_patch_based_cnn_blocks_are_bound_by_the_dft_of_the_whole(tmp_path: Path, dynamo: bool) -> None:
    """orthogonium's PatchBasedCNN (circular orthogonal convolutions, centring, MaxMin): every block's region,
    bounded structurally, is its exact norm within the rounding margin (the DFT of the composed map; the product
    of its steps gave 2 to 4)."""
    model = _patch_cnn(8, 8, 2)
    graph = load_model(export_onnx(model, tmp_path / "patch.onnx", (3, 8, 8), dynamo))
    dense = {r.name: r.upper for r in propagate(graph, lower_bounds=False).layers if r.op.startswith("linear region")}
    assert len(dense) == 2
    with thresholds.override(**STRUCTURED):
        result = propagate(graph, lower_bounds=False)
    regions = [r for r in result.layers if r.op.startswith("linear region")]
    for row in regions:
        assert row.upper >= dense[row.name] * (1 - 1e-9)
        assert row.upper <= dense[row.name] * (1 + 1e-6), (row.name, row.upper_method, row.upper, dense[row.name])
        assert row.upper_method in ("dft (region)", "product(region, tail)")  # a bias after: the tail


def test_region_with_zero_padded_convolutions_is_not_one_convolution(tmp_path: Path) -> None:
    """Zero padding between two convolutions breaks shift-equivariance: a centred chain of two zero-padded
    convolutions is not bounded by the DFT of the composed kernel, and its bound is still at least its norm."""
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
            self.b = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(self.a(x))
            return torch.relu(y - y.mean(dim=(2, 3), keepdim=True))

    torch.manual_seed(3)
    model = torch.nn.Sequential(Block(), torch.nn.Flatten()).eval()
    graph = load_model(export_onnx(model, tmp_path / "zero.onnx", (2, 5, 5), False))
    wide = Block().double()
    wide.load_state_dict(model[0].state_dict())

    def linear(v: torch.Tensor) -> torch.Tensor:
        y = wide.b(wide.a(v))
        return y - y.mean(dim=(2, 3), keepdim=True)

    exact = dense_norm(linear, (2, 5, 5))
    with thresholds.override(**STRUCTURED):
        rows = [r for r in propagate(graph, lower_bounds=False).layers if r.op.startswith("linear region")]
    assert len(rows) == 1 and rows[0].upper_method != "dft (region)"
    assert rows[0].upper >= exact * (1 - 1e-9)


def test_region_and_tail_never_worse_than_the_region_alone(tmp_path: Path) -> None:
    """x + circular conv(x) read by a dense layer joins one region: structured, its bound is the region's own DFT
    bound times the dense layer's norm (not the product of all steps), at least the exact norm."""
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", bias=False)
            self.dense = torch.nn.Linear(2 * 6 * 6, 5, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dense(torch.flatten(x + self.conv(x), 1))

    torch.manual_seed(4)
    model = Model().eval()
    graph = load_model(export_onnx(model, tmp_path / "tail.onnx", (2, 6, 6), False))
    wide = Model().double()
    wide.load_state_dict(model.state_dict())
    exact = dense_norm(wide, (2, 6, 6))
    head = dense_norm(lambda v: v + wide.conv(v), (2, 6, 6))
    with torch.no_grad():
        dense_layer = float(torch.linalg.matrix_norm(wide.dense.weight, 2))
        conv = dense_norm(wide.conv, (2, 6, 6))
    with thresholds.override(**STRUCTURED):
        rows = [r for r in propagate(graph, lower_bounds=False).layers if r.op.startswith("linear region")]
    assert len(rows) == 1
    assert rows[0].upper >= exact * (1 - 1e-9)
    # the dense layer by Gram iteration (structured): within 1e-3 of its norm
    assert rows[0].upper <= head * dense_layer * (1 + 1e-3), (rows[0].upper_method, rows[0].upper)
    assert rows[0].upper < (1 + conv) * dense_layer * 0.99  # the product of the steps


def test_transfer_bound_matches_dense_on_random_circular_regions() -> None:
    """A block-circulant region of several circular convolutions, 1x1 channel mixes, a per-channel scale, a
    centring and a channel concatenation: the DFT bound of the composed map equals its dense norm."""
    from lipcert.bounds.decompose import decompose
    from lipcert.bounds.kinds import Region
    from lipcert.bounds.transfer import transfer_bound
    from lipcert.model.onnx_loader import graph_from_onnx

    from .soundness.build import Builder

    for seed in range(3):
        b = Builder((3, 5, 6), 17, seed)
        rng = b.rng

        def conv(v: str, k: int, c_in: int, c_out: int, *, circular: bool, b: Builder = b, rng=rng) -> str:
            x = v
            if circular and k > 1:
                for axis in (2, 3):
                    parts = [b.slice(x, [-1], [2 ** 62], [axis]), x, b.slice(x, [0], [k - 2], [axis])] \
                        if k > 2 else [b.slice(x, [-1], [2 ** 62], [axis]), x]
                    x = b.node("Concat", parts, axis=axis)
            w = rng.standard_normal((c_out, c_in, k, k)).astype("float32")
            return b.node("Conv", [x, b.const(w)])

        a = conv("input", 3, 3, 4, circular=True)
        mixed = conv(a, 1, 4, 4, circular=False)
        centred = b.node("Sub", [mixed, b.reduce("ReduceMean", mixed, [2, 3])])
        scaled = b.node("Mul", [conv("input", 2, 3, 4, circular=True),
                                b.const(rng.standard_normal((4, 1, 1)).astype("float32"))])
        out = b.node("Relu", [b.node("Concat", [b.node("Add", [centred, scaled]), conv("input", 1, 3, 2,
                                                                                        circular=False)], axis=1)])
        graph = graph_from_onnx(b.model(b.node("Flatten", [out])), "built")
        regions = [s for s in decompose(graph) if isinstance(s.details, Region)]
        assert len(regions) == 1
        step = regions[0]
        with thresholds.override(**STRUCTURED):
            bound = transfer_bound(step)
        exact = upper_bound(step.linear).value
        assert bound is not None
        assert exact * (1 - 1e-9) <= bound <= exact * (1 + 1e-6)
