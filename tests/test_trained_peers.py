"""The peer forms of issue 22, trained as their users train them (a few epochs on scikit-learn's digits with a
margin loss), vanilla-exported with both torch exporters, then verified, reported and run through the soundness
harness's oracles: proven and reporting at least the library's own certificate where 1-Lipschitz; unproven
naming the assumption or factor where lipcert cannot prove it; violated, with a witness onnxruntime confirms, where
the library's export is not 1-Lipschitz. Each model is trained once per session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lipcert import load_model
from lipcert.bounds import thresholds
from lipcert.bounds.results import PROVEN, UNPROVEN, VIOLATED
from lipcert.bounds.verify import verify

from .conftest import dense_norm, export_onnx, strip_parametrizations
from .peers_training import compare_with_library, digits, jacobian_max, train
from .soundness import oracle

SHAPE = (1, 8, 8)
EPS = [36 / 255, 72 / 255]
EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])


class MaxMinGather(torch.nn.Module):
    """MaxMin of neighbouring entries picked by indexing, ``a, b = x[..., 0], x[..., 1]`` (exported as Gather)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=-1)


class MaxMinStrided(torch.nn.Module):
    """MaxMin of every other channel, ``x[:, ::2], x[:, 1::2]`` (exported as Slice with steps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def _maxmin_by_indexing() -> torch.nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(AdaptiveOrthoConv2d(1, 4, 3, padding="same"), MaxMinStrided(),
                                AdaptiveOrthoConv2d(4, 4, 2, stride=2, padding=0), torch.nn.Flatten(), MaxMinGather(),
                                OrthoLinear(64, 10))
    return strip_parametrizations(train(model, digits()))


def _padconv(modes: tuple[str, ...]) -> torch.nn.Module:
    """deel-torchlip SpectralConv2d (a PadConv2d) layers, one per padding mode, with GroupSort2; symmetric padding
    of one pixel is replicate in torchlip, so that layer is 5x5 with padding 2 (exported as Slice/Concat)."""
    import deel.torchlip as tl

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, mode in enumerate(modes):
        k = 5 if mode == "symmetric" else 3
        layers += [tl.SpectralConv2d(1 if i == 0 else 4, 4, k, padding=k // 2, padding_mode=mode), tl.GroupSort2()]
    model = tl.Sequential(*layers, torch.nn.Flatten(), tl.SpectralLinear(256, 10))
    return train(model, digits()).vanilla_export().eval()


def _patch_based_cnn() -> torch.nn.Module:
    from orthogonium.layers.normalization import LayerCentering2D
    from orthogonium.model_factory.classparam import ClassParam
    from orthogonium.model_factory.models_factory import PatchBasedCNN

    torch.manual_seed(0)
    model = PatchBasedCNN(img_shape=SHAPE, dim=16, depth=2, patch_size=4, n_classes=10,
                          norm=ClassParam(LayerCentering2D, num_features=16))
    return strip_parametrizations(train(model, digits()))


def _staged_cnn() -> torch.nn.Module:
    """orthogonium's classic StagedCNN (orthogonal convolutions, a strided one between stages, centring, MaxMin,
    orthogonal dense layers). Its default norm lacks ``num_features``; a bias of one channel broadcasts over all."""
    from orthogonium.layers import AdaptiveOrthoConv2d
    from orthogonium.layers.normalization import LayerCentering2D
    from orthogonium.model_factory.classparam import ClassParam
    from orthogonium.model_factory.models_factory import StagedCNN

    torch.manual_seed(0)
    model = StagedCNN(img_shape=SHAPE, dim_repeats=[(4, 1), (8, 1)], dim_nb_dense=(32, 1), n_classes=10,
                      conv=ClassParam(AdaptiveOrthoConv2d, kernel_size=3, bias=False, padding=1),
                      norm=ClassParam(LayerCentering2D, num_features=1))
    return strip_parametrizations(train(model, digits()))


def _sllxaoc(stride: int) -> torch.nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
    from orthogonium.layers.conv.SLL.sll_layer import SLLxAOCLipschitzResBlock

    torch.manual_seed(0)
    side = SHAPE[1] // stride
    model = torch.nn.Sequential(AdaptiveOrthoConv2d(1, 4, 3, padding="same"),
                                SLLxAOCLipschitzResBlock(4, 4, 2, kernel_size=3, stride=stride), MaxMin(),
                                torch.nn.Flatten(), OrthoLinear(4 * side * side, 10))
    return strip_parametrizations(train(model, digits()))


def _soc_one_term() -> torch.nn.Module:
    """orthogonium's FastSOC with one term of the exponential: exp(K) ~ I + K, whose norm is sqrt(1 + ||K||^2)
    for a skew-symmetric K, above 1 (three terms, the default, stay within a few percent of 1)."""
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
    from orthogonium.layers.conv.adaptiveSOC.fast_skew_ortho_conv import ExpParams, FastSOC

    torch.manual_seed(0)
    model = torch.nn.Sequential(AdaptiveOrthoConv2d(1, 4, 3, padding="same"),
                                FastSOC(4, 4, 3, padding=1, exp_params=ExpParams(exp_niter=1)), MaxMin(),
                                FastSOC(4, 4, 3, padding=1, exp_params=ExpParams(exp_niter=1)),
                                torch.nn.Flatten(), OrthoLinear(256, 10))
    return strip_parametrizations(train(model, digits()))


@dataclass(frozen=True)
class Form:
    build: Callable[[], torch.nn.Module]
    verdict: str  # what lipcert must say: proven (1-Lipschitz by construction), unproven, violated


FORMS = {
    "MaxMin by Gather and strided Slice": Form(_maxmin_by_indexing, PROVEN),
    "torchlip PadConv2d zeros, replicate, symmetric, circular": Form(
        lambda: _padconv(("zeros", "replicate", "symmetric", "circular")), PROVEN),
    "torchlip PadConv2d reflect": Form(lambda: _padconv(("reflect", "reflect")), UNPROVEN),
    "orthogonium PatchBasedCNN": Form(_patch_based_cnn, PROVEN),
    "orthogonium StagedCNN": Form(_staged_cnn, PROVEN),
    "orthogonium SLLxAOC stride 1": Form(lambda: _sllxaoc(1), PROVEN),
    "orthogonium SLLxAOC stride 2": Form(lambda: _sllxaoc(2), PROVEN),
    "orthogonium SOC, one term": Form(_soc_one_term, VIOLATED),
}
PROVEN_FORMS = sorted(name for name, form in FORMS.items() if form.verdict == PROVEN)


class Trained:
    """Each form trained once and exported once per exporter, on first use (session scope)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, torch.nn.Module] = {}
        self.paths: dict[tuple[str, bool], Path] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self.models:
            self.models[name] = FORMS[name].build()
        return self.models[name]

    def path(self, name: str, dynamo: bool) -> Path:
        key = (name, dynamo)
        if key not in self.paths:
            stem = "".join(c if c.isalnum() else "_" for c in name)
            self.paths[key] = export_onnx(self.model(name), self.root / f"{stem}_{dynamo}.onnx", SHAPE, dynamo)
        return self.paths[key]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return Trained(tmp_path_factory.mktemp("trained_peers"))


