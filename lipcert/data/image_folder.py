"""Folders of images sorted into one sub-folder per class, ordered like torchvision's ``ImageFolder``.

The files are listed once at open; images are decoded only when their batch is read. The first image fixes
the size and the colour mode (greyscale stays one channel, anything else becomes RGB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .base import Source, reading, sha256_tree

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list
GREY_MODES = ("1", "L", "LA")


def class_names(root: Path) -> list[str]:
    """Class sub-folders in sorted order (hidden ones such as ``.ipynb_checkpoints`` are skipped)."""
    with reading(root, "cannot list the folder"):
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_images(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image file, class index) in torchvision's order: by class, then by walk order and file name."""
    found = []
    with reading(root, "cannot list the folder"):
        for index, name in enumerate(classes):
            for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
                found += [(Path(folder, f), index) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    return found


def decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (H, W) or (H, W, 3), failing with a DataError that names the file."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                raise DataError(f"{image.mode} images (16-bit or float) are not supported; use 8-bit images",
                                source=str(path))
            if image.size != size:
                raise DataError(f"the image is {image.size[0]}x{image.size[1]} but the first image is "
                                f"{size[0]}x{size[1]}; all images must have the same size", source=str(path))
            return np.asarray(image.convert(mode), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL reports damaged files with many error types (OSError, SyntaxError, ...)
        raise DataError(f"corrupt or unreadable image: {exc}", source=str(path)) from exc


def split_root(path: Path, split: str) -> Path:
    """``path/<split>`` when the folder holds both ``train`` and ``test`` sub-folders, else ``path``."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path / split
    return path


class ImageFolderSource(Source):
    """Images under ``root/<class>/...``; labels are the class folders' indices in sorted order."""

    format = "image-folder"

    def __init__(self, root: Path) -> None:
        classes = class_names(root)
        listed = list_images(root, classes)
        if not listed:
            raise DataError(f"the dataset is empty: no images ({', '.join(EXTENSIONS)}) in class sub-folders",
                            source=str(root))
        self._files = [f for f, _ in listed]
        self._labels = np.array([c for _, c in listed], dtype=np.int64)
        self._root = root
        try:
            with Image.open(self._files[0]) as first:
                self._mode = "L" if first.mode in GREY_MODES else "RGB"
                self._size = first.size
        except Exception as exc:  # as in decode: PIL's error types vary by format
            raise DataError(f"corrupt or unreadable image: {exc}", source=str(self._files[0])) from exc
        width, height = self._size
        shape = (height, width) if self._mode == "L" else (height, width, 3)
        super().__init__(root, len(self._files), shape, np.dtype(np.uint8),
                         fixed_layout="NHW" if self._mode == "L" else "NHWC", num_classes=len(classes))

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        for first in range(start, stop, rows):
            yield np.stack([decode(f, self._mode, self._size) for f in self._files[first:min(stop, first + rows)]])

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        yield self._labels[start:stop]

    def sha256(self) -> str:
        return sha256_tree((f.relative_to(self._root).as_posix(), f) for f in self._files)


def looks_like(path: Path) -> bool:
    """A folder with at least one (non-hidden) sub-folder."""
    return path.is_dir() and bool(class_names(path))


def open_source(path: Path, split: str) -> ImageFolderSource:
    """Open an image folder; a folder with ``train``/``test`` sub-folders is opened at ``split``."""
    return ImageFolderSource(split_root(path, split))
