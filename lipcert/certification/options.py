"""``CertifyOptions``: every setting of a ``certify`` run, with its defaults, checked in one place.

Each field is a setting of ``settings.SETTINGS``, which gives its default and its check; the checks that involve
several settings (the normalisation, the gates' radii, the folders) are here. The defaults are those of ``lipcert
report``, which only maps its settings onto these parameters. A wrong value is a ``ConfigError`` naming the
parameter (``batch_size must be a whole number of at least 1, got 0``), which the command line spells as its flag.
This module imports neither torch nor numpy; what needs them is imported when an options object is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lipcert import limits
from lipcert.certification.settings import (
    ATTACK_FIELDS,
    CERTIFY_FIELDS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_OUT,
    SETTINGS,
    is_finite,
)
from lipcert.errors import ConfigError, ModelError
from lipcert.parse import fraction_problem, parse_eps, parse_gate

if TYPE_CHECKING:
    from lipcert.certification.attack import AttackConfig
    from lipcert.graph.core import Graph

#: a gate's radius is already certified when an ``eps`` is this close to it
SAME_RADIUS = 1e-12


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    """A ConfigError ``NAME must be EXPECTED, got VALUE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}", parameter=name)


def _check_fraction(name: str, value: Any) -> None:
    """An accuracy threshold: a fraction in [0, 1], with a hint when it looks like a percentage."""
    _check(is_finite(value), name, "a fraction between 0 and 1", value)
    problem = fraction_problem(value)
    if problem:
        expected, _, hint = problem.removeprefix("expected ").partition("; ")
        raise ConfigError(f"{name} must be {expected}, got {value!r}" + (f"; {hint}" if hint else ""),
                          parameter=name)


def _eps_labels(eps: str | float | Sequence[str | float]) -> list[str]:
    """The radii as the user wrote them, one per item (``36/255``, ``0.1``)."""
    if isinstance(eps, str) or is_finite(eps):
        return [str(eps)]
    if not isinstance(eps, Sequence) or not all(isinstance(e, str) or is_finite(e) for e in eps):
        raise ConfigError(f"eps must be radii like '36/255,72/255' or a list of numbers, got {eps!r}",
                          parameter="eps")
    return [str(e) for e in eps]


def _gate(item: Any) -> tuple[str, float, float]:
    """One ``min_certified_acc`` item (``"36/255=0.6"`` or ``("36/255", 0.6)``) as (label, radius, accuracy)."""
    if isinstance(item, tuple) and len(item) == 2 and (isinstance(item[0], str) or is_finite(item[0])) \
            and is_finite(item[1]):
        text = f"{item[0]}={item[1]!r}"
    elif isinstance(item, str):
        text = item
    else:
        raise ConfigError(f"min_certified_acc items must be 'EPS=ACCURACY' strings or (eps, accuracy) pairs, got "
                          f"{item!r}", parameter="min_certified_acc")
    try:
        return parse_gate(text)
    except ValueError as exc:
        raise ConfigError(f"min_certified_acc {text!r}: {exc}", parameter="min_certified_acc") from None


def _setting(name: str) -> Any:
    return SETTINGS[name].field()


