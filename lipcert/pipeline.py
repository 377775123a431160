"""``certify``: a loaded model and a dataset in, a ``Report`` out (what ``lipcert report`` runs)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

from .certify import accuracy_curve, certified_accuracy
from .data import Dataset, check_fits, open_dataset
from .errors import ConfigError
from .evaluate import certificate_setup, evaluate
from .graph import Graph
from .report import EpsResult, Report, SampleTable, parse_eps, sha256_file

NORMS = ("l2", "linf")


def certify(model: Graph, data: str | Path | Dataset, eps: Sequence[str | float] | str = "36/255", *,
            norm: str = "l2", device: str = "cpu", batch_size: int = 256, backend: str = "auto",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            lipschitz: float | None = None, layout: str = "auto", value_range: str = "auto",
            progress: Callable[[int], None] | None = None, on_start: Callable[[int], None] | None = None) -> Report:
    """Certify every sample of ``data`` at each radius in ``eps`` and return the report.

    Example::

        graph = lipcert.load_model("sample_models/digits_conv.onnx")
        report = lipcert.certify(graph, "sample_models/digits_test.npz", eps="36/255,72/255")
        print(report.eps[0].certified_accuracy)
    """
    started = time.perf_counter()
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: expected l2 or linf")
    eps_list = parse_eps(eps) if isinstance(eps, str) else parse_eps(",".join(str(e) for e in eps))
    if lipschitz is not None and (not math.isfinite(lipschitz) or lipschitz <= 0):
        raise ConfigError(f"--lipschitz must be a positive number, got {lipschitz}")
    dataset = data if not isinstance(data, (str, Path)) else open_dataset(data, layout=layout,
                                                                           value_range=value_range)
    classes = model.value_shapes.get(model.output, (0,))[-1]
    check_fits(dataset, sample_shape=tuple(model.input_shape), num_classes=max(2, classes))
    t_bound = time.perf_counter()
    setup, info = certificate_setup(model, device=device, declared=lipschitz, std=std)
    bound_seconds = time.perf_counter() - t_bound
    if on_start:
        on_start(dataset.info.num_samples)
    run = evaluate(model, dataset, setup, device=device, batch_size=batch_size, backend=backend, mean=mean,
                   std=std, progress=progress)
    correct = run.predictions == run.labels
    input_dim = math.prod(model.input_shape)
    radii = run.radii / math.sqrt(input_dim) if norm == "linf" else run.radii
    results = [EpsResult(value, label, certified_accuracy(radii, correct, value),
                         int(((radii > value) & correct).sum())) for label, value in eps_list]
    notes = list(model.notes)
    if lipschitz is not None:
        notes.append(f"certificates use the Lipschitz bound {lipschitz:g} declared with --lipschitz, not lipcert's "
                     f"sound bound {info.computed_upper / info.normalisation_factor:.6g}")
    if not math.isfinite(info.value):
        notes.append("lipcert could not bound the model's Lipschitz constant (an operator has no rule): "
                     "nothing is certified; run lipcert verify for details")
    info_dict = dict(info.__dict__)
    total = time.perf_counter() - started
    d = dataset.info
    return Report(
        model={"path": model.source, "sha256": sha256_file(model.source) if Path(model.source).is_file() else "",
               "format": Path(model.source).suffix.lstrip(".")},
        dataset={"path": d.path, "format": d.format, "sha256": d.sha256, "num_samples": d.num_samples,
                 "layout": d.layout, "value_range": d.value_range, "num_classes": d.num_classes,
                 "sample_shape": list(d.sample_shape)},
        device=device, backend=run.backend, batch_size=run.batch_size, norm=norm, input_dim=input_dim,
        bound=info_dict, clean_accuracy=float(correct.double().mean()) if run.count else 0.0, eps=results,
        curve=accuracy_curve(radii, correct),
        timings={"bound_seconds": bound_seconds, "inference_seconds": run.seconds, "total_seconds": total,
                 "images_per_second": run.images_per_second},
        notes=notes,
        samples=SampleTable(run.labels, run.predictions, run.margins, radii))
