"""Training progress without a terminal: plain lines as the run goes, not one bar at the end."""

from __future__ import annotations

import io

from rich.console import Console

from adaptory.adapters.training import progress as progress_module
from adaptory.adapters.training.progress import TrainProgress


def _run(total: int, *, start: int = 0, terminal: bool = False, width: int = 200) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=width)
    with TrainProgress(total, description="pretraining", start=start, console=console) as bar:
        for step in range(start + 1, total + 1):
            bar.update(step, loss=1.0 / step, lr=1e-3, tokens=10)
            if step == total // 2:
                bar.note("evaluated: eval_loss 0.5")
    return out.getvalue().splitlines()


def test_a_log_gets_a_line_at_every_tenth_and_at_the_end(monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 1e9)  # only the tenths count here
    lines = _run(40)
    steps = [line.split()[1] for line in lines if line.startswith("pretraining ")]
    assert steps == [f"{s}/40" for s in range(4, 41, 4)]
    last = lines[-1]
    assert "loss 0.0250" in last and "lr 1.00e-03" in last and "tok/s" in last
    assert "eta 0:00:00" in last
    assert "evaluated: eval_loss 0.5" in lines  # notes are printed too


def test_a_resumed_run_counts_from_where_it_starts(monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 1e9)
    steps = [line.split()[1] for line in _run(40, start=20) if line.startswith("pretraining ")]
    assert steps == [f"{s}/40" for s in range(24, 41, 4)]


def test_a_minute_without_a_line_gets_one(monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)  # every update is "a minute on"
    steps = [line.split()[1] for line in _run(7) if line.startswith("pretraining ")]
    assert steps == [f"{s}/7" for s in range(1, 8)]


def test_a_terminal_gets_the_bar_not_lines(monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    output = "\n".join(_run(10, terminal=True))
    assert "10/10" in output and "pretraining 1/10  loss" not in output


def test_a_line_is_never_wrapped_in_a_narrow_log(monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 1e9)
    lines = _run(20, width=40)
    progress = [line for line in lines if line.startswith("pretraining ")]
    assert len(progress) == 10 and all(" eta " in line for line in progress), lines
