"""``certify``: a loaded model and a dataset in, a ``Report`` out (what ``lipcert report`` runs), and ``attack``.

``certify`` runs its stages in order: options (``CertifyOptions``) -> data (the model and the data, loaded and
checked against each other) -> setup (the checkpoint, checked against the settings first, then the bound, the
engine and the warnings of ``sanity``) -> batches (read back from the checkpoint, or certified, attacked and saved
as they finish) -> merge (every process's results in dataset order, a ``RunResult``) -> build (``report.build``,
and the run's notes) -> gates (``report.gates``) -> write (with ``out``; the checkpoint removed). Under torchrun
each process takes a contiguous shard of batches and rank 0 merges the results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipcert.certification.attack import (
    AttackConfig,
    AttackSummary,
    BatchAttack,
    attack_batch,
    batch_generator,
    predict,
    summarize_attack,
)
from lipcert.certification.checkpoint import BatchResult, Checkpoint
from lipcert.certification.distributed import World, broadcast, gather, joined, shard
from lipcert.certification.engine import Engine, fixed_multiple, normalisation, pixel_model
from lipcert.certification.local import LocalCertifier
from lipcert.certification.options import CertifyOptions
from lipcert.certification.radii import Certificates
from lipcert.certification.setup import certificate_setup
from lipcert.data import Batch, Dataset, Labels, as_dataset, check_fits, read_batches
from lipcert.errors import DataError, LipcertError
from lipcert.graph.core import Graph
from lipcert.model.loader import as_graph
from lipcert.progress import ATTACK, BOUND, INFERENCE, READING, Progress, Steps, as_progress, phase
from lipcert.report.build import RunResult, RunTimings, build_report, model_sha256
from lipcert.report.gates import report_gates
from lipcert.report.model import BoundInfo, Report, SampleTable
from lipcert.report.sanity import output_note, radius_note
from lipcert.version import __version__

#: the world of a run without torchrun: one process
ALONE = World()
#: samples per model call on a CPU (a divisor of the batch near it), so that progress moves within a batch
CHUNK = 64


def chunk_size(batch_size: int, fixed_batch: int | None, device: str) -> int:
    """Samples per model call: on a CPU the largest divisor of the batch up to ``CHUNK`` (a multiple of a fixed
    batch the model declares, and at least a quarter of ``CHUNK``); on a GPU, or when none fits, the batch."""
    unit = fixed_batch or 1
    if device.startswith("cuda") or batch_size <= CHUNK:
        return batch_size
    sizes = [d for d in range(unit, CHUNK + 1, unit) if batch_size % d == 0 and d >= CHUNK // 4]
    return max(sizes) if sizes else batch_size


def _in_chunks(engine: Engine, dataset: Dataset, batch_size: int, chunk: int, first: int, last: int,
               progress: Progress, **kwargs) -> Iterator[tuple[int, torch.Tensor, Batch, Certificates]]:
    """``Engine.batches`` run ``chunk`` samples at a time and regrouped into batches of ``batch_size``, each
    chunk counted as inference progress: the same batches, results and checkpoints, with progress that moves."""
    per = batch_size // chunk
    total = dataset.info.num_samples
    group: list[tuple[torch.Tensor, Batch, Certificates]] = []
    for index, x, batch, cert in engine.batches(dataset, chunk, first * per, last * per, **kwargs):
        progress.advance(INFERENCE, len(batch.y) + len(batch.skipped))
        group.append((x, batch, cert))
        number = index // per
        if len(group) < min(per, -(-(total - number * batch_size) // chunk)):
            continue
        if per == 1:
            yield number, x, batch, cert
        else:
            xs, batches, certs = zip(*group, strict=False)
            yield (number, torch.cat(xs),
                   Batch(np.concatenate([b.x for b in batches]), np.concatenate([b.y for b in batches]),
                         np.concatenate([b.indices for b in batches]), [s for b in batches for s in b.skipped]),
                   Certificates(*[torch.cat([getattr(c, f.name) for c in certs]) for f in fields(Certificates)]))
        group = []


@contextmanager
def _discard_on_bad_input(ckpt: Checkpoint | None) -> Iterator[None]:
    """A run that stops on bad input removes the checkpoint it made (a resume would stop the same way); a
    checkpoint it was resuming stays, for a corrected command to continue."""
    try:
        yield
    except LipcertError:
        if ckpt is not None and ckpt.created:
            ckpt.remove()
        raise


def _options(options: CertifyOptions | None, eps: str | Sequence[str | float] | None,
             settings: dict[str, Any]) -> CertifyOptions:
    """``options`` (else the defaults) with the keyword settings, and ``eps``, over it."""
    if eps is not None:
        settings = {**settings, "eps": eps}
    if options is None:
        return CertifyOptions(**settings)
    return replace(options, **settings) if settings else options


def certify(model: Graph | str | Path | torch.nn.Module, data: str | Path | Dataset | Any,
            eps: str | Sequence[str | float] | None = None, *, options: CertifyOptions | None = None,
            progress: Progress | bool | Callable[[str, float, float | None], Any] | None = None,
            world: World = ALONE, example_input: Any = None, **settings: Any) -> Report | None:
    """Certify every sample of ``data`` at each radius of the settings and return the report, gates included.

    ``model`` is a loaded ``Graph``, a model file, or a ``torch.nn.Module``: that is exported to ONNX in memory
    (with ``example_input``, else the data's first sample) and the exported graph is what is certified (see
    ``load_model``). ``data`` is a dataset file or folder, an ``(x, y)`` pair of numpy arrays or torch tensors, a
    map-style torch ``Dataset`` of ``(x, y)`` pairs, or a ``lipcert.data.Dataset``; in memory, x is read as a
    file's pixels would be (``value_range``: 0-1 floats, or 0-255). The settings are ``CertifyOptions``'
    parameters, as keywords (``eps`` may be the third argument) or as ``options`` (keywords override it); their
    defaults are those of ``lipcert report``, and a wrong one is a ``ConfigError`` naming it. With ``out``, the
    report is also written there, atomically, and the run's checkpoint removed. In a torchrun ``world``, every
    process returns None but rank 0, which returns the merged report. ``progress`` hears of each phase as it
    goes: a ``Progress``, True (plain lines on stderr), or a function called with ``(phase, done, total)``.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        report = lipcert.certify(graph, "sample_models/digits_test.npz", eps="36/255,72/255", attack=False)
        print(report.eps[0].certified_accuracy)
        report = lipcert.certify(net, (x_test, y_test), eps="36/255", progress=True)  # a module and arrays
    """
    started = time.perf_counter()
    opts = _options(options, eps, settings)
    progress = as_progress(progress)
    with joined(world, opts.run_device()) as device:
        graph, dataset, labels = _data(model, data, opts, progress, example_input)
        batch_size = fixed_multiple(graph, opts.batch_size_on(device))
        ckpt = _checkpoint(opts, graph, dataset, batch_size, world)
        with _discard_on_bad_input(ckpt):
            run = _setup(graph, dataset, opts, device, batch_size, world, progress, ckpt)
            warnings = [n for n in (output_note(graph, run.info.value),
                                    radius_note(opts.radii, opts.norm, graph.input_shape),
                                    _local_note(run.engine.local)) if n]
            for text in warnings:
                progress.note(text)
            merged = _merge(*_batches(run, dataset, labels, opts, progress), run, opts, dataset, world)
        if merged is None:
            return None
    report = build_report(_result(graph, dataset, labels, opts, run, merged, time.perf_counter() - started, world))
    _gate(report, opts, warnings + _checkpoint_notes(ckpt, opts))
    if opts.out is not None:
        report.write(opts.out)
        if ckpt is not None:
            ckpt.remove()
    return report


def _local_note(local: LocalCertifier | None) -> str | None:
    """What the local certificates could not use, when they can give nothing (or less) beyond the global radius."""
    if local is None or not local.reason:
        return None
    return f"local certificates: {local.reason}; where they prove nothing more, the local radius is the global one"


def _gate(report: Report, opts: CertifyOptions, notes: list[str]) -> None:
    """The run's own notes (its warnings, its checkpoint, a missing baseline) and the gates of the settings."""
    report.notes += notes
    if opts.baseline_missing is not None:
        report.notes.append(f"the baseline {opts.baseline_missing} does not exist yet (missing_baseline skip): no "
                            "drop was checked; copy this run's report.json there to make it the next baseline")
    report.gates = report_gates(report, min_clean_acc=opts.min_clean_acc, min_certified=opts.certified_gates,
                                min_mean_radius=opts.min_mean_radius, max_violations=opts.max_violations,
                                max_lipschitz=opts.max_lipschitz, baseline=opts.baseline_report,
                                max_drop=opts.max_drop, require_claim=opts.require_claim,
                                allow_empty_certificates=opts.allow_empty_certificates,
                                baseline_missing=opts.baseline_missing, gate_on=opts.gate_on)


