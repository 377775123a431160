"""Folders of images sorted into one sub-folder per class, ordered like torchvision's ``ImageFolder``.

The files are listed once at open; images are decoded only when their batch is read, in worker processes
(``workers``, by default one per core up to 4) that run ahead of the model by a bounded number of chunks, so
that decoding overlaps inference and memory does not grow with the number of images. The first readable
image fixes the size and the colour mode (greyscale stays one channel, anything else becomes RGB).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from lipcert.data.base import Source, reading, sha256_tree
from lipcert.errors import ConfigError, DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list
GREY_MODES = ("1", "L", "LA")
MAX_WORKERS = 4
PARALLEL_MIN = 1024  # by default, fewer images than this are decoded in the main process
IN_FLIGHT = 2  # chunks queued or being decoded per worker
TASK_BYTES = 4 << 20  # decoded pixels per chunk sent back by a worker (at least one image)
PROBE = 64  # images tried at open for the size and colour mode before the folder is declared unreadable
WATCH_SECONDS = 1.0  # how often workers check that their parent lives, and the parent that its workers do
JOIN_SECONDS = 5.0  # how long a worker may take to finish its chunk when told to stop, before it is killed
#: multiprocessing's start method for the workers; None: the platform default
START_METHOD: Literal["fork", "spawn", "forkserver"] | None = None


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


def read_image(path: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray | str:
    """One image as uint8 (H, W) or (H, W, 3), or the reason it cannot be used."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                return f"{image.mode} images (16-bit or float) are not supported; use 8-bit images"
            if image.size != size:
                return (f"the image is {image.size[0]}x{image.size[1]} but the first image is {size[0]}x{size[1]}; "
                        "all images must have the same size")
            return np.asarray(image.convert(mode), dtype=np.uint8)
    except Exception as exc:  # PIL reports damaged files with many error types (OSError, SyntaxError, ...)
        return f"corrupt or unreadable image: {exc}"


