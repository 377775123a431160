"""``.npz`` archives (``numpy.savez`` / ``savez_compressed``), read row by row from the zip member streams.

Only the .npy headers are parsed at open; rows are then streamed out of the (stored or deflated) member, so an
archive larger than memory works. Pickled (object) arrays are refused: nothing in the file is executed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipcert.data.base import Source, check_lengths, label_count, pick_keys, reading, sha256_file, stream_rows
from lipcert.errors import DataError


@dataclass(frozen=True)
class Member:
    """One .npy array inside the archive: where its data starts and how it is laid out."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def read_member(archive: zipfile.ZipFile, name: str, path: Path) -> Member:
    """Parse the .npy header of one member and check that the member is long enough for the data."""
    with archive.open(name) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:  # versions 2.0 and 3.0 share the header framing
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        offset = fp.tell()
    if dtype.hasobject:
        raise DataError(f"{name} holds Python objects (a pickle); only numeric arrays are read", source=str(path))
    if fortran and len(shape) > 1:
        raise DataError(f"{name} is stored in Fortran order; save it in C order", source=str(path))
    if not shape:
        raise DataError(f"{name} is a scalar, not an array of samples", source=str(path))
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if archive.getinfo(name).file_size < needed:
        raise DataError(f"the file is truncated: {name} holds {archive.getinfo(name).file_size} bytes, its header "
                        f"needs {needed}", source=str(path))
    return Member(name, tuple(shape), dtype, offset)


class NpzSource(Source):
    """Arrays ``x``/``y`` (or ``images``/``labels``, ``x_<split>``/``y_<split>``) of a .npz archive."""

    format = "npz"

    def __init__(self, path: Path, split: str) -> None:
        with reading(path, "not a readable .npz archive (damaged or truncated?)"), zipfile.ZipFile(path) as archive:
            members = {n[:-4]: n for n in archive.namelist() if n.endswith(".npy")}
            x_key, y_key = pick_keys(list(members), split, path)
            self._x = read_member(archive, members[x_key], path)
            self._y = read_member(archive, members[y_key], path)
        num_labels = label_count(self._y.shape, path, y_key)
        check_lengths(self._x.shape[0], num_labels, path)
        super().__init__(path, self._x.shape[0], self._x.shape[1:], self._x.dtype)

    def _rows(self, member: Member, row_shape: tuple[int, ...], start: int, stop: int,
              rows: int) -> Iterator[np.ndarray]:
        with reading(self.path, f"cannot read {member.name}"), zipfile.ZipFile(self.path) as archive, \
                archive.open(member.name) as fp:
            yield from stream_rows(fp, member.offset, row_shape, member.dtype, start, stop, rows, self.path,
                                   member.name)

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._x, self._x.shape[1:], start, stop, rows)

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._y, (), start, stop, rows)

    def sha256(self) -> str:
        return sha256_file(self.path)


def looks_like(path: Path) -> bool:
    """A file named ``*.npz``."""
    return path.is_file() and path.suffix.lower() == ".npz"


def open_source(path: Path, split: str) -> NpzSource:
    """Open a .npz archive; ``split`` selects ``x_<split>``/``y_<split>`` when plain ``x``/``y`` are absent."""
    return NpzSource(path, split)
