"""Datasets already in memory, for the Python API: ``(x, y)`` numpy arrays or torch tensors, and a map-style torch
``Dataset`` that returns ``(x, y)`` pairs. Both are sources of ``base.build_dataset``, so they are checked, scaled
and delivered exactly as a file with the same arrays would be (layout and value range resolved, pixels checked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np

from lipcert.data.base import Source, check_lengths, label_count
from lipcert.errors import DataError

#: how an in-memory dataset is named in messages and in the report
ARRAYS_NAME = "<arrays>"


def as_array(value: Any, name: str, where: str) -> np.ndarray:
    """A numpy array of a numpy array, a torch tensor (detached, on the CPU) or a number, else a one-line
    ``DataError`` naming ``name``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} is not an array ({type(value).__name__}: {exc})", source=where) from None
    if array.dtype.hasobject:
        raise DataError(f"{name} is not a numeric array (it holds {type(value).__name__} objects)", source=where)
    return array


class ArraySource(Source):
    """``x`` (N, ...) and ``y`` (N,) arrays in memory."""

    format = "arrays"

    def __init__(self, x: Any, y: Any, name: str = ARRAYS_NAME) -> None:
        self._x = as_array(x, "x", name)
        self._y = as_array(y, "y", name)
        if self._x.ndim < 2:
            raise DataError(f"x has shape {self._x.shape}; expected samples along its first axis, e.g. (N, C, H, W)",
                            source=name)
        check_lengths(len(self._x), label_count(self._y.shape, name), name)
        self._y = self._y.reshape(len(self._x))
        super().__init__(Path(name), len(self._x), self._x.shape[1:], self._x.dtype)

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, rows):
            yield self._x[first:min(stop, first + rows)]

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, rows):
            yield self._y[first:min(stop, first + rows)]

    def sha256(self) -> str:
        """Of each array's dtype, shape and bytes (the same arrays give the same hash, whatever holds them)."""
        digest = hashlib.sha256()
        for array in (self._x, self._y):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


class MapSource(Source):
    """A map-style dataset (``len(ds)`` and ``ds[i]`` -> ``(x, y)``, as a torch ``Dataset``), read item by item.

    It is read once to open it (hash, labels, a float dataset's value range) and then once per run, so its items
    must not change between reads (no random augmentation)."""

    format = "torch-dataset"

    def __init__(self, items: Any, name: str) -> None:
        self._items = items
        self._name = name
        if not isinstance(items, Sized):
            raise DataError("a dataset without a length (an IterableDataset) cannot be read by index: give a "
                            "map-style Dataset or (x, y) arrays", source=name)
        count = len(items)
        if count == 0:
            raise DataError("the dataset is empty: it holds no samples", source=name)
        x, _ = self._item(0)
        super().__init__(Path(name), count, x.shape, x.dtype)

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            item = self._items[index]
        except Exception as exc:  # noqa: BLE001 - the user's dataset may raise anything
            raise DataError(f"sample {index}: reading it raised {type(exc).__name__}: {exc}",
                            source=self._name) from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"sample {index} is a {type(item).__name__}, not an (x, y) pair", source=self._name)
        x, y = as_array(item[0], f"sample {index}'s x", self._name), as_array(item[1], f"sample {index}'s y",
                                                                              self._name)
        if y.size != 1:
            raise DataError(f"sample {index}'s label has shape {y.shape}; expected one class index",
                            source=self._name)
        return x, y.reshape(())

    def _rows(self, start: int, stop: int, rows: int, part: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, rows):
            items = [self._item(i) for i in range(first, min(stop, first + rows))]
            for k, (x, _) in enumerate(items):
                if x.shape != self.x_shape:
                    raise DataError(f"sample {first + k}'s x has shape {x.shape}, sample 0's has {self.x_shape}",
                                    source=self._name)
            yield np.stack([item[part] for item in items])

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(start, stop, rows, 0)

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        return self._rows(start, stop, rows, 1)

    def sha256(self) -> str:
        """Of every item's x and y (dtype, shape and bytes), in order: one read of the whole dataset."""
        digest = hashlib.sha256()
        for index in range(self.num_samples):
            for array in self._item(index):
                digest.update(f"{array.dtype.str}{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()
