"""Every setting of ``lipcert verify``, ``report`` and ``inspect``, declared once in ``SETTINGS``.

A ``Setting`` says what the value is (its parser, for text from a flag or the environment and TOML values from a
config file; its check, for Python values given to the API), its default, its help, which commands take it,
whether a config file may set it and whether a checkpoint records it. The command line's options, the config
keys and their validation, ``CertifyOptions``' defaults and checks and the checkpoint's settings are all read
from this table. Errors name settings (``batch_size``), never flags: the command line spells those. This module
imports neither torch nor numpy, so that ``lipcert --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lipcert.errors import ConfigError
from lipcert.limits import DEFAULT_MAX_ELEMENTS, ENV_VAR
from lipcert.parse import LAYOUTS, NORMS, REQUIRE, VALUE_RANGES, choice, fraction_problem, parse_eps, parse_gate

BACKENDS = ("auto", "torch", "onnxruntime")
FORMATS = ("text", "json")
PRECISIONS = ("float32", "bfloat16")
#: what a run does when its baseline report does not exist
MISSING_BASELINE = ("fail", "skip")
#: the certified radius the gates read: float32-safe (sound for the deployed model) or exact arithmetic
GATE_ON = ("float", "exact")
#: radii certified when ``eps`` is not given, per norm: the usual benchmark radii of each norm
DEFAULT_EPS = {"l2": "36/255,72/255,108/255", "linf": "1/255,2/255,4/255,8/255"}
#: samples per batch when ``batch_size`` is not given, per kind of device
DEFAULT_BATCH_SIZE = {"cpu": 256, "cuda": 1024}
#: where ``lipcert report`` writes when ``out`` is not given
DEFAULT_OUT = "lipcert-report"

VERIFY, REPORT, INSPECT = "verify", "report", "inspect"
COMMON = frozenset({VERIFY, REPORT})
LOADING = frozenset({VERIFY, REPORT, INSPECT})


# ---------------------------------------------------------------- parsers: raw value -> value, or ValueError
# A parser takes a string (a flag or the environment) or a TOML value (a config file) and returns it converted,
# or raises ValueError saying what was expected.


def _text(expected: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(expected)
        return value

    return parse


_path = _text("expected a file or folder path (a string)")


def _choice(*options: str) -> Callable[[Any], str]:
    return lambda value: choice(value, options)


def _pattern(regex: str, expected: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(regex, value):
            raise ValueError(expected)
        return value

    return parse


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
_device_text = _pattern(DEVICE_PATTERN, "expected auto, cpu, cuda or cuda:N")


def _device(value: Any) -> str:
    return _device_text(value.strip().lower() if isinstance(value, str) else value)
_module_function = _pattern(r"[\w.]+:\w+", "expected module:function, e.g. mypkg.models:build")


def _switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError("expected a positive number")
    return number


def _non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("expected a number of at least 0")
    return number


def _fraction(value: Any) -> float:
    number = _number(value)
    problem = fraction_problem(number)
    if problem:
        raise ValueError(problem)
    return number


def _whole(low: int, expected: str = "") -> Callable[[Any], int]:
    expected = expected or f"expected a whole number of at least {low}"

    def parse(value: Any) -> int:
        text = value.strip().replace("_", "") if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif text and text.lstrip("-").isascii() and text.lstrip("-").isdigit():
            number = int(text)
        else:
            raise ValueError(expected)
        if number < low:
            raise ValueError(expected)
        return number

    return parse


def _items(value: Any) -> list[Any]:
    """A comma-separated string, a TOML list, or one number, as a list of items."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise ValueError("expected a list or a comma-separated string")


def _numbers(positive: bool) -> Callable[[Any], list[float]]:
    def parse(value: Any) -> list[float]:
        numbers = [_number(v) for v in _items(value)]
        if not numbers:
            raise ValueError("expected at least one number")
        if positive and min(numbers) <= 0:
            raise ValueError("expected positive numbers (one per channel, or one for all)")
        return numbers

    return parse


