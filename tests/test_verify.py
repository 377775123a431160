"""``lipcert verify``: sound per-layer bounds on exact operators, patterns, network verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lipcert.bounds.decompose import decompose
from lipcert.bounds.results import PROVEN, UNPROVEN, VIOLATED
from lipcert.bounds.spectral import kernel_matrix_norm, upper_bound
from lipcert.bounds.verify import verify
from lipcert.graph.core import Node
from lipcert.graph.ops import REGISTRY
from lipcert.model.loader import load_model

from .conftest import SAMPLES, export_onnx, orthogonium_model, run_cli, strip_parametrizations, torchlip_model


@pytest.mark.parametrize("name", ["digits_conv.onnx", "digits_dense.onnx", "digits_conv.safetensors",
                                  "digits_dense.safetensors"])
def test_sample_models_are_proven(name: str) -> None:
    result = verify(load_model(SAMPLES / name))
    assert result.status == PROVEN, [(r.name, r.status, r.upper) for r in result.layers]
    assert result.network_upper <= 1.0 + 1e-5
    assert 0.5 < result.network_lower <= result.network_upper


@pytest.mark.parametrize("name", ["digits_broken.onnx", "digits_broken.safetensors"])
def test_broken_model_is_violated_and_names_the_conv(name: str) -> None:
    result = verify(load_model(SAMPLES / name))
    assert result.status == VIOLATED
    assert result.network_lower > 1.0
    broken = result.breaking_layers
    assert len(broken) == 1 and broken[0].op == "Conv"
    assert broken[0].lower > 2.0 and broken[0].upper >= broken[0].lower


@pytest.mark.slow
def test_cli_verify_exit_codes_and_json(tmp_path: Path) -> None:
    ok = run_cli("verify", str(SAMPLES / "digits_dense.onnx"), "--json", str(tmp_path / "v.json"))
    assert ok.returncode == 0, ok.stderr
    assert "PROVEN" in ok.stdout
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["schema"] == "lipcert.verify/1" and data["status"] == "proven"
    assert all(layer["upper"] >= (layer["lower"] or 0) * (1 - 1e-9) for layer in data["layers"])
    bad = run_cli("verify", str(SAMPLES / "digits_broken.onnx"))
    assert bad.returncode == 1
    assert "VIOLATED" in bad.stdout and "/conv1/Conv" in bad.stdout and "2.79" in bad.stdout
    missing = run_cli("verify", str(tmp_path / "nope.onnx"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_bound_flag_changes_the_verdict() -> None:
    graph = load_model(SAMPLES / "digits_broken.onnx")
    assert verify(graph, bound=3.0).status == PROVEN
    assert verify(graph, bound=0.5).status == VIOLATED


def _sll_model() -> torch.nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
    from orthogonium.layers.conv.SLL.sll_layer import SDPBasedLipschitzDense, SDPBasedLipschitzResBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        AdaptiveOrthoConv2d(1, 4, 3, padding="same", padding_mode="circular"), SDPBasedLipschitzResBlock(4, 2, 3),
        MaxMin(), torch.nn.Flatten(), SDPBasedLipschitzDense(256, 256, 64), OrthoLinear(256, 10))
    return strip_parametrizations(model.eval())


PEERS = {
    "torchlip-conv (zero padding, stride 2, GroupSort, L2 pooling)": lambda: torchlip_model("conv"),
    "torchlip-dense (FullSort)": lambda: torchlip_model("dense"),
    "orthogonium (circular padding, strided, MaxMin)": orthogonium_model,
    "orthogonium SLL residual network": _sll_model,
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_models_are_proven(tmp_path: Path, peer: str, dynamo: bool) -> None:
    path = export_onnx(PEERS[peer](), tmp_path / "m.onnx", (1, 8, 8), dynamo)
    result = verify(load_model(path))
    assert result.status == PROVEN, [(r.name, r.op, r.status, r.upper) for r in result.layers]
    assert not result.no_rule


def test_sll_block_needs_its_rule() -> None:
    """Without the SLL rule the sum rule gives 1 + ||A|| ||B|| > 1; with it, exactly 1."""
    model = _sll_model()
    result = verify(load_model(export_onnx(model, Path(__import__("tempfile").mkdtemp()) / "m.onnx", (1, 8, 8),
                                           dynamo=False)))
    labels = [r.op for r in result.layers]
    assert sum("SLL" in label for label in labels) == 2
    assert result.network_upper <= 1.0 + 1e-5


def test_sll_block_beyond_the_sqrt2_condition_is_bounded_by_q2_minus_1(tmp_path: Path) -> None:
    """x - c W^T relu(W x + b) with c ||W||^2 = q^2 = 3: the Jacobian I - c W^T D W has eigenvalues in
    [1 - q^2, 1], so the block is (q^2 - 1) = 2-Lipschitz, attained where every unit is active."""
    torch.manual_seed(5)
    w = torch.randn(12, 64, dtype=torch.float64)
    w = (w / torch.linalg.matrix_norm(w, 2)).float()

    class Block(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x.flatten(1)
            return v - 3.0 * torch.relu(v @ w.T + 5.0) @ w

    result = verify(load_model(export_onnx(Block(), tmp_path / "m.onnx", (1, 8, 8), dynamo=False)),
                    empirical_budget=2.0)
    block = [r for r in result.layers if "SLL" in r.op]
    assert len(block) == 1 and "> 2" in block[0].reason
    w64 = w.double()  # the weights the model holds
    exact = float(torch.linalg.matrix_norm(torch.eye(64, dtype=torch.float64) - 3.0 * w64.T @ w64, 2))
    assert exact == pytest.approx(2.0, abs=1e-6)  # the bias keeps every unit active near the origin
    assert exact <= block[0].upper <= exact * (1 + 1e-5)


def test_pattern_names_are_reported(tmp_path: Path) -> None:
    result = verify(load_model(SAMPLES / "digits_conv.onnx"))
    labels = " ".join(r.op for r in result.layers)
    assert "GroupSort2" in labels and "L2-norm pool" in labels and "circular" in labels


def test_no_rule_means_not_proven(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1))
    result = verify(load_model(export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), dynamo=False)), bound=100.0)
    assert result.status == UNPROVEN
    assert result.no_rule and math.isinf(result.network_upper)


def test_residual_sum_and_concat_rules(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)

        def forward(self, x):
            x = x.flatten(1)
            return torch.cat([x + torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)

    torch.manual_seed(0)
    net = Net().eval()
    result = verify(load_model(export_onnx(net, tmp_path / "m.onnx", (1, 4, 4), dynamo=False)), bound=10.0)
    na = torch.linalg.matrix_norm(net.a.weight.double(), 2).item()
    nb = torch.linalg.matrix_norm(net.b.weight.double(), 2).item()
    assert result.network_upper == pytest.approx(math.sqrt((1 + na) ** 2 + nb ** 2), rel=1e-6)
    assert result.network_lower <= result.network_upper


CONV_CASES = {
    "stride2-asym": dict(weight=(4, 3, 3, 3), strides=[2, 2], pads=[0, 1, 1, 2], dilations=[1, 1], group=1),
    "dilated": dict(weight=(4, 3, 3, 3), strides=[1, 1], pads=[2, 2, 2, 2], dilations=[2, 2], group=1),
    "groups": dict(weight=(4, 1, 3, 3), strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=2),
}


def _conv_operator(case: dict, in_shape: tuple[int, ...], transpose: bool = False):
    torch.manual_seed(0)
    w = torch.randn(*case["weight"], dtype=torch.float64)
    attrs = {k: v for k, v in case.items() if k != "weight"}
    op = "ConvTranspose" if transpose else "Conv"
    node = Node("c", op, ["x", "w"], ["y"], attrs)
    x = torch.zeros((1,) + in_shape, dtype=torch.float64)
    out_shape = tuple(REGISTRY[op].run(node, [x, w], None)[0].shape[1:])
    return REGISTRY[op].linear(node, [None, w], 0, in_shape, out_shape), w


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_adjoint_and_bounds_match_dense_svd(case: str) -> None:
    in_shape = (CONV_CASES[case]["weight"][1] * CONV_CASES[case]["group"], 7, 6)
    op, w = _conv_operator(CONV_CASES[case], in_shape)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((3,) + op.in_shape, generator=gen, dtype=torch.float64)
    y = torch.randn((3,) + op.out_shape, generator=gen, dtype=torch.float64)
    assert torch.allclose((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-10)
    exact = torch.linalg.matrix_norm(op.to_dense(), 2).item()
    structured = upper_bound(op, dense_limit=0)
    assert structured.value >= exact * (1 - 1e-12)
    assert upper_bound(op).value == pytest.approx(exact, rel=1e-8)


def test_conv_transpose_adjoint() -> None:
    op, _ = _conv_operator(dict(weight=(3, 4, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1],
                                group=1, output_padding=[1, 1]), (3, 5, 5), transpose=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((2,) + op.in_shape, generator=gen, dtype=torch.float64)
    y = torch.randn((2,) + op.out_shape, generator=gen, dtype=torch.float64)
    assert torch.allclose((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-10)


def test_kernel_matrix_norm_is_not_the_operator_norm() -> None:
    """The broken sample conv: its reshaped kernel has norm < 1, its operator norm is > 2x that."""
    graph = load_model(SAMPLES / "digits_broken.onnx")
    weight = next(t for n, t in graph.params.items() if t.dim() == 4 and t.shape[1] == 1)
    result = verify(graph)
    conv = result.breaking_layers[0]
    assert kernel_matrix_norm(weight) < 1.0
    assert conv.upper > 2 * kernel_matrix_norm(weight)
    assert all(abs(r.upper - kernel_matrix_norm(weight)) > 0.5 for r in result.layers if r.op == "Conv"
               and r.status == VIOLATED)


def test_layer_bounds_equal_dense_svd_of_the_whole_step(tmp_path: Path) -> None:
    graph = load_model(SAMPLES / "digits_conv.onnx")
    steps = [s for s in decompose(graph) if s.kind == "linear"]
    result = verify(graph)
    rows = [r for r in result.layers if r.upper_method not in ("rule", "pattern")]
    for step, row in zip(steps, rows):
        exact = torch.linalg.matrix_norm(step.linear.to_dense(), 2).item()
        assert row.upper >= exact * (1 - 1e-12)
        assert row.upper == pytest.approx(exact, rel=1e-6)
        assert row.lower <= exact * (1 + 1e-12)
        if row.upper_method == "svd":
            assert (row.upper - row.lower) / row.upper < 1e-4


def test_circular_conv_bound_without_dense_is_tight(tmp_path: Path) -> None:
    """A 24x24 circular conv (too large for the dense path) gets the exact FFT bound; power iteration meets it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", bias=False)
    model = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    result = verify(load_model(export_onnx(model, tmp_path / "m.onnx", (8, 24, 24), dynamo=True)), bound=100.0)
    row = result.layers[0]
    assert row.upper_method == "fft-circular" and row.exact
    exact_w = conv.weight.detach().double()
    freq = torch.fft.fft2(exact_w, s=(24, 24)).permute(2, 3, 0, 1)
    expected = torch.linalg.matrix_norm(freq, 2).max().item()
    assert row.upper == pytest.approx(expected, rel=1e-8)
    assert (row.upper - row.lower) / row.upper < 1e-4


