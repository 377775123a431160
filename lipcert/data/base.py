"""Shared machinery of the dataset readers.

Each format module turns a path into a :class:`Source`: the samples *as stored* (raw rows of one dtype and
per-sample shape) and their labels, read forward in chunks so that memory never grows with the dataset.
:func:`build_dataset` wraps a source into a :class:`StreamingDataset`, which resolves the layout and value
range once and then converts every batch to float32, channels first, in [0, 1], validating it on the way.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from lipcert import limits
from lipcert.errors import DataError
from lipcert.parse import LAYOUTS, VALUE_RANGES

SPLITS = ("test", "train")
UINT8_RANGE = "uint8 0-255"
FLOAT_RANGE = "float 0-1"
SCAN_BYTES = 4 << 20  # rows read per chunk by the open-time scans, in bytes of raw data
HASH_CHUNK = 1 << 20
SAMPLE_PREFIX = re.compile(r"^sample \d+: ")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds, as reported to the user and checked against a model."""

    path: str  # as given to open_dataset
    format: str  # "npz" | "safetensors" | "cifar" | "idx" | "image-folder"
    num_samples: int
    sample_shape: tuple[int, ...]  # per sample as delivered: channels first, e.g. (3, 32, 32) or (1, 28, 28)
    layout: str  # as stored: "NCHW" | "NHWC" | "NHW" (no channel axis) | "NC" (flat)
    value_range: str  # "uint8 0-255" (delivered divided by 255) | "float 0-1" (delivered as is)
    num_classes: int | None  # from the format's metadata, else the largest label + 1
    sha256: str  # of the data file; several files: names, sizes and bytes in order


class Batch(NamedTuple):
    """One batch of the samples that could be read, with their dataset indices and the samples left out."""

    x: np.ndarray  # float32 (B, *sample_shape) in [0, 1]
    y: np.ndarray  # int64 (B,)
    indices: np.ndarray  # int64 (B,): each sample's index in the dataset
    skipped: list[tuple[int, str]]  # (index, reason) of each sample of the batch's range left out, in order

    def leave_out(self, reasons: dict[int, str]) -> Batch:
        """This batch without the samples (by dataset index) in ``reasons``, which join ``skipped``."""
        if not reasons:
            return self
        keep = ~np.isin(self.indices, list(reasons))
        return Batch(self.x[keep], self.y[keep], self.indices[keep], sorted(self.skipped + list(reasons.items())))


