"""Progress of long phases: evaluation, post-hoc sweeps, and the runs of a comparison.

Own code, not tqdm: a phase's bar must also work as plain lines in a CI log (tqdm turns itself off there), and
the innermost open bar is advanced from deep inside ``evaluate.predict`` without threading a bar through every
method's ``finalize``. On a terminal a bar redraws one line and, when closed, leaves one summary line; on any
other stream it writes a plain line at most every ``PLAIN_INTERVAL`` seconds and one when closed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

# Plain (non-terminal) output: a line at most this often, so a long phase shows life without flooding a log.
PLAIN_INTERVAL = 30.0
# Terminal redraws at most this often: drawing costs a write per call.
REDRAW_INTERVAL = 0.2
_WIDTH = 24
_open: list[Bar] = []


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Time left if the rest goes at the rate so far; None before any progress or without a total."""
    if not total or done <= 0:
        return None
    return elapsed * (total - done) / done


class Bar:
    """One phase: ``label``, ``done`` of ``total`` units (batches), elapsed and ETA; ``total`` None counts only."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = self.start if not self.terminal else 0.0

    def advance(self, units: int = 1) -> None:
        self.done += units
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = REDRAW_INTERVAL if self.terminal else PLAIN_INTERVAL
        if now - self._last_draw >= interval:
            self._last_draw = now
            self._write(self.status(now))

    def status(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        if self.total:
            filled = round(_WIDTH * min(1.0, self.done / self.total))
            bar = "#" * filled + "-" * (_WIDTH - filled)
            eta = eta_seconds(self.done, self.total, elapsed)
            left = f", ETA {format_seconds(eta)}" if eta is not None else ""
            return f"{self.label} [{bar}] {self.done}/{self.total} {format_seconds(elapsed)}{left}"
        return f"{self.label}: {self.done} batches, {format_seconds(elapsed)}"

    def close(self, summary: str | None = None) -> None:
        """Leave one line: ``summary`` (default: the label, units and time taken)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = summary or f"{self.label}: {self.done} batches in {format_seconds(elapsed)}"
        self._write(line, final=True)

    def _write(self, text: str, final: bool = False) -> None:
        if self.terminal:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@contextmanager
def phase(label: str, total: int | None = None, enabled: bool = True, stream: TextIO | None = None) -> Iterator[Bar]:
    """A bar that ``advance_current`` moves while the block runs (the innermost open one), closed after it."""
    bar = Bar(label, total, stream, enabled)
    _open.append(bar)
    try:
        yield bar
    finally:
        _open.remove(bar)
        bar.close()


def advance_current(units: int = 1) -> None:
    """Advance the innermost open phase, if any (called once per evaluated batch: a counter, no device sync)."""
    if _open:
        _open[-1].advance(units)


def batch_count(splits: Mapping[str, Any], batch_size: int, skip: tuple[str, ...] = ("train",)) -> int:
    """Batches of one pass over ``splits`` (all but ``skip``): the total of an evaluation's bar."""
    return sum(math.ceil(len(split) / batch_size) for name, split in splits.items() if name not in skip)


class RunsProgress:
    """The runs of one command (a comparison): runs done of total, the current run, elapsed and ETA.

    The ETA is the mean time of the runs done here times the runs left; runs read back from an earlier
    call take no time and count as done without skewing the mean.
    """

    def __init__(self, total: int, log: Any) -> None:
        self.total, self.log = total, log
        self.done = self.timed = 0
        self.seconds = 0.0
        self.start = time.perf_counter()
        self._run_start = self.start

    def started(self, label: str) -> str:
        """The prefix of the run now starting, ``[k/N] label``; logs a status line with elapsed time and ETA."""
        self._run_start = time.perf_counter()
        prefix = f"[{self.done + 1}/{self.total}] {label}"
        elapsed = self._run_start - self.start
        left = self.total - self.done
        eta = f", ETA {format_seconds(self.seconds / self.timed * left)}" if self.timed else ""
        self.log(f"{prefix}: starting (elapsed {format_seconds(elapsed)}{eta})")
        return prefix

    def finished(self, label: str, summary: str, timed: bool = True) -> None:
        """One line for a finished (or reused) run."""
        self.done += 1
        if timed:
            self.timed += 1
            self.seconds += time.perf_counter() - self._run_start
        self.log(f"[{self.done}/{self.total}] {label}: {summary}")


def results_summary(entry: Mapping[str, Any]) -> str:
    """``ID 91.20, OOD avg 63.10`` from a results entry."""
    parts = []
    if isinstance(entry.get("id"), int | float):
        parts.append(f"ID {entry['id']:.2f}")
    if isinstance(entry.get("ood_avg"), int | float):
        parts.append(f"OOD avg {entry['ood_avg']:.2f}")
    return ", ".join(parts) or "done"
