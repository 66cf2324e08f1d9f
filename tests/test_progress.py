"""Progress: bars that redraw one terminal line or write plain lines to a log, advanced per evaluated batch."""

from __future__ import annotations

import io

import pytest

import robustft.progress as progress
from posthoc_support import small_prepared
from robustft.demo import demo_config
from robustft.progress import Bar, RunsProgress, advance_current, batch_count, eta_seconds, format_seconds, phase
from robustft.runner import fit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_times_and_eta():
    assert (format_seconds(75.2), format_seconds(3725)) == ("1:15", "1:02:05")
    assert eta_seconds(1, 4, 10.0) == pytest.approx(30.0)
    assert eta_seconds(0, 4, 10.0) is None and eta_seconds(2, None, 10.0) is None


def test_plain_lines_off_a_terminal_and_one_redrawn_line_on_it(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    monkeypatch.setattr(progress, "REDRAW_INTERVAL", 0.0)
    log = io.StringIO()
    bar = Bar("eval", 4, log)
    for _ in range(4):
        bar.advance()
    bar.close("eval: done")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[1].startswith("eval [############------------] 2/4 ") and "ETA" in lines[1]
    assert lines[-1] == "eval: done"

    terminal = Terminal()
    bar = Bar("eval", 2, terminal)
    bar.advance()
    bar.close("eval: done")
    text = terminal.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\r\x1b[Keval: done\n")  # redrawn, then one summary line


def test_the_innermost_open_phase_is_advanced():
    stream = io.StringIO()
    with phase("outer", None, stream=stream) as outer:
        with phase("inner", 3, stream=stream) as inner:
            advance_current(2)
        advance_current()
    advance_current()  # none open: nothing happens
    assert (outer.done, inner.done) == (1, 2)
    assert stream.getvalue().splitlines()[-1].startswith("outer: 1 batches in ")


def test_fit_shows_an_evaluation_bar_and_leaves_one_summary_line(digits_prepared, tmp_path, capsys):
    small = small_prepared(digits_prepared, size=32)
    lines: list[str] = []
    fit(demo_config("zeroshot", 0, tmp_path, progress=True), log=lines.append, prepared=small)
    total = batch_count(small.ctx.splits, small.ctx.eval_batch_size)
    stderr = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"zeroshot: evaluating: {total} batches in ") for line in stderr), stderr
    assert lines[-1].startswith(f"{tmp_path / 'zeroshot'}: zeroshot finished in ") and "ID " in lines[-1]


def test_runs_progress_counts_runs_and_gives_an_eta_after_a_timed_run(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 10.0, 12.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    runs = RunsProgress(3, lines.append)
    runs.started("zeroshot")
    runs.finished("zeroshot", "fitted")
    runs.started("finetune")
    assert lines == [
        "[1/3] zeroshot: starting (elapsed 0:00)",
        "[1/3] zeroshot: fitted",
        "[2/3] finetune: starting (elapsed 0:10, ETA 0:20)",
    ]
