"""A linear region that is a polynomial in one convolution (SOC's truncated exponential) bound whole
(``lipcert/bounds/series.py``): with zero padding, where the region is no convolution, each bound compared with
the dense norm at small sizes (thresholds lowered) and with power iteration past the dense limit; the method steps
aside for a kernel that is not skew, two weights, a strided convolution and padding that is not "same"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lipcert import load_model
from lipcert.bounds import regions, thresholds
from lipcert.bounds.decompose import decompose
from lipcert.bounds.kinds import Region
from lipcert.bounds.propagate import propagate
from lipcert.bounds.series import read_series, series_bound
from lipcert.bounds.spectral import upper_bound
from lipcert.model.onnx_loader import graph_from_onnx

from .conftest import dense_norm, export_onnx, strip_parametrizations
from .soundness.build import Builder
from .soundness.paths import LOWERED

STRUCTURED = LOWERED["structured"]


class Exponential(torch.nn.Module):
    """x + Cx + C^2 x / 2 + ... + C^(n-1) x / (n-1)!, C a zero-padded "same" convolution with a skew kernel of
    norm ``scale`` (Frobenius), plus ``perturb`` times noise; a Relu after, so that nothing joins the region."""

    def __init__(self, c: int, k: int, dilation: int = 1, terms: int = 4, scale: float = 1.0,
                 perturb: float = 0.0) -> None:
        super().__init__()
        self.terms = terms
        self.conv = torch.nn.Conv2d(c, c, k, padding=dilation * (k // 2), dilation=dilation, bias=False)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_(w - w.transpose(0, 1).flip(2, 3))
            w.mul_(scale / float(torch.linalg.vector_norm(w)))
            w.add_(perturb * torch.randn_like(w))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        total, term = x, x
        for i in range(1, self.terms):
            term = self.conv(term) / i
            total = total + term
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def _exact(model: Exponential, shape: tuple[int, ...]) -> float:
    wide = Exponential(shape[0], model.conv.kernel_size[0], model.conv.dilation[0], model.terms).double()
    wide.load_state_dict(model.state_dict())
    return dense_norm(wide.linear, shape)


def _regions(path: Path, **lowered: int) -> list:
    with thresholds.override(**lowered):
        result = propagate(load_model(path), lower_bounds=False)
    return [r for r in result.layers if r.op.startswith("linear region")]


#: lowered thresholds: every operator structured (the DFT evaluated whole, unchunked: the harness chunks it)
WHOLE = {"dense_limit": 0, "dense_max_entries": 0}
CASES = [(False, 3, 1), (False, 5, 1), (False, 3, 2), (True, 3, 1), (True, 5, 1), (True, 3, 2)]


@pytest.mark.parametrize("dynamo,k,dilation", CASES,
                         ids=[f"{'dynamo' if d else 'torchscript'}-k{k}-d{x}" for d, k, x in CASES])
def test_zero_padded_exponential_of_a_skew_conv_is_bound_at_its_norm(tmp_path: Path, dynamo: bool, k: int,
                                                                     dilation: int) -> None:
    """3 channels on 5x5 (an odd dimension, so 0 is in the spectrum and the norm is |p(0)| = 1), kernels 3 and 5,
    dilation 2, both exporters (the Div after a conv folds into it, or not): structured, the region is
    bounded by ``series (region)`` within 1e-4 of its dense norm, never below it (the product of its steps: 3)."""
    shape = (3, 5, 5)
    torch.manual_seed(k + dilation)
    model = Exponential(3, k, dilation).eval()
    path = export_onnx(torch.nn.Sequential(model, torch.nn.Flatten()), tmp_path / "e.onnx", shape, dynamo)
    exact = _exact(model, shape)
    rows = _regions(path, **WHOLE)
    assert len(rows) == 1 and rows[0].upper_method == "series (region)", [r.upper_method for r in rows]
    assert exact * (1 - 1e-9) <= rows[0].upper <= exact + 1e-4, (rows[0].upper, exact)


def _big(tmp_path: Path) -> Path:
    """The truncated exponential of a skew conv (Frobenius norm 1), 16 channels on 32x32: past the dense limit."""
    torch.manual_seed(0)
    model = Exponential(16, 3).eval()
    return export_onnx(torch.nn.Sequential(model, torch.nn.Flatten()), tmp_path / "big.onnx", (16, 32, 32), False)


def test_exponential_past_the_dense_limit_is_bound_at_one(tmp_path: Path) -> None:
    """At production thresholds, too large for the dense norm: the zero-padded truncated exponential of a skew
    conv is bounded at 1, and power iteration agrees from below."""
    rows = [r for r in propagate(load_model(_big(tmp_path))).layers if r.op.startswith("linear region")]
    assert len(rows) == 1 and rows[0].upper_method == "series (region)"
    assert rows[0].lower is not None and 0.99 <= rows[0].lower <= rows[0].upper <= 1 + 1e-6, rows[0]


def test_exponential_past_the_dense_limit_was_bound_by_its_steps(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same region without the series bound: the product of its steps, 1.63."""
    monkeypatch.setattr(regions, "series_bound", lambda step: None)
    rows = [r for r in propagate(load_model(_big(tmp_path)), lower_bounds=False).layers
            if r.op.startswith("linear region")]
    assert rows[0].upper_method == "product(region steps)" and rows[0].upper > 1.6, rows[0]