def _ort_ratio(path: Path, pair: np.lib.npyio.NpzFile) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    a, b = (session.run(None, {name: pair[k]})[0].astype(np.float64) for k in ("x", "x_prime"))
    return float(np.linalg.norm(a - b) / np.linalg.norm(pair["x"].astype(np.float64) - pair["x_prime"]))


@EXPORTERS
@pytest.mark.parametrize("name", PROVEN_FORMS)
def test_trained_peer_is_proven_and_reports_at_least_the_library(trained: Trained, name: str, dynamo: bool) -> None:
    """Proven, the bound above the torch model's exact Jacobian norms, and lipcert's report on the test digits
    certifies at 36/255 and 72/255 at least what the library's margin / sqrt(2) certifies (but for points within
    the float allowance of a radius), each correct point's radius at least the library's less that allowance."""
    path = trained.path(name, dynamo)
    graph = load_model(path)
    result = verify(graph, empirical=False)
    assert result.status == PROVEN, [(r.name, r.op, r.upper, r.reason) for r in result.layers] + [result.why]
    model = trained.model(name)
    assert jacobian_max(model, SHAPE) <= result.network_upper * (1 + 1e-9)
    data = digits()
    cmp = compare_with_library(graph, model, data.x_test, data.y_test, EPS)
    for e, ours, theirs, border in zip(cmp.eps, cmp.lipcert, cmp.library, cmp.border):
        assert ours >= theirs - border, (e, ours, theirs, border)
    assert cmp.short == 0
    assert cmp.library[0] >= cmp.total // 5  # trained: the comparison is not between two zeros


