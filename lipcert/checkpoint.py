"""Resumable report runs: per-batch results saved in the output folder as batches finish.

The checkpoint records the model and data hashes and every setting that changes a number; ``--resume``
refuses a checkpoint made with different ones. Each batch file is written atomically, so an interrupted run
(Ctrl-C, a killed process, a lost GPU) loses at most the batch in flight.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import ConfigError

FOLDER = ".lipcert-checkpoint"
MANIFEST = "manifest.json"


class Checkpoint:
    """Per-batch results of one run, keyed by the global batch index."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], resume: bool) -> None:
        self.folder = Path(out_dir) / FOLDER
        self.manifest = json.loads(json.dumps(manifest))
        path = self.folder / MANIFEST
        if resume and path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                raise ConfigError("the checkpoint's manifest is unreadable; run without --resume",
                                  source=str(path)) from None
            for key in sorted(set(saved) | set(self.manifest)):
                if saved.get(key) != self.manifest.get(key):
                    raise ConfigError(f"cannot resume: the checkpoint was made with a different {key} "
                                      f"({saved.get(key)!r}, now {self.manifest.get(key)!r}); run without --resume",
                                      source=str(self.folder))
        elif path.exists() or self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        if not path.is_file():
            write_text_atomic(path, json.dumps(self.manifest, indent=2, sort_keys=True))

    def _file(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.npz"

    def done(self, index: int) -> bool:
        return self._file(index).is_file()

    def save(self, index: int, arrays: dict[str, np.ndarray], extra: list[dict]) -> None:
        buf = io.BytesIO()
        np.savez(buf, __extra__=np.frombuffer(json.dumps(extra).encode(), dtype=np.uint8), **arrays)
        write_bytes_atomic(self._file(index), buf.getvalue())

    def load(self, index: int) -> tuple[dict[str, np.ndarray], list[dict]]:
        with np.load(self._file(index), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "__extra__"}
            extra = json.loads(bytes(data["__extra__"]).decode())
        return arrays, extra

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def clear(out_dir: str | Path) -> None:
    """Remove a finished run's checkpoint."""
    shutil.rmtree(Path(out_dir) / FOLDER, ignore_errors=True)