def _built(program: callable, shape: tuple[int, ...] = (3, 5, 5), seed: int = 0) -> tuple[object, float]:
    """The one region of a built graph (``program(b)`` returns the region's last value) and its dense norm."""
    b = Builder(shape, 17, seed)
    graph = graph_from_onnx(b.model(b.node("Flatten", [b.node("Relu", [program(b)])])), "built")
    found = [s for s in decompose(graph) if isinstance(s.details, Region)]
    assert len(found) == 1
    return found[0], upper_bound(found[0].linear).value


def _skew(rng: np.random.Generator, c: int, k: int, scale: float = 1.0) -> np.ndarray:
    w = rng.standard_normal((c, c, k, k))
    w = w - w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    return (w * scale / np.linalg.norm(w)).astype(np.float32)


def _exponential(b: Builder, weights: list[str], terms: int = 4, **attrs: object) -> str:
    """x + sum_i C_i ... C_1 x / i!, the i-th conv reading weights[i % len(weights)]."""
    total, term = "input", "input"
    for i in range(1, terms):
        term = b.node("Div", [b.node("Conv", [term, weights[(i - 1) % len(weights)]], **attrs),
                              b.const(np.float32(i))])
        total = b.node("Add", [total, term])
    return total


def test_a_kernel_off_skew_is_bound_by_its_perturbation_never_below_the_norm() -> None:
    """A skew kernel plus noise of 1e-6 to 1e-1 per entry: the spectral bound plus the perturbation by the rest
    (or the coefficients' bound) is at least the dense norm, and for small noise within its noise of it."""
    for noise in (1e-6, 1e-3, 1e-1):
        rng = np.random.default_rng(1)
        w = _skew(rng, 3, 3) + (noise * rng.standard_normal((3, 3, 3, 3))).astype(np.float32)
        step, exact = _built(lambda b, w=w: _exponential(b, [b.const(w)], pads=[1, 1, 1, 1]))
        with thresholds.override(**STRUCTURED):
            found = series_bound(step)
        assert found is not None
        branch, value = found
        assert value >= exact * (1 - 1e-9), (noise, branch, value, exact)
        if noise <= 1e-3:
            assert branch == "region.series" and value <= exact + 100 * noise, (noise, value, exact)


def test_cancelling_terms_of_a_raw_kernel_take_the_coefficient_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """x + Cx + C^2 x / 2 - C(Cx) / 4 with a kernel far from skew: the coefficients' bound (1 + r + r^2 / 4) is
    below the product of the steps (1 + r + 3 r^2 / 4) and at least the dense norm."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((3, 3, 3, 3)) * 0.2).astype(np.float32)

    def program(b: Builder) -> str:
        c = b.const(w)
        first = b.node("Conv", ["input", c], pads=[1, 1, 1, 1])
        second = b.node("Conv", [first, c], pads=[1, 1, 1, 1])
        total = b.node("Add", [b.node("Add", ["input", first]), b.node("Div", [second, b.const(np.float32(2))])])
        again = b.node("Conv", [b.node("Conv", ["input", c], pads=[1, 1, 1, 1]), c], pads=[1, 1, 1, 1])
        return b.node("Sub", [total, b.node("Div", [again, b.const(np.float32(4))])])

    step, exact = _built(program)
    series = read_series(step)
    assert series is not None and [float(c) for c in series.coeffs] == [1.0, 1.0, 0.25]
    with thresholds.override(**STRUCTURED):
        branch, value = series_bound(step) or ("", math.inf)
        row = regions.region_bound(step, lambda op: upper_bound(op))
    assert branch == "region.series-sum" and value >= exact * (1 - 1e-9)
    assert row.method == "series (region)" and row.value == value
    monkeypatch.setattr(regions, "series_bound", lambda step: None)
    with thresholds.override(**STRUCTURED):
        product = regions.region_bound(step, lambda op: upper_bound(op))
    assert product.method == "product(region steps)" and value < product.value * 0.99


def test_the_series_steps_aside_for_two_weights_a_stride_and_padding_that_is_not_same() -> None:
    """Two different kernels in the series, a stride-2 convolution (brought back to the grid by DepthToSpace):
    not a polynomial in one operator. Padding that is not "same" (all of it after the grid): a polynomial, but
    its matrix is not skew, so only the coefficients' bound applies. Each bound stays above the dense norm."""
    rng = np.random.default_rng(3)
    a, c = _skew(rng, 3, 3), _skew(rng, 3, 3)
    step, _ = _built(lambda b: _exponential(b, [b.const(a), b.const(c)], pads=[1, 1, 1, 1]))
    assert read_series(step) is None

    def strided(b: Builder) -> str:
        w = (rng.standard_normal((12, 3, 3, 3)) * 0.2).astype(np.float32)
        down = b.node("Conv", ["input", b.const(w)], pads=[1, 1, 1, 1], strides=[2, 2])
        return b.node("Add", ["input", b.node("DepthToSpace", [down], blocksize=2)])

    step, _ = _built(strided, (3, 4, 4))
    assert read_series(step) is None
    step, exact = _built(lambda b: _exponential(b, [b.const(a)], pads=[0, 0, 2, 2]))
    assert read_series(step) is not None
    with thresholds.override(**STRUCTURED):
        found = series_bound(step)
    assert found is not None and found[0] == "region.series-sum" and found[1] >= exact * (1 - 1e-9)


