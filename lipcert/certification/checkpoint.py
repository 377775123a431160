"""Resumable report runs: per-batch results saved in the output folder as batches finish.

The checkpoint records the model and data hashes and every setting that changes a number (``checkpoint`` in
``settings.SETTINGS``). Each batch file is written atomically, so an interrupted run (Ctrl-C, a crash, a killed
process, a lost GPU) loses at most the batch in flight. A run finding a checkpoint in its folder:
- made with the same model, data and settings: continues it, with ``resume`` or without (the batches it holds are
  the ones this run would compute), so that rerunning the command that crashed or was interrupted just works;
- made with others (or unreadable): with ``resume``, refuses, naming the setting that differs, and leaves it in
  place; without, replaces it (a new run in that folder, which would overwrite that run's report too), and says so.
A checkpoint is removed by the run that made it when it finishes, or when it stops on bad input (a resume would
fail the same way).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipcert.atomic import write_bytes_atomic, write_text_atomic
from lipcert.certification.attack import Violation
from lipcert.certification.settings import CHECKPOINT_ENTRIES, SETTINGS
from lipcert.errors import ConfigError

FOLDER = ".lipcert-checkpoint"
MANIFEST = "manifest.json"
#: how a mismatch message names each manifest entry: the setting it records, else what it is
ENTRIES = {"model_sha256": "the model", "data_sha256": "the data", "world_size": "processes",
           "lipcert_version": "lipcert",
           "attack.norm": "norm", "attack.lower": "attack box lower", "attack.upper": "attack box upper",
           **CHECKPOINT_ENTRIES}


@dataclass
class BatchResult:
    """One batch's per-sample results, in dataset order: what a checkpoint stores and the merge concatenates.

    On disk: the arrays, and ``__extra__``, a JSON list of the batch's metadata then its violations."""

    labels: np.ndarray
    predictions: np.ndarray
    margins: np.ndarray
    radii: np.ndarray
    backend: str
    #: each row's dataset index and the samples left out (index, reason); only with ``skip_bad_samples``
    indices: np.ndarray | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    #: the attack's results (see ``attack.attack_batch``); None without an attack
    attack_radius: np.ndarray | None = None
    broken_at: np.ndarray | None = None
    violations: list[Violation] = field(default_factory=list)
    #: the exact-arithmetic radii (``radii`` are the float32-safe ones); a batch always has them
    exact_radii: np.ndarray | None = None
    #: the local certificates' radii (``local``); None without them
    local_radii: np.ndarray | None = None

    @property
    def read(self) -> int:
        """Samples this batch read, skipped ones included."""
        return len(self.labels) + len(self.skipped)

    def arrays(self) -> dict[str, np.ndarray]:
        optional = {"indices": self.indices, "attack_radius": self.attack_radius, "broken_at": self.broken_at,
                    "exact_radii": self.exact_radii, "local_radii": self.local_radii}
        return {"labels": self.labels, "predictions": self.predictions, "margins": self.margins, "radii": self.radii,
                **{k: v for k, v in optional.items() if v is not None}}

    def extra(self) -> list[dict[str, Any]]:
        meta: dict[str, Any] = {"backend": self.backend}
        if self.indices is not None:  # only then, as checkpoints made before skip_bad_samples existed
            meta["skipped"] = [[i, why] for i, why in self.skipped]
        return [meta] + [asdict(v) for v in self.violations]

    @classmethod
    def stored(cls, arrays: dict[str, np.ndarray], extra: list[dict[str, Any]]) -> BatchResult:
        """The result a checkpoint file holds (``arrays()`` and ``extra()`` read back). A batch saved before
        exact radii were recorded is refused: its float32-safe radii came from a looser allowance, and the
        exact ones cannot be made up."""
        if "exact_radii" not in arrays:
            raise ConfigError("cannot resume: the checkpoint was made by an earlier lipcert that did not record "
                              "exact-arithmetic radii; delete the checkpoint folder to start over",
                              parameter="resume")
        meta = extra[0]
        return cls(arrays["labels"], arrays["predictions"], arrays["margins"], arrays["radii"], meta["backend"],
                   arrays.get("indices"), [(int(i), why) for i, why in meta.get("skipped", ())],
                   arrays.get("attack_radius"), arrays.get("broken_at"), [Violation(**v) for v in extra[1:]],
                   arrays["exact_radii"], arrays.get("local_radii"))