@dataclass(frozen=True)
class CertifyOptions:
    """Every setting of a ``certify`` run, with ``lipcert report``'s defaults; checked when made.

    ``eps`` (default: ``DEFAULT_EPS`` of the norm) is certified along with every radius a ``min_certified_acc``
    gate names. ``device`` ``auto`` is the GPU when there is one; ``batch_size`` defaults per device
    (``DEFAULT_BATCH_SIZE``). ``attack`` is True (PGD with ``AttackConfig``'s defaults), an ``AttackConfig``, or
    False/None (no attack); the attack always uses the run's norm. The gates (``min_clean_acc``,
    ``min_certified_acc``, ``min_mean_radius``, ``max_violations``, ``max_lipschitz``, ``require_claim``,
    ``baseline``, ``missing_baseline``, ``max_drop``, ``allow_empty_certificates``) are those of ``report_gates``
    and end up in ``Report.gates``; ``gate_on`` (float or exact) chooses the certified radius they
    read. ``local`` adds a third radius per sample, the local certificate, from the network's last ``local_depth``
    activation blocks (``LocalCertifier``). ``out`` is the run's folder: a checkpoint there while it runs, the report
    written there at the end and the checkpoint removed; ``checkpoint_dir`` keeps the checkpoint without writing a
    report. An unfinished run's checkpoint there is continued when it was made with the same model, data and
    settings (``resume`` or not); one made with others is refused with ``resume``, replaced without it (see
    ``checkpoint``). Options are frozen:
    ``dataclasses.replace`` makes (and checks) others.
    """

    eps: str | float | Sequence[str | float] | None = _setting("eps")
    norm: str = _setting("norm")
    device: str = _setting("device")
    batch_size: int | None = _setting("batch_size")
    out: str | Path | None = _setting("out")
    mean: Sequence[float] | None = _setting("mean")
    std: Sequence[float] | None = _setting("std")
    lipschitz: float | None = _setting("lipschitz")
    backend: str = _setting("backend")
    layout: str = _setting("layout")
    value_range: str = _setting("value_range")
    max_elements: int | None = _setting("max_elements")
    skip_bad_samples: bool = _setting("skip_bad_samples")
    workers: int | None = _setting("workers")
    attack: AttackConfig | bool | None = _setting("attack")
    min_clean_acc: float | None = _setting("min_clean_acc")
    min_certified_acc: str | Sequence[str | tuple[str | float, float]] | Mapping[str | float, float] = \
        _setting("min_certified_acc")
    max_violations: int = _setting("max_violations")
    min_mean_radius: float | None = _setting("min_mean_radius")
    max_lipschitz: float | None = _setting("max_lipschitz")
    require_claim: bool | None = _setting("require_claim")
    baseline: str | Path | Mapping[str, Any] | None = _setting("baseline")
    missing_baseline: str = _setting("missing_baseline")
    max_drop: float = _setting("max_drop")
    allow_empty_certificates: bool = _setting("allow_empty_certificates")
    gate_on: str = _setting("gate_on")
    local: bool = _setting("local")
    local_depth: int = _setting("local_depth")
    checkpoint_dir: str | Path | None = _setting("checkpoint_dir")
    resume: bool = _setting("resume")
    #: what the settings above resolve to, set when the options are made
    radii: list[tuple[str, float]] = field(init=False, repr=False, compare=False)
    certified_gates: list[tuple[str, float, float]] = field(init=False, repr=False, compare=False)
    attack_config: AttackConfig | None = field(init=False, repr=False, compare=False)
    baseline_report: dict[str, Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from lipcert.certification.attack import AttackConfig

        for f in fields(self):
            if "setting" in f.metadata:
                self._set(f.name, f.metadata["setting"].validate(getattr(self, f.name)))
        self._check_normalisation()
        if self.max_elements is not None:
            limits.resolve(self.max_elements)
        _check(isinstance(self.attack, (AttackConfig, bool)) or self.attack is None, "attack",
               "True, False, None or an AttackConfig", self.attack)
        attack = AttackConfig() if self.attack is True else self.attack or None
        self._set("attack_config", attack.in_norm(self.norm) if attack is not None else None)
        self._check_gates()
        self._set("radii", self._radii())
        self._check_folders()
        self._load_baseline()
        self.run_device()

    @classmethod
    def of_command(cls, given: Mapping[str, Any]) -> CertifyOptions:
        """The options of ``lipcert report`` from the settings it was given (parsed, by name; the others take
        their defaults): the attack's settings make its ``AttackConfig``, and ``out`` defaults to ``DEFAULT_OUT``."""
        from lipcert.certification.attack import AttackConfig

        options = {name: given[name] for name in CERTIFY_FIELDS if name in given}
        attack = {field: given[name] for name, field in ATTACK_FIELDS.items() if name in given}
        options["attack"] = False if given.get("attack") is False else AttackConfig(**attack)
        options["out"] = given.get("out") or DEFAULT_OUT
        return cls(**options)

    def _set(self, name: str, value: Any) -> None:
        """Set a resolved value (the options are frozen once made)."""
        object.__setattr__(self, name, value)

    def _check_normalisation(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ConfigError("mean and std go together: give both, or neither", parameter=("mean", "std"))
        _check(self.std is None or min(self.std) > 0, "std", "positive numbers", self.std)

    def _check_gates(self) -> None:
        if self.min_clean_acc is not None:
            _check_fraction("min_clean_acc", self.min_clean_acc)
        _check_fraction("max_drop", self.max_drop)
        items = self.min_certified_acc
        if isinstance(items, (str, Mapping)):
            items = [items] if isinstance(items, str) else list(items.items())
        _check(isinstance(items, Sequence), "min_certified_acc",
               "a list of 'EPS=ACCURACY' strings or (eps, accuracy) pairs, or a dict", self.min_certified_acc)
        self._set("certified_gates", [_gate(item) for item in items])

    def _radii(self) -> list[tuple[str, float]]:
        """``eps`` (or the norm's default radii), then every radius a gate names that is not among them."""
        labels = _eps_labels(self.eps) if self.eps is not None else [DEFAULT_EPS[self.norm]]
        eps = parse_eps(",".join(labels))
        extra = [label for label, value, _ in self.certified_gates
                 if not any(abs(value - v) <= SAME_RADIUS for _, v in eps)]
        return parse_eps(",".join([label for label, _ in eps] + extra))

    def _check_folders(self) -> None:
        for name in ("out", "checkpoint_dir"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, (str, Path)) and str(value).strip() != ""), name,
                   "a folder path", value)
        if self.out is not None and self.checkpoint_dir is not None:
            raise ConfigError("out and checkpoint_dir: give one (out keeps the checkpoint until it writes the report)",
                              parameter=("out", "checkpoint_dir"))
        if self.resume and self.folder is None:
            raise ConfigError("resume needs out or checkpoint_dir, the folder of the run to continue",
                              parameter=("resume", "out", "checkpoint_dir"))

    def _load_baseline(self) -> None:
        from lipcert.report.gates import load_baseline

        if isinstance(self.baseline, (str, Path)):
            self._set("baseline_report", load_baseline(Path(self.baseline), missing=self.missing_baseline))
        else:
            _check(self.baseline is None or isinstance(self.baseline, Mapping), "baseline",
                   "a report.json path or its contents", self.baseline)
            self._set("baseline_report", dict(self.baseline) if self.baseline is not None else None)

    @property
    def baseline_missing(self) -> str | None:
        """The path of a baseline that does not exist (``missing_baseline`` skip), else None."""
        return str(self.baseline) if isinstance(self.baseline, (str, Path)) and self.baseline_report is None else None

    @property
    def folder(self) -> Path | None:
        """Where the run keeps its checkpoint: ``out`` or ``checkpoint_dir``."""
        folder = self.out if self.out is not None else self.checkpoint_dir
        return None if folder is None else Path(folder)

    def run_device(self) -> str:
        """The torch device ``device`` names (``auto``: the GPU when there is one)."""
        from lipcert.device import resolve_device

        return resolve_device(self.device)

    def batch_size_on(self, device: str) -> int:
        """``batch_size``, else the default for ``device``."""
        return self.batch_size or DEFAULT_BATCH_SIZE["cuda" if device.startswith("cuda") else "cpu"]

    def check_model(self, model: Graph) -> None:
        """The settings that depend on the model: the normalisation's channels, the backend, the claim."""
        channels = model.input_shape[0] if model.input_shape else 1
        if self.mean is not None and (self.std is None or len(self.mean) != len(self.std)
                                      or len(self.mean) not in (1, channels)):
            counts = "1 value" if channels == 1 else f"1 or {channels} values"
            raise ConfigError(f"mean and std need {counts} each (the model's input has {channels} channel(s))",
                              parameter=("mean", "std"))
        if self.backend == "onnxruntime" and model.onnx_model is None:
            raise ConfigError("backend onnxruntime needs an ONNX model", parameter="backend")
        if self.require_claim and self.lipschitz is None and model.claimed_lipschitz() is None:
            raise ModelError("require_claim: the model declares no Lipschitz claim (no lipcert.claimed_lipschitz "
                             "metadata) and no lipschitz was given", source=model.source,
                             parameter=("require_claim", "lipschitz"))