def _circular_norm(weight: torch.Tensor, size: tuple[int, int]) -> float:
    """The operator norm of a stride-1 circular convolution on a ``size`` grid, from the kernel's DFT."""
    freq = torch.fft.fft2(weight.detach().double(), s=size).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(freq, 2).max().item()


class ShuffleThenCircular(torch.nn.Module):
    """A pixel shuffle (Reshape/Transpose/Reshape) in front of a circular convolution: 16x24x24 -> 4x48x48."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.shuffle = torch.nn.PixelShuffle(2)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(self.shuffle(x)))


@pytest.mark.parametrize("dynamo", [False, True])
def test_circular_conv_behind_a_pixel_shuffle_is_bounded_on_its_own_grid(tmp_path: Path, dynamo: bool) -> None:
    """The conv runs on the 48x48 grid the shuffle makes, not on the 24x24 grid of the chain's input."""
    model = ShuffleThenCircular().eval()
    graph = load_model(export_onnx(model, tmp_path / "m.onnx", (16, 24, 24), dynamo=dynamo))
    true_norm = _circular_norm(model.conv.weight, (48, 48))
    result = verify(graph, bound=100.0)
    row = next(r for r in result.layers if r.op.startswith("Conv"))
    assert row.upper >= true_norm * (1 - 1e-12)
    assert row.upper == pytest.approx(true_norm, rel=1e-6)
    assert row.lower <= true_norm * (1 + 1e-12)
    assert result.network_upper >= true_norm * (1 - 1e-12)


