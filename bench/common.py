"""What every benchmark shares: the machine line it records, a timer, the CIFAR-shaped 1-Lipschitz model."""

from __future__ import annotations

import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
CHANNELS = [3, 32, 64, 64, 128, 128]


def machine(device: str) -> str:
    """CPU model, cores, memory, GPU (when used) and library versions, for the line under each table."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "") if cpuinfo.exists() else platform.processor()
    meminfo = Path("/proc/meminfo")
    mem = next((int(line.split()[1]) / 2**20 for line in meminfo.read_text().splitlines()
                if line.startswith("MemTotal")), 0.0) if meminfo.exists() else 0.0
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU used"
    import onnxruntime

    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores ({torch.get_num_threads()} torch threads), "
            f"{mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[T, float]:
    """The value of ``fn()`` and its best wall time over ``repeat`` calls, in seconds."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best  # type: ignore[return-value]


def cifar_model() -> torch.nn.Module:
    """Five orthogonium convolutions at 32x32 (3 -> 128 channels, circular/zero padding), MaxMin, deel-torchlip's
    ScaledL2NormPool2d and two OrthoLinear layers; parametrizations baked into plain weights, as shipped."""
    from deel.torchlip import ScaledL2NormPool2d
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (cin, cout) in enumerate(zip(CHANNELS, CHANNELS[1:])):
        layers += [AdaptiveOrthoConv2d(cin, cout, 3, padding="same",
                                       padding_mode="circular" if i % 2 == 0 else "zeros"), MaxMin()]
    layers += [ScaledL2NormPool2d(kernel_size=8), torch.nn.Flatten(), OrthoLinear(128 * 4 * 4, 256), MaxMin(),
               OrthoLinear(256, 10)]
    return _baked(torch.nn.Sequential(*layers))


def imagenet_model() -> torch.nn.Module:
    """The same building blocks at 224x224: five stride-2 orthogonium convolutions (3 -> 256 channels, 224 -> 7),
    MaxMin, ScaledL2NormPool2d(7) and OrthoLinear 256 -> 1000; parametrizations baked in."""
    from deel.torchlip import ScaledL2NormPool2d
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for cin, cout in zip([3, 32, 64, 128, 256], [32, 64, 128, 256, 256]):
        layers += [AdaptiveOrthoConv2d(cin, cout, 3, stride=2, padding=1, padding_mode="zeros"), MaxMin()]
    layers += [ScaledL2NormPool2d(kernel_size=7), torch.nn.Flatten(), OrthoLinear(256, 1000)]
    return _baked(torch.nn.Sequential(*layers))


def _baked(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every parametrization replaced by its current plain weight."""
    import torch.nn.utils.parametrize as parametrize

    model = model.eval()
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name)
    return model


def export(model: torch.nn.Module, path: Path, input_shape: tuple[int, ...] = (3, 32, 32)) -> Path:
    """``model`` as an ONNX file with a free batch dimension (torch's TorchScript exporter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, *input_shape),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    return path


def append_markdown(text: str, path: Path | None) -> None:
    """Print ``text`` and append it to ``path`` when one is given."""
    print(text)
    if path is not None:
        with path.open("a") as f:
            f.write(text + "\n")