def test_orthogonium_soc_is_one_convolution_and_keeps_its_exact_norm(tmp_path: Path) -> None:
    """orthogonium's SOC (AdaptiveSOCConv2d, zero padding) composes its truncated exponential into one kernel
    before export: one Conv per layer, no series on the graph, so its bound is the conv's own (the exact norm,
    dense at this size), which is what tells a network whose exported convolutions exceed 1 ``violated``."""
    import onnx
    from orthogonium.layers.conv.adaptiveSOC import AdaptiveSOCConv2d

    torch.manual_seed(0)
    layer = AdaptiveSOCConv2d(4, 4, 3, padding_mode="zeros", bias=False)
    model = strip_parametrizations(torch.nn.Sequential(layer, torch.nn.Flatten()).eval())
    path = export_onnx(model, tmp_path / "soc.onnx", (4, 12, 12), False)
    assert [n.op_type for n in onnx.load(path).graph.node] == ["Conv", "Flatten"]
    rows = propagate(load_model(path), lower_bounds=False).layers
    exact = dense_norm(model.double()[0], (4, 12, 12))
    assert [r.upper_method for r in rows if r.op == "Conv"] == ["svd"]
    assert math.isclose(rows[0].upper, exact, rel_tol=1e-6), (rows[0].upper, exact)


def test_the_peak_on_the_imaginary_axis_is_an_upper_bound_and_tight() -> None:
    """max_{|lambda| <= rho} |p(i lambda)| for random real polynomials of degree 1 to 7 and rho in [0.1, 3], and
    the truncated exponential below and above sqrt(3) (where its peak leaves lambda = 0): never below a fine
    sampling, within 1e-6 of it."""
    from fractions import Fraction

    from lipcert.bounds.series import max_on_imaginary_axis

    rng = np.random.default_rng(5)
    cases = [([1.0, 1.0, 0.5, 1 / 6], rho) for rho in (0.5, 1.7, 2.0, 3.0)]
    cases += [(list(rng.uniform(-2, 2, rng.integers(2, 9))), float(rng.uniform(0.1, 3))) for _ in range(50)]
    for coeffs, rho in cases:
        bound = float(max_on_imaginary_axis([Fraction(c) for c in coeffs], Fraction(rho)))
        lam = np.linspace(0.0, rho, 20001)
        sampled = float(np.abs(sum(c * (1j * lam) ** k for k, c in enumerate(coeffs))).max())
        assert sampled <= bound <= sampled * (1 + 1e-6) + 1e-9, (coeffs, rho, bound, sampled)


class Spelling(torch.nn.Module):
    """p(C) of a zero-padded skew conv spelt otherwise: Horner's form, the original SOC loop of 13 terms
    (``curr = conv(curr) / i``), and a Sub/Mul/Neg form x - Cx / 2 - C^2 x / 4."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_(w - w.transpose(0, 1).flip(2, 3))
            w.mul_(1.2 / float(torch.linalg.vector_norm(w)))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.form == "horner":
            return x + c(x + c(x / 2 + c(x) / 6))
        if self.form == "soc":
            total = term = x
            for i in range(1, 14):
                term = c(term) / float(i)
                total = total + term
            return total
        return x - c(x) * 0.5 + (-c(c(x))) * 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


@pytest.mark.parametrize("form", ["horner", "soc", "sub"])
def test_other_spellings_of_a_series_are_read_as_one(tmp_path: Path, form: str) -> None:
    """Each spelling is bounded by ``series (region)``, never below the dense norm; the exponential's (an
    orthogonal map up to truncation) within 1e-4 of it."""
    torch.manual_seed(1)
    model = Spelling(form).eval()
    path = export_onnx(torch.nn.Sequential(model, torch.nn.Flatten()), tmp_path / "s.onnx", (3, 5, 5), False)
    wide = Spelling(form).double()
    wide.load_state_dict(model.state_dict())
    exact = dense_norm(wide.linear, (3, 5, 5))
    rows = _regions(path, **WHOLE)
    assert len(rows) == 1 and rows[0].upper_method == "series (region)", [r.upper_method for r in rows]
    assert rows[0].upper >= exact * (1 - 1e-9)
    if form != "sub":
        assert rows[0].upper <= exact + 1e-4, (rows[0].upper, exact)
