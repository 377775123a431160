"""Train and export lipcert's sample models on scikit-learn's digits data set.

Run from the repository root: ``python sample_models/make_samples.py``. It writes, next to this script,

* ``digits_test.npz``: the held-out test split (``x`` float32 ``(N, 1, 8, 8)`` in [0, 1], ``y`` int64);
* ``digits_conv.{onnx,safetensors}``: a truly 1-Lipschitz (L2) convolutional net with circular padding;
* ``digits_dense.{onnx,safetensors}``: a 1-Lipschitz dense net;
* ``digits_broken.{onnx,safetensors}``: a net that claims to be 1-Lipschitz but is not: its first
  convolution (zero padding) was normalised with ``torch.nn.utils.parametrizations.spectral_norm``, which
  bounds the reshaped kernel matrix, not the convolution operator.

The facts used:

* A stride-1 circular convolution on n x n inputs is block-diagonalised by the 2-D DFT; its operator norm
  is the largest singular value of the c_out x c_in matrices K_hat(omega) over the n^2 frequencies
  (Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019).
* A zero-padded convolution has no such closed form; the script checks it exactly from the dense matrix of
  the operator on 8 x 8 inputs (SVD in float64).
* MaxMin (GroupSort with groups of 2, written as in deel-torchlip's ``group_sort``) and non-overlapping
  L2-norm pooling are 1-Lipschitz (Anil, Lucas, Grosse, ICML 2019; Boureau, Ponce, LeCun 2010).
* A piecewise-smooth map whose Jacobian has spectral norm above 1 at some point is not 1-Lipschitz; the
  script uses this to show that the broken model really is broken, not merely loosely bounded.

Everything is seeded and single-threaded, so two runs write the same files byte for byte.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils import parametrize

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
IMAGE_SIZE = 8
EPSILON = 36 / 255
HINGE_MARGIN = 0.3
# The broken model's author keeps the reshaped kernel matrix 1% below norm 1 "for safety".
BROKEN_KERNEL_NORM = 0.99


def seed_everything(seed: int) -> None:
    """Make training reproducible: seeds, deterministic kernels, one thread."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] as (N, 1, 8, 8) float32, split 70/30, stratified, with a fixed seed."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=SEED)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but with fixed zip timestamps, so the file is byte-for-byte reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Layers and norms


class GroupSort2(nn.Module):
    """MaxMin: sort channels (axis 1) in consecutive pairs, ascending; as deel-torchlip's ``group_sort``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_shape = x.shape[:1] + (x.shape[1] // 2, 2) + x.shape[2:]
        pairs = x.view(new_shape)
        low = torch.min(pairs, 2, keepdim=True)[0]
        high = torch.max(pairs, 2, keepdim=True)[0]
        return torch.cat([low, high], dim=2).view(x.shape)


def circular_conv_norm(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Exact L2 operator norm of a stride-1 circular convolution on n x n inputs (Sedghi et al. 2019).

    Differentiable; works in the weight's dtype (float64 for the export-time check).
    """
    k_hat = torch.fft.fft2(weight, s=(n, n))  # (c_out, c_in, n, n): K_hat(omega) for every frequency
    return torch.linalg.matrix_norm(k_hat.permute(2, 3, 0, 1), ord=2).max()