def _checkpoint_notes(ckpt: Checkpoint | None, opts: CertifyOptions) -> list[str]:
    """What the report says of a checkpoint a run without ``resume`` found: continued, or replaced."""
    if ckpt is None or opts.resume:
        return []
    if ckpt.continued:
        return [f"continued the unfinished run in {ckpt.folder.parent}, made with the same model, data and settings "
                "(its finished batches were read back, not recomputed)"]
    if ckpt.replaced:
        return [f"replaced an unfinished run's checkpoint: {ckpt.replaced}"]
    return []


@dataclass
class _Run:
    """What the setup stage decides: the engine and its bound, the batches this process certifies, the checkpoint."""

    engine: Engine
    info: BoundInfo
    bound_seconds: float
    batch_size: int
    first: int
    last: int
    samples: int  # this process's samples
    scale: float  # certified L2 radius to the run's norm
    ckpt: Checkpoint | None


@dataclass
class _Merged:
    """Every process's batches in dataset order, and the seconds each phase took over all of them."""

    result: BatchResult
    inference: float
    crosscheck: float
    attack: float
    computed: int


def _data(model: Graph | str | Path | torch.nn.Module, data: Any, opts: CertifyOptions, progress: Progress,
          example_input: Any = None) -> tuple[Graph, Dataset, Labels]:
    """The model (loaded, or exported with ``example_input``, else the data's first sample), the dataset, checked
    against the model, and how its labels name the model's classes (a model with one output, whatever its shape,
    is a binary classifier: two classes)."""
    from_data = isinstance(model, torch.nn.Module) and example_input is None
    graph = None if from_data else as_graph(model, example_input)
    if graph is not None:
        opts.check_model(graph)
    with phase(progress, READING):
        dataset = as_dataset(data, layout=opts.layout, value_range=opts.value_range, max_elements=opts.max_elements,
                             skip_bad_samples=opts.skip_bad_samples, workers=opts.workers)
        if graph is None:
            graph = as_graph(model, torch.from_numpy(next(iter(dataset.batches(1)))[0]))
            opts.check_model(graph)
        outputs = math.prod(graph.value_shapes.get(graph.output, (2,)))
        labels = check_fits(dataset, sample_shape=tuple(graph.input_shape), num_classes=max(2, outputs),
                            binary=outputs == 1, skip_bad_samples=opts.skip_bad_samples)
    return graph, dataset, labels