@pytest.mark.slow
@EXPORTERS
@pytest.mark.parametrize("name", sorted(FORMS))
def test_trained_peer_passes_the_soundness_oracles(trained: Trained, name: str, dynamo: bool) -> None:
    """The harness's oracles (steps, values, network, verify, report at the ci profile), the report oracle's
    dataset led by test digits."""
    outcome = oracle.check_model(trained.path(name, dynamo), data=digits().x_test[:8])
    assert not outcome.refused, outcome.refused
    assert not outcome.failures, "\n".join(outcome.failures)


@EXPORTERS
def test_trained_sllxaoc_at_stride_2_too_large_for_the_s_procedure_names_its_failed_assumption(
        trained: Trained, dynamo: bool) -> None:
    """At stride 2 the fused block has no SLL form on its own grid, and the S-procedure needs its explicit
    matrices: past the size for them (a lowered threshold) it is unproven (its Jacobian norms below the bound), and
    ``why`` names the SLL fit that failed on the block's Sub and the size, not just the factors."""
    name = "orthogonium SLLxAOC stride 2"
    with thresholds.override(sll_dense_entries=1000):
        result = verify(load_model(trained.path(name, dynamo)), empirical_budget=0.5)
    assert result.status == UNPROVEN
    assert "recognised but not proven" in result.why and "not an SLL block" in result.why
    assert "too large for the S-procedure" in result.why
    assert any("sub" in miss.split(":")[0].lower() for miss in result.near_misses), result.near_misses
    assert jacobian_max(trained.model(name), SHAPE) <= result.network_upper * (1 + 1e-9)


@EXPORTERS
def test_trained_torchlip_reflect_padding_is_not_1_lipschitz(trained: Trained, tmp_path: Path, dynamo: bool) -> None:
    """torchlip scales a reflect-padded convolution as if each entry were read k x k times, but reflect reads the
    entry next to the edge (k + 1)^2 times: the trained layer's exact norm is above 1. lipcert bounds it at that
    norm; the network is unproven, naming the layer; the layer alone is violated, with a witness onnxruntime
    confirms."""
    name = "torchlip PadConv2d reflect"
    model = trained.model(name)
    conv = model[0]
    exact = dense_norm(lambda v: torch.nn.functional.conv2d(torch.nn.functional.pad(v, (1, 1, 1, 1), mode="reflect"),
                                                            conv.weight.double()), SHAPE)
    assert exact > 1.01
    result = verify(load_model(trained.path(name, dynamo)), empirical_budget=0.5)
    assert result.status == UNPROVEN and result.layers[0].name in result.why
    assert result.layers[0].upper == pytest.approx(exact, rel=1e-6)
    assert jacobian_max(model, SHAPE) <= result.network_upper * (1 + 1e-9)
    alone = export_onnx(torch.nn.Sequential(conv, torch.nn.Flatten()).eval(), tmp_path / "conv.onnx", SHAPE, dynamo)
    layer = verify(load_model(alone), witness=tmp_path / "w.npz", empirical_budget=2.0)
    assert layer.status == VIOLATED and layer.witness is not None and layer.witness["confirmed"]
    ratio = _ort_ratio(alone, np.load(tmp_path / "w.npz"))
    assert 1.0 < ratio <= exact * (1 + 1e-4) and ratio == pytest.approx(layer.witness["ratio"], rel=1e-6)


