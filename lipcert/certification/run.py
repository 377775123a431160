"""``certify``: a loaded model and a dataset in, a ``Report`` out (what ``lipcert report`` runs).

One pass over the data: each batch is certified, then (optionally) attacked, and its per-sample results are
kept, and saved to a checkpoint when an output folder is given, so an interrupted run can resume. Under
torchrun each process takes a contiguous shard of batches and rank 0 merges the results.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lipcert.bounds.results import DEFAULT_TOL
from lipcert.certification.attack import (
    AttackConfig,
    AttackSummary,
    BatchAttack,
    Violation,
    attack_batch,
    batch_generator,
    summarize,
)
from lipcert.certification.checkpoint import Checkpoint, refuse_overwrite
from lipcert.certification.distributed import World, broadcast, gather, shard
from lipcert.certification.engine import Engine
from lipcert.certification.radii import Certificates, accuracy_curve, certified_accuracy
from lipcert.certification.setup import certificate_setup
from lipcert.data import Batch, Dataset, check_fits, open_dataset
from lipcert.errors import ConfigError, DataError, LipcertError
from lipcert.graph.core import Graph
from lipcert.parse import parse_eps
from lipcert.progress import ATTACK, BOUND, INFERENCE, READING, Progress, Steps, phase
from lipcert.report.model import EpsResult, Report, SampleTable, sha256_file

NORMS = ("l2", "linf")
CERT_KEYS = ("labels", "predictions", "margins", "radii")
ATTACK_KEYS = ("attack_radius", "broken_at")
#: samples per model call on a CPU (a divisor of the batch near it), so that progress moves within a batch
CHUNK = 64








def _eps(eps: Sequence[str | float] | str) -> list[tuple[str, float]]:
    return parse_eps(eps) if isinstance(eps, str) else parse_eps(",".join(str(e) for e in eps))


def _classes(model: Graph) -> int:
    """How many classes the model's labels may name (a one-logit binary model has two)."""
    return max(2, model.value_shapes.get(model.output, (0,))[-1])


def _open(model: Graph, data: str | Path | Dataset, layout: str = "auto", value_range: str = "auto",
          max_elements: int | None = None, skip_bad_samples: bool = False, workers: int | None = None) -> Dataset:
    dataset = data if not isinstance(data, (str, Path)) else open_dataset(
        data, layout=layout, value_range=value_range, max_elements=max_elements, skip_bad_samples=skip_bad_samples,
        workers=workers)
    check_fits(dataset, sample_shape=tuple(model.input_shape), num_classes=_classes(model),
               skip_bad_samples=skip_bad_samples)
    return dataset


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


