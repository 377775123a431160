"""How long runs report their phases: ``Progress`` (ignores them; the command line draws them) and the adapters of step
callbacks."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from lipcert.errors import ConfigError

READING, BOUND, INFERENCE, ATTACK = "opening the data", "computing the Lipschitz bound", "inference", "attack"



#: ``progress(phase, done, total, unit)``: how ``verify`` and ``certificate_setup`` report completed steps, counted
#: in ``unit`` (layers, iterations, steps)
StepCallback = Callable[[str, int, int, str], None]


class Progress:
    """Where ``certify`` reports its phases; this base class ignores them (the command line draws progress bars
    on a terminal and writes log lines elsewhere). Phases: ``READING``, ``BOUND`` (no total), then
    ``INFERENCE`` and ``ATTACK``, counted in samples of this process's share of the data."""

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        """A phase begins: ``total`` units of work (``done`` of them already, read back from a checkpoint), or
        None when its length is unknown; ``unit`` names what is counted."""

    def advance(self, phase: str, amount: float) -> None:
        """``amount`` more units of ``phase`` are done (a fraction of a sample for the attack)."""

    def end(self, phase: str) -> None:
        """The phase is over."""

    def note(self, text: str) -> None:
        """Something the user should read now, such as how many samples a resumed run read back."""

    def close(self) -> None:
        """The run is over (finished, failed or interrupted): stop drawing."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



class Steps:
    """``verify``'s and ``certificate_setup``'s ``progress(phase, done, total)`` callback, drawn as phases of a
    ``Progress``; ``close`` ends the phases it started."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.done: dict[str, int] = {}

    def __call__(self, name: str, done: int, total: int, unit: str) -> None:
        if name not in self.done:
            self.progress.start(name, total, unit=unit)
            self.done[name] = 0
        self.progress.advance(name, done - self.done[name])
        self.done[name] = done

    def close(self) -> None:
        for name in self.done:
            self.progress.end(name)



@contextmanager
def phase(progress: Progress, name: str) -> Iterator[None]:
    """A phase of unknown length, ended when the block finishes (not when it raises)."""
    progress.start(name)
    yield
    progress.end(name)


class PrintProgress(Progress):
    """Plain lines on ``stream`` (default stderr), for a notebook or a script: each phase as it starts and ends,
    its count at most every ``interval`` seconds, and every note."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 5.0) -> None:
        self.stream = stream
        self.interval = interval
        self.phases: dict[str, list[Any]] = {}  # phase -> [done, total, unit, started, last printed]

    def _print(self, text: str) -> None:
        print(f"lipcert: {text}", file=self.stream or sys.stderr, flush=True)

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        now = time.monotonic()
        self.phases[phase] = [done, total, unit, now, now]
        self._print(phase + (f": {done:.0f}/{total:.0f} {unit}" if total is not None else "") + "...")

    def advance(self, phase: str, amount: float) -> None:
        state = self.phases.get(phase)
        if state is None:
            return
        state[0] += amount
        now = time.monotonic()
        if state[1] is not None and now - state[4] >= self.interval:
            state[4] = now
            self._print(f"{phase}: {state[0]:.0f}/{state[1]:.0f} {state[2]}")

    def end(self, phase: str) -> None:
        state = self.phases.pop(phase, None)
        if state is not None:
            self._print(f"{phase}: done in {time.monotonic() - state[3]:.1f} s")

    def note(self, text: str) -> None:
        self._print(f"note: {text}")


class CallbackProgress(Progress):
    """Calls ``callback(phase, done, total)`` as each phase starts, advances and ends (``total`` None for a phase
    of unknown length); notes are not passed on (they are in the report's notes)."""

    def __init__(self, callback: Callable[[str, float, float | None], Any]) -> None:
        self.callback = callback
        self.phases: dict[str, list[Any]] = {}

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        self.phases[phase] = [done, total]
        self.callback(phase, done, total)

    def advance(self, phase: str, amount: float) -> None:
        state = self.phases.setdefault(phase, [0.0, None])
        state[0] += amount
        self.callback(phase, state[0], state[1])

    def end(self, phase: str) -> None:
        done, total = self.phases.pop(phase, [0.0, None])
        self.callback(phase, total if total is not None else done, total)


def as_progress(progress: Progress | bool | Callable[[str, float, float | None], Any] | None) -> Progress:
    """What the API's ``progress`` parameter names: a ``Progress`` as it is; True, printed lines
    (``PrintProgress``); a function, called with ``(phase, done, total)`` (``CallbackProgress``); None or False,
    nothing."""
    if isinstance(progress, Progress):
        return progress
    if progress is None or progress is False:
        return Progress()
    if progress is True:
        return PrintProgress()
    if callable(progress):
        return CallbackProgress(progress)
    raise ConfigError(f"progress must be a lipcert.Progress, True, False or a function (phase, done, total), got "
                      f"{type(progress).__name__}", parameter="progress")

