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

from .analysis import Step
from .certify import Certificates, CertificateSetup, certify_logits, pair_norms
from .data import Batch, Dataset, read_batches
from .errors import ConfigError, DataError, ModelError
from .executor import GraphModule, full_precision, in_fixed_batches
from .graph import Graph
from .empirical import jacobian_lower_bound
from .rounding import Affine, gamma, plan as error_plan
from .verify import check_network, propagate

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
    error_base: float  # the deployed logits err by at most error_base + error_slope R, R = ||x|| + radius
    error_slope: float


#: a last dense layer is materialised for the per-pair rule up to this many entries
HEAD_MAX_ENTRIES = 2 ** 24
#: power-iteration steps per layer in report's self-check (any step gives a valid lower estimate)
CHECK_ITERATIONS = 30
#: points and Jacobian power-iteration steps of report's network self-check
CHECK_POINTS, CHECK_JACOBIAN_STEPS = 4, 10


def head_rows(step: Step) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of the last linear step's matrix, one per logit in the output's own order (taken from the
    operator's adjoint, so a reshape or transpose after the dense layer is accounted for), and a bound on
    each computed row's float64 rounding error (gamma of the accumulations times its |A| row)."""
    op = step.operator
    if op.out_numel * op.in_numel > HEAD_MAX_ENTRIES or not step.parts:
        return None
    eye = torch.eye(op.out_numel, dtype=torch.float64).reshape((op.out_numel,) + tuple(op.out_shape))
    with torch.no_grad():
        rows = op.adjoint(eye).reshape(op.out_numel, -1)
        if any(p.rounding is None or p.rounding.abs_op is None for p in step.parts):
            return rows, torch.full((op.out_numel,), math.inf, dtype=torch.float64)
        absolute = step.parts[0].rounding.abs_op
        for part in step.parts[1:]:
            absolute = absolute.then(part.rounding.abs_op)
        magnitude = absolute.adjoint(eye).reshape(op.out_numel, -1).norm(dim=1)
    terms = sum(p.rounding.terms + 4 for p in step.parts)
    return rows, magnitude * gamma(terms, 2.0 ** -53)


def certificate_setup(graph: Graph, *, device: str = "cpu", declared: float | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      dtype: torch.dtype = torch.float32, points: torch.Tensor | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> tuple[CertificateSetup, BoundInfo]:
    """The sound bound (or the user's declared one, stated as such) in pixel space, the per-pair head, and
    the float error allowance; ``mean``/``std`` is the normalisation applied before the model.

    It runs the self-checks of ``verify`` first (power iteration below each layer's upper bound, and a measured
    Jacobian norm at ``points``, or random points, below the network bound): a contradiction raises
    ``SelfCheckError`` and nothing is certified. ``progress(phase, done, total)`` follows the layer bounds."""
    if (mean is None) != (std is None) or (std is not None and len(mean) != len(std)):
        raise ConfigError("--mean and --std need the same number of values, and one needs the other")
    prop = propagate(graph, device=device, lower_bounds=True, max_iter=CHECK_ITERATIONS, progress=progress)
    computed = prop.upper
    if math.isfinite(computed):
        if points is None:
            points = torch.rand((CHECK_POINTS,) + tuple(graph.input_shape), generator=torch.Generator().manual_seed(0))
        module = GraphModule(graph).to(device=device, dtype=torch.float64)
        found = jacobian_lower_bound(module, points[:CHECK_POINTS].to(device=device, dtype=torch.float64),
                                     iters=CHECK_JACOBIAN_STEPS)
        check_network(found.value, computed, found.method)
    factor = 1.0 / min(std) if std else 1.0
    value = declared if declared is not None else computed
    method = ("declared by the user (--lipschitz), not verified" if declared is not None
              else "computed sound upper bound (lipcert verify)")
    head_weight, head_lip, row_error = None, None, None
    last = prop.steps[-1] if prop.steps else None
    if declared is None and last is not None and last.kind == "linear" and last.output == graph.output:
        head = head_rows(last)
        if head is not None:
            (head_weight, row_error), head_lip = head, prop.bounds.get(last.inputs[0], math.inf) * factor
    errors = error_plan(graph, prop.steps, prop.bounds, dtype=dtype, mean=mean, std=std)
    error = errors.evaluate()
    rule = "per-pair (last dense layer) and sqrt(2), the larger" if head_weight is not None else "sqrt(2) margin"
    if math.prod(graph.value_shapes.get(graph.output, (2,))) == 1:
        rule = "binary |z| / L"
    setup = CertificateSetup(lipschitz=value * factor, head_lipschitz=head_lip, head_weight=head_weight,
                             head_row_error=row_error, error_base=error.base, error_slope=error.slope,
                             error_plan=errors)
    info = BoundInfo(value=value * factor, method=method, computed_upper=computed * factor, declared=declared,
                     normalisation_factor=factor, rule=rule, error_base=error.base, error_slope=error.slope)
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
    """Runs the model on a batch of pixel-space inputs (normalised first when asked): the logits, and the
    per-sample norms of the values the float error analysis reads (None when the backend cannot give them)."""

    def __init__(self, graph: Graph, backend: str, device: str, mean: torch.Tensor | None,
                 std: torch.Tensor | None, measure: Sequence[str] = ()) -> None:
        self.graph, self.backend, self.device = graph, backend, device
        self.mean, self.std = mean, std
        self.measure = set(measure)
        if backend == "torch":
            self.module = GraphModule(graph).to(device).eval()
        else:
            from .crosscheck import ort_session, with_outputs

            model = graph.onnx_model
            produced = {o for node in model.graph.node for o in node.output} | {graph.input_name}
            if not self.measure <= produced:
                self.measure = set()  # names lipcert rewrote: certify around the zero image instead
            self.fetch = sorted(self.measure - {graph.input_name})
            providers = ([("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
                         if device.startswith("cuda") else None)
            try:
                self.session = ort_session(with_outputs(model, self.fetch) if self.fetch else model, providers)
            except Exception:  # noqa: BLE001 - onnxruntime refuses some intermediate outputs: measure nothing
                self.measure, self.fetch = set(), []
                self.session = ort_session(model, providers)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        if self.backend == "torch":
            with torch.inference_mode(), full_precision():
                if not self.measure:
                    return self.module(x), None
                return self.module.forward_norms(x, self.measure)
        norms: dict[str, list[torch.Tensor]] = {}

        def run(chunk: torch.Tensor) -> torch.Tensor:
            outputs = self.session.run([self.graph.output] + self.fetch, {self.graph.input_name: chunk.cpu().numpy()})
            for name, value in zip(self.fetch, outputs[1:]):
                norms.setdefault(name, []).append(_norms(torch.from_numpy(value)))
            return torch.from_numpy(outputs[0])

        logits = in_fixed_batches(run, x, self.graph.fixed_batch).to(x.device)
        if not self.measure:
            return logits, None
        found = {name: torch.cat(parts)[: x.shape[0]] for name, parts in norms.items()}
        if self.graph.input_name in self.measure:
            found[self.graph.input_name] = _norms(x)
        return logits, found


def _norms(values: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 L2 norms (on the CPU)."""
    return torch.linalg.vector_norm(values.detach().reshape(values.shape[0], -1).double(), dim=1).cpu()


def _time(runner: Runner, x: torch.Tensor) -> float:
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def choose_backend(graph: Graph, requested: str, device: str, sample: torch.Tensor, mean, std,
                   measure: Sequence[str] = ()) -> Runner:
    """The requested backend, or for ``auto`` the faster of torch and onnxruntime on one batch."""
    if requested not in BACKENDS:
        raise ConfigError(f"--backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested != "auto":
        if requested == "onnxruntime" and graph.onnx_model is None:
            raise ConfigError("--backend onnxruntime needs an ONNX model")
        return Runner(graph, requested, device, mean, std, measure)
    candidates = [Runner(graph, "torch", device, mean, std, measure)]
    if graph.onnx_model is not None:
        candidates.append(Runner(graph, "onnxruntime", device, mean, std, measure))
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
        self.pairs = (pair_norms(setup.head_weight, setup.head_row_error).to(device)
                      if setup.head_weight is not None else None)
        self.measure = setup.error_plan.needed if setup.error_plan is not None else ()
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
                self.runner = choose_backend(self.graph, self.requested, self.device, x, self.mean, self.std,
                                             self.measure)
            began = time.perf_counter()
            logits, norms = self.runner(x)
            logits = logits.reshape(x.shape[0], -1)
            if not torch.isfinite(logits).all():
                raise DataError(f"the model gives NaN or Inf logits in the batch of samples {batch.indices[0]} to "
                                f"{batch.indices[-1]}", source=dataset.info.path)
            x_norm = _norms(x)
            error = self.error(x_norm, norms)
            self._check_alone(x, logits, error, batch.indices[0])
            cert = certify_logits(logits, x_norm.to(logits.device), self.setup, self.pairs, error)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - began
            yield index, x, batch, cert
            index += 1

    def error(self, x_norm: torch.Tensor, norms: dict[str, torch.Tensor] | None) -> Affine:
        """The float error allowance of each sample of a batch: base (per sample, at the sample itself) +
        slope x radius. Around each sample when the backend measured its values, else around the zero image."""
        plan = self.setup.error_plan
        if plan is not None and norms is not None and math.isfinite(self.setup.lipschitz):
            return plan.evaluate(norms)
        return Affine(self.setup.error_base + self.setup.error_slope * x_norm.double(), self.setup.error_slope)

    def _check_alone(self, x: torch.Tensor, logits: torch.Tensor, error: Affine, index: int) -> None:
        """The first sample run on its own must give its logits in the batch, up to twice the float error
        allowance: a model whose output depends on the rest of its batch (or on the batch size) is refused."""
        if x.shape[0] < 2 or not math.isfinite(self.setup.lipschitz):
            return
        alone, _ = self.runner(x[:1])
        gap = float((alone.reshape(1, -1).double() - logits[:1].double()).norm())
        base = error.base[0] if isinstance(error.base, torch.Tensor) and error.base.dim() else error.base
        if not gap <= 2 * float(base) + 1e-30:
            raise ModelError(f"sample {index} gives different logits alone and in its batch of {x.shape[0]} "
                             f"(by {gap:.3g}, more than rounding explains): the model's output depends on the "
                             "other samples or on the batch size, so no per-sample certificate holds",
                             source=self.graph.source)

    def attack_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The differentiable float32 model in pixel space (through the normalisation) that PGD attacks."""
        if self._attack_module is None:
            self._attack_module = GraphModule(self.graph).to(self.device).eval()
        module, mean, std = self._attack_module, self.mean, self.std

        def forward(x: torch.Tensor) -> torch.Tensor:
            z = x if mean is None else (x - mean.to(x)) / std.to(x)
            with full_precision():
                return module(z).reshape(x.shape[0], -1)

        return forward