def test_maxmin_reshape_before_a_circular_conv_keeps_the_fft_bound(tmp_path: Path) -> None:
    """orthogonium's MaxMin exports a Reshape in front of the next wrap pad; the conv after it is still circular."""
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin

    torch.manual_seed(0)
    model = strip_parametrizations(torch.nn.Sequential(
        AdaptiveOrthoConv2d(8, 16, 3, padding="same", padding_mode="circular"), MaxMin(),
        AdaptiveOrthoConv2d(16, 16, 3, padding="same", padding_mode="circular"), MaxMin()).eval())
    result = verify(load_model(export_onnx(model, tmp_path / "m.onnx", (8, 24, 24), dynamo=False)))
    convs = [r for r in result.layers if r.op.startswith("Conv")]
    assert len(convs) == 2 and all("circular" in r.op and r.upper_method == "fft-circular" for r in convs), \
        [(r.op, r.upper_method) for r in convs]
    assert convs[1].upper == pytest.approx(_circular_norm(model[2].weight, (24, 24)), rel=1e-6)
    assert result.status == PROVEN


def test_a_scale_behind_a_transpose_is_not_folded_into_the_conv_channels(tmp_path: Path) -> None:
    """Conv -> Transpose(C <-> H) -> Mul by a (20, 1, 1) scale: the scale acts on rows, not on conv channels.

    All the conv's output lands in channel 1 (scale 0.1 if mistaken for a channel scale) and in every row
    (row 0 scaled by 10), so the true norm is 10 and folding the scale into the channels would claim 0.1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.zeros(20, 20, 3, 3)
    weight[1, 0, 1, 1] = 1.0
    scale = torch.full((20, 1, 1), 0.1)
    scale[0] = 10.0
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 1, 3], name="swap"),
             helper.make_node("Mul", ["t", "s"], ["m"], name="scale"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20, 20, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 20, 20, 20])],
                              [numpy_helper.from_array(weight.numpy(), "w"),
                               numpy_helper.from_array(scale.numpy(), "s")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    result = verify(load_model(path), bound=100.0)
    row = next(r for r in result.layers if r.op.startswith("Conv"))
    assert row.lower == pytest.approx(10.0, rel=1e-3)
    assert row.upper >= 10.0 and result.network_upper >= 10.0


def test_a_layer_above_the_claim_compensated_by_another_is_not_a_break(tmp_path: Path) -> None:
    """A dense layer of norm 2 then one of norm 0.5 (product 1): the network is proven, nothing 'breaks the claim'."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(2.0 * torch.eye(4))
        model[2].weight.copy_(0.5 * torch.eye(4))
    path = export_onnx(model, tmp_path / "m.onnx", (4,), dynamo=False)
    result = verify(load_model(path))
    assert result.status == PROVEN and result.breaking_layers == []
    assert [layer.lower for layer in result.layers_above] == [pytest.approx(2.0)]
    cli = run_cli("verify", str(path))
    assert cli.returncode == 0 and "breaks the claim" not in cli.stdout and "other layers compensate" in cli.stdout


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_large_reflect_and_edge_pads_get_a_finite_sound_bound(tmp_path: Path, mode: str) -> None:
    """A padding that copies entries has norm sqrt(most copies of one entry): bounded by the Schur test."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode=mode, bias=False)
    model = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    result = verify(load_model(export_onnx(model, tmp_path / "m.onnx", (8, 24, 24), dynamo=False)), bound=100.0)
    assert math.isfinite(result.network_upper) and not result.no_rule
    row = result.layers[0]
    assert row.lower <= row.upper
    # pad 1 copies an entry at most twice per axis: ||pad|| = sqrt(2 * 2); the conv's norm is at most the
    # supremum of its symbol, which a fine DFT grid approximates
    assert row.upper <= 2.0 * _circular_norm(conv.weight, (256, 256)) * (1 + 1e-2)


def test_constant_padding_with_a_value_is_1_lipschitz(tmp_path: Path) -> None:
    class PadHalf(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(F.pad(x, (1, 1, 1, 1), value=0.5))

    result = verify(load_model(export_onnx(PadHalf(), tmp_path / "m.onnx", (2, 5, 5), dynamo=False)))
    assert result.status == PROVEN and any("constant padding with value 0.5" in r.reason for r in result.layers)


def test_empirical_budget_stops_the_search_and_progress_reports_every_phase() -> None:
    """A tiny budget ends the search after its first step, keeping the pair found; the JSON says so; progress
    sees every layer bound and the search steps (no timing is asserted)."""
    graph = load_model(SAMPLES / "digits_dense.onnx")
    calls: list[tuple[str, int, int, str]] = []
    short = verify(graph, empirical_budget=1e-6, progress=lambda *a: calls.append(a))
    assert short.network_lower_stopped and short.network_lower_steps == 1 and "stopped by the" in \
        short.network_lower_method and 0 < short.network_lower <= short.network_upper
    full = verify(graph, empirical_budget=None)
    assert not full.network_lower_stopped and full.network_lower_steps > short.network_lower_steps
    assert full.to_dict()["empirical_budget"] is None and short.to_dict()["empirical_budget"] == 1e-6
    layers = [c for c in calls if c[0] == "layer bounds"]
    assert [c[1] for c in layers] == list(range(1, layers[0][2] + 1)) and {c[3] for c in layers} == {"layers"}
    assert any(c[0].startswith("empirical search") for c in calls)
    with pytest.raises(Exception, match="empirical_budget must be a positive number of seconds"):
        verify(graph, empirical_budget=0.0)


def test_cli_verify_empirical_budget_flag(tmp_path: Path) -> None:
    out = run_cli("verify", str(SAMPLES / "digits_dense.onnx"), "--empirical-budget", "0.000001", "--json",
                  str(tmp_path / "v.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["network_lower_stopped"] is True and data["empirical_budget"] == 1e-6
    assert all(isinstance(layer["lower_iterations"], int) for layer in data["layers"] if layer["lower"] is not None)
    bad = run_cli("verify", str(SAMPLES / "digits_dense.onnx"), "--empirical-budget", "-1")
    assert bad.returncode == 2 and "--empirical-budget" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