@EXPORTERS
def test_trained_soc_with_one_term_is_violated_with_a_witness(trained: Trained, tmp_path: Path, dynamo: bool) -> None:
    """SOC truncated to one term of the exponential is not orthogonal: violated, the witness pair saved, and its
    ratio measured again here in onnxruntime above the claim (and below the sound bound)."""
    name = "orthogonium SOC, one term"
    path = trained.path(name, dynamo)
    result = verify(load_model(path), witness=tmp_path / "w.npz", empirical_budget=2.0)
    assert result.status == VIOLATED and result.witness is not None and result.witness["confirmed"], result.why
    pair = np.load(tmp_path / "w.npz")
    assert pair["x"].shape == (1,) + SHAPE and pair["x"].dtype == np.float32
    ratio = _ort_ratio(path, pair)
    assert 1.0 < ratio <= result.network_upper and ratio == pytest.approx(result.witness["ratio"], rel=1e-6)
    assert jacobian_max(trained.model(name), SHAPE) > 1.0  # the torch model itself is not 1-Lipschitz


@pytest.mark.slow
@EXPORTERS
def test_default_size_patch_based_cnn_is_proven(tmp_path: Path, dynamo: bool) -> None:
    """orthogonium's PatchBasedCNN at its default size (CIFAR 3x32x32, 128 channels, depth 8), untrained: every
    block's linear region bound whole by the DFT, within 2e-6 of its power-iteration norm, and the network proven
    at a tolerance of 1e-4. At the default 1e-5 it is not: the DFT gives each region's norm as 1.0000014 to
    1.0000016 (its float32 weights are orthogonal to about 1e-6), and the 8 of them multiply to 1.0000126."""
    from orthogonium.layers.normalization import LayerCentering2D
    from orthogonium.model_factory.classparam import ClassParam
    from orthogonium.model_factory.models_factory import PatchBasedCNN

    torch.manual_seed(0)
    model = strip_parametrizations(PatchBasedCNN(norm=ClassParam(LayerCentering2D, num_features=128)).eval())
    path = export_onnx(model, tmp_path / "patch.onnx", (3, 32, 32), dynamo)
    result = verify(load_model(path), empirical=False, tol=1e-4)
    assert result.status == PROVEN, result.why
    regions = [r for r in result.layers if r.op.startswith("linear region")]
    assert len(regions) == 8 and all(r.upper_method == "dft (region)" for r in regions)
    assert all(r.lower is not None and r.lower <= r.upper <= r.lower + 2e-6 for r in regions)


@pytest.mark.slow
@EXPORTERS
def test_default_size_bcop_large_cnn_is_proven(tmp_path: Path, dynamo: bool) -> None:
    """orthogonium's BCOPLargeCNN at its default size (CIFAR, 2.5M parameters), untrained: its BCOP x RKO
    convolutions compose their kernels at run time (a constant subgraph), which lipcert folds a few ulps away from
    onnxruntime (another order of summation); it takes onnxruntime's values, says so, and proves the network."""
    from orthogonium.model_factory.models_factory import BCOPLargeCNN

    torch.manual_seed(0)
    model = strip_parametrizations(BCOPLargeCNN().eval())
    path = export_onnx(model, tmp_path / "bcop.onnx", (3, 32, 32), dynamo)
    graph = load_model(path)
    assert any("taken from onnxruntime" in note for note in graph.notes), graph.notes
    result = verify(graph, empirical=False)
    assert result.status == PROVEN, result.why


@pytest.mark.slow
@EXPORTERS
def test_default_size_conv_mixer_is_proven(tmp_path: Path, dynamo: bool) -> None:
    """orthogonium's ConvMixerInspired at its default size (CIFAR, 128 channels, depth 8; without its default norm
    layer, which the library cannot build: ``LayerCentering2D`` is called without ``num_features``), untrained:
    proven, with its bound below 1 (its pooling)."""
    from orthogonium.model_factory.models_factory import ConvMixerInspired

    torch.manual_seed(0)
    model = strip_parametrizations(ConvMixerInspired(norm=None).eval())
    path = export_onnx(model, tmp_path / "mixer.onnx", (3, 32, 32), dynamo)
    result = verify(load_model(path), empirical=False)
    assert result.status == PROVEN and result.network_upper <= 1.0, result.why
