"""Datasets for certification: open a file or folder in one of several formats and stream it in batches.

Every dataset is delivered the same way, whatever its format: x as float32, channels first, in [0, 1], and
y as int64 class indices, in file order. Every problem with the data is reported as a one-line DataError.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import cifar, idx, image_folder, npz, safetensors_data
from .base import SPLITS, Dataset, DatasetInfo, Source, build_dataset, reading

__all__ = ["FORMATS", "Dataset", "DatasetInfo", "check_fits", "detect_format", "open_dataset"]

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
                 value_range: str = "auto", split: str = "test") -> Dataset:
    """Open a dataset, detecting its format from the path unless ``format`` is given.

    ``layout`` ("auto", "NCHW", "NHWC") says how 4-D arrays are stored; ``value_range`` ("auto", "0-255",
    "0-1") how pixel values are scaled; ``split`` ("test", "train") which part of a multi-split format to read.
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
        source = FORMATS[format][1](path, split)
        return build_dataset(source, path=str(path), layout=layout, value_range=value_range)


def check_fits(ds: Dataset, *, sample_shape: tuple[int, ...], num_classes: int) -> None:
    """Fail unless the dataset is non-empty, has the model's input shape, and every label is a model class.

    Labels are streamed without reading any images, so the check is cheap even for large datasets.
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
    offset = 0
    for labels in ds.labels():
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"sample {offset + i} has label {int(labels[i])}, but the model has {num_classes} "
                            f"classes (0..{num_classes - 1})", source=info.path)
        offset += len(labels)