def _radii(value: Any) -> list[str]:
    """The radii as the user wrote them (``36/255``), checked."""
    items = _items(value)
    if any(isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in items):
        raise ValueError("expected radii like 36/255,72/255")
    try:
        return [label for label, _ in parse_eps(",".join(str(v) for v in items))]
    except ConfigError:
        raise ValueError("expected non-negative radii like 36/255,72/255") from None


def _shape(value: Any) -> tuple[int, ...]:
    items = re.split(r"[,x]", value.strip()) if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected a sample shape like 3,32,32")
    try:
        return tuple(_whole(1)(v) for v in items)
    except ValueError:
        raise ValueError("expected positive whole numbers like 3,32,32") from None


def _gate_list(value: Any) -> list[tuple[str, float]]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError('expected EPS=ACCURACY strings, e.g. ["36/255=0.60"]')
    return [(label, accuracy) for label, _, accuracy in map(parse_gate, items)]


# ---------------------------------------------------------------- checks: an API value is valid, or not


def is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: is_whole(value) and value >= low


def _finite_list(value: Any) -> bool:
    return (hasattr(value, "__len__") and not isinstance(value, (str, bytes)) and len(value) > 0
            and all(is_finite(v) for v in value))


@dataclass(frozen=True)
class _Options:
    """The check that a value is one of ``options``; ``canonical`` names the option whatever the value's case."""

    options: tuple[str, ...]

    def __call__(self, value: Any) -> bool:
        return value in self.options

    def canonical(self, value: Any) -> Any:
        try:
            return choice(value, self.options)
        except ValueError:
            return value


def _in(*options: str) -> _Options:
    return _Options(options)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, where it may be given, and what it means to a run.

    ``parse`` converts a typed-in value (flag text, environment text or a TOML value); ``check`` accepts or refuses
    a Python value given to the API, which must then be ``expected`` (``None``: no check of its own, the API checks
    it with others). ``config``: a config file may set it. ``checkpoint``: it changes a number, so a checkpoint
    records it and a resume with another value is refused. ``api`` is the parameter it sets when that is not a
    ``CertifyOptions`` field of its own name (``attack.steps``), or ``""`` when it sets none of ``certify``'s."""

    name: str
    parse: Callable[[Any], Any]
    help: str
    commands: frozenset[str]
    default: Any = None
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    metavar: str | None = None
    short: str = ""
    switch: bool = False
    negatable: bool = False
    repeat: bool = False
    path: bool = False
    config: bool = True
    environment: str = ""
    checkpoint: bool = False
    api: str | None = None

    def validate(self, value: Any, parameter: str = "") -> Any:
        """``value`` (a Python value given to the API; a choice named in any case, as its option), or a ConfigError
        ``NAME must be EXPECTED, got VALUE`` naming ``parameter`` (default: the setting's name)."""
        name = parameter or self.name
        if isinstance(self.check, _Options):
            value = self.check.canonical(value)
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{name} must be {self.expected}, got {value!r}", parameter=name)
        return value

    def field(self) -> Any:
        """The dataclass field of an API parameter that is this setting: its default, and the setting as metadata."""
        return dataclasses.field(default=self.default, metadata={"setting": self})


def _settings(*rows: Setting) -> dict[str, Setting]:
    return {row.name: row for row in rows}


