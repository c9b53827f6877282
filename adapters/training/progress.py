"""A rich progress bar for training loops: step/total, loss, lr, tokens/s, ETA."""

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
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._progress = None
        if enabled:
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
                console=console or Console(stderr=True),
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
