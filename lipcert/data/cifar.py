"""CIFAR-10/100 "python version" folders: pickled batches of 10,000 images each, read one batch at a time.

The batches are pickles, which can run arbitrary code when loaded. They are read with :class:`SafeUnpickler`,
which rebuilds numpy arrays and nothing else, so a hostile file fails with a DataError instead of executing.
"""

from __future__ import annotations

import codecs
import math
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lipcert.data.base import Source, sha256_tree
from lipcert.errors import DataError

BATCH = re.compile(r"^(data_batch_\d+|test_batch|train|test)$")


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use for bytes; only latin1 is allowed."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


# The only globals a batch may name: what numpy (1.x or 2.x, any pickle protocol) needs to rebuild arrays.
_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = np.ndarray(0).__reduce__()[0]
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = np.ndarray(0).__reduce_ex__(5)[0]
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
_ALLOWED[("_codecs", "encode")] = _latin1


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals needed for arrays and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"the pickle refers to {module}.{name}, which is not allowed: only numpy arrays "
                            f"are read from CIFAR batches") from None


def load_pickle(path: Path) -> Any:
    """Load a CIFAR pickle safely (``encoding="bytes"``, as the official Python 2 files need)."""
    try:
        with open(path, "rb") as fp:
            return SafeUnpickler(fp, encoding="bytes").load()
    except DataError as exc:
        raise DataError(str(exc), source=str(path)) from exc
    except Exception as exc:  # a damaged pickle can raise almost any error type while being decoded
        raise DataError(f"not a readable CIFAR pickle: {type(exc).__name__}: {exc}", source=str(path)) from exc


def _get(batch: dict, *keys: str) -> Any:
    """The first of ``keys`` present, whether stored as bytes (Python 2 files) or str."""
    for key in keys:
        for variant in (key.encode(), key):
            if variant in batch:
                return batch[variant]
    return None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, s, s), labels) of one batch file."""
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"expected a dict of data and labels, found {type(batch).__name__}", source=str(path))
    data, labels = _get(batch, "data"), _get(batch, "fine_labels", "labels")
    if data is None or labels is None:
        keys = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)) or "nothing"
        raise DataError(f"no data/labels (or fine_labels) entries; the batch holds: {keys}", source=str(path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (2, 4):
        raise DataError("'data' must be a uint8 array of shape (n, 3*s*s) or (n, 3, s, s)", source=str(path))
    side = math.isqrt(int(np.prod(data.shape[1:])) // 3)
    if data.ndim == 2 and 3 * side * side != data.shape[1] or data.ndim == 4 and data.shape[1:] != (3, side, side):
        raise DataError(f"'data' has shape {data.shape}; expected rows of 3 square colour planes", source=str(path))
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"the labels are not an array: {exc}", source=str(path)) from exc
    if labels.shape != (len(data),):
        raise DataError(f"{len(data)} images but labels of shape {labels.shape}", source=str(path))
    return data.reshape(len(data), 3, side, side), labels


def batch_files(path: Path, split: str) -> tuple[list[Path], Path | None]:
    """(batch files of the split in order, metadata file or None) for a CIFAR folder or a single batch file."""
    folder = path.parent if path.is_file() else path
    meta = next((folder / n for n in ("batches.meta", "meta") if (folder / n).is_file()), None)
    if path.is_file():
        return [path], meta
    if split == "test":
        names = ["test_batch"] if (path / "test_batch").is_file() else ["test"]
    else:
        numbered = sorted((p.name for p in path.glob("data_batch_*") if p.name[11:].isdigit()),
                          key=lambda n: int(n[11:]))
        names = numbered or ["train"]
    files = [path / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"no {split} batch file ({', '.join(missing)}) in the CIFAR folder", source=str(path))
    return files, meta


def meta_classes(meta: Path) -> int | None:
    """Number of classes named by ``batches.meta`` (CIFAR-10) or ``meta`` (CIFAR-100), if any."""
    names = load_pickle(meta)
    found = _get(names, "fine_label_names", "label_names") if isinstance(names, dict) else None
    return len(found) if isinstance(found, list) and found else None


class CifarSource(Source):
    """The batches of one split; labels are kept (10,000 per batch), images are re-read a batch at a time."""

    format = "cifar"

    def __init__(self, path: Path, split: str) -> None:
        self._files, meta = batch_files(path, split)
        self._labels: list[np.ndarray] = []
        shape = None
        for file in self._files:
            data, labels = read_batch(file)
            if shape is not None and data.shape[1:] != shape:
                raise DataError(f"images of shape {data.shape[1:]} differ from the first batch's {shape}",
                                source=str(file))
            shape = data.shape[1:]
            self._labels.append(labels)
        assert shape is not None  # batch_files gives at least one file
        super().__init__(path, sum(len(y) for y in self._labels), shape, np.dtype(np.uint8), fixed_layout="NCHW",
                         num_classes=meta_classes(meta) if meta else None)

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(file index, first row, end row) within each batch file overlapping samples [start, stop)."""
        base = 0
        for i, labels in enumerate(self._labels):
            lo, hi = max(start - base, 0), min(stop - base, len(labels))
            if lo < hi:
                yield i, lo, hi
            base += len(labels)

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        for i, lo, hi in self._spans(start, stop):
            yield read_batch(self._files[i])[0][lo:hi]

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        for i, lo, hi in self._spans(start, stop):
            yield self._labels[i][lo:hi]

    def sha256(self) -> str:
        return sha256_tree((f.name, f) for f in self._files)


def looks_like(path: Path) -> bool:
    """A CIFAR batch file, or a folder of CIFAR-10 (``data_batch_*``, ``test_batch``) or CIFAR-100 batches."""
    if path.is_file():
        return BATCH.match(path.name) is not None
    return ((path / "test_batch").is_file() or any(path.glob("data_batch_*"))
            or ((path / "train").is_file() and (path / "test").is_file()))


def open_source(path: Path, split: str) -> CifarSource:
    """Open a CIFAR folder's ``split`` (``test``: the test batch; ``train``: the training batches)."""
    return CifarSource(path, split)