def conv_operator_norm(conv: nn.Conv2d, n: int) -> float:
    """Exact L2 operator norm of ``conv`` (bias dropped, its real padding) on n x n inputs, by dense SVD."""
    c_in = conv.in_channels
    basis = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    dense = nn.Conv2d(c_in, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=False,
                      padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        dense.weight.copy_(conv.weight.double())
        matrix = dense(basis).reshape(c_in * n * n, -1).T
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def kernel_matrix_norm(weight: torch.Tensor) -> float:
    """Spectral norm of the kernel reshaped to (c_out, c_in k k): what ``spectral_norm`` normalises."""
    return float(torch.linalg.matrix_norm(weight.detach().double().reshape(weight.shape[0], -1), ord=2))


class CircularConvNormalizer(nn.Module):
    """Parametrisation dividing a circular conv kernel by its exact operator norm on n x n inputs."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / circular_conv_norm(weight, self.n)


class SpectralNormalizer(nn.Module):
    """Parametrisation dividing a dense weight by its exact spectral norm (SVD)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / torch.linalg.matrix_norm(weight, ord=2)


# ----------------------------------------------------------------------------------------------------------
# Models


def conv_net(first_padding_mode: str) -> nn.Sequential:
    """Conv(1->16) MaxMin Conv(16->32) MaxMin L2Pool(2) Flatten Linear(512->10); 3x3 kernels, padding 1."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1, padding_mode=first_padding_mode)),
        ("act1", GroupSort2()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1, padding_mode="circular")),
        ("act2", GroupSort2()),
        ("pool", nn.LPPool2d(2, 2, stride=2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(32 * 4 * 4, 10)),
    ]))


def dense_net() -> nn.Sequential:
    """Flatten Linear(64->128) MaxMin Linear(128->64) MaxMin Linear(64->10)."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64, 128)),
        ("act1", GroupSort2()),
        ("fc2", nn.Linear(128, 64)),
        ("act2", GroupSort2()),
        ("fc3", nn.Linear(64, 10)),
    ]))


def conv_spec(first_padding_mode: str) -> list[dict]:
    """The lipcert-arch layers of :func:`conv_net`."""
    return [
        {"type": "conv", "weight": "conv1.weight", "bias": "conv1.bias", "padding": 1,
         "padding_mode": first_padding_mode},
        {"type": "maxmin"},
        {"type": "conv", "weight": "conv2.weight", "bias": "conv2.bias", "padding": 1,
         "padding_mode": "circular"},
        {"type": "maxmin"},
        {"type": "l2pool", "kernel": 2, "stride": 2},
        {"type": "flatten"},
        {"type": "linear", "weight": "fc.weight", "bias": "fc.bias"},
    ]