def decode_files(paths: Sequence[str | Path], mode: str,
                 size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Images stacked as uint8 rows, zeros for any that cannot be used, with (position, reason) of those."""
    width, height = size
    rows = np.zeros((len(paths), height, width) + (() if mode == "L" else (3,)), dtype=np.uint8)
    bad = []
    for k, path in enumerate(paths):
        image = read_image(path, mode, size)
        if isinstance(image, str):
            bad.append((k, image))
        else:
            rows[k] = image
    return rows, bad


def default_workers() -> int:
    """Decoding processes: the cores this process may use, shared among torchrun's local processes, at most 4;
    none when that leaves fewer than two (a single worker would only add copying)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(MAX_WORKERS, share) if share >= 2 else 0


def _work(files: list[str], mode: str, size: tuple[int, int], tasks: multiprocessing.queues.Queue,
          results: multiprocessing.queues.Queue, stop: multiprocessing.synchronize.Event, parent: int) -> None:
    """A worker process: decode the chunks (number, first, count) it is given until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    results.cancel_join_thread()  # exit without flushing results nobody will read
    while not stop.is_set():
        try:
            task = tasks.get(timeout=WATCH_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died without stopping us (SIGKILL, OOM killer)
                return
            continue
        if task is None or stop.is_set():
            return
        number, first, count = task
        results.put((number, decode_files(files[first:first + count], mode, size)))


#: what ``decode_files`` returns for one span: its rows, and (position, reason) of the images it could not use
Decoded = tuple[np.ndarray, list[tuple[int, str]]]


def decode_in_workers(files: list[str], spans: Sequence[tuple[int, int]], workers: int, mode: str,
                      size: tuple[int, int], root: str) -> Generator[Decoded, None, None]:
    """``decode_files`` of each (first, count) span of ``files``, in order, by ``workers`` processes.

    At most ``IN_FLIGHT * workers`` chunks are queued or decoded ahead of the consumer. The workers are stopped
    (and killed if they do not stop) when the generator finishes, fails or is closed, and stop by themselves
    when this process dies.
    """
    context = multiprocessing.get_context(START_METHOD)
    tasks, results, stop = context.Queue(), context.Queue(), context.Event()
    started: list[multiprocessing.process.BaseProcess] = []
    try:
        for k in range(workers):
            worker = context.Process(target=_work, args=(files, mode, size, tasks, results, stop, os.getpid()),
                                     name=f"lipcert-decode-{k}", daemon=True)
            worker.start()
            started.append(worker)
        queued = ((number, first, count) for number, (first, count) in enumerate(spans))
        for task in islice(queued, IN_FLIGHT * workers):
            tasks.put(task)
        ready: dict[int, Decoded] = {}
        for number in range(len(spans)):
            while number not in ready:
                try:
                    done, result = results.get(timeout=WATCH_SECONDS)
                except queue.Empty:
                    dead = [p.exitcode for p in started if p.exitcode is not None]
                    if dead:
                        raise DataError(f"an image-decoding process ended unexpectedly (exit code {dead[0]}); "
                                        "workers 0 decodes in the main process", source=root,
                                        parameter="workers") from None
                    continue
                ready[done] = result
            following = next(queued, None)
            if following is not None:
                tasks.put(following)
            yield ready.pop(number)
    finally:
        stop.set()
        for _ in started:
            tasks.put(None)  # wakes idle workers at once
        for process in started:
            process.join(JOIN_SECONDS)
        for process in started:
            if process.is_alive():
                process.terminate()
                process.join()
        tasks.close()
        results.close()


def split_root(path: Path, split: str) -> Path:
    """``path/<split>`` when the folder holds both ``train`` and ``test`` sub-folders, else ``path``."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path / split
    return path


class ImageFolderSource(Source):
    """Images under ``root/<class>/...``; labels are the class folders' indices in sorted order."""

    format = "image-folder"

    def __init__(self, root: Path, workers: int | None = None) -> None:
        if workers is not None and workers < 0:
            raise ConfigError(f"workers must be 0 (decode in the main process) or more, got {workers}",
                              parameter="workers")
        classes = class_names(root)
        listed = list_images(root, classes)
        if not listed:
            raise DataError(f"the dataset is empty: no images ({', '.join(EXTENSIONS)}) in class sub-folders",
                            source=str(root))
        self._files = [str(f) for f, _ in listed]
        self._labels = np.array([c for _, c in listed], dtype=np.int64)
        self._root = root
        self.workers = workers  # decoding processes; None: default_workers() for a large enough range
        self._mode, self._size = self._probe()
        width, height = self._size
        shape = (height, width) if self._mode == "L" else (height, width, 3)
        super().__init__(root, len(self._files), shape, np.dtype(np.uint8),
                         fixed_layout="NHW" if self._mode == "L" else "NHWC", num_classes=len(classes))

    def _probe(self) -> tuple[str, tuple[int, int]]:
        """Colour mode and size of the first readable image; the first one's error when none of PROBE opens."""
        errors: list[DataError] = []
        for file in self._files[:PROBE]:  # there is at least one (an empty folder is refused before)
            try:
                with Image.open(file) as image:
                    return ("L" if image.mode in GREY_MODES else "RGB"), image.size
            except Exception as exc:  # as in read_image: PIL's error types vary by format
                errors.append(DataError(f"corrupt or unreadable image: {exc}", source=file))
        raise errors[0]

    def _workers_for(self, count: int, chunks: int) -> int:
        """How many processes decode ``count`` images in ``chunks`` chunks (0: the main process does)."""
        wanted = self.workers if self.workers is not None else default_workers() if count >= PARALLEL_MIN else 0
        return min(wanted, chunks) if chunks > 1 else 0

    def read_x(self, start: int, stop: int,
               rows: int) -> Generator[tuple[np.ndarray, dict[int, DataError]], None, None]:
        """Decoded rows [start, stop) in order, zero rows for images that cannot be used, with their errors."""
        per_chunk = max(1, min(rows, TASK_BYTES // int(np.prod(self.x_shape))))
        spans = [(first, min(per_chunk, stop - first)) for first in range(start, stop, per_chunk)]
        workers = self._workers_for(stop - start, len(spans))
        if workers:
            decoded = decode_in_workers(self._files, spans, workers, self._mode, self._size, str(self._root))
        else:
            decoded = (decode_files(self._files[first:first + count], self._mode, self._size)
                       for first, count in spans)
        with closing(decoded):
            for (first, _), (chunk, bad) in zip(spans, decoded, strict=False):
                yield chunk, {first + k: DataError(why, source=self._files[first + k]) for k, why in bad}

    def x_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        with closing(self.read_x(start, stop, rows)) as chunks:
            for chunk, bad in chunks:
                if bad:
                    raise bad[min(bad)]
                yield chunk

    def y_chunks(self, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
        yield self._labels[start:stop]

    def sha256(self) -> str:
        return sha256_tree((Path(f).relative_to(self._root).as_posix(), Path(f)) for f in self._files)


def looks_like(path: Path) -> bool:
    """A folder with at least one (non-hidden) sub-folder."""
    return path.is_dir() and bool(class_names(path))


def open_source(path: Path, split: str, workers: int | None = None) -> ImageFolderSource:
    """Open an image folder; a folder with ``train``/``test`` sub-folders is opened at ``split``."""
    return ImageFolderSource(split_root(path, split), workers)
