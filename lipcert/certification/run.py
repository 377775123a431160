"""``certify``: a loaded model and a dataset in, a ``Report`` out (what ``lipcert report`` runs).

One pass over the data, in steps: the settings checked (``CertifyOptions``), the dataset opened and the bound
computed; then the finished batches read back from the checkpoint (``_resume``), the others certified, attacked
and saved as they finish (``_run_batches``), every process's results merged in dataset order (``_merge``), and
the report built (``_build_report``) with its gates; with ``out``, it is written there and the checkpoint
removed. Under torchrun each process takes a contiguous shard of batches and rank 0 merges the results.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lipcert.bounds.results import DEFAULT_TOL
from lipcert.certification.attack import (
    AttackConfig,
    AttackSummary,
    BatchAttack,
    attack_batch,
    batch_generator,
    summarize_attack,
)
from lipcert.certification.checkpoint import BatchResult, Checkpoint
from lipcert.certification.distributed import World, broadcast, gather, joined, shard
from lipcert.certification.engine import Engine
from lipcert.certification.options import CertifyOptions
from lipcert.certification.radii import Certificates, accuracy_curve, certified_accuracy
from lipcert.certification.setup import BoundInfo, certificate_setup
from lipcert.data import Batch, Dataset, Labels, check_fits, open_dataset
from lipcert.errors import DataError, LipcertError
from lipcert.graph.core import Graph
from lipcert.progress import ATTACK, BOUND, INFERENCE, READING, Progress, Steps, phase
from lipcert.report.gates import report_gates
from lipcert.report.model import EpsResult, Report, SampleTable, sha256_file

#: samples per model call on a CPU (a divisor of the batch near it), so that progress moves within a batch
CHUNK = 64


def _open(model: Graph, data: str | Path | Dataset, opts: CertifyOptions) -> tuple[Dataset, Labels]:
    """The dataset, checked against the model, and how its labels name the model's classes (a model with one
    output, whatever its shape, is a binary classifier: two classes)."""
    dataset = data if not isinstance(data, (str, Path)) else open_dataset(
        data, layout=opts.layout, value_range=opts.value_range, max_elements=opts.max_elements,
        skip_bad_samples=opts.skip_bad_samples, workers=opts.workers)
    outputs = math.prod(model.value_shapes.get(model.output, (2,)))
    labels = check_fits(dataset, sample_shape=tuple(model.input_shape), num_classes=max(2, outputs),
                        binary=outputs == 1, skip_bad_samples=opts.skip_bad_samples)
    return dataset, labels


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
            xs, batches, certs = zip(*group)
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


def _claim(model: Graph, lipschitz: float | None, computed: float) -> dict:
    """The Lipschitz claim (``--lipschitz``, else the model's metadata) and whether lipcert's bound proves it."""
    claim = lipschitz if lipschitz is not None else model.claimed_lipschitz()
    if claim is None:
        return {"claimed": None, "claim_source": None, "claim_proven": None}
    return {"claimed": claim, "claim_source": "--lipschitz" if lipschitz is not None else "model metadata",
            "claim_proven": computed <= claim * (1.0 + DEFAULT_TOL)}


def _options(options: CertifyOptions | None, eps: str | Sequence[str | float] | None,
             settings: dict[str, Any]) -> CertifyOptions:
    """``options`` (else the defaults) with the keyword settings, and ``eps``, over it."""
    if eps is not None:
        settings = {**settings, "eps": eps}
    if options is None:
        return CertifyOptions(**settings)
    return replace(options, **settings) if settings else options


def certify(model: Graph, data: str | Path | Dataset, eps: str | Sequence[str | float] | None = None, *,
            options: CertifyOptions | None = None, progress: Progress | None = None, world: World = World(),
            **settings: Any) -> Report | None:
    """Certify every sample of ``data`` at each radius of the settings and return the report, gates included.

    The settings are ``CertifyOptions``' parameters, as keywords (``eps`` may be the third argument) or as
    ``options`` (keywords override it); their defaults are those of ``lipcert report``, and a wrong one is a
    ``ConfigError`` naming it. With ``out``, the report is also written there, atomically, and the run's
    checkpoint removed. In a torchrun ``world``, every process returns None but rank 0, which returns the merged
    report. ``progress`` (a ``Progress``) hears of each phase as it goes.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        report = lipcert.certify(graph, "sample_models/digits_test.npz", eps="36/255,72/255", attack=False)
        print(report.eps[0].certified_accuracy)
    """
    started = time.perf_counter()
    opts = _options(options, eps, settings)
    opts.check_model(model)
    progress = progress or Progress()
    with joined(world, opts.run_device()) as device:
        with phase(progress, READING):
            dataset, labels = _open(model, data, opts)
        t_bound = time.perf_counter()
        with phase(progress, BOUND):
            steps = Steps(progress)
            bound = (certificate_setup(model, device=device, declared=opts.lipschitz, mean=opts.mean, std=opts.std,
                                       progress=steps) if world.is_main else None)
            steps.close()
            setup, info = broadcast(bound, world)
        bound_seconds = time.perf_counter() - t_bound
        engine = Engine(model, setup, device=device, backend=opts.backend, mean=opts.mean, std=opts.std)
        batch_size = engine.batch_size(opts.batch_size_on(device))
        total = dataset.info.num_samples
        first, last = shard(-(-total // batch_size), world)
        my_samples = max(0, min(last * batch_size, total) - first * batch_size)
        ckpt = _checkpoint(opts, model, dataset, batch_size, world)
        with _discard_on_bad_input(ckpt):
            stored = _resume(ckpt, first, last)
            read_back = sum(result.read for result in stored.values())
            if ckpt is not None and opts.resume:
                progress.note(f"--resume: no checkpoint in {opts.folder}; starting from the beginning" if ckpt.created
                              else f"resumed from {ckpt.folder}: read back {read_back} of {my_samples} samples "
                                   f"({len(stored)} batches); computing the rest")
            if stored and engine.requested == "auto":
                engine.requested = stored[first].backend
            counted = (INFERENCE, ATTACK) if opts.attack_config else (INFERENCE,)
            for name in counted:
                progress.start(name, my_samples, read_back)
            attack_seconds, computed = 0.0, 0
            for index, result, seconds in _run_batches(engine, dataset, labels, model, opts, batch_size,
                                                       first + len(stored), last, progress):
                stored[index] = result
                attack_seconds += seconds
                computed += len(result.labels)
                if ckpt is not None:
                    ckpt.save(index, result)
            for name in counted:
                progress.end(name)
            parts = [p for shard_parts in gather([stored[i] for i in range(first, last)], world) for p in shard_parts]
            timing = gather({"inference": engine.seconds, "attack": attack_seconds, "computed": computed,
                             "crosscheck": engine.crosscheck_seconds}, world)
            if not world.is_main:
                return None
            merged = _merge(parts, opts, engine.backend, dataset)
    timings = {"bound": bound_seconds, "inference": sum(t["inference"] for t in timing),
               "crosscheck": max(t["crosscheck"] for t in timing),
               "attack": sum(t["attack"] for t in timing), "computed": sum(t["computed"] for t in timing),
               "total": time.perf_counter() - started, "processes": world.size}
    report = _build_report(model, dataset, labels, opts, device, batch_size, info, merged, timings)
    report.gates = [g.to_dict() for g in report_gates(
        report, min_clean_acc=opts.min_clean_acc, min_certified=opts.certified_gates,
        max_violations=opts.max_violations, max_lipschitz=opts.max_lipschitz, baseline=opts.baseline_report,
        max_drop=opts.max_drop, require_claim=opts.require_claim)]
    if opts.out is not None:
        report.write(opts.out)
        ckpt.remove()
    return report


def _checkpoint(opts: CertifyOptions, model: Graph, dataset: Dataset, batch_size: int,
                world: World) -> Checkpoint | None:
    """The run's checkpoint in ``opts.folder`` (made or checked by rank 0, then opened by the others), or None.

    Its manifest holds every setting that changes a number, so that a resume with other settings is refused."""
    if opts.folder is None:
        return None
    cfg = opts.attack_config
    manifest = {"model_sha256": _sha(model.source), "data_sha256": dataset.info.sha256, "eps": opts.radii,
                "norm": opts.norm, "batch_size": batch_size, "backend": opts.backend, "mean": opts.mean,
                "std": opts.std, "lipschitz": opts.lipschitz, "attack": None if cfg is None else cfg.__dict__,
                "world_size": world.size}
    if opts.skip_bad_samples:  # only when set, so that checkpoints made before the flag existed still resume
        manifest["skip_bad_samples"] = True
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


def _run_batches(engine: Engine, dataset: Dataset, labels: Labels, model: Graph, opts: CertifyOptions,
                 batch_size: int, begin: int, last: int, progress: Progress) -> Iterator[tuple[int, BatchResult, float]]:
    """Certify, and attack, batches [begin, last): (batch index, its results, the seconds its attack took)."""
    cfg = opts.attack_config
    scale = 1.0 / math.sqrt(math.prod(model.input_shape)) if opts.norm == "linf" else 1.0
    chunk = chunk_size(batch_size, model.fixed_batch, engine.device)
    for index, x, batch, cert in _in_chunks(engine, dataset, batch_size, chunk, begin, last, progress,
                                            skip_bad_samples=opts.skip_bad_samples, labels=labels):
        result = BatchResult(batch.y.astype(np.int64), cert.prediction.cpu().numpy(), cert.margin.cpu().numpy(),
                             (cert.radius * scale).cpu().numpy(), engine.backend,
                             batch.indices if opts.skip_bad_samples else None,
                             [(int(i), why) for i, why in batch.skipped])
        seconds = 0.0
        if cfg is not None:
            t0 = time.perf_counter()
            part = attack_batch(engine.attack_model(), x, torch.from_numpy(batch.y).long().to(x.device),
                                cert.prediction, torch.from_numpy(result.radii), 0, opts.radii, cfg,
                                batch_generator(cfg.seed, index),
                                lambda done, size=result.read: progress.advance(ATTACK, done * size))
            seconds = time.perf_counter() - t0
            for v in part.violations:  # attack_batch counts from the batch's first sample read
                v.index = int(batch.indices[v.index])
            result.attack_radius, result.broken_at = part.attack_radius.numpy(), part.broken_at.numpy()
            result.violations = part.violations
        yield index, result, seconds


def _merge(parts: list[BatchResult], opts: CertifyOptions, backend: str, dataset: Dataset) -> BatchResult:
    """Every batch's results, in dataset order, as one result of the whole run."""

    def joined_arrays(name: str) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else np.empty(0)

    attacked = opts.attack_config is not None
    merged = BatchResult(
        *[joined_arrays(name) for name in ("labels", "predictions", "margins", "radii")],
        backend=next((p.backend for p in parts if len(p.labels)), backend),
        indices=joined_arrays("indices") if opts.skip_bad_samples else None,
        skipped=[s for p in parts for s in p.skipped],
        attack_radius=joined_arrays("attack_radius") if attacked else None,
        broken_at=joined_arrays("broken_at") if attacked else None,
        violations=[v for p in parts for v in p.violations])
    if opts.skip_bad_samples and not len(merged.labels):
        index, why = merged.skipped[0]
        raise DataError(f"every sample was skipped as unreadable or invalid (sample {index}: {why}); nothing is "
                        "left to certify", source=dataset.info.path)
    return merged


def _build_report(model: Graph, dataset: Dataset, classes: Labels, opts: CertifyOptions, device: str,
                  batch_size: int, info: BoundInfo, merged: BatchResult, timings: dict[str, float]) -> Report:
    """The report of a run: accuracies per eps, the curve, the claim, the attack's part, notes and timings."""
    labels = torch.from_numpy(merged.labels)
    predictions = torch.from_numpy(merged.predictions)
    radii = torch.from_numpy(merged.radii)
    correct = predictions == labels
    results = [EpsResult(value, label, certified_accuracy(radii, correct, value),
                         int(((radii > value) & correct).sum())) for label, value in opts.radii]
    input_dim = math.prod(model.input_shape)
    computed_upper = info.computed_upper / info.normalisation_factor
    lipschitz = opts.lipschitz
    claim = _claim(model, lipschitz, computed_upper)
    notes = []
    if claim["claim_proven"] is False:
        upper = ("unbounded (an operator has no rule)" if not math.isfinite(computed_upper)
                 else f"{computed_upper:.6g}")
        notes.append(f"LIPSCHITZ CLAIM NOT PROVEN: the model is claimed {claim['claimed']:g}-Lipschitz "
                     f"({claim['claim_source']}), but lipcert's sound upper bound is {upper}; "
                     + ("the certificates use the declared bound, which lipcert cannot confirm"
                        if lipschitz is not None else "the certificates use lipcert's bound, not the claim")
                     + " (run lipcert verify to find the layer)")
    notes += list(model.notes)
    if lipschitz is not None:
        notes.append(f"certificates use the Lipschitz bound {lipschitz:g} declared with --lipschitz, not lipcert's "
                     f"sound bound {computed_upper:.6g}")
    if not math.isfinite(info.value):
        notes.append("lipcert could not bound the model's Lipschitz constant (an operator has no rule): "
                     "nothing is certified; run lipcert verify for details")
    if classes.note:
        notes.append(classes.note)
    if opts.norm == "linf":
        notes.append(f"L-infinity radii are the L2 radii divided by sqrt({input_dim}) (||d||_2 <= sqrt(d) ||d||_inf)")
    if merged.skipped:
        notes.append(f"{len(merged.skipped)} of {dataset.info.num_samples} samples were skipped as unreadable or "
                     f"invalid (--skip-bad-samples; listed in report.json): accuracies are over the "
                     f"{len(merged.labels)} samples evaluated")
    attack_part, columns = None, {}
    if opts.attack_config is not None:
        summary = summarize_attack(opts.attack_config, opts.radii, torch.from_numpy(merged.attack_radius),
                                   torch.from_numpy(merged.broken_at), merged.violations, timings["attack"],
                                   binary=classes.binary)
        attack_part = attack_report(summary, radii, correct, results)
        columns["attack_radius"] = summary.attack_radius
        if summary.violations:
            notes.append(f"SOUNDNESS VIOLATION: the attack broke {len(summary.violations)} certified point(s) inside "
                         "their certified radius: the model's Lipschitz claim or the certificate is wrong")
    d = dataset.info
    count = int(labels.numel())
    computed, total, inference = timings["computed"], timings["total"], timings["inference"]
    return Report(
        model={"path": model.source, "sha256": _sha(model.source), "format": Path(model.source).suffix.lstrip(".")},
        dataset={"path": d.path, "format": d.format, "sha256": d.sha256, "num_samples": d.num_samples,
                 "layout": d.layout, "value_range": d.value_range, "num_classes": d.num_classes,
                 "sample_shape": list(d.sample_shape)},
        device=device, backend=merged.backend, batch_size=batch_size, norm=opts.norm, input_dim=input_dim,
        bound={**info.__dict__, **claim}, clean_accuracy=float(correct.double().mean()) if count else 0.0,
        eps=results, curve=accuracy_curve(radii, correct),
        timings={"bound_seconds": timings["bound"], "inference_seconds": inference,
                 "attack_seconds": timings["attack"], "crosscheck_seconds": timings["crosscheck"],
                 "total_seconds": total,
                 "images_per_second": computed / total if total > 0 else 0.0,
                 "inference_images_per_second": computed / inference if inference > 0 else 0.0,
                 "samples_read_back": count - computed, "processes": timings["processes"]},
        notes=notes, attack=attack_part,
        skipped={"count": len(merged.skipped), "evaluated": count,
                 "samples": [{"index": i, "reason": why} for i, why in merged.skipped]}
        if opts.skip_bad_samples else None,
        samples=SampleTable(labels, predictions, torch.from_numpy(merged.margins), radii, columns,
                            torch.from_numpy(merged.indices) if opts.skip_bad_samples else None))


def _sha(path: str) -> str:
    return sha256_file(path) if Path(path).is_file() else ""


def attack(model: Graph, data: str | Path | Dataset, eps: str | Sequence[str | float] | None = None, *,
           steps: int = 50, restarts: int = 2, norm: str = "l2", seed: int = 0, device: str = "auto",
           batch_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           max_elements: int | None = None) -> AttackSummary:
    """Run the PGD attack alone on every correctly classified sample (no certificates, so no violations).

    The settings mean what they do in ``certify`` (``CertifyOptions``), with the same defaults and checks.

    Example::

        summary = lipcert.attack(lipcert.load_model("model.onnx"), "test.npz", eps="36/255,72/255")
        print([row["robust_accuracy"] for row in summary.per_eps])
    """
    opts = CertifyOptions(eps=eps, norm=norm, device=device, batch_size=batch_size, mean=mean, std=std,
                          max_elements=max_elements, attack=AttackConfig(steps=steps, restarts=restarts, seed=seed))
    opts.check_model(model)
    cfg = opts.attack_config
    device = opts.run_device()
    dataset, labels = _open(model, data, opts)
    setup, _ = certificate_setup(model, device=device, mean=mean, std=std)
    engine = Engine(model, setup, device=device, backend="torch", mean=mean, std=std)
    batch_size = engine.batch_size(opts.batch_size_on(device))
    started = time.perf_counter()
    parts: list[BatchAttack] = []
    for index, x, batch, cert in engine.batches(dataset, batch_size, labels=labels):
        parts.append(attack_batch(engine.attack_model(), x, torch.from_numpy(batch.y).long().to(x.device),
                                  cert.prediction, torch.zeros(len(batch.y)), index * batch_size, opts.radii, cfg,
                                  batch_generator(cfg.seed, index)))
    return summarize_attack(cfg, opts.radii, torch.cat([p.attack_radius for p in parts]),
                            torch.cat([p.broken_at for p in parts]), [v for p in parts for v in p.violations],
                            time.perf_counter() - started, binary=labels.binary)


def _histogram(values: torch.Tensor, bins: int = 30) -> dict:
    """Counts of the gaps between attack radius and certified radius, for the plot."""
    if values.numel() == 0:
        return {"edges": [], "counts": []}
    hi = float(values.max())
    lo = min(0.0, float(values.min()))
    hi = hi if hi > lo else lo + 1e-9
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    return {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": [int(c) for c in counts.tolist()]}


def attack_report(summary: AttackSummary, radii: torch.Tensor, correct: torch.Tensor,
                  results: list[EpsResult]) -> dict:
    """The attack's part of the report: per-eps empirical accuracy beside the certified one, gaps, curve."""
    for res, row in zip(results, summary.per_eps):
        res.extra["empirical robust"] = row["robust_accuracy"]
    inconsistent = [r.label for r, row in zip(results, summary.per_eps)
                    if row["robust_accuracy"] < r.certified_accuracy]
    attacked = correct & torch.isfinite(summary.attack_radius)
    gaps = (summary.attack_radius - radii.double())[attacked]
    finite = summary.attack_radius[torch.isfinite(summary.attack_radius)]
    top = float(finite.max()) if finite.numel() else 0.0
    grid = torch.linspace(0, max(top, max((r.eps for r in results), default=0.0)), 101, dtype=torch.float64)
    curve = [(float(g), float((summary.attack_radius > g).double().mean())) for g in grid]
    data = summary.to_dict()
    n = len(summary.violations)
    verdict = (f"{n} soundness violation(s): certified points broken inside their certified radius"
               if n else "no certified point was broken (consistent)")
    per = ", ".join(f"{row['label']}: {100 * row['robust_accuracy']:.2f}%" for row in summary.per_eps)
    data.update({
        "summary": f"{summary.method}, {summary.steps} steps x {summary.restarts} restarts; empirical robust "
                   f"accuracy {per}; {verdict}",
        "violation_count": n, "consistent": n == 0 and not inconsistent,
        "median_gap": float(gaps.median()) if gaps.numel() else None,
        "gap_histogram": _histogram(gaps), "curve": curve,
    })
    return data