def _setup(model: Graph, dataset: Dataset, opts: CertifyOptions, device: str, batch_size: int, world: World,
           progress: Progress, ckpt: Checkpoint | None) -> _Run:
    """The bound (computed by rank 0, then shared), the engine and this process's shard of batches of
    ``batch_size``, with the checkpoint (made, and checked against the settings, before the bound: a resume with
    other settings is refused at once)."""
    t_bound = time.perf_counter()
    with phase(progress, BOUND):
        steps = Steps(progress)
        bound = (certificate_setup(model, device=device, declared=opts.lipschitz, mean=opts.mean, std=opts.std,
                                   progress=steps) if world.is_main else None)
        steps.close()
        setup, info = broadcast(bound, world)
        scale = 1.0 / math.sqrt(math.prod(model.input_shape)) if opts.norm == "linf" else 1.0
        local = (LocalCertifier(model, setup, mean=opts.mean, std=opts.std, at=[v / scale for _, v in opts.radii],
                                max_depth=opts.local_depth, prop=setup.propagation) if opts.local else None)
    bound_seconds = time.perf_counter() - t_bound
    engine = Engine(model, setup, device=device, backend=opts.backend, mean=opts.mean, std=opts.std, local=local)
    total = dataset.info.num_samples
    first, last = shard(-(-total // batch_size), world)
    samples = max(0, min(last * batch_size, total) - first * batch_size)
    return _Run(engine, info, bound_seconds, batch_size, first, last, samples, scale, ckpt)


def _batches(run: _Run, dataset: Dataset, labels: Labels, opts: CertifyOptions,
             progress: Progress) -> tuple[dict[int, BatchResult], float, int]:
    """This process's batches: those the checkpoint holds read back, the others certified (and attacked) and saved
    as they finish; with the seconds the attack took and the number of samples certified (not read back)."""
    stored = _resume(run.ckpt, run.first, run.last)
    read_back = sum(result.read for result in stored.values())
    if run.ckpt is not None and opts.resume:
        progress.note(f"resume: no checkpoint in {opts.folder}; starting from the beginning" if run.ckpt.created
                      else f"resumed from {run.ckpt.folder}: read back {read_back} of {run.samples} samples "
                           f"({len(stored)} batches); computing the rest")
    elif run.ckpt is not None and run.ckpt.continued:
        progress.note(f"{opts.folder} holds an unfinished run with the same model, data and settings: continuing it "
                      f"from {run.ckpt.folder}: read back {read_back} of {run.samples} samples ({len(stored)} "
                      "batches); computing the rest")
    elif run.ckpt is not None and run.ckpt.replaced:
        progress.note(f"replaced an unfinished run's checkpoint: {run.ckpt.replaced}")
    if stored and run.engine.requested == "auto":
        run.engine.requested = stored[run.first].backend
    counted = (INFERENCE, ATTACK) if opts.attack_config else (INFERENCE,)
    for name in counted:
        progress.start(name, run.samples, read_back)
    attack_seconds, computed = 0.0, 0
    for index, result, seconds in _run_batches(run, dataset, labels, opts, run.first + len(stored), progress):
        stored[index] = result
        attack_seconds += seconds
        computed += len(result.labels)
        if run.ckpt is not None:
            run.ckpt.save(index, result)
    for name in counted:
        progress.end(name)
    return stored, attack_seconds, computed


def _checkpoint(opts: CertifyOptions, model: Graph, dataset: Dataset, batch_size: int,
                world: World) -> Checkpoint | None:
    """The run's checkpoint in ``opts.folder`` (made or checked by rank 0, then opened by the others), or None.

    Its manifest holds every setting that changes a number, and lipcert's version, so that a checkpoint of other
    settings, or made by another lipcert, is never continued."""
    if opts.folder is None:
        return None
    cfg = opts.attack_config
    manifest = {"model_sha256": model_sha256(model), "data_sha256": dataset.info.sha256, "eps": opts.radii,
                "norm": opts.norm, "batch_size": batch_size, "backend": opts.backend, "mean": opts.mean,
                "std": opts.std, "lipschitz": opts.lipschitz, "attack": None if cfg is None else cfg.__dict__,
                "world_size": world.size, "lipcert_version": __version__}
    if opts.skip_bad_samples:  # only when set, so that checkpoints made before the setting existed still resume
        manifest["skip_bad_samples"] = True
    if opts.local:  # the same
        manifest.update(local=True, local_depth=opts.local_depth)
    ckpt = Checkpoint(opts.folder, manifest, opts.resume) if world.is_main else None
    gather(None, world)
    return ckpt if world.is_main else Checkpoint(opts.folder, manifest, True)


def _resume(ckpt: Checkpoint | None, first: int, last: int) -> dict[int, BatchResult]:
    """The finished batches of [first, last) the checkpoint holds, read back: from ``first`` up to the first
    batch missing (the run computes the rest)."""
    stored: dict[int, BatchResult] = {}
    index = first
    while ckpt is not None and index < last and ckpt.done(index):
        stored[index] = ckpt.load(index)
        index += 1
    return stored


def _run_batches(run: _Run, dataset: Dataset, labels: Labels, opts: CertifyOptions, begin: int,
                 progress: Progress) -> Iterator[tuple[int, BatchResult, float]]:
    """Certify, and attack, batches [begin, run.last): (batch index, its results, the seconds its attack took)."""
    cfg, engine = opts.attack_config, run.engine
    chunk = chunk_size(run.batch_size, engine.graph.fixed_batch, engine.device)
    for index, x, batch, cert in _in_chunks(engine, dataset, run.batch_size, chunk, begin, run.last, progress,
                                            skip_bad_samples=opts.skip_bad_samples, labels=labels):
        result = BatchResult(batch.y.astype(np.int64), cert.prediction.cpu().numpy(), cert.margin.cpu().numpy(),
                             (cert.radius * run.scale).cpu().numpy(), engine.backend,
                             batch.indices if opts.skip_bad_samples else None,
                             [(int(i), why) for i, why in batch.skipped],
                             exact_radii=(cert.radius_exact * run.scale).cpu().numpy())
        if opts.local and cert.radius_local is not None:
            result.local_radii = (cert.radius_local * run.scale).cpu().numpy()
        seconds = 0.0
        if cfg is not None:
            t0 = time.perf_counter()
            size = result.read

            def advance(done: float, size: int = size) -> None:
                progress.advance(ATTACK, done * size)

            part = attack_batch(engine.attack_model(), x, torch.from_numpy(batch.y).long().to(x.device),
                                cert.prediction, torch.from_numpy(_attacked_radii(result)), 0, opts.radii, cfg,
                                batch_generator(cfg.seed, index), advance)
            seconds = time.perf_counter() - t0
            for v in part.violations:  # attack_batch counts from the batch's first sample read
                v.index = int(batch.indices[v.index])
            result.attack_radius, result.broken_at = part.attack_radius.numpy(), part.broken_at.numpy()
            result.violations = part.violations
        yield index, result, seconds


def _attacked_radii(result: BatchResult) -> np.ndarray:
    """The radii the attack must not break inside: the local ones when there are (never below the others)."""
    return result.local_radii if result.local_radii is not None else result.radii


def _merge(stored: dict[int, BatchResult], attack_seconds: float, computed: int, run: _Run, opts: CertifyOptions,
           dataset: Dataset, world: World) -> _Merged | None:
    """Every process's batches, in dataset order, as one result of the whole run (on rank 0; None elsewhere)."""
    parts = [p for shard_parts in gather([stored[i] for i in range(run.first, run.last)], world) for p in shard_parts]
    timing = gather({"inference": run.engine.seconds, "attack": attack_seconds, "computed": computed,
                     "crosscheck": run.engine.crosscheck_seconds}, world)
    if not world.is_main:
        return None

    def joined_arrays(name: str) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else np.empty(0)

    attacked = opts.attack_config is not None
    merged = BatchResult(
        joined_arrays("labels"), joined_arrays("predictions"), joined_arrays("margins"), joined_arrays("radii"),
        backend=next((p.backend for p in parts if len(p.labels)), run.engine.backend),
        indices=joined_arrays("indices") if opts.skip_bad_samples else None,
        skipped=[s for p in parts for s in p.skipped],
        attack_radius=joined_arrays("attack_radius") if attacked else None,
        broken_at=joined_arrays("broken_at") if attacked else None,
        violations=[v for p in parts for v in p.violations], exact_radii=joined_arrays("exact_radii"),
        local_radii=joined_arrays("local_radii") if opts.local else None)
    if opts.skip_bad_samples and not len(merged.labels):
        index, why = merged.skipped[0]
        raise DataError(f"every sample was skipped as unreadable or invalid (sample {index}: {why}); nothing is "
                        "left to certify", source=dataset.info.path)
    return _Merged(merged, sum(t["inference"] for t in timing), max(t["crosscheck"] for t in timing),
                   sum(t["attack"] for t in timing), sum(t["computed"] for t in timing))


def _result(model: Graph, dataset: Dataset, labels: Labels, opts: CertifyOptions, run: _Run, merged: _Merged,
            seconds: float, world: World) -> RunResult:
    """The merged results as the typed result the report is built from."""
    m = merged.result
    attack = None
    if opts.attack_config is not None:
        attack = summarize_attack(opts.attack_config, opts.radii, torch.from_numpy(m.attack_radius),
                                  torch.from_numpy(m.broken_at), m.violations, merged.attack, binary=labels.binary)
    samples = SampleTable(torch.from_numpy(m.labels), torch.from_numpy(m.predictions), torch.from_numpy(m.margins),
                          torch.from_numpy(m.radii), {},
                          torch.from_numpy(m.indices) if opts.skip_bad_samples else None,
                          torch.from_numpy(m.exact_radii))
    if m.local_radii is not None:
        samples.columns["local_radius"] = torch.from_numpy(m.local_radii)
    timings = RunTimings(run.bound_seconds, merged.inference, merged.crosscheck, merged.attack, seconds,
                         merged.computed, world.size)
    return RunResult(model, dataset.info, labels, opts.norm, opts.radii, opts.lipschitz, run.engine.device, m.backend,
                     run.batch_size, run.info, samples, attack, m.skipped if opts.skip_bad_samples else None, timings,
                     opts.gate_on)


def attack(model: Graph | str | Path | torch.nn.Module, data: str | Path | Dataset | Any,
           eps: str | Sequence[str | float] | None = None, *,
           steps: int = 50, restarts: int = 2, norm: str = "l2", seed: int = 0, device: str = "auto",
           batch_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           max_elements: int | None = None) -> AttackSummary:
    """Run the PGD attack alone on every correctly classified sample (no certificates, so no violations).

    The model, the data and the settings mean what they do in ``certify`` (``CertifyOptions``), with the same
    defaults and checks.

    Example::

        summary = lipcert.attack(lipcert.load_model("model.onnx"), "test.npz", eps="36/255,72/255")
        print([row.robust_accuracy for row in summary.per_eps])
    """
    opts = CertifyOptions(eps=eps, norm=norm, device=device, batch_size=batch_size, mean=mean, std=std,
                          max_elements=max_elements, attack=AttackConfig(steps=steps, restarts=restarts, seed=seed))
    cfg = opts.attack_config
    assert cfg is not None  # the options were given an attack
    device = opts.run_device()
    model, dataset, labels = _data(model, data, opts, Progress())
    forward = pixel_model(model, device, *normalisation(model, opts.mean, opts.std))
    batch_size = fixed_multiple(model, opts.batch_size_on(device))
    started = time.perf_counter()
    parts: list[BatchAttack] = []
    for index, batch in enumerate(read_batches(dataset, batch_size, labels=labels)):
        x = torch.from_numpy(batch.x).to(device)
        with torch.no_grad():
            prediction = predict(forward(x))
        parts.append(attack_batch(forward, x, torch.from_numpy(batch.y).long().to(device), prediction,
                                  torch.zeros(len(batch.y)), index * batch_size, opts.radii, cfg,
                                  batch_generator(cfg.seed, index)))
    return summarize_attack(cfg, opts.radii, torch.cat([p.attack_radius for p in parts]),
                            torch.cat([p.broken_at for p in parts]), [v for p in parts for v in p.violations],
                            time.perf_counter() - started, binary=labels.binary)
