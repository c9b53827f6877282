"""The server's scheduler: gathers concurrent requests for one base into mixed-adapter batches.

One worker thread per runtime owns a `DecodeBatch`. Batching is continuous: between two decode
steps the worker admits newly arrived requests (prefilled together, merged into the running
cache) up to `max_batch` rows, and finished or cancelled rows leave. When idle, the first
arrival opens a short window (`window_s`) to gather company before the first prefill.
A row that fails alone (a broken adapter's NaN logits) ends alone; the others go on.

Classification runs in bounded chunks (at most `classify_rows` rows and `classify_tokens`
padded tokens per encoder pass), one chunk per turn of the loop, taken round-robin from the
waiting requests: a 200-text request cannot hold up a one-text request for more than a chunk.
While another base decodes on the same device, a chunk is sized to take about half of one of its
decode steps (measured), so a classify flood slows a decode step by about half.

Several bases on one device take turns (`Turns`): one unit of work each, first come first served.

Events reach asyncio through `loop.call_soon_threadsafe`; torch releases the GIL while it
computes, so the event loop keeps serving. `stop()` refuses new work and drains the rest.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from adaptory.adapters.serving.decode import GenerationRequest
from adaptory.adapters.serving.runtime import Runtime
from adaptory.registry.errors import AdaptoryError

log = logging.getLogger("adaptory.serving")


# While generation runs on the device, a classify chunk takes about this share of a decode step
# (so a decode step waits at most ~1.5 steps' time for its turn)
CHUNK_STEP_SHARE = 0.5


class Turns:
    """First come, first served turns on one device for the schedulers of several bases.

    Each base has its own worker thread; without turns, a classifier's encoder passes and a
    causal base's decode steps run at once and fight over the cores (on the CPU, two torch
    thread pools on the same cores stall each other) or queue behind each other on the GPU
    in no set order. With turns, a worker computes one unit of work (admissions, one classify
    chunk, one decode step) and then waits behind every worker already waiting, so a decode
    step waits for at most one unit of each other base's work.
    """

    STEP_RECENT_S = 1.0  # decode steps this recent mean generation is running on the device

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose turn it is
        self._step_s: float | None = None  # moving average of decode steps on this device
        self._last_step = 0.0

    def note_step(self, seconds: float) -> None:
        """Record how long a decode step took (classification sizes its chunks by it)."""
        with self._cond:
            old = self._step_s
            self._step_s = seconds if old is None else 0.8 * old + 0.2 * seconds
            self._last_step = time.monotonic()

    def step_seconds(self) -> float | None:
        """The usual decode step on this device, if generation is running now; else None."""
        with self._cond:
            if self._step_s is None or time.monotonic() - self._last_step > self.STEP_RECENT_S:
                return None
            return self._step_s

    @contextmanager
    def turn(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


_TURNS: dict[str, Turns] = {}
_TURNS_LOCK = threading.Lock()


def device_turns(device) -> Turns:
    """The turns shared by every scheduler computing on `device` in this process."""
    with _TURNS_LOCK:
        return _TURNS.setdefault(str(device), Turns())


class SchedulerClosed(AdaptoryError):
    """The server is shutting down and takes no new work."""


@dataclass
class Job:
    """One request in flight; its events land on `events` (an asyncio.Queue) in order:
    ("text", TextDelta)*, then ("done", GenerationResult | list[dict]) or ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    generation: GenerationRequest | None = None
    classify: list[tuple[str, str]] | None = None
    cancelled: bool = False
    row: Any = None
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (client and server both went away)
            pass

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Mixed-adapter batching for one runtime, continuous between decode steps."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_batch: int | None = None,
        max_seq_len: int = 2560,
        window_s: float = 0.005,
        classify_rows: int = 16,
        classify_tokens: int = 4096,
    ) -> None:
        self.runtime = runtime
        length = min(max_seq_len, runtime.max_positions or max_seq_len)
        if max_batch is None and runtime.task == "causal-lm":
            max_batch = runtime.max_batch(length)  # as many rows as the KV budget holds
        self.max_batch = max(1, max_batch or 8)
        self.window_s = max(0.0, window_s)
        self.classify_rows = max(1, classify_rows)
        self.classify_tokens = max(1, classify_tokens)
        self.turns = device_turns(runtime.base.device)
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.batch = self._new_batch(length)
        self.jobs: dict[int, Job] = {}  # id(row) -> job
        self.classifying: deque[_Classification] = deque()  # worker thread only
        self.closing = False
        self.steps = 0
        self.batch_rows = 0  # sum of active rows over steps (mean batch size = rows / steps)
        self.admitted = 0  # generation rows that joined the batch
        self.cancelled = 0  # requests dropped because their client went away
        self.classify_backlog = 0  # texts waiting to be classified
        self._token_s: float | None = None  # moving average: seconds per padded classify token
        if runtime.task == "causal-lm":
            log.info(
                "base %s: decoding %s, up to %d rows per step (%s numerics)",
                runtime.base_ref, self.describe()["decode"], self.max_batch, runtime.numerics.name,
            )  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="adaptory-scheduler", daemon=True)
        self._thread.start()

    def _new_batch(self, length: int):
        """The worker's decode batch. On CUDA its cache is allocated for the whole batch limit
        and context now (captured graphs need buffers that never move); on the CPU it starts
        small and grows with the load."""
        if self.runtime.task != "causal-lm":
            return _NoGeneration()
        if str(self.runtime.base.device).startswith("cuda"):
            return self.runtime.new_batch(slots=self.max_batch, length=length)
        return self.runtime.new_batch(slots=min(self.max_batch, 8), length=min(length, 256))

    def describe(self) -> dict:
        """How this base decodes: the batch limit and the step runner (eager, cuda-graphs…)."""
        runner = getattr(self.batch, "runner", None)
        return {"max_batch": self.max_batch, "decode": runner.name if runner else None}

    @property
    def active(self) -> int:
        return self.batch.active

    def submit(self, job: Job) -> Job:
        if self.closing:
            raise SchedulerClosed("the server is shutting down")
        self.inbox.put(job)
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued and running ones, then end the worker."""
        self.closing = True
        self.inbox.put(None)
        self._thread.join(timeout)

    # -- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while True:
            waiting: list[Job] = []
            if not self.batch.active and not self.classifying:
                if stopping and self.inbox.empty():
                    return
                first = self.inbox.get()
                if first is None:
                    stopping = True
                    continue
                waiting.append(first)
                deadline = time.monotonic() + self.window_s
                while len(waiting) < self.max_batch:
                    left = deadline - time.monotonic()
                    try:
                        job = self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    waiting.append(job)
            room = self.max_batch - self.batch.active - len(waiting)
            while room > 0:
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    continue
                waiting.append(job)
                room -= 1
            if not (waiting or self.batch.active or self.classifying):
                continue
            try:
                with self.turns.turn():  # one unit of work, then the other bases' schedulers
                    self._queue_classify([j for j in waiting if j.classify is not None])
                    self._admit([j for j in waiting if j.generation is not None])
                    self._drop_cancelled()
                    self._classify_chunk()
                    if self.batch.active:
                        self.steps += 1
                        self.batch_rows += self.batch.active
                        began = time.perf_counter()
                        finished = self.batch.step()
                        self.turns.note_step(time.perf_counter() - began)
                        for row in finished:
                            self._finish(row)
            except Exception as exc:  # a bug, not a bad request: fail what is running, go on
                for row in list(self.batch.rows):
                    job = self.jobs.pop(id(row), None)
                    if job:
                        job.emit("error", exc)
                self.batch.drop(list(self.batch.rows), reason="error")

    # -- classification ---------------------------------------------------------------------

    def _queue_classify(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled:
                self.cancelled += 1
                continue
            try:
                lengths = self.runtime.classify_lengths([text for _, text in job.classify])
            except Exception as exc:
                job.emit("error", exc)
                continue
            self.classifying.append(_Classification(job, lengths))
            self.classify_backlog += len(lengths)

    def _classify_chunk(self) -> None:
        """Classify one bounded chunk, taken from the waiting requests in turn."""
        for work in [w for w in self.classifying if w.job.cancelled]:
            self.classifying.remove(work)
            self.classify_backlog -= work.left
            self.cancelled += 1
        if not self.classifying:
            return
        parts: list[tuple[_Classification, int]] = []  # (request, rows taken from it)
        rows, longest, budget = 0, 0, self._chunk_tokens()
        for work in self.classifying:
            taken = 0
            while work.done + taken < len(work.lengths) and rows < self.classify_rows:
                length = max(longest, work.lengths[work.done + taken])
                if rows and length * (rows + 1) > budget:  # padded tokens
                    break
                longest, taken, rows = length, taken + 1, rows + 1
            if taken:
                parts.append((work, taken))
            if work.done + taken < len(work.lengths):  # this chunk is full
                break
        items = [
            work.job.classify[i]
            for work, taken in parts
            for i in range(work.done, work.done + taken)
        ]
        began = time.perf_counter()
        try:
            results = self.runtime.classify_mixed(items)
        except Exception:
            results = None
        else:
            per_token = (time.perf_counter() - began) / max(1, rows * longest)
            old = self._token_s
            self._token_s = per_token if old is None else 0.8 * old + 0.2 * per_token
        start = 0
        for work, taken in parts:
            try:  # a chunk that failed runs again per request, so a broken one fails alone
                if results is not None:
                    got = results[start : start + taken]
                else:
                    got = self.runtime.classify_mixed(
                        work.job.classify[work.done : work.done + taken]
                    )
            except Exception as exc:
                work.job.emit("error", exc)
                work.failed = True
                got = []
            start += taken
            work.results.extend(got)
        # the requests served this turn go to the back of the line unless they are over
        for work, taken in parts:
            self.classifying.remove(work)
            self.classify_backlog -= work.left if work.failed else taken
            if work.failed:
                continue
            if work.left:
                self.classifying.append(work)
            else:
                work.job.emit("done", work.results)

    def _chunk_tokens(self) -> int:
        """Padded tokens for the next chunk: `classify_tokens`, or, while another base decodes
        on this device, about CHUNK_STEP_SHARE of one of its decode steps' worth (at least one
        text), so a chunk delays a decode step by about half a step."""
        step = self.turns.step_seconds()
        if step is None or not self._token_s:
            return self.classify_tokens
        return max(1, min(self.classify_tokens, int(CHUNK_STEP_SHARE * step / self._token_s)))

    # -- generation -------------------------------------------------------------------------

    def _admit(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            if job.cancelled:  # its client went away while it waited
                self.cancelled += 1
                continue
            try:  # load (or refuse) each adapter alone, so a broken one fails only its request
                if job.generation.adapter is not None:
                    adapter = self.runtime.load(job.generation.adapter, count_hit=False)
                    refusal = self.runtime.refusal(adapter.key)
                    if refusal is not None:  # its last rows all failed: no prefill for it
                        raise refusal
                ready.append(job)
            except Exception as exc:
                job.emit("error", exc)
        if not ready:
            return
        try:
            rows = self.batch.add_many([(j.generation, self._sink(j)) for j in ready])
            pairs = list(zip(ready, rows, strict=True))
        except Exception:  # add_many is all or nothing: retry one by one to isolate the cause
            pairs = []
            for job in ready:
                try:
                    pairs.append((job, self.batch.add(job.generation, on_text=self._sink(job))))
                except Exception as exc:
                    job.emit("error", exc)
        self.admitted += len(pairs)
        for job, row in pairs:
            job.row = row
            if row.error is not None:  # failed at its first token, alone
                job.emit("error", row.error)
            elif row.result is not None:  # finished at its first token
                job.emit("done", row.result)
            else:
                self.jobs[id(row)] = job

    @staticmethod
    def _sink(job: Job):
        return lambda delta: job.emit("text", delta)

    def _drop_cancelled(self) -> None:
        gone = [row for row in self.batch.rows if (job := self.jobs.get(id(row))) and job.cancelled]
        if gone:
            self.batch.drop(gone, reason="cancelled")
            self.cancelled += len(gone)
            for row in gone:
                self.jobs.pop(id(row), None)

    def _finish(self, row) -> None:
        job = self.jobs.pop(id(row), None)
        if job is None:
            return
        if row.error is not None:
            job.emit("error", row.error)
        elif row.result is not None:
            job.emit("done", row.result)


@dataclass
class _Classification:
    """A classify request in progress: its texts' token counts and the results so far."""

    job: Job
    lengths: list[int]
    results: list[dict] = field(default_factory=list)
    failed: bool = False

    @property
    def done(self) -> int:
        return len(self.results)

    @property
    def left(self) -> int:
        return len(self.lengths) - len(self.results)


class _NoGeneration:
    """The batch of a classification base: nothing ever decodes."""

    rows: list = []
    active = 0

    def step(self) -> list:
        return []

    def drop(self, rows, *, reason: str | None = None) -> None:
        pass
