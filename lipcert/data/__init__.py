"""Datasets for certification: open a file or folder in one of several formats and stream it in batches.

Every dataset is delivered the same way, whatever its format: x as float32, channels first, in [0, 1], and
y as int64 class indices, in file order. Every problem with the data is reported as a one-line DataError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lipcert.data import arrays, cifar, idx, image_folder, npz, safetensors_data
from lipcert.data.base import (
    SPLITS,
    Batch,
    Dataset,
    DatasetInfo,
    Source,
    StreamingDataset,
    build_dataset,
    reading,
    reason,
    value_problems,
)
from lipcert.data.labels import BINARY_LABELS, Labels
from lipcert.errors import DataError

__all__ = ["FORMATS", "Batch", "Dataset", "DatasetInfo", "Labels", "as_dataset", "check_fits", "detect_format",
           "open_dataset", "read_batches"]

# name -> (does the path look like this format?, open the path's split); detection tries them in this order.
FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path, str], Source]]] = {
    "npz": (npz.looks_like, npz.open_source),
    "safetensors": (safetensors_data.looks_like, safetensors_data.open_source),
    "cifar": (cifar.looks_like, cifar.open_source),
    "idx": (idx.looks_like, idx.open_source),
    "image-folder": (image_folder.looks_like, image_folder.open_source),
}


def detect_format(path: Path) -> str:
    """The format of an existing file or folder, from its name and (for folders) the names inside it."""
    with reading(path, "cannot inspect the path"):
        for name, (looks_like, _) in FORMATS.items():
            if looks_like(path):
                return name
    raise DataError(f"cannot tell the dataset format; expected a .npz or .safetensors file, a CIFAR batches "
                    f"folder, IDX files or a folder of class sub-folders (formats: {', '.join(FORMATS)})",
                    source=str(path))


def open_dataset(path: str | Path, *, format: str | None = None, layout: str = "auto",
                 value_range: str = "auto", split: str = "test", max_elements: int | None = None,
                 skip_bad_samples: bool = False, workers: int | None = None) -> Dataset:
    """Open a dataset, detecting its format from the path unless ``format`` is given.

    ``layout`` ("auto", "NCHW", "NHWC") says how 4-D arrays are stored; ``value_range`` ("auto", "0-255",
    "0-1") how pixel values are scaled; ``split`` ("test", "train") which part of a multi-split format to read;
    ``max_elements`` the largest sample accepted (default: ``$LIPCERT_MAX_ELEMENTS``, else 2**28 elements);
    ``skip_bad_samples`` lets the open-time scans pass over bad samples (see :func:`read_batches`); ``workers``
    how many processes decode an image folder (default: one per core, at most 4; 0: the main process).
    Opening reads the whole data once (hash, label scan, and a value scan for float pixels) in bounded memory.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})", source=str(path))
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise DataError(f"unknown format {format!r} (expected one of {', '.join(FORMATS)})", source=str(path))
    with reading(path):
        source: Source
        if format == "image-folder":
            source = image_folder.open_source(path, split, workers)
        else:
            source = FORMATS[format][1](path, split)
        return build_dataset(source, path=str(path), layout=layout, value_range=value_range,
                             max_elements=max_elements, skip_bad_samples=skip_bad_samples)


def as_dataset(data: object, *, layout: str = "auto", value_range: str = "auto", max_elements: int | None = None,
               skip_bad_samples: bool = False, workers: int | None = None) -> Dataset:
    """The data the API was given, as a ``Dataset``: a path (``open_dataset``), a ``Dataset`` as it is, an
    ``(x, y)`` pair of numpy arrays or torch tensors, or a map-style torch ``Dataset`` of ``(x, y)`` pairs (both
    read as a file of the same arrays would be); anything else is a one-line ``DataError``."""
    options: dict[str, Any] = {"layout": layout, "value_range": value_range, "max_elements": max_elements,
               "skip_bad_samples": skip_bad_samples}
    if isinstance(data, (str, Path)):
        return open_dataset(data, workers=workers, **options)
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return build_dataset(arrays.ArraySource(*data), path=arrays.ARRAYS_NAME, **options)
    if hasattr(data, "__getitem__") and not isinstance(data, (bytes, dict, tuple, list, np.ndarray)):
        name = f"<{type(data).__name__}>"
        return build_dataset(arrays.MapSource(data, name), path=name, **options)
    raise DataError(f"the data must be a dataset file or folder, an (x, y) pair of arrays or tensors, or a torch "
                    f"Dataset of (x, y) pairs, got {type(data).__name__}", parameter="data")