def dense_spec() -> list[dict]:
    """The lipcert-arch layers of :func:`dense_net`."""
    return [
        {"type": "flatten"},
        {"type": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
        {"type": "maxmin"},
        {"type": "linear", "weight": "fc2.weight", "bias": "fc2.bias"},
        {"type": "maxmin"},
        {"type": "linear", "weight": "fc3.weight", "bias": "fc3.bias"},
    ]


def run_spec(layers: list[dict], tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate a lipcert-arch layer list (the types used here only), to check that a spec is right."""
    for layer in layers:
        kind = layer["type"]
        if kind == "conv":
            pad, mode = layer["padding"], layer["padding_mode"]
            if mode != "zeros":
                x, pad = nn.functional.pad(x, (pad,) * 4, mode=mode), 0
            x = nn.functional.conv2d(x, tensors[layer["weight"]], tensors[layer["bias"]], padding=pad)
        elif kind == "maxmin":
            x = GroupSort2()(x)
        elif kind == "l2pool":
            x = nn.functional.lp_pool2d(x, 2, layer["kernel"], layer["stride"])
        elif kind == "flatten":
            x = x.flatten(1)
        elif kind == "linear":
            x = nn.functional.linear(x, tensors[layer["weight"]], tensors[layer["bias"]])
        else:
            raise ValueError(f"layer type {kind!r} not handled here")
    return x


# ----------------------------------------------------------------------------------------------------------
# Training


def hinge_loss(logits: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Multiclass hinge: mean over samples of sum_{j != y} relu(margin - (z_y - z_j))."""
    true = logits.gather(1, y[:, None])
    terms = torch.relu(margin - (true - logits))
    return (terms.sum(1) - margin).mean()  # the j = y term is exactly `margin`


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    """Adam with cosine learning-rate decay, mini-batches of 64, multiclass hinge loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for idx in perm.split(64):
            loss = hinge_loss(model(x[idx]), y[idx], HINGE_MARGIN)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def bake(model: nn.Module, exact_norms: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Remove every parametrisation (keeping its value), then divide each named weight by its exact norm.

    ``exact_norms`` maps a module name to a function of its float64 weight returning the norm to divide by.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    with torch.no_grad():
        for name, norm_of in exact_norms.items():
            weight = model.get_submodule(name).weight
            weight.copy_((weight.double() / norm_of(weight.double())).float())


def circular_norm_8(weight: torch.Tensor) -> torch.Tensor:
    """:func:`circular_conv_norm` on 8 x 8 inputs."""
    return circular_conv_norm(weight, IMAGE_SIZE)


def spectral_norm_exact(weight: torch.Tensor) -> torch.Tensor:
    """Exact spectral norm of a matrix."""
    return torch.linalg.matrix_norm(weight, ord=2)


def broken_kernel_norm(weight: torch.Tensor) -> torch.Tensor:
    """What the broken model's author divides by: the kernel-matrix norm over the 0.99 safety target."""
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2) / BROKEN_KERNEL_NORM


def report_norms(model: nn.Module) -> None:
    """Print the float64 norm of every stored float32 weight (operator norms on 8 x 8 for convs)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            print(f"  {name}: operator norm {conv_operator_norm(module, IMAGE_SIZE):.9f}, "
                  f"kernel-matrix norm {kernel_matrix_norm(module.weight):.9f}")
        elif isinstance(module, nn.Linear):
            print(f"  {name}: spectral norm {kernel_matrix_norm(module.weight):.9f}")


# ----------------------------------------------------------------------------------------------------------
# Evaluation and export


def max_jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """Largest spectral norm of the logits' Jacobian over the points ``x``: a lower bound on the model's
    Lipschitz constant."""

    def logits(sample: torch.Tensor) -> torch.Tensor:
        return model(sample[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(logits))(x).reshape(len(x), 10, -1)
    return float(torch.linalg.matrix_norm(jac.detach().double(), ord=2).max())


def accuracies(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Clean accuracy, and certified accuracy at EPSILON for a 1-Lipschitz logit map (margin / sqrt 2)."""
    true = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    margin = true - others.max(1)
    return float((margin > 0).mean()), float((margin / math.sqrt(2) > EPSILON).mean())


def export_onnx(model: nn.Module, path: Path, description: str) -> onnx.ModelProto:
    """Export to ONNX (opset 17, dynamic batch), add lipcert metadata, re-save with embedded weights."""
    dummy = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():  # the TorchScript exporter is asked for on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    props = {"lipcert.claimed_lipschitz": "1.0", "lipcert.description": description}
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def export_safetensors(model: nn.Module, layers: list[dict], path: Path) -> dict[str, torch.Tensor]:
    """Save the float32 weights with the lipcert-arch spec in ``__metadata__["lipcert.arch"]``."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    used = {layer[key] for layer in layers for key in ("weight", "bias") if key in layer}
    assert used == set(tensors), f"spec uses {sorted(used)}, model has {sorted(tensors)}"
    spec = {"format": "lipcert-arch", "version": 1, "input_shape": [1, IMAGE_SIZE, IMAGE_SIZE],
            "claimed_lipschitz": 1.0, "layers": layers}
    save_file(tensors, str(path), metadata={"lipcert.arch": json.dumps(spec)})
    return tensors


def export_and_check(model: nn.Module, name: str, layers: list[dict], description: str,
                     x_te: torch.Tensor, y_te: torch.Tensor) -> float:
    """Write ``name``.onnx and ``name``.safetensors; check both against torch; print accuracies and ops.

    Returns the largest Jacobian norm over the test set.
    """
    onnx_path, st_path = OUT_DIR / f"{name}.onnx", OUT_DIR / f"{name}.safetensors"
    proto = export_onnx(model, onnx_path, description)
    tensors = export_safetensors(model, layers, st_path)
    with torch.no_grad():
        expected = model(x_te).numpy()
        from_spec = run_spec(layers, tensors, x_te).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x_te.numpy()})[0]
    ort_diff = float(np.abs(got - expected).max())
    spec_diff = float(np.abs(from_spec - expected).max())
    assert ort_diff < 1e-5, f"{name}: onnxruntime differs from torch by {ort_diff}"
    assert spec_diff < 1e-5, f"{name}: the arch spec differs from torch by {spec_diff}"
    clean, certified = accuracies(got, y_te.numpy())
    jac_norm = max_jacobian_norm(model, x_te)
    print(f"{name}: test accuracy {clean:.4f}, certified accuracy at 36/255 if 1-Lipschitz {certified:.4f}; "
          f"max |onnxruntime - torch| {ort_diff:.2e}, max |spec - torch| {spec_diff:.2e}")
    print(f"  largest Jacobian norm over the test set: {jac_norm:.6f}")
    print(f"  ONNX ops: {[n.op_type for n in proto.graph.node]}")
    return jac_norm


def main() -> None:
    """Train, export and check the three sample models."""
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_data()
    save_npz(OUT_DIR / "digits_test.npz", {"x": x_te.numpy(), "y": y_te.numpy()})

    seed_everything(SEED)
    conv = conv_net("circular")
    for layer in (conv.conv1, conv.conv2):
        parametrize.register_parametrization(layer, "weight", CircularConvNormalizer(IMAGE_SIZE))
    parametrize.register_parametrization(conv.fc, "weight", SpectralNormalizer())
    train(conv, x_tr, y_tr, epochs=60, lr=1e-2)
    bake(conv, {"conv1": circular_norm_8, "conv2": circular_norm_8, "fc": spectral_norm_exact})
    for layer in (conv.conv1, conv.conv2):
        fft_norm = float(circular_norm_8(layer.weight.detach().double()))
        assert abs(fft_norm - conv_operator_norm(layer, IMAGE_SIZE)) < 1e-9, "DFT and dense norms disagree"
    report_norms(conv)
    jac_norm = export_and_check(
        conv, "digits_conv", conv_spec("circular"),
        "1-Lipschitz (L2) conv net on 8x8 digits: circular convs divided by their exact operator norm, "
        "MaxMin, L2-norm pooling, linear divided by its spectral norm", x_te, y_te)
    assert jac_norm <= 1.0 + 1e-5

    seed_everything(SEED)
    dense = dense_net()
    for layer in ("fc1", "fc2", "fc3"):
        parametrize.register_parametrization(getattr(dense, layer), "weight", SpectralNormalizer())
    train(dense, x_tr, y_tr, epochs=60, lr=1e-2)
    bake(dense, {layer: spectral_norm_exact for layer in ("fc1", "fc2", "fc3")})
    report_norms(dense)
    jac_norm = export_and_check(
        dense, "digits_dense", dense_spec(),
        "1-Lipschitz (L2) dense net on 8x8 digits: linear layers divided by their exact spectral norm, "
        "MaxMin activations", x_te, y_te)
    assert jac_norm <= 1.0 + 1e-5

    seed_everything(SEED)
    broken = conv_net("zeros")
    torch.nn.utils.parametrizations.spectral_norm(broken.conv1)
    parametrize.register_parametrization(broken.conv2, "weight", CircularConvNormalizer(IMAGE_SIZE))
    parametrize.register_parametrization(broken.fc, "weight", SpectralNormalizer())
    train(broken, x_tr, y_tr, epochs=60, lr=1e-2)
    bake(broken, {"conv1": broken_kernel_norm, "conv2": circular_norm_8, "fc": spectral_norm_exact})
    op_norm, mat_norm = conv_operator_norm(broken.conv1, IMAGE_SIZE), kernel_matrix_norm(broken.conv1.weight)
    print(f"digits_broken conv1 (zero padding): operator norm on 8x8 {op_norm:.6f}, "
          f"kernel-matrix norm {mat_norm:.6f}")
    assert op_norm > 1.05 and mat_norm < 1.0, "the broken model is not broken the intended way"
    report_norms(broken)
    jac_norm = export_and_check(
        broken, "digits_broken", conv_spec("zeros"),
        "claims 1-Lipschitz but is NOT: conv1 (zero padding) was normalised with torch spectral_norm on the "
        "reshaped kernel, and its operator norm on 8x8 is above 1", x_te, y_te)
    assert jac_norm > 1.0, "the broken model should have a Jacobian norm above 1 somewhere"
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