@runtime_checkable
class Dataset(Protocol):
    """A labelled dataset delivered in batches, in file order."""

    info: DatasetInfo

    def batches(self, batch_size: int, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x float32 (B, *sample_shape) in [0, 1], y int64 (B,)) for samples [start, stop)."""
        ...

    def labels(self, start: int = 0, stop: int | None = None,
               chunk_size: int = 65536) -> Iterator[np.ndarray]:
        """Yield the int64 labels of samples [start, stop) in chunks, without reading any x."""
        ...


class Source(ABC):
    """A dataset as stored in one format: raw sample rows and labels, readable in forward chunks."""

    format: str

    def __init__(self, path: Path, num_samples: int, x_shape: tuple[int, ...], x_dtype: np.dtype,
                 *, fixed_layout: str | None = None, num_classes: int | None = None) -> None:
        self.path = path
        self.num_samples = num_samples
        self.x_shape = x_shape  # per-sample shape as stored
        self.x_dtype = np.dtype(x_dtype)
        self.fixed_layout = fixed_layout  # the layout the format itself defines, or None for plain arrays
        self.num_classes = num_classes  # from the format's metadata, when it has any
        if self.x_dtype.kind not in "iuf":
            raise DataError(f"x has dtype {self.x_dtype}; expected integer or floating-point pixels",
                            source=str(path))
        if 0 in x_shape:
            raise DataError(f"x samples have an empty shape {x_shape}", source=str(path))

    @abstractmethod
    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        """Yield the raw rows [start, stop) in order, in chunks of about ``rows`` rows."""

    def read_x(self, start: int, stop: int, rows: int) -> Iterator[tuple[np.ndarray, dict[int, DataError]]]:
        """Like ``x_chunks``, but a row that cannot be read is zero-filled and its error returned by sample index.

        Formats whose samples fail one by one (image files) override this; a whole-file fault still raises.
        """
        for chunk in self.x_chunks(start, stop, rows):
            yield chunk, {}

    @abstractmethod
    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        """Yield the raw labels [start, stop) in order (any numeric dtype, shape (k,))."""

    @abstractmethod
    def sha256(self) -> str:
        """Hash of the content of the file(s) the samples come from."""


def key_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """Accepted (images, labels) key names, in order of preference (keras' mnist.npz uses x_test/y_test)."""
    return (("x", "y"), ("images", "labels"), (f"x_{split}", f"y_{split}"))


def pick_keys(keys: list[str], split: str, path: Path) -> tuple[str, str]:
    """The first accepted (images, labels) key pair present, or a DataError naming the keys that exist."""
    for pair in key_pairs(split):
        if pair[0] in keys and pair[1] in keys:
            return pair
    wanted = " or ".join(f"{x}/{y}" for x, y in key_pairs(split))
    raise DataError(f"no {wanted} arrays; the file holds: {', '.join(sorted(keys)) or 'nothing'}",
                    source=str(path))


@contextmanager
def reading(path: Path | str, what: str = "cannot read the file") -> Iterator[None]:
    """Turn the low-level errors of reading a damaged or unreadable file into a one-line DataError."""
    try:
        yield
    except DataError:
        raise
    except EOFError as exc:
        raise DataError(f"{what}: the file is truncated ({exc or 'unexpected end of data'})",
                        source=str(path)) from exc
    except (OSError, ValueError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: {exc}", source=str(path)) from exc


def read_exact(fp, size: int, path: Path | str, what: str) -> bytes:
    """Read exactly ``size`` bytes, or fail naming the file as truncated."""
    data = fp.read(size)
    if len(data) != size:
        raise DataError(f"the file is truncated: {what} ends {size - len(data)} bytes early", source=str(path))
    return data


def label_count(shape: tuple[int, ...], path: Path | str, name: str = "y") -> int:
    """Number of labels in an array of class indices of shape (N,) or (N, 1)."""
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return int(shape[0])
    raise DataError(f"{name} has shape {tuple(shape)}; expected class indices of shape (N,)", source=str(path))


def check_lengths(num_x: int, num_y: int, path: Path | str) -> None:
    """Fail when images and labels disagree on the number of samples."""
    if num_x != num_y:
        raise DataError(f"x holds {num_x} samples but y holds {num_y} labels", source=str(path))


def rows_for(row_bytes: int, budget: int = SCAN_BYTES) -> int:
    """How many rows of ``row_bytes`` fit in a chunk of about ``budget`` bytes (at least one)."""
    return max(1, budget // max(1, row_bytes))


def stream_rows(fp, data_offset: int, row_shape: tuple[int, ...], dtype: np.dtype, start: int, stop: int,
                rows: int, path: Path | str, what: str) -> Iterator[np.ndarray]:
    """Read rows [start, stop) of a C-ordered array stored at ``data_offset`` of a (possibly compressed) stream."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    fp.seek(data_offset + start * row_bytes)  # forward seeks on zip/gzip streams decompress and discard
    for first in range(start, stop, rows):
        count = min(rows, stop - first)
        data = read_exact(fp, count * row_bytes, path, f"{what} (rows {first}..{first + count - 1})")
        yield np.frombuffer(data, dtype=dtype).reshape((count, *row_shape))


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes, streamed (equals ``sha256sum path``)."""
    digest = hashlib.sha256()
    _hash_into(digest, path)
    return digest.hexdigest()


def sha256_tree(entries: Iterable[tuple[str, Path]]) -> str:
    """sha256 over several files: each contributes its relative name, its size and its bytes, in order."""
    digest = hashlib.sha256()
    for name, path in entries:
        with reading(path, "cannot hash the file"):
            size = path.stat().st_size
        digest.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "little"))
        _hash_into(digest, path)
    return digest.hexdigest()


def _hash_into(digest: hashlib._Hash, path: Path) -> None:
    with reading(path, "cannot hash the file"), open(path, "rb") as fp:
        while chunk := fp.read(HASH_CHUNK):
            digest.update(chunk)


def rechunk(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup a stream of row chunks into chunks of exactly ``size`` rows (the last one may be shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for chunk in chunks:
        while len(chunk):
            take = min(size - count, len(chunk))
            pending.append(chunk[:take])
            count += take
            chunk = chunk[take:]
            if count == size:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def resolve_layout(source: Source, requested: str) -> str:
    """The layout of x as stored: the format's own, the caller's choice, or guessed from the shape."""
    path = str(source.path)
    if requested not in LAYOUTS:
        raise DataError(f"unknown layout {requested!r} (expected one of {', '.join(LAYOUTS)})", source=path)
    if source.fixed_layout is not None:
        if requested not in ("auto", source.fixed_layout):
            raise DataError(f"layout {requested} does not apply: the {source.format} format stores "
                            f"{source.fixed_layout}", source=path)
        return source.fixed_layout
    shape = source.x_shape
    if requested != "auto":
        if len(shape) != 3:
            raise DataError(f"layout {requested} needs 4-D x, but x has shape (N, {', '.join(map(str, shape))})",
                            source=path)
        return requested
    if len(shape) == 3:
        return "NHWC" if shape[2] in (1, 3) and shape[0] not in (1, 3) else "NCHW"
    if len(shape) == 2:
        return "NHW"
    if len(shape) == 1:
        return "NC"
    raise DataError(f"x has shape (N, {', '.join(map(str, shape))}); expected (N, C, H, W), (N, H, W, C), "
                    f"(N, H, W) or (N, features)", source=path)


def delivered_shape(x_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Per-sample shape after conversion to channels first."""
    if layout == "NHWC":
        return (x_shape[2], x_shape[0], x_shape[1])
    if layout == "NHW":
        return (1, *x_shape)
    return tuple(x_shape)


def channels_first(raw: np.ndarray, layout: str) -> np.ndarray:
    """Raw rows as a new (writable, C-contiguous) float32 array, channels first."""
    if layout == "NHWC":
        raw = raw.transpose(0, 3, 1, 2)
    elif layout == "NHW":
        raw = raw[:, None]
    return np.array(raw, dtype=np.float32, order="C")


def value_problems(x: np.ndarray, offset: int, top: float, path: Path | str, expected: str) -> dict[int, DataError]:
    """The error of every sample with NaN/Inf or with values outside [0, top], by sample index."""
    flat = x.reshape(len(x), -1)
    finite = np.isfinite(flat).all(axis=1)
    problems = {offset + int(i): DataError(f"sample {offset + int(i)}: x contains NaN or Inf", source=str(path))
                for i in np.flatnonzero(~finite)}
    low, high = flat.min(axis=1), flat.max(axis=1)
    for i in np.flatnonzero(finite & ((low < 0) | (high > top))):
        problems[offset + int(i)] = DataError(
            f"sample {offset + int(i)}: x has values in [{low[i]:g}, {high[i]:g}], outside {expected} [0, {top:g}]; "
            "lipcert expects raw pixels, not normalized ones", source=str(path))
    return problems



def resolve_value_range(source: Source, requested: str, skip_bad_samples: bool = False) -> str:
    """The value range of x: the caller's choice, uint8-like for integers, else decided by a scan of the floats.

    With ``skip_bad_samples`` the scan passes over samples with NaN/Inf or values outside [0, 255] (they are
    left out when read) instead of failing on the first.
    """
    if requested not in VALUE_RANGES:
        raise DataError(f"unknown value range {requested!r} (expected one of {', '.join(VALUE_RANGES)})",
                        source=str(source.path))
    if requested != "auto":
        return UINT8_RANGE if requested == "0-255" else FLOAT_RANGE
    if source.x_dtype.kind in "iu":
        return UINT8_RANGE
    row_bytes = int(np.prod(source.x_shape)) * source.x_dtype.itemsize
    top, offset = 0.0, 0
    for raw in source.x_chunks(0, source.num_samples, rows_for(row_bytes)):
        x = np.asarray(raw, dtype=np.float32)
        problems = value_problems(x, offset, 255.0, source.path, "the pixel range")
        if problems and not skip_bad_samples:
            raise problems[min(problems)]
        good = np.delete(x, [i - offset for i in problems], axis=0) if problems else x
        top = max(top, float(good.max())) if len(good) else top
        offset += len(raw)
    return UINT8_RANGE if top > 1.0 else FLOAT_RANGE


def checked_labels(raw: np.ndarray, offset: int, path: Path | str) -> tuple[np.ndarray, dict[int, DataError]]:
    """Raw labels as int64 (0 where not a whole number), and the error of each one that is not, by sample index."""
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64), {}
    if raw.dtype.kind == "f":
        whole = np.isfinite(raw) & (raw == np.round(raw))
        problems = {offset + int(i): DataError(f"sample {offset + int(i)}: label {raw[i].item()} is not an integer",
                                               source=str(path)) for i in np.flatnonzero(~whole)}
        return np.where(whole, raw, 0).astype(np.int64), problems
    raise DataError(f"labels have dtype {raw.dtype}; expected integer class indices", source=str(path))


def as_labels(raw: np.ndarray, offset: int, path: Path | str) -> np.ndarray:
    """Raw labels as int64, failing unless every one is a whole number (naming the first that is not)."""
    labels, problems = checked_labels(raw, offset, path)
    if problems:
        raise problems[min(problems)]
    return labels


def reason(error: DataError, root: str) -> str:
    """Why a sample was left out: its error's message without the dataset's path and the sample's number (listed
    beside it); a file inside the dataset is named relative to it."""
    text, source = str(error), error.source
    if source is not None and text.startswith(source + ": "):
        message, base = SAMPLE_PREFIX.sub("", text[len(source) + 2:]), root.rstrip(os.sep)
        if source == root:
            return message
        if source.startswith(base + os.sep):
            return f"{source[len(base) + 1:]}: {message}"
    return text


class StreamingDataset:
    """A :class:`Dataset` over a :class:`Source`: converts and validates each batch as it is read."""

    def __init__(self, source: Source, info: DatasetInfo) -> None:
        self._source = source
        self.info = info

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        if start < 0 or (stop is not None and stop < 0):
            raise DataError(f"sample range must not be negative (start={start}, stop={stop})", source=self.info.path)
        end = self.info.num_samples if stop is None else min(stop, self.info.num_samples)
        return min(start, end), end

    def _read(self, batch_size: int, start: int,
              stop: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, int, dict[int, DataError]]]:
        """Per batch: x converted (bad rows included), y, the batch's first index, and the bad samples' errors."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}", source=self.info.path)
        start, stop = self._range(start, stop)
        scale = self.info.value_range == UINT8_RANGE
        top, expected = (255.0, "the uint8 range") if scale else (1.0, "the float range")
        path = self._source.path
        failures: dict[int, DataError] = {}  # of rows read so far and not yet batched
        reader = self._source.read_x(start, stop, batch_size)

        def rows() -> Iterator[np.ndarray]:
            for chunk, bad in reader:
                failures.update(bad)
                yield chunk

        try:
            xs = rechunk(rows(), batch_size)
            ys = rechunk(self._source.y_chunks(start, stop, batch_size), batch_size)
            offset = start
            for raw, y in zip(xs, ys, strict=True):
                errors = {i: failures.pop(i) for i in sorted(i for i in failures if i < offset + len(raw))}
                x = channels_first(raw, self.info.layout)
                if not (scale and raw.dtype == np.uint8):  # uint8 pixels always fit the 0-255 range
                    for i, error in value_problems(x, offset, top, path, expected).items():
                        errors.setdefault(i, error)
                if scale:
                    x /= np.float32(255.0)
                labels, bad_labels = checked_labels(y, offset, path)
                for i, error in bad_labels.items():
                    errors.setdefault(i, error)
                yield x, labels, offset, errors
                offset += len(raw)
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()  # stops a format's decoding processes as soon as reading stops

    def batches(self, batch_size: int, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x float32 (B, *sample_shape) in [0, 1], y int64 (B,)) for samples [start, stop), in file order."""
        for x, y, _, errors in self._read(batch_size, start, stop):
            if errors:
                raise errors[min(errors)]
            yield x, y

    def checked_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Like ``batches``, but a sample that cannot be read or is invalid is left out and listed, not raised.

        Batches keep their ranges of indices ([start + k * batch_size, ...)), so a batch may hold fewer samples.
        """
        root = str(self._source.path)
        for x, y, offset, errors in self._read(batch_size, start, stop):
            batch = Batch(x, y, np.arange(offset, offset + len(y), dtype=np.int64), [])
            yield batch.leave_out({i: reason(error, root) for i, error in errors.items()})

    def label_chunks(self, chunk_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every label as int64 in chunks, with a mask of those that are whole numbers (the others read as 0), for
        scans that pass over bad labels instead of failing on the first."""
        offset = 0
        for y in rechunk(self._source.y_chunks(0, self.info.num_samples, chunk_size), chunk_size):
            labels, problems = checked_labels(y, offset, self._source.path)
            whole = np.ones(len(labels), dtype=bool)
            whole[[i - offset for i in problems]] = False
            yield labels, whole
            offset += len(y)

    def labels(self, start: int = 0, stop: int | None = None, chunk_size: int = 65536) -> Iterator[np.ndarray]:
        """Yield the int64 labels of samples [start, stop) in chunks of ``chunk_size``, without reading x."""
        start, stop = self._range(start, stop)
        offset = start
        for y in rechunk(self._source.y_chunks(start, stop, chunk_size), chunk_size):
            yield as_labels(y, offset, self._source.path)
            offset += len(y)


def build_dataset(source: Source, *, path: str, layout: str, value_range: str,
                  max_elements: int | None = None, skip_bad_samples: bool = False) -> StreamingDataset:
    """Resolve layout, value range, class count and hash of a source, and wrap it as a Dataset named ``path``.

    A sample larger than ``max_elements`` (see :mod:`lipcert.limits`) is refused before any sample is read. With
    ``skip_bad_samples`` the open-time scans pass over samples with bad pixels or labels instead of failing."""
    limits.check(source.x_shape, limits.resolve(max_elements), "one sample of x", str(source.path), DataError)
    if source.num_samples == 0:
        raise DataError("the dataset is empty: it holds no samples", source=str(source.path))
    resolved_layout = resolve_layout(source, layout)
    resolved_range = resolve_value_range(source, value_range, skip_bad_samples)
    num_classes = source.num_classes
    if num_classes is None:
        top, offset = -1, 0
        for y in source.y_chunks(0, source.num_samples, 1 << 16):
            labels, problems = checked_labels(y, offset, source.path)
            if problems and not skip_bad_samples:
                raise problems[min(problems)]
            whole = np.delete(labels, [i - offset for i in problems])
            top = max(top, int(whole.max())) if len(whole) else top
            offset += len(y)
        num_classes = top + 1
    info = DatasetInfo(path=path, format=source.format, num_samples=source.num_samples,
                       sample_shape=delivered_shape(source.x_shape, resolved_layout), layout=resolved_layout,
                       value_range=resolved_range, num_classes=num_classes, sha256=source.sha256())
    return StreamingDataset(source, info)