def certify(model: Graph, data: str | Path | Dataset, eps: Sequence[str | float] | str = "36/255", *,
            norm: str = "l2", device: str = "cpu", batch_size: int = 256, backend: str = "auto",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            lipschitz: float | None = None, layout: str = "auto", value_range: str = "auto",
            attack: AttackConfig | None = None, progress: Progress | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, world: World = World(),
            max_elements: int | None = None, skip_bad_samples: bool = False,
            workers: int | None = None) -> Report | None:
    """Certify every sample of ``data`` at each radius in ``eps`` and return the report.

    ``checkpoint_dir`` keeps per-batch results there as they finish and ``resume`` continues from them; without
    ``resume``, an existing checkpoint there is refused (ConfigError), never discarded. In a torchrun ``world``,
    every process returns None but rank 0, which returns the merged report.
    ``max_elements`` bounds one sample of a dataset given as a path (see :mod:`lipcert.limits`).
    ``skip_bad_samples`` leaves out, and lists in ``Report.skipped``, every sample that cannot be read or is
    invalid (a corrupt image, NaN/Inf or out-of-range pixels, a label that is not a model class) instead of
    failing; accuracies are then over the samples evaluated. ``workers`` sets how many processes decode an
    image folder (default: one per core, at most 4; 0: the main process). ``progress`` (a ``Progress``)
    hears of each phase as it goes.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        report = lipcert.certify(graph, "sample_models/digits_test.npz", eps="36/255,72/255")
        print(report.eps[0].certified_accuracy)
    """
    started = time.perf_counter()
    progress = progress or Progress()
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: expected l2 or linf")
    eps_list = _eps(eps)
    if lipschitz is not None and (not math.isfinite(lipschitz) or lipschitz <= 0):
        raise ConfigError(f"--lipschitz must be a positive number, got {lipschitz}")
    if attack is not None and (attack.steps < 1 or attack.restarts < 1):
        raise ConfigError("--attack-steps and --attack-restarts must be at least 1")
    channels = model.input_shape[0] if model.input_shape else 1
    if (mean is None) != (std is None):
        raise ConfigError("--mean and --std go together: give both, or neither")
    if mean is not None and (len(mean) != len(std) or len(mean) not in (1, channels)):
        counts = "1 value" if channels == 1 else f"1 or {channels} values"
        raise ConfigError(f"--mean and --std need {counts} each (the model's input has {channels} channel(s))")
    if std is not None and min(std) <= 0:
        raise ConfigError(f"--std {','.join(map(str, std))}: every value must be positive")
    if checkpoint_dir is not None and not resume and world.is_main:
        refuse_overwrite(checkpoint_dir)
    with phase(progress, READING):
        dataset = _open(model, data, layout, value_range, max_elements, skip_bad_samples, workers)
    t_bound = time.perf_counter()
    with phase(progress, BOUND):
        steps = Steps(progress)
        bound = (certificate_setup(model, device=device, declared=lipschitz, mean=mean, std=std, progress=steps)
                 if world.is_main else None)
        steps.close()
        setup, info = broadcast(bound, world)
    bound_seconds = time.perf_counter() - t_bound
    engine = Engine(model, setup, device=device, backend=backend, mean=mean, std=std)
    batch_size = engine.batch_size(batch_size)
    total = dataset.info.num_samples
    num_batches = -(-total // batch_size)
    first, last = shard(num_batches, world)
    my_samples = max(0, min(last * batch_size, total) - first * batch_size)
    input_dim = math.prod(model.input_shape)
    scale = 1.0 / math.sqrt(input_dim) if norm == "linf" else 1.0
    ckpt = None
    if checkpoint_dir is not None:
        manifest = {"model_sha256": _sha(model.source), "data_sha256": dataset.info.sha256, "eps": eps_list,
                    "norm": norm, "batch_size": batch_size, "backend": backend, "mean": mean, "std": std,
                    "lipschitz": lipschitz, "attack": None if attack is None else attack.__dict__,
                    "world_size": world.size}
        if skip_bad_samples:  # only when set, so that checkpoints made before the flag existed still resume
            manifest["skip_bad_samples"] = True
        if world.is_main:
            ckpt = Checkpoint(Path(checkpoint_dir), manifest, resume)
        gather(None, world)
        if not world.is_main:
            ckpt = Checkpoint(Path(checkpoint_dir), manifest, True)
    with _discard_on_bad_input(ckpt):
        stored: dict[int, tuple[dict[str, np.ndarray], list[dict]]] = {}
        begin = first
        while ckpt is not None and begin < last and ckpt.done(begin):
            stored[begin] = ckpt.load(begin)
            begin += 1
        read_back = sum(len(a["labels"]) + len(extra[0].get("skipped", ())) for a, extra in stored.values())
        if ckpt is not None and resume:
            progress.note(f"--resume: no checkpoint in {checkpoint_dir}; starting from the beginning" if ckpt.created
                          else f"resumed from {ckpt.folder}: read back {read_back} of {my_samples} samples "
                               f"({len(stored)} batches); computing the rest")
        if stored and engine.requested == "auto":
            engine.requested = stored[first][1][0]["backend"]
        for name in (INFERENCE, ATTACK) if attack else (INFERENCE,):
            progress.start(name, my_samples, read_back)
        attack_seconds, computed = 0.0, 0
        chunk = chunk_size(batch_size, model.fixed_batch, device)
        for index, x, batch, cert in _in_chunks(engine, dataset, batch_size, chunk, begin, last, progress,
                                                skip_bad_samples=skip_bad_samples, num_classes=_classes(model)):
            yb = batch.y
            size = len(yb) + len(batch.skipped)
            computed += len(yb)
            arrays = {"labels": yb.astype(np.int64), "predictions": cert.prediction.cpu().numpy(),
                      "margins": cert.margin.cpu().numpy(), "radii": (cert.radius * scale).cpu().numpy()}
            extra: list[dict] = [{"backend": engine.backend}]
            if skip_bad_samples:
                arrays["indices"] = batch.indices
                extra[0]["skipped"] = [[i, why] for i, why in batch.skipped]
            if attack is not None:
                t0 = time.perf_counter()
                part = attack_batch(engine.attack_model(), x, torch.from_numpy(yb).long().to(x.device),
                                    cert.prediction, torch.from_numpy(arrays["radii"]), 0, eps_list,
                                    attack, batch_generator(attack.seed, index),
                                    lambda done, size=size: progress.advance(ATTACK, done * size))
                attack_seconds += time.perf_counter() - t0
                arrays["attack_radius"] = part.attack_radius.numpy()
                arrays["broken_at"] = part.broken_at.numpy()
                for v in part.violations:  # attack_batch counts from the batch's first sample read
                    v.index = int(batch.indices[v.index])
                extra += [v.__dict__ for v in part.violations]
            stored[index] = (arrays, extra)
            if ckpt is not None:
                ckpt.save(index, arrays, extra)
        for name in (INFERENCE, ATTACK) if attack else (INFERENCE,):
            progress.end(name)
        mine = [stored[i] for i in range(first, last)]
        parts = [p for shard_parts in gather(mine, world) for p in shard_parts]
        timing = gather({"inference": engine.seconds, "attack": attack_seconds, "backend": engine.backend,
                         "computed": computed}, world)
        if not world.is_main:
            return None
        merged = {k: np.concatenate([a[k] for a, _ in parts]) if parts else np.empty(0)
                  for k in CERT_KEYS + (ATTACK_KEYS if attack else ()) + (("indices",) if skip_bad_samples else ())}
        violations = [Violation(**v) for _, extra in parts for v in extra[1:]]
        backend_used = next((extra[0]["backend"] for a, extra in parts if len(a["labels"])), engine.backend)
        skipped = [(int(i), why) for _, extra in parts for i, why in extra[0].get("skipped", ())]
        if skip_bad_samples and not len(merged["labels"]):
            raise DataError(f"every sample was skipped as unreadable or invalid (sample {skipped[0][0]}: "
                            f"{skipped[0][1]}); nothing is left to certify", source=dataset.info.path)
    labels = torch.from_numpy(merged["labels"])
    predictions = torch.from_numpy(merged["predictions"])
    radii = torch.from_numpy(merged["radii"])
    correct = predictions == labels
    results = [EpsResult(value, label, certified_accuracy(radii, correct, value),
                         int(((radii > value) & correct).sum())) for label, value in eps_list]
    computed_upper = info.computed_upper / info.normalisation_factor
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
    if norm == "linf":
        notes.append(f"L-infinity radii are the L2 radii divided by sqrt({input_dim}) (||d||_2 <= sqrt(d) ||d||_inf)")
    if skipped:
        notes.append(f"{len(skipped)} of {dataset.info.num_samples} samples were skipped as unreadable or invalid "
                     f"(--skip-bad-samples; listed in report.json): accuracies are over the "
                     f"{len(merged['labels'])} samples evaluated")
    attack_part, columns = None, {}
    inference_seconds = sum(t["inference"] for t in timing)
    if attack is not None:
        summary = summarize(attack, eps_list, torch.from_numpy(merged["attack_radius"]),
                            torch.from_numpy(merged["broken_at"]), violations, sum(t["attack"] for t in timing))
        attack_part = attack_report(summary, radii, correct, results)
        columns["attack_radius"] = summary.attack_radius
        if summary.violations:
            notes.append(f"SOUNDNESS VIOLATION: the attack broke {len(summary.violations)} certified point(s) inside "
                         "their certified radius: the model's Lipschitz claim or the certificate is wrong")
    d = dataset.info
    count = int(labels.numel())
    computed_total = sum(t["computed"] for t in timing)
    total_seconds = time.perf_counter() - started
    return Report(
        model={"path": model.source, "sha256": _sha(model.source), "format": Path(model.source).suffix.lstrip(".")},
        dataset={"path": d.path, "format": d.format, "sha256": d.sha256, "num_samples": d.num_samples,
                 "layout": d.layout, "value_range": d.value_range, "num_classes": d.num_classes,
                 "sample_shape": list(d.sample_shape)},
        device=device, backend=backend_used, batch_size=batch_size, norm=norm, input_dim=input_dim,
        bound={**info.__dict__, **claim}, clean_accuracy=float(correct.double().mean()) if count else 0.0,
        eps=results, curve=accuracy_curve(radii, correct),
        timings={"bound_seconds": bound_seconds, "inference_seconds": inference_seconds,
                 "attack_seconds": sum(t["attack"] for t in timing), "total_seconds": total_seconds,
                 "images_per_second": computed_total / total_seconds if total_seconds > 0 else 0.0,
                 "inference_images_per_second": computed_total / inference_seconds if inference_seconds > 0 else 0.0,
                 "samples_read_back": count - computed_total, "processes": world.size},
        notes=notes, attack=attack_part,
        skipped={"count": len(skipped), "evaluated": count,
                 "samples": [{"index": i, "reason": why} for i, why in skipped]} if skip_bad_samples else None,
        samples=SampleTable(labels, predictions, torch.from_numpy(merged["margins"]), radii, columns,
                            torch.from_numpy(merged["indices"]) if skip_bad_samples else None))


def _sha(path: str) -> str:
    return sha256_file(path) if Path(path).is_file() else ""


def attack(model: Graph, data: str | Path | Dataset, eps: Sequence[str | float] | str = "36/255", *,
           steps: int = 50, restarts: int = 2, norm: str = "l2", seed: int = 0, device: str = "cpu",
           batch_size: int = 256, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, max_elements: int | None = None) -> AttackSummary:
    """Run the PGD attack alone on every correctly classified sample (no certificates, so no violations).

    Example::

        summary = lipcert.attack(lipcert.load_model("model.onnx"), "test.npz", eps="36/255,72/255")
        print([row["robust_accuracy"] for row in summary.per_eps])
    """
    if norm not in NORMS:
        raise ConfigError(f"norm {norm!r}: expected l2 or linf")
    eps_list = _eps(eps)
    dataset = _open(model, data, max_elements=max_elements)
    setup, _ = certificate_setup(model, device=device, mean=mean, std=std)
    engine = Engine(model, setup, device=device, backend="torch", mean=mean, std=std)
    cfg = AttackConfig(steps=steps, restarts=restarts, norm=norm, seed=seed)
    started = time.perf_counter()
    parts: list[BatchAttack] = []
    for index, x, batch, cert in engine.batches(dataset, engine.batch_size(batch_size)):
        yb = batch.y
        parts.append(attack_batch(engine.attack_model(), x, torch.from_numpy(yb).long().to(x.device),
                                  cert.prediction, torch.zeros(len(yb)), index * batch_size, eps_list, cfg,
                                  batch_generator(seed, index)))
    return summarize(cfg, eps_list, torch.cat([p.attack_radius for p in parts]),
                     torch.cat([p.broken_at for p in parts]), [v for p in parts for v in p.violations],
                     time.perf_counter() - started)


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