def _flatten(manifest: dict[str, Any]) -> dict[str, Any]:
    """The attack's settings as entries of their own (``attack.steps``), so that a mismatch names one."""
    flat = {k: v for k, v in manifest.items() if k != "attack"}
    attack = manifest.get("attack")
    flat["attack"] = attack is not None
    flat.update({f"attack.{k}": v for k, v in (attack or {}).items()})
    return flat


def _describe(key: str, value: Any) -> str:
    """One setting as the user gave it: ``batch_size 32``, ``no attack``, ``the model sha256 be10903b...``."""
    name = ENTRIES.get(key, key)
    if key.endswith("sha256"):
        return f"{name} sha256 {str(value)[:12]}..."
    if key == "world_size":
        return f"{value} process(es)"
    if key == "lipcert_version":
        return f"lipcert {value}" if value else "an earlier lipcert"
    if value is None or value is False:
        return f"no {name}"
    if value is True:
        return name
    if key == "eps":
        value = ",".join(str(label) for label, _ in value)
    elif isinstance(value, list):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{name} {value}"


class Checkpoint:
    """Per-batch results of one run, keyed by the global batch index.

    ``created``: this run made it (it found none to continue); ``continued``: a run without ``resume`` found one
    of the same settings and continues it; ``replaced``: why a run without ``resume`` replaced the one it found
    (None when it did not)."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], resume: bool) -> None:
        self.folder = Path(out_dir) / FOLDER
        self.manifest = json.loads(json.dumps(manifest))
        self.continued = False
        self.replaced: str | None = None
        path = self.folder / MANIFEST
        self.created = not path.is_file()
        if not self.created:
            difference = self._difference(path)
            if difference is None:
                self.continued = not resume
                return
            what, parameter = difference
            if resume:
                raise ConfigError(f"cannot resume: {what}; rerun with the checkpoint's settings, or delete "
                                  f"{self.folder} to start over", parameter=parameter)
            batches = len(list(self.folder.glob("batch-*.npz")))
            self.replaced, self.created = f"{what} ({batches} finished batch(es), discarded)", True
        if self.folder.exists():  # a folder without a manifest, or one replaced: nothing of it is kept
            shutil.rmtree(self.folder, ignore_errors=True)
        write_text_atomic(path, json.dumps(self.manifest, indent=2, sort_keys=True))

    def _difference(self, path: Path) -> tuple[str, str | None] | None:
        """What makes the checkpoint at ``path`` another run's (and the setting it names), or None when this run
        would compute the very batches it holds."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return f"the checkpoint's manifest {path} is unreadable", None
        old, new = _flatten(saved), _flatten(self.manifest)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = ENTRIES.get(key, key)
                return (f"the checkpoint in {self.folder.parent} was made with {_describe(key, old.get(key))}, this "
                        f"run has {_describe(key, new.get(key))}", name if name in SETTINGS else None)
        return None

    def _file(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.npz"

    def done(self, index: int) -> bool:
        return self._file(index).is_file()

    def save(self, index: int, result: BatchResult) -> None:
        buf = io.BytesIO()
        # typed Any: mypy would match a dict of arrays against savez's keyword allow_pickle (a bool)
        entries: dict[str, Any] = {"__extra__": np.frombuffer(json.dumps(result.extra()).encode(), dtype=np.uint8),
                                   **result.arrays()}
        np.savez(buf, **entries)
        write_bytes_atomic(self._file(index), buf.getvalue())

    def load(self, index: int) -> BatchResult:
        with np.load(self._file(index), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "__extra__"}
            extra = json.loads(bytes(data["__extra__"]).decode())
        return BatchResult.stored(arrays, extra)

    def remove(self) -> None:
        """Delete the checkpoint: its run finished, or stopped on bad input that a resume would meet again."""
        shutil.rmtree(self.folder, ignore_errors=True)
