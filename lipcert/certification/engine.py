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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import torch

from lipcert.bounds.rounding import UNIT_ROUNDOFF, Affine
from lipcert.certification.local import LocalCertifier
from lipcert.certification.radii import (
    Certificates,
    CertificateSetup,
    certificates_from_logits,
    pair_norms,
    sample_norms,
)
from lipcert.data import Batch, Dataset, Labels, read_batches
from lipcert.errors import DataError, ModelError
from lipcert.graph.core import Graph
from lipcert.graph.executor import GraphModule, full_precision, in_fixed_batches
from lipcert.model.crosscheck import CrossCheck, check_points, ort_session, unit_directions, with_outputs

PREFETCH = 2
#: samples of a run's data (and points on their certified balls) compared with onnxruntime value by value
CROSSCHECK_SAMPLES = 8
T = TypeVar("T")


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
            model = graph.onnx_model
            produced = {o for node in model.graph.node for o in node.output} | {graph.input_name}
            if not self.measure <= produced:
                self.measure = set()  # names lipcert rewrote: certify around the zero image instead
            self.fetch = sorted(self.measure - {graph.input_name})
            # onnxruntime takes a provider with its options as (name, options); ort_session's annotation
            # (lipcert/model/crosscheck.py) names only list[str]: the ignores below go once it is widened
            providers: list[str | tuple[str, dict[str, int]]] | None = (
                [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"] if device.startswith("cuda")
                else None)
            try:
                self.session = ort_session(with_outputs(model, self.fetch) if self.fetch else model, providers)
            except Exception:  # noqa: BLE001 - onnxruntime refuses some intermediate outputs: measure nothing
                self.measure, self.fetch = set(), []
                self.session = ort_session(model, providers)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.mean is not None and self.std is not None:  # ``normalisation`` gives both or neither
            x = (x - self.mean.to(x)) / self.std.to(x)
        if self.backend == "torch":
            with torch.inference_mode(), full_precision():
                if not self.measure:
                    return self.module(x), None
                return self.module.forward_norms(x, self.measure)
        norms: dict[str, list[torch.Tensor]] = {}

        def run(chunk: torch.Tensor) -> torch.Tensor:
            outputs = self.session.run([self.graph.output] + self.fetch, {self.graph.input_name: chunk.cpu().numpy()})
            for name, value in zip(self.fetch, outputs[1:], strict=False):
                norms.setdefault(name, []).append(sample_norms(torch.from_numpy(value).double()).cpu())
            return torch.from_numpy(outputs[0])

        logits = in_fixed_batches(run, x, self.graph.fixed_batch).to(x.device)
        if not self.measure:
            return logits, None
        found = {name: torch.cat(parts)[: x.shape[0]] for name, parts in norms.items()}
        if self.graph.input_name in self.measure:
            found[self.graph.input_name] = sample_norms(x.detach().double()).cpu()
        return logits, found


def _time(runner: Runner, x: torch.Tensor) -> float:
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    runner(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def choose_backend(graph: Graph, requested: str, device: str, sample: torch.Tensor, mean: torch.Tensor | None,
                   std: torch.Tensor | None, measure: Sequence[str] = ()) -> Runner:
    """The requested backend (one of ``options.BACKENDS``, onnxruntime only for an ONNX model, as
    ``CertifyOptions`` checks), or for ``auto`` the faster of torch and onnxruntime on one batch."""
    if requested != "auto":
        return Runner(graph, requested, device, mean, std, measure)
    candidates = [Runner(graph, "torch", device, mean, std, measure)]
    if graph.onnx_model is not None:
        candidates.append(Runner(graph, "onnxruntime", device, mean, std, measure))
    if len(candidates) == 1:
        return candidates[0]
    return min(candidates, key=lambda r: _time(r, sample))


class Engine:
    """Certifies batches: normalisation, the chosen backend, the certificate rule; and the attack's model.

    Its settings are those ``CertifyOptions`` checked (``certify`` and ``attack`` check them before they make one)."""

    def __init__(self, graph: Graph, setup: CertificateSetup, *, device: str = "cpu", backend: str = "auto",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 local: LocalCertifier | None = None) -> None:
        self.mean, self.std = normalisation(graph, mean, std)
        self.graph, self.setup, self.device, self.requested = graph, setup, device, backend
        #: local certificates, each batch's third radius (None: it is the float32-safe one)
        self.local = local
        self.pairs = (pair_norms(setup.head_weight, setup.head_row_error).to(device)
                      if setup.head_weight is not None else None)
        self.measure = setup.error_plan.needed if setup.error_plan is not None else ()
        #: the float64 run's error bound, around the zero image: base + slope ||x|| at a sample x
        self.exact_error = (replace(setup.error_plan, unit=UNIT_ROUNDOFF[torch.float64]).evaluate()
                            if setup.error_plan is not None else None)
        self._exact_module: GraphModule | None = None
        self.runner: Runner | None = None
        #: whether the executor was compared with onnxruntime on this run's data (``check_against_runtime``)
        self.checked = graph.onnx_model is None
        self.crosscheck: CrossCheck | None = None
        self.seconds = self.crosscheck_seconds = 0.0
        self._attack_model: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def backend(self) -> str:
        return self.runner.backend if self.runner else self.requested

    def batches(self, dataset: Dataset, batch_size: int, first: int = 0, last: int | None = None, *,
                skip_bad_samples: bool = False,
                labels: Labels | None = None) -> Iterator[tuple[int, torch.Tensor, Batch, Certificates]]:
        """(batch index, x on the device, the batch read, certificates) for batches [first, last) of ``dataset``.

        ``skip_bad_samples`` leaves out bad samples (see ``read_batches``); a batch may then hold none. ``labels``
        (from ``check_fits``) turns the labels into class indices.
        """
        stop = None if last is None else last * batch_size
        pin = self.device.startswith("cuda")
        index = first
        for batch in _prefetch(read_batches(dataset, batch_size, first * batch_size, stop,
                                            skip_bad_samples=skip_bad_samples, labels=labels)):
            xb, yb = batch.x, batch.y
            x = torch.from_numpy(xb)
            if not len(yb):
                empty = torch.empty(0, dtype=torch.float64)
                yield index, x, batch, Certificates(torch.empty(0, dtype=torch.int64), empty, empty, empty, empty)
                index += 1
                continue
            x = (x.pin_memory() if pin else x).to(self.device, non_blocking=True)
            if self.runner is None:
                self.runner = choose_backend(self.graph, self.requested, self.device, x, self.mean, self.std,
                                             self.measure)
            runner = self.runner
            began = time.perf_counter()
            logits, norms = runner(x)
            logits = logits.reshape(x.shape[0], -1)
            if not torch.isfinite(logits).all():
                raise DataError(f"the model gives NaN or Inf logits in the batch of samples {batch.indices[0]} to "
                                f"{batch.indices[-1]}", source=dataset.info.path)
            x_norm = sample_norms(x.detach().double()).cpu()  # float64 on the CPU, as the error analysis reads
            error = self.error(x_norm, norms)
            self._check_alone(runner, x, logits, error, batch.indices[0])
            cert = certificates_from_logits(logits, x_norm.to(logits.device), self.setup, self.pairs, error,
                                            self.exact_logits(x, x_norm))
            cert.radius_local = cert.radius if self.local is None else self.local.radii(
                x, cert.prediction, cert.radius, error.base, error.slope).radius.to(cert.radius)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - began
            if not self.checked:
                began = time.perf_counter()
                self.check_against_runtime(x, cert.radius)
                self.crosscheck_seconds = time.perf_counter() - began
            yield index, x, batch, cert
            index += 1

    def check_against_runtime(self, x: torch.Tensor, radius: torch.Tensor, samples: int = CROSSCHECK_SAMPLES,
                              seed: int = 0) -> None:
        """Compare lipcert's executor with onnxruntime, node by node (``crosscheck.check_points``), at the first
        samples of the run's data and at a point on each one's certified ball (at radius 1 where none is
        certified): the certificates are about lipcert's executor, so a mismatch stops the run (ModelError)."""
        x = x[:samples].detach().float().cpu()
        r = radius[:samples].detach().double().cpu()
        r = torch.where(torch.isfinite(r) & (r > 0), r, torch.ones_like(r)).float()
        ball = x + r.reshape((-1,) + (1,) * (x.dim() - 1)) * unit_directions(tuple(x.shape),
                                                                            torch.Generator().manual_seed(seed))

        def model_input(points: torch.Tensor) -> torch.Tensor:
            return points if self.mean is None or self.std is None else (points - self.mean) / self.std

        self.crosscheck = check_points(self.graph, [("the data's first samples", model_input(x)),
                                                    ("points on their certified balls", model_input(ball))])
        if self.crosscheck.adopted:
            raise ModelError(f"onnxruntime computes the folded constant(s) {', '.join(self.crosscheck.adopted)} "
                             "differently from lipcert, after the bound was computed on lipcert's: load the model with "
                             "its cross-check (lipcert.load_model(..., check=True)), which takes onnxruntime's values",
                             source=self.graph.source)
        self.checked = True

    def exact_logits(self, x: torch.Tensor, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits of a float64 run of the graph at the pixel-space batch ``x`` (normalised in float64), and
        a bound per sample on their L2 distance to the exact logits (the error plan at float64's unit roundoff);
        None where the plan cannot bound it. The certificates' second centre: only the ball then needs the
        float32 allowance."""
        err = self.exact_error
        if err is None or not math.isfinite(self.setup.lipschitz) or not math.isfinite(err.base + err.slope):
            return None
        if self._exact_module is None:
            self._exact_module = GraphModule(self.graph).to(device=self.device, dtype=torch.float64).eval()
        z = x.double()
        if self.mean is not None and self.std is not None:
            z = (z - self.mean.to(z)) / self.std.to(z)
        with torch.inference_mode(), full_precision():
            logits = self._exact_module(z).reshape(x.shape[0], -1)
        return logits, err.base + err.slope * x_norm.double()

    def error(self, x_norm: torch.Tensor, norms: dict[str, torch.Tensor] | None) -> Affine:
        """The float error allowance of each sample of a batch: base (per sample, at the sample itself) +
        slope x radius. Around each sample when the backend measured its values, else around the zero image."""
        plan = self.setup.error_plan
        if plan is not None and norms is not None and math.isfinite(self.setup.lipschitz):
            return plan.evaluate(norms)
        return Affine(self.setup.error_base + self.setup.error_slope * x_norm.double(), self.setup.error_slope)

    def _check_alone(self, runner: Runner, x: torch.Tensor, logits: torch.Tensor, error: Affine, index: int) -> None:
        """The first sample run on its own must give its logits in the batch, up to twice the float error
        allowance: a model whose output depends on the rest of its batch (or on the batch size) is refused."""
        if x.shape[0] < 2 or not math.isfinite(self.setup.lipschitz):
            return
        alone, _ = runner(x[:1])
        gap = float((alone.reshape(1, -1).double() - logits[:1].double()).norm())
        if not gap <= 2 * _first_base(error) + 1e-30:
            raise ModelError(f"sample {index} gives different logits alone and in its batch of {x.shape[0]} "
                             f"(by {gap:.3g}, more than rounding explains): the model's output depends on the "
                             "other samples or on the batch size, so no per-sample certificate holds",
                             source=self.graph.source)

    def attack_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The differentiable float32 model in pixel space (through the normalisation) that PGD attacks."""
        if self._attack_model is None:
            self._attack_model = pixel_model(self.graph, self.device, self.mean, self.std)
        return self._attack_model


def _first_base(error: Affine) -> float:
    """The error allowance's base at the batch's first sample (``base`` is one number, or one per sample)."""
    base = error.base
    if isinstance(base, torch.Tensor):
        return float(base[0] if base.dim() else base)
    if isinstance(base, (int, float)):
        return float(base)
    raise TypeError(f"an error allowance's base is a number or a tensor, not {type(base).__name__}")


def pixel_model(graph: Graph, device: str, mean: torch.Tensor | None,
                std: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable float32 model in pixel space: ``mean``/``std`` (shaped to broadcast) normalise first."""
    module = GraphModule(graph).to(device).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = x if mean is None or std is None else (x - mean.to(x)) / std.to(x)
        with full_precision():
            return module(z).reshape(x.shape[0], -1)

    return forward


def normalisation(graph: Graph, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``mean`` and ``std`` as tensors that broadcast over a batch of the model's inputs (None without them)."""
    if mean is None or std is None:
        return None, None
    view = (1, -1) + (1,) * (len(graph.input_shape) - 1)
    return (torch.tensor(mean, dtype=torch.float32).reshape(view),
            torch.tensor(std, dtype=torch.float32).reshape(view))


def fixed_multiple(graph: Graph, requested: int) -> int:
    """The batch size to use: ``requested`` (at least 1), made a multiple of a fixed batch the model may declare."""
    fixed = graph.fixed_batch
    return max(fixed, requested // fixed * fixed) if fixed else requested