SETTINGS: dict[str, Setting] = _settings(
    # --- loading the model (every command)
    Setting("model", _path, "model file (.onnx or .safetensors); or set it in the config", LOADING, path=True,
            api=""),
    Setting("arch", _path, "architecture spec (JSON) for a .safetensors model", LOADING, path=True, api=""),
    Setting("arch_python", _module_function, "module:function returning a torch.nn.Module for a .safetensors model "
            "(runs your code)", LOADING, api=""),
    Setting("input_shape", _shape, "one sample's shape, e.g. 3,32,32 (for dynamic inputs)", LOADING, api=""),
    Setting("max_elements", _whole(1, "expected a positive whole number of elements"),
            "largest stored tensor, intermediate value or dataset sample, in elements; a file asking for more is "
            f"refused before anything is allocated (default ${ENV_VAR}, else {DEFAULT_MAX_ELEMENTS:,} = 2**28)",
            LOADING, metavar="N", environment=ENV_VAR),
    # --- the data and the run
    Setting("data", _path, "dataset: .npz, .safetensors, CIFAR batches folder, MNIST IDX files or an image folder",
            frozenset({REPORT}), path=True, api=""),
    Setting("eps", _radii, f"radii to certify (default {DEFAULT_EPS['l2']}, with norm linf {DEFAULT_EPS['linf']})",
            frozenset({REPORT}), checkpoint=True),
    Setting("norm", _choice(*NORMS), "l2 (default) or linf", frozenset({REPORT}), "l2", _in(*NORMS), "l2 or linf",
            checkpoint=True),
    Setting("device", _device, "auto (default), cpu or cuda", COMMON, "auto",
            lambda v: isinstance(v, str) and bool(re.fullmatch(DEVICE_PATTERN, v)), "auto, cpu, cuda or cuda:N"),
    Setting("batch_size", _whole(1), f"default {DEFAULT_BATCH_SIZE['cpu']} on CPU, {DEFAULT_BATCH_SIZE['cuda']} on "
            "GPU", frozenset({REPORT}), None, lambda v: v is None or _at_least(1)(v), "a whole number of at least 1",
            metavar="N", checkpoint=True),
    Setting("out", _path, f"folder for the report files (default {DEFAULT_OUT})", frozenset({REPORT}),
            metavar="DIR", path=True),
    Setting("mean", _numbers(False), "per-channel mean of a normalisation outside the model", frozenset({REPORT}),
            None, lambda v: v is None or _finite_list(v),
            "a list of finite numbers (one per channel, or one for all)", checkpoint=True),
    Setting("std", _numbers(True), "per-channel std of a normalisation outside the model", frozenset({REPORT}),
            None, lambda v: v is None or _finite_list(v),
            "a list of finite numbers (one per channel, or one for all)", checkpoint=True),
    Setting("lipschitz", _positive, "certify with this declared bound instead of lipcert's sound one (stated in "
            "the report)", frozenset({REPORT}), None, lambda v: v is None or (is_finite(v) and v > 0),
            "a positive number", metavar="L", checkpoint=True),
    Setting("backend", _choice(*BACKENDS), "auto (default), torch or onnxruntime", frozenset({REPORT}), "auto",
            _in(*BACKENDS), " or ".join(BACKENDS), checkpoint=True),
    Setting("layout", _choice(*LAYOUTS), "auto (default), NCHW or NHWC", frozenset({REPORT}), "auto", _in(*LAYOUTS),
            " or ".join(LAYOUTS)),
    Setting("value_range", _choice(*VALUE_RANGES), "auto (default), 0-255 or 0-1", frozenset({REPORT}), "auto",
            _in(*VALUE_RANGES), " or ".join(VALUE_RANGES)),
    Setting("skip_bad_samples", _switch, "leave out (and list in the report) samples that cannot be read or are "
            "invalid, instead of stopping; accuracies are then over the samples evaluated", frozenset({REPORT}),
            False, lambda v: isinstance(v, bool), "True or False", switch=True, checkpoint=True),
    Setting("workers", _whole(0), "processes decoding an image folder (default: one per core, at most 4; 0 decodes "
            "in the main process)", frozenset({REPORT}), None, lambda v: v is None or _at_least(0)(v),
            "a whole number of at least 0", metavar="N"),
    # --- the attack
    Setting("attack", _switch, "run the PGD sanity check (default on)", frozenset({REPORT}), True,
            switch=True, negatable=True, checkpoint=True),
    Setting("attack_steps", _whole(1), "PGD steps per restart (default 50)", frozenset({REPORT}), 50, _at_least(1),
            "a whole number of at least 1", metavar="N", checkpoint=True, api="attack.steps"),
    Setting("attack_restarts", _whole(1), "PGD random restarts (default 2)", frozenset({REPORT}), 2, _at_least(1),
            "a whole number of at least 1", metavar="N", checkpoint=True, api="attack.restarts"),
    Setting("seed", _whole(0), "random seed of the attack (report), of power iteration and the search (verify)",
            COMMON, 0, _at_least(0), "a whole number of at least 0", metavar="N", checkpoint=True, api="attack.seed"),
    Setting("attack_precision", _choice(*PRECISIONS), "float32 (default) or bfloat16 for the attack's steps; "
            "examples are re-checked in float32, certificates always use float32", frozenset({REPORT}), "float32",
            _in(*PRECISIONS), " or ".join(PRECISIONS), checkpoint=True, api="attack.precision"),
    # --- verify
    Setting("bound", _positive, "the claimed Lipschitz bound (default: the model's lipcert.claimed_lipschitz "
            "metadata, else 1.0)", frozenset({VERIFY}), metavar="L", api=""),
    Setting("tol", _non_negative, "relative tolerance on the claim (default 1e-05)", frozenset({VERIFY}),
            metavar="T", api=""),
    Setting("empirical_budget", _positive, "time limit of the empirical network search (default 60 on a CPU, 20 "
            "on a GPU); the best pair found is kept", frozenset({VERIFY}), metavar="SECONDS", api=""),
    Setting("witness", _path, "when the claim is violated, write the pair of inputs that breaks it (.npz: x, x_prime "
            "and onnxruntime's outputs), once onnxruntime confirms it", frozenset({VERIFY}), metavar="FILE",
            path=True, api=""),
    # --- gates
    Setting("require", _choice(*REQUIRE), "gate: proven (default) or not-violated", frozenset({VERIFY}), "proven",
            _in(*REQUIRE), "one of " + ", ".join(REQUIRE), api=""),
    Setting("min_clean_acc", _fraction, "gate: minimum clean accuracy, a fraction such as 0.9", frozenset({REPORT}),
            metavar="ACC"),
    Setting("min_certified_acc", _gate_list, "gate, e.g. 36/255=0.60 (repeatable)", frozenset({REPORT}), (),
            metavar="EPS=ACC", repeat=True),
    Setting("max_violations", _whole(0), "gate: attack contradictions allowed (default 0)", frozenset({REPORT}), 0,
            _at_least(0), "a whole number of at least 0", metavar="N"),
    Setting("min_mean_radius", _non_negative, "gate: minimum mean certified radius (0 for a wrong prediction)",
            frozenset({REPORT}), None, lambda v: v is None or (is_finite(v) and v >= 0), "a number of at least 0",
            metavar="R"),
    Setting("max_lipschitz", _positive, "gate: fail when the Lipschitz bound is above this", COMMON, None,
            lambda v: v is None or (is_finite(v) and v > 0), "a positive number", metavar="L"),
    Setting("require_claim", _switch, "gate: fail when lipcert's sound bound is above the model's Lipschitz claim "
            "(its metadata or lipschitz); on by default when there is a claim", frozenset({REPORT}), None,
            lambda v: v is None or isinstance(v, bool), "True, False or None", switch=True,
            negatable=True),
    Setting("baseline", _path, "gate: a previous report.json to compare with", frozenset({REPORT}), metavar="FILE",
            path=True),
    Setting("missing_baseline", _choice(*MISSING_BASELINE), "fail (default): a baseline file that does not exist is "
            "an error; skip: pass the baseline gate with a note (a first run, before any baseline exists)",
            frozenset({REPORT}), "fail", _in(*MISSING_BASELINE), " or ".join(MISSING_BASELINE)),
    Setting("allow_empty_certificates", _switch, "gate: do not fail when nothing is certified (no sample at any "
            "radius above 0, or an infinite Lipschitz bound)", frozenset({REPORT}), False,
            lambda v: isinstance(v, bool), "True or False", switch=True),
    Setting("max_drop", _fraction, "largest allowed drop in certified accuracy against the baseline, a fraction "
            "(default 0)", frozenset({REPORT}), 0.0, metavar="D"),
    Setting("gate_on", _choice(*GATE_ON), "the certified radius the gates read: float (default; float32-safe, "
            "sound for the deployed model) or exact (exact arithmetic, the figure papers print)", frozenset({REPORT}),
            "float", _in(*GATE_ON), "float or exact"),
    Setting("local", _switch, "also certify each point beyond the global radius from what the network does near it "
            "(local certificates, a third radius; slower)", frozenset({REPORT}), False,
            lambda v: isinstance(v, bool), "True or False", switch=True, checkpoint=True),
    Setting("local_depth", _whole(1), "how many of the network's last activation blocks the local certificates "
            "analyse (default 2; more certifies more points, slower)", frozenset({REPORT}), 2, _at_least(1),
            "a whole number of at least 1", metavar="N", checkpoint=True),
    # --- the run's folder and processes (flags only)
    Setting("checkpoint_dir", _path, "a folder that keeps the run's checkpoint without writing a report",
            frozenset(), path=True, config=False),
    Setting("resume", _switch, "continue an interrupted run from the checkpoint in out", frozenset({REPORT}), False,
            lambda v: isinstance(v, bool), "True or False", switch=True, config=False),
    Setting("launcher", _choice("torchrun"), "torchrun: start gpus processes with torch.distributed (or run this "
            "command under torchrun yourself)", frozenset({REPORT}), config=False, api=""),
    Setting("gpus", _whole(1), "processes to start with launcher torchrun (default 1)", frozenset({REPORT}), 1,
            metavar="N", config=False, api=""),
    # --- outputs
    Setting("json", _path, "write the result (with its gates) as JSON to FILE; - for stdout", COMMON, metavar="FILE",
            path=True, api=""),
    Setting("junit", _path, "write JUnit XML, one test case per gate", COMMON, metavar="FILE", path=True, api=""),
    Setting("format", _choice(*FORMATS), "text (default) or json: the result as JSON on stdout, nothing else (the "
            "same as json -)", LOADING, api=""),
    Setting("quiet", _switch, "print only the verdict line, and no progress", COMMON, short="-q", switch=True,
            api=""),
    Setting("config", _path, "settings file (default: ./lipcert.toml or [tool.lipcert] in ./pyproject.toml)", COMMON,
            config=False, api=""),
)

#: settings of ``CertifyOptions`` fields of the same name, in the table's order
CERTIFY_FIELDS = tuple(s.name for s in SETTINGS.values() if s.api is None)
#: settings of ``AttackConfig`` fields, and the field each sets
ATTACK_FIELDS = {s.name: s.api.removeprefix("attack.") for s in SETTINGS.values()
                 if s.api and s.api.startswith("attack.")}
#: how a checkpoint's manifest names its entries: the settings that change a number, by their API name
CHECKPOINT_ENTRIES = {(f"attack.{ATTACK_FIELDS[s.name]}" if s.name in ATTACK_FIELDS else s.name): s.name
                      for s in SETTINGS.values() if s.checkpoint}


def keys(command: str) -> set[str]:
    """The config-file keys of ``command``."""
    return {s.name for s in SETTINGS.values() if command in s.commands and s.config}


def setting_of(parameter: str) -> Setting | None:
    """The setting an API parameter an error names stands for: ``batch_size``, or the attack's ``steps``."""
    name = next((key for key, field in ATTACK_FIELDS.items() if field == parameter), parameter)
    return SETTINGS.get(name)
