"""``.safetensors`` files holding a dataset as two tensors, read lazily with ``safe_open`` / ``get_slice``.

The file is memory-mapped by safetensors and each batch slices only its own rows, so nothing is loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from lipcert.data.base import Source, check_lengths, label_count, pick_keys, sha256_file
from lipcert.errors import DataError


def _reader(path: Path):
    """Open the file for numpy slicing, reporting a damaged file as a DataError."""
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"not a readable .safetensors file (damaged or truncated?): {exc}", source=str(path)) from exc


class SafetensorsSource(Source):
    """Tensors ``x``/``y`` (or ``images``/``labels``, ``x_<split>``/``y_<split>``) of a .safetensors file."""

    format = "safetensors"

    def __init__(self, path: Path, split: str) -> None:
        with _reader(path) as tensors:
            self._x_key, self._y_key = pick_keys(list(tensors.keys()), split, path)
            try:
                x, y = tensors.get_slice(self._x_key), tensors.get_slice(self._y_key)
                x_shape, y_shape = tuple(x.get_shape()), tuple(y.get_shape())
                x_dtype = x[0:0].dtype  # an empty slice gives numpy's dtype without reading data
            except (SafetensorError, TypeError, ValueError) as exc:
                raise DataError(f"cannot read tensor {self._x_key!r}: {exc}", source=str(path)) from exc
        if not x_shape:
            raise DataError(f"{self._x_key} is a scalar, not an array of samples", source=str(path))
        check_lengths(x_shape[0], label_count(y_shape, path, self._y_key), path)
        super().__init__(path, x_shape[0], x_shape[1:], x_dtype)

    def _rows(self, key: str, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        with _reader(self.path) as tensors:
            tensor = tensors.get_slice(key)
            for first in range(start, stop, rows):
                try:
                    chunk = tensor[first:min(stop, first + rows)]
                except (SafetensorError, TypeError, ValueError) as exc:
                    raise DataError(f"cannot read tensor {key!r}: {exc}", source=str(self.path)) from exc
                yield chunk if key == self._x_key else chunk.reshape(-1)

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._x_key, start, stop, rows)

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(self._y_key, start, stop, rows)

    def sha256(self) -> str:
        return sha256_file(self.path)


def looks_like(path: Path) -> bool:
    """A file named ``*.safetensors``."""
    return path.is_file() and path.suffix.lower() == ".safetensors"


def open_source(path: Path, split: str) -> SafetensorsSource:
    """Open a .safetensors dataset; ``split`` selects ``x_<split>``/``y_<split>`` when ``x``/``y`` are absent."""
    return SafetensorsSource(path, split)
