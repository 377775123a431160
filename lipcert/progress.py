"""How long runs report their phases: ``Progress`` (ignores them; the command line draws them) and the adapters of step
callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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

