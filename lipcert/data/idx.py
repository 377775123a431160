"""IDX files (MNIST, Fashion-MNIST, EMNIST): an images file and a labels file, plain or gzip-compressed.

Only the headers are read at open; rows are then read from the data offset onwards (gzip files are streamed
through the decompressor), so memory does not depend on the number of images.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lipcert.data.base import Source, check_lengths, label_count, read_exact, reading, sha256_tree, stream_rows
from lipcert.errors import DataError

NAME = re.compile(r"^(?P<prefix>.+?)[-.](?P<kind>images|labels)[-.]idx(?P<rank>\d)[-.]ubyte(?P<gz>\.gz)?$",
                  re.IGNORECASE)
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path) -> io.BufferedIOBase:
    """The file's decompressed byte stream."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an IDX header; plain files are also checked to be long enough."""
    with reading(path, "not a readable IDX file"), _open(path) as fp:
        magic = read_exact(fp, 4, path, "the IDX header")
        if magic[:2] != b"\0\0" or magic[2] not in DTYPES or magic[3] == 0:
            raise DataError(f"not an IDX file (magic bytes {magic.hex()})", source=str(path))
        rank = magic[3]
        shape = struct.unpack(f">{rank}I", read_exact(fp, 4 * rank, path, "the IDX header"))
    dtype = np.dtype(DTYPES[magic[2]])
    offset = 4 + 4 * rank
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not path.name.lower().endswith(".gz") and path.stat().st_size < needed:
        raise DataError(f"the file is truncated: its header announces {needed} bytes but it holds "
                        f"{path.stat().st_size}", source=str(path))
    return shape, dtype, offset


def _in_split(prefix: str, split: str) -> bool:
    """Whether a file-name prefix (``t10k``, ``train``, ``emnist-digits-test``) belongs to the split."""
    tokens = re.split(r"[-_.]", prefix.lower())
    return "train" in tokens if split == "train" else bool({"t10k", "test"} & set(tokens))


def _name(file: Path) -> re.Match[str]:
    """The parts of an IDX file's name (``NAME``): prefix, kind, rank."""
    match = NAME.match(file.name)
    if match is None:
        raise DataError("not an IDX file name (expected *-images-idx3-ubyte[.gz] or *-labels-idx1-ubyte[.gz])",
                        source=str(file))
    return match


def _partner(file: Path, kind: str) -> Path:
    """The file of the other kind with the same prefix, preferring the same compression."""
    prefix = _name(file)["prefix"]
    found = [p for p in sorted(file.parent.iterdir())
             if (m := NAME.match(p.name)) and m["prefix"] == prefix and m["kind"].lower() == kind]
    if not found:
        raise DataError(f"no matching {kind} file ({prefix}-{kind}-idx*-ubyte[.gz]) next to it", source=str(file))
    gz = file.name.lower().endswith(".gz")
    return min(found, key=lambda p: p.name.lower().endswith(".gz") != gz)


def find_pair(path: Path, split: str) -> tuple[Path, Path]:
    """(images file, labels file) for a path naming either file or the folder holding them."""
    if path.is_file():
        match = _name(path)
        if match["kind"].lower() == "labels":
            return _partner(path, "images"), path
        return path, _partner(path, "labels")
    with reading(path, "cannot list the folder"):
        images = [p for p in sorted(path.iterdir()) if (m := NAME.match(p.name)) and m["kind"].lower() == "images"
                  and _in_split(m["prefix"], split)]
    prefixes = {_name(p)["prefix"] for p in images}
    if len(prefixes) != 1:
        listed = ", ".join(p.name for p in images) or "none"
        raise DataError(f"expected one {split} images file, found: {listed}", source=str(path))
    chosen = min(images, key=lambda p: p.name.lower().endswith(".gz"))  # plain files read fastest
    return chosen, _partner(chosen, "labels")


class IdxSource(Source):
    """An IDX images file and its labels file."""

    format = "idx"

    def __init__(self, images: Path, labels: Path) -> None:
        self._images, self._labels = images, labels
        x_shape, x_dtype, self._x_offset = read_header(images)
        y_shape, self._y_dtype, self._y_offset = read_header(labels)
        check_lengths(x_shape[0], label_count(y_shape, labels, "the labels file"), images)
        super().__init__(images, x_shape[0], x_shape[1:], x_dtype)

    def _rows(self, path: Path, offset: int, row_shape: tuple[int, ...], dtype: np.dtype, start: int, stop: int,
              rows: int) -> Iterator[np.ndarray]:
        with reading(path, "cannot read the IDX data"), _open(path) as fp:
            yield from stream_rows(fp, offset, row_shape, dtype, start, stop, rows, path, "the IDX data")

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._images, self._x_offset, self.x_shape, self.x_dtype, start, stop, rows)

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._labels, self._y_offset, (), self._y_dtype, start, stop, rows)

    def sha256(self) -> str:
        return sha256_tree([(self._images.name, self._images), (self._labels.name, self._labels)])


def looks_like(path: Path) -> bool:
    """An IDX images/labels file, or a folder holding an IDX images file."""
    if path.is_file():
        return NAME.match(path.name) is not None
    return any((m := NAME.match(p.name)) and m["kind"].lower() == "images" for p in path.iterdir())


def open_source(path: Path, split: str) -> IdxSource:
    """Open an IDX pair; for a folder, ``split`` picks the ``t10k``/``test`` or ``train`` files."""
    return IdxSource(*find_pair(path, split))
