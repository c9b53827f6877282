"""Progress of a training loop: step/total, loss, lr, tokens/s, ETA. A live bar in a terminal;
in a pipe or a log (CI, nohup, the demo's log) a plain line at every tenth of the run and at
least once a minute, since a bar there would print nothing until the run ends."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Context manager; `update(step, loss=, lr=, tokens=)` after each optimizer step.

    Disabled (does nothing) with enabled=False, for tests and --json output.
    """

    def __init__(
        self,
        total: int,
        *,
        description: str = "training",
        enabled: bool = True,
        start: int = 0,
        console: Console | None = None,
    ) -> None:
        self.total, self.enabled, self.start = total, enabled, start
        self.description = description
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._progress = None
        self._lines: Console | None = None  # plain lines instead of a bar
        self._last_line, self._last_tenth = self.t0, start * 10 // max(total, 1)
        console = console or Console(stderr=True)
        if enabled and not console.is_terminal:
            self._lines = console
        elif enabled:
            self._progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(
                description, total=total, completed=start, loss="-", lr="-", tps="-"
            )

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, *, loss: float, lr: float, tokens: int = 0) -> None:
        self.tokens += tokens
        if self._lines is not None:
            self._line(step, loss, lr)
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tps=f"{self.tokens / elapsed:,.0f}",
        )

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        elif self._lines is not None:
            self._lines.print(text, highlight=False, soft_wrap=True)

    def _line(self, step: int, loss: float, lr: float) -> None:
        """One plain line when the run passes a tenth of its steps, ends, or a minute has gone
        by since the last line."""
        now = time.perf_counter()
        tenth = step * 10 // max(self.total, 1)
        if tenth == self._last_tenth and step < self.total and now - self._last_line < LINE_EVERY_S:
            return
        self._last_tenth, self._last_line = tenth, now
        elapsed = now - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else None
        self._lines.print(
            f"{self.description} {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s  elapsed {_clock(elapsed)}"
            + (f"  eta {_clock(eta)}" if eta is not None else ""),
            highlight=False,
            soft_wrap=True,  # one line in the log, however narrow the console thinks it is
        )


LINE_EVERY_S = 60.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