def check_fits(ds: Dataset, *, sample_shape: tuple[int, ...], num_classes: int, binary: bool = False,
               skip_bad_samples: bool = False) -> Labels:
    """Fail unless the dataset is non-empty, has the model's input shape, and every label is a model class; return
    how the labels name the classes.

    ``binary`` is for a model with one output: labels 0 and 1, or -1 and +1 (deel-lip's convention; -1 is class
    0), whichever the dataset uses, but not a mix of -1 and 0. Labels are streamed without reading any images, so
    the check is cheap even for large datasets. With ``skip_bad_samples`` labels that name no class are not
    refused here: :func:`read_batches` leaves them out.
    """
    info = ds.info
    if info.num_samples == 0:
        raise DataError("the dataset is empty: it holds no samples", source=info.path)
    have, want = tuple(info.sample_shape), tuple(sample_shape)
    if have != want:
        hint = ""
        if info.layout in ("NCHW", "NHWC") and sorted(have) == sorted(want):
            hint = f"; is the layout wrong? (read as {info.layout})"
        raise DataError(f"samples have shape {have} but the model expects {want}{hint}", source=info.path)
    if binary:
        return _binary_labels(ds, skip_bad_samples)
    labels = Labels(num_classes)
    if skip_bad_samples:
        return labels
    offset = 0
    for chunk in ds.labels():
        bad = np.flatnonzero(labels.bad(chunk))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"sample {offset + i} has {labels.problem(int(chunk[i]))}", source=info.path)
        offset += len(chunk)
    return labels


def _binary_labels(ds: Dataset, skip_bad_samples: bool) -> Labels:
    """A one-output model's labels, from one scan of them all: -1 and +1 when there is a -1 and no 0, else 0 and 1.

    A label outside {-1, 0, 1} fails, naming its sample (unless skipped); -1 beside 0 always fails."""
    first: dict[int, int] = {}  # label -1 or 0 -> the first sample with it
    other: tuple[int, int] | None = None  # the first sample with another label, and that label
    offset = 0
    for chunk, usable in _label_scan(ds, skip_bad_samples):
        for value in (-1, 0):
            hit = np.flatnonzero(usable & (chunk == value))
            if hit.size and value not in first:
                first[value] = offset + int(hit[0])
        hit = np.flatnonzero(usable & ((chunk < -1) | (chunk > 1)))
        if hit.size and other is None:
            other = (offset + int(hit[0]), int(chunk[hit[0]]))
        offset += len(chunk)
    labels = Labels(2, binary=True, plus_minus=-1 in first and 0 not in first)
    if other is not None and not skip_bad_samples:
        raise DataError(f"sample {other[0]} has {labels.problem(other[1])}", source=ds.info.path)
    if -1 in first and 0 in first:
        raise DataError(f"sample {first[-1]} has label -1 and sample {first[0]} has label 0, but the model has one "
                        f"output (a binary classifier): {BINARY_LABELS}, not a mix", source=ds.info.path)
    return labels


def _label_scan(ds: Dataset, skip_bad_samples: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every label in chunks, with a mask of the usable ones: with ``skip_bad_samples``, a label of a dataset lipcert
    opened that is not a whole number is passed over (``read_batches`` leaves its sample out)."""
    if skip_bad_samples and isinstance(ds, StreamingDataset):
        yield from ds.label_chunks()
        return
    for chunk in ds.labels():
        yield chunk, np.ones(len(chunk), dtype=bool)


def read_batches(ds: Dataset, batch_size: int, start: int = 0, stop: int | None = None, *,
                 skip_bad_samples: bool = False, labels: Labels | None = None) -> Iterator[Batch]:
    """The batches of samples [start, stop), each with its samples' dataset indices, and with ``labels`` (what
    ``check_fits`` returned) the labels as class indices.

    Without ``skip_bad_samples`` the first bad sample ends the read with its DataError. With it, a sample that
    cannot be read (a corrupt image), has NaN/Inf or out-of-range pixels, or a label that is not a whole number
    or names no class of ``labels`` is left out of its batch and listed in ``Batch.skipped``; faults of a whole
    file still raise. Batch k always covers indices [start + k * batch_size, ...), so every process of a
    sharded run, and a resumed run, skips exactly the same samples.
    """
    if not skip_bad_samples:
        offset = start
        for x, y in ds.batches(batch_size, start, stop):
            yield Batch(x, y if labels is None else labels.classes(y),
                        np.arange(offset, offset + len(y), dtype=np.int64), [])
            offset += len(y)
        return
    checked = ds.checked_batches if isinstance(ds, StreamingDataset) else _checked(ds)
    for batch in checked(batch_size, start, stop):
        if labels is None:
            yield batch
            continue
        bad = np.flatnonzero(labels.bad(batch.y))
        batch = batch.leave_out({int(batch.indices[k]): labels.problem(int(batch.y[k])) for k in bad})
        yield batch._replace(y=labels.classes(batch.y))


def _checked(ds: Dataset) -> Callable[[int, int, int | None], Iterator[Batch]]:
    """``checked_batches`` for a Dataset lipcert did not open: samples with NaN/Inf or values outside [0, 1]
    are left out."""
    def checked(batch_size: int, start: int, stop: int | None) -> Iterator[Batch]:
        offset = start
        for x, y in ds.batches(batch_size, start, stop):
            batch = Batch(x, y, np.arange(offset, offset + len(y), dtype=np.int64), [])
            problems = value_problems(x, offset, 1.0, ds.info.path, "the float range")
            yield batch.leave_out({i: reason(error, ds.info.path) for i, error in problems.items()})
            offset += len(y)

    return checked
