"""The progress of a run on stderr: rich bars on a terminal, log lines elsewhere (a CI log)."""

from __future__ import annotations

import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

from lipcert.progress import Progress

#: log lines (stderr not a terminal): a phase gets its first line after this many seconds, then one as often
LOG_INTERVAL = 10.0


#: how often the log writer looks at the running phases, in seconds
LOG_TICK = 1.0
#: the progress bar's width in characters: small, so that a row with its counts fits 80 columns
BAR_WIDTH = 10


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
    """Units per second over the last half minute (``3446/s``, ``4.2/s``)."""

    def render(self, task: Any) -> Text:
        speed = task.speed if task.fields["counted"] else None
        return Text("" if not speed else f"{speed:.0f}/s" if speed >= 100 else f"{speed:.1f}/s")


class _Name(ProgressColumn):
    """The phase's name on one line, cut with an ellipsis when the terminal is narrow: its column is the one
    that gives up width first (a wrapping column to rich's layout, a text that does not wrap)."""

    def render(self, task: Any) -> Text:
        return Text(task.description, no_wrap=True, overflow="ellipsis")


def time_left(task: Any) -> float | None:
    """Seconds until ``task`` ends at its recent speed, counted down since its last advance (rich's estimate
    stays still until the next one: a batch that takes a minute would freeze it), or None without a speed."""
    speed = task.speed
    if not speed or task.total is None:
        return None
    return max(task.remaining / speed - (task.get_time() - task.fields["advanced"]), 0.0)


class _Left(ProgressColumn):
    """``3 min 10 s left`` on the phase that ends last (see ``BarProgress``), counting down between advances."""

    def render(self, task: Any) -> Text:
        left = time_left(task) if task.fields["last"] and not task.finished else None
        if left is None:
            return Text("")
        return Text(f"{duration(left) if left < 10 or left >= 60 else f'{round(left)} s'} left")


def _one_line() -> Column:
    """A progress column that never wraps, so that a row keeps to one line (``_Name`` gives up width)."""
    return Column(no_wrap=True)


class BarProgress(Progress):
    """Progress bars on a terminal: one row per phase with its count, speed and elapsed time. The time left is
    shown on the counted phase started last: phases that run together (inference feeds the attack, batch by
    batch) end together, at the pace of the last one; it counts down live between advances. Each row keeps to
    one line (``_one_line``). The rows stay on the screen when the run ends or is interrupted."""

    def __init__(self, console: Console) -> None:
        self.bars = RichProgress(SpinnerColumn(finished_text="[green]✓[/]", table_column=_one_line()),
                                 _Name(), BarColumn(bar_width=BAR_WIDTH, table_column=_one_line()),
                                 _Count(table_column=_one_line()), _Rate(table_column=_one_line()),
                                 TimeElapsedColumn(table_column=_one_line()), _Left(table_column=_one_line()),
                                 console=console, refresh_per_second=4)
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: float | None = None, done: float = 0.0, unit: str = "samples") -> None:
        if not self.tasks:
            self.bars.start()
        if total is not None:
            for task in self.bars.tasks:
                self.bars.update(task.id, last=False)
        # rich's Task.completed is a float (a share of a sample, read back or attacked); add_task annotates an int
        self.tasks[phase] = self.bars.add_task(phase, total=total, completed=done,  # type: ignore[arg-type]
                                               counted=total is not None, last=total is not None, unit=unit,
                                               advanced=self.bars.get_time())

    def advance(self, phase: str, amount: float) -> None:
        self.bars.advance(self.tasks[phase], amount)
        self.bars.update(self.tasks[phase], advanced=self.bars.get_time())

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

