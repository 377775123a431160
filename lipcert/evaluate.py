"""Stream a dataset through the model and certify every sample: the engine behind ``lipcert report``.

Batches are read in a background thread (bounded queue) while the device computes; on a GPU they are
copied from pinned memory without blocking. ONNX models can run through onnxruntime or lipcert's torch
executor; ``backend="auto"`` times both on the first batch and keeps the faster one.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .certify import Certificates, CertificateSetup, certify_logits, float_error_scale, pair_norms
from .data import Batch, Dataset, read_batches
from .errors import ConfigError, DataError
from .executor import GraphModule, in_fixed_batches
from .graph import Graph
from .verify import propagate

BACKENDS = ("auto", "torch", "onnxruntime")
PREFETCH = 2
T = TypeVar("T")


@dataclass
class BoundInfo:
    """The Lipschitz bound a report certifies with, where it comes from, and the input-space factor."""

    value: float
    method: str
    computed_upper: float
    declared: float | None
    normalisation_factor: float
    rule: str
    error_scale: float
    depth: int
    max_fan_in: int


def _fan_in(graph: Graph) -> int:
    """The longest sum any layer computes per output (conv window x channels, dense inputs, pool windows)."""
    best = 1
    for node in graph.nodes:
        weight = graph.params.get(node.inputs[1]) if len(node.inputs) > 1 else None
        in_shape = graph.value_shapes.get(node.inputs[0]) if node.inputs else None
        if node.op == "Conv" and weight is not None:
            best = max(best, int(weight[0].numel()))
        elif node.op == "ConvTranspose" and weight is not None:
            best = max(best, int(weight.numel() // max(1, weight.shape[1])))
        elif node.op in ("Gemm", "MatMul") and weight is not None:
            best = max(best, int(weight.shape[0] if node.op == "MatMul" or not node.attr("transB", 0)
                                 else weight.shape[1]))
        elif node.op in ("AveragePool", "LpPool") and node.attr("kernel_shape"):
            best = max(best, math.prod(node.attr("kernel_shape")))
        elif node.op in ("ReduceMin", "ReduceMax", "GlobalMaxPool"):
            continue  # a min or max is exact in floating point, like MaxPool: no rounding error to bound
        elif (node.op.startswith("Reduce") or node.op.startswith("Global")) and in_shape is not None:
            best = max(best, math.prod(in_shape))
    return best


def certificate_setup(graph: Graph, *, device: str = "cpu", declared: float | None = None,
                      std: Sequence[float] | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[CertificateSetup, BoundInfo]:
    """The sound bound (or the user's declared one, stated as such) in pixel space, and the per-pair head."""
    prop = propagate(graph, device=device, lower_bounds=False)
    computed = prop.upper
    factor = 1.0 / min(std) if std else 1.0
    value = declared if declared is not None else computed
    method = ("declared by the user (--lipschitz), not verified" if declared is not None
              else "computed sound upper bound (lipcert verify)")
    head_weight, head_lip = None, None
    last = prop.steps[-1] if prop.steps else None
    if declared is None and last is not None and last.kind == "linear" and last.output == graph.output:
        op = last.operator
        if op.kind == "matrix":
            matrix = op.structure["matrix"].double()
            if matrix.shape == (op.out_numel, op.in_numel) and len(op.out_shape) == 1:
                head_weight, head_lip = matrix, prop.bounds.get(last.inputs[0], math.inf) * factor
    depth = sum(1 for s in prop.steps if s.kind != "none")
    fan_in = _fan_in(graph)
    scale = float_error_scale(depth, fan_in, dtype)
    rule = "per-pair (last dense layer) and sqrt(2), the larger" if head_weight is not None else "sqrt(2) margin"
    if graph.value_shapes.get(graph.output, (2,))[-1] == 1:
        rule = "binary |z| / L"
    setup = CertificateSetup(lipschitz=value * factor, head_lipschitz=head_lip, head_weight=head_weight,
                             error_scale=scale)
    info = BoundInfo(value=value * factor, method=method, computed_upper=computed * factor, declared=declared,
                     normalisation_factor=factor, rule=rule, error_scale=scale, depth=depth, max_fan_in=fan_in)
    return setup, info


def _prefetch(batches: Iterator[T]) -> Iterator[T]:
    """Read batches in a background thread, at most PREFETCH ahead; errors are raised in the consumer.

    When the consumer stops early (an error, or the generator closed), the reader is closed in its thread, so
    that a dataset's decoding processes end with the run.
    """
    q: queue.Queue = queue.Queue(maxsize=PREFETCH)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in batches:
                if not put(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put(exc)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Runner:
    """Runs the model on a batch of pixel-space inputs (normalised first when asked) and returns logits."""

    def __init__(self, graph: Graph, backend: str, device: str, mean: torch.Tensor | None,
                 std: torch.Tensor | None) -> None:
        self.graph, self.backend, self.device = graph, backend, device
        self.mean, self.std = mean, std
        if backend == "torch":
            self.module = GraphModule(graph).to(device).eval()
        else:
            from .crosscheck import ort_session

            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
            self.session = ort_session(graph.onnx_model, providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        if self.backend == "torch":
            with torch.inference_mode():
                return self.module(x)
        def run(chunk: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.session.run(None, {self.graph.input_name: chunk.cpu().numpy()})[0])

        return in_fixed_batches(run, x, self.graph.fixed_batch).to(x.device)


def _time(runner: Runner, x: torch.Tensor) -> float:
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def choose_backend(graph: Graph, requested: str, device: str, sample: torch.Tensor, mean, std) -> Runner:
    """The requested backend, or for ``auto`` the faster of torch and onnxruntime on one batch."""
    if requested not in BACKENDS:
        raise ConfigError(f"--backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested != "auto":
        if requested == "onnxruntime" and graph.onnx_model is None:
            raise ConfigError("--backend onnxruntime needs an ONNX model")
        return Runner(graph, requested, device, mean, std)
    candidates = [Runner(graph, "torch", device, mean, std)]
    if graph.onnx_model is not None:
        candidates.append(Runner(graph, "onnxruntime", device, mean, std))
    if len(candidates) == 1:
        return candidates[0]
    return min(candidates, key=lambda r: _time(r, sample))


class Engine:
    """Certifies batches: normalisation, the chosen backend, the certificate rule; and the attack's model."""

    def __init__(self, graph: Graph, setup: CertificateSetup, *, device: str = "cpu", backend: str = "auto",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        channels = graph.input_shape[0] if graph.input_shape else 1
        self.mean = self.std = None
        if mean is not None or std is not None:
            if mean is None or std is None or len(mean) != len(std) or len(mean) not in (1, channels):
                raise ConfigError(f"--mean and --std need 1 or {channels} values each")
            if min(std) <= 0:
                raise ConfigError("--std values must be positive")
            view = (1, -1) + (1,) * (len(graph.input_shape) - 1)
            self.mean = torch.tensor(mean, dtype=torch.float32).reshape(view)
            self.std = torch.tensor(std, dtype=torch.float32).reshape(view)
        self.graph, self.setup, self.device, self.requested = graph, setup, device, backend
        self.pairs = pair_norms(setup.head_weight).to(device) if setup.head_weight is not None else None
        self.runner: Runner | None = None
        self.seconds = 0.0
        self._attack_module: GraphModule | None = None

    @property
    def backend(self) -> str:
        return self.runner.backend if self.runner else self.requested

    def batch_size(self, requested: int) -> int:
        """The batch size to use: at least 1, a multiple of a fixed batch the model may declare."""
        if requested < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {requested}")
        fixed = self.graph.fixed_batch
        return max(fixed, requested // fixed * fixed) if fixed else requested

    def batches(self, dataset: Dataset, batch_size: int, first: int = 0, last: int | None = None, *,
                skip_bad_samples: bool = False,
                num_classes: int | None = None) -> Iterator[tuple[int, torch.Tensor, Batch, Certificates]]:
        """(batch index, x on the device, the batch read, certificates) for batches [first, last) of ``dataset``.

        ``skip_bad_samples`` leaves out bad samples (see ``read_batches``); a batch may then hold none.
        """
        stop = None if last is None else last * batch_size
        pin = self.device.startswith("cuda")
        index = first
        for batch in _prefetch(read_batches(dataset, batch_size, first * batch_size, stop,
                                            skip_bad_samples=skip_bad_samples, num_classes=num_classes)):
            xb, yb = batch.x, batch.y
            x = torch.from_numpy(xb)
            if not len(yb):
                empty = torch.empty(0, dtype=torch.float64)
                yield index, x, batch, Certificates(torch.empty(0, dtype=torch.int64), empty, empty, empty)
                index += 1
                continue
            x = (x.pin_memory() if pin else x).to(self.device, non_blocking=True)
            if self.runner is None:
                self.runner = choose_backend(self.graph, self.requested, self.device, x, self.mean, self.std)
            began = time.perf_counter()
            logits = self.runner(x).reshape(x.shape[0], -1)
            if not torch.isfinite(logits).all():
                raise DataError(f"the model gives NaN or Inf logits in the batch of samples {batch.indices[0]} to "
                                f"{batch.indices[-1]}", source=dataset.info.path)
            cert = certify_logits(logits, x.flatten(1).double().norm(dim=1), self.setup, self.pairs)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - began
            yield index, x, batch, cert
            index += 1

    def attack_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The differentiable float32 model in pixel space (through the normalisation) that PGD attacks."""
        if self._attack_module is None:
            self._attack_module = GraphModule(self.graph).to(self.device).eval()
        module, mean, std = self._attack_module, self.mean, self.std

        def forward(x: torch.Tensor) -> torch.Tensor:
            z = x if mean is None else (x - mean.to(x)) / std.to(x)
            return module(z).reshape(x.shape[0], -1)

        return forward
