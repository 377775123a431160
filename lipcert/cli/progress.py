"""The progress of a run on stderr: rich bars on a terminal, log lines elsewhere (a CI log)."""

from __future__ import annotations

import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from lipcert.progress import Progress

#: log lines (stderr not a terminal): a phase gets its first line after this many seconds, then one as often
LOG_INTERVAL = 10.0



#: how often the log writer looks at the running phases, in seconds
LOG_TICK = 1.0



def duration(seconds: float) -> str:
    """``75.3`` -> ``1 min 15 s``; ``4.21`` -> ``4.2 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"



class _Count(ProgressColumn):
    """``123/540 samples`` (or layers, steps: the phase's unit); nothing for a phase of unknown length."""

    def render(self, task: Any) -> Text:
        return Text(f"{int(task.completed)}/{int(task.total)} {task.fields['unit']}" if task.fields["counted"]
                    else "")



class _Rate(ProgressColumn):
    """Samples per second over the last half minute."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.fields["counted"] and task.speed else "")



class _Left(ProgressColumn):
    """``about 3 min 10 s left``, from the recent speed, on the phase that ends last (see ``BarProgress``)."""

    def render(self, task: Any) -> Text:
        left = task.time_remaining
        return Text(f"about {duration(left)} left" if task.fields["last"] and not task.finished
                    and left is not None else "")



class BarProgress(Progress):
    """Progress bars on a terminal: one row per phase with its count, speed and elapsed time. The time left is
    shown on the counted phase started last: phases that run together (inference feeds the attack, batch by
    batch) end together, at the pace of the last one. The rows stay on the screen when the run ends or is
    interrupted."""

    def __init__(self, console: Console) -> None:
        self.bars = RichProgress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
                                 BarColumn(), _Count(), _Rate(), TimeElapsedColumn(), _Left(), console=console,
                                 refresh_per_second=4)
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        if not self.tasks:
            self.bars.start()
        if total is not None:
            for task in self.bars.tasks:
                self.bars.update(task.id, last=False)
        # rich's Task.completed is a float (a share of a sample, read back or attacked); add_task annotates an int
        self.tasks[phase] = self.bars.add_task(phase, total=total, completed=done,  # type: ignore[arg-type]
                                               counted=total is not None, last=total is not None, unit=unit)

    def advance(self, phase: str, amount: float) -> None:
        self.bars.advance(self.tasks[phase], amount)

    def end(self, phase: str) -> None:
        task = self.tasks[phase]
        total = next(t.total for t in self.bars.tasks if t.id == task)
        self.bars.update(task, total=total or 1, completed=total or 1)
        self.bars.stop_task(task)

    def note(self, text: str) -> None:
        self.bars.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.bars.stop()



class _Phase:
    """One phase as the log writer follows it."""

    def __init__(self, total: float | None, done: float, unit: str) -> None:
        self.total, self.done, self.base, self.unit = total, done, done, unit
        self.began = self.last = time.monotonic()
        self.printed = False



class LogProgress(Progress):
    """Progress as plain lines on a stream that is not a terminal (a CI log): a phase that has run for
    ``LOG_INTERVAL`` seconds gets a line (count, speed, and on the counted phase started last the time left, as
    for ``BarProgress``), then one every ``LOG_INTERVAL`` seconds, and a closing line; phases shorter than that
    print nothing."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.phases: dict[str, _Phase] = {}
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _line(self, text: str) -> None:
        self.stream.write(f"lipcert: {text}\n")
        self.stream.flush()

    def _status(self, name: str, p: _Phase, now: float, last: bool) -> str:
        elapsed = now - p.began
        if p.total is None:
            return f"{name}: {duration(elapsed)} so far"
        rate = (p.done - p.base) / elapsed if elapsed > 0 else 0.0
        left = f", about {duration((p.total - p.done) / rate)} left" if rate > 0 and last else ""
        share = f" ({100 * p.done / p.total:.1f}%)" if p.total else ""
        return f"{name}: {p.done:.0f}/{p.total:.0f} {p.unit}{share}, {rate:.1f} {p.unit}/s{left}"

    def _watch(self) -> None:
        while not self.stopped.wait(LOG_TICK):
            with self.lock:
                now = time.monotonic()
                last = [name for name, p in self.phases.items() if p.total is not None][-1:]
                for name, p in list(self.phases.items()):
                    if now - p.last >= LOG_INTERVAL:
                        self._line(self._status(name, p, now, [name] == last))
                        p.last, p.printed = now, True

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        with self.lock:
            self.phases[phase] = _Phase(total, done, unit)

    def advance(self, phase: str, amount: float) -> None:
        with self.lock:
            self.phases[phase].done += amount

    def end(self, phase: str) -> None:
        with self.lock:
            p = self.phases.pop(phase)
            elapsed = time.monotonic() - p.began
            if not p.printed and elapsed < LOG_INTERVAL:
                return
            if p.total is None:
                self._line(f"{phase}: done in {duration(elapsed)}")
            else:
                count = p.done - p.base
                self._line(f"{phase}: done, {count:.0f} {p.unit} in {duration(elapsed)} "
                           f"({count / elapsed if elapsed > 0 else 0.0:.1f} {p.unit}/s)")

    def note(self, text: str) -> None:
        with self.lock:
            self._line(text)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()



def progress_for(quiet: bool, console: Console) -> Progress:
    """Progress on stderr: nothing when ``quiet``, bars on a terminal, log lines elsewhere."""
    if quiet:
        return Progress()
    if console.is_terminal:
        return BarProgress(console)
    return LogProgress(console.file)

