"""Progress for long commands: rich bars on a terminal, one plain line per finished step elsewhere.

``Steps`` shows, per step, ``[i/n] label``, a bar, ``done/total unit``, elapsed and ETA while stderr is a
terminal; when it is not (logs, CI, pipes) or with ``--quiet``, each step prints exactly one line when it
ends (``[i/n] label: 255 tok in 30.1 s (8.5 tok/s)``) and nothing redraws.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """``--quiet``: line-based progress even on a terminal (and no third-party progress bars)."""
    _state["quiet"] = bool(quiet)
    if quiet or not live_terminal():
        quiet_libraries()


def live_terminal(console: Console | None = None) -> bool:
    """Whether progress may redraw: stderr is a terminal and ``--quiet`` was not given."""
    return not _state["quiet"] and (console.is_terminal if console is not None else sys.stderr.isatty())


def quiet_libraries() -> None:
    """Turn off transformers' tqdm bars (weight loading, GGUF conversion): they redraw into logs."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m else f"{seconds:.1f} s"


class Steps:
    """A sequence of ``n`` steps (methods, samples, quantizers), each with its own count of units."""

    def __init__(self, console: Console, n: int | None = None, unit: str = "tok"):
        self.console, self.n, self.unit = console, n, unit
        self.index, self.t0 = 0, time.perf_counter()
        self.live = live_terminal(console)
        self._progress: Progress | None = None
        self._open: dict | None = None

    def __enter__(self) -> "Steps":
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.end()
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def _name(self, label: str) -> str:
        return f"[{self.index}/{self.n}] {label}" if self.n else label

    def begin(self, label: str, total: int, unit: str | None = None) -> Callable[[int], None]:
        """Start the next step (ending an open one); returns its ``advance(k=1)``."""
        if self._open is not None:
            self.end()
        self.index += 1
        unit = unit or self.unit
        task = self._progress.add_task(self._name(label), total=total, unit=unit) if self._progress is not None else None
        self._open = {"name": self._name(label), "unit": unit, "done": 0, "t0": time.perf_counter(), "task": task}
        return self.advance

    def advance(self, k: int = 1) -> None:
        if self._open is not None:
            self._open["done"] += k
            if self._open["task"] is not None:
                self._progress.advance(self._open["task"], k)

    def end(self) -> None:
        """End the open step: its bar goes, one line stays (``name: done unit in time (rate) · total``)."""
        s, self._open = self._open, None
        if s is None:
            return
        if s["task"] is not None:
            self._progress.remove_task(s["task"])
        seconds = time.perf_counter() - s["t0"]
        rate = f" ({s['done'] / seconds:.1f} {s['unit']}/s)" if seconds > 0 and s["done"] else ""
        self.note(f"{s['name']}: {s['done']} {s['unit']} in {_duration(seconds)}{rate} · total {_duration(time.perf_counter() - self.t0)}")

    @contextmanager
    def step(self, label: str, total: int, unit: str | None = None) -> Iterator[Callable[[int], None]]:
        """``with steps.step("kivi:bits=2", 255) as advance: ... advance()``."""
        advance = self.begin(label, total, unit)
        try:
            yield advance
        finally:
            self.end()

    def note(self, message: str) -> None:
        """A line above the bars (or in the log)."""
        self.console.print(message, highlight=False, markup=False)


class BenchPoints:
    """A benchmark's :class:`lowbit.bench.timing.Points` shown as one step of `steps`: ``label``, a bar of points,
    elapsed and ETA on a terminal; one summary line when it ends elsewhere."""

    def __init__(self, steps: Steps, label: str):
        self.steps, self.label, self._advance = steps, label, None

    def start(self, total: int) -> None:
        self._advance = self.steps.begin(self.label, total, "points")

    def advance(self) -> None:
        if self._advance is not None:
            self._advance(1)

    @property
    def live(self) -> bool:
        """Whether a bar is drawn (then lines must go through :meth:`log`)."""
        return self.steps.live

    def log(self, message: str) -> None:
        """A benchmark's line: above the bar on a terminal, else on stdout as before."""
        if self.steps.live:
            self.steps.note(message)
        else:
            print(message, flush=True)
