"""A completion's answer from its jobs' events: one JSON body, or server-sent events (OpenAI's
chunks, then `data: [DONE]`). A request is one job per choice (each prompt times `n`, or
`best_of`); their events are merged as they come. A request whose client goes away is
cancelled: its rows leave the batch at the next decode step, whether waiting or streaming."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from adaptory.adapters.serving import answers
from adaptory.adapters.serving.http_errors import (
    APIError,
    ClientGone,
    api_error,
    as_api_error,
    error_body,
)
from adaptory.adapters.serving.metrics import Metrics
from adaptory.adapters.serving.protocol import ChatCompletionRequest, CompletionRequest
from adaptory.adapters.serving.runtime import GenerationResult, Runtime
from adaptory.adapters.serving.scheduler import Job, Scheduler, SchedulerClosed
from adaptory.adapters.serving.settings import ServerSettings
from adaptory.adapters.serving.validation import generation_requests, unsupported

log = logging.getLogger("adaptory.server")

DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there


def submit(scheduler: Scheduler, job: Job) -> None:
    """Queue `job`; a scheduler that is draining answers 503 `shutting_down`."""
    try:
        scheduler.submit(job)
    except SchedulerClosed as exc:
        raise api_error(exc) from None


class Listener:
    """Reads the events of a request's jobs for its handler while watching the client:
    `next()` gives (job index, kind, value) as they come, and raises ClientGone once the client
    has disconnected (checked every DISCONNECT_POLL_S, also while events keep coming)."""

    def __init__(self, request: Request, jobs: list[Job]) -> None:
        self.request, self.jobs = request, jobs
        self.checked = time.monotonic()
        self.waiting: dict[asyncio.Future, int] = {}
        self.open = set(range(len(jobs)))  # jobs that have not ended
        self.watch = True  # poll for a disconnect (a streaming response watches for itself)

    async def next(self) -> tuple[int, str, Any]:
        while True:
            now = time.monotonic()
            if self.watch and now - self.checked >= DISCONNECT_POLL_S:
                self.checked = now
                if await self.request.is_disconnected():
                    raise ClientGone
            listening = set(self.waiting.values())
            for i in sorted(self.open - listening):
                self.waiting[asyncio.ensure_future(self.jobs[i].events.get())] = i
            done, _ = await asyncio.wait(
                self.waiting, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                future = min(done, key=lambda f: self.waiting[f])
                i = self.waiting.pop(future)
                kind, value = future.result()
                if kind != "text":
                    self.open.discard(i)
                return i, kind, value

    def close(self) -> None:
        for future in self.waiting:
            future.cancel()
        self.waiting.clear()


class JobsStream(StreamingResponse):
    """Server-sent events of a request's jobs; however the response ends (done, or the client
    went away mid-stream), the jobs are cancelled so their rows leave the batch."""

    def __init__(self, jobs: list[Job], listener: Listener, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.jobs, self.listener = jobs, listener

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.listener.close()
            for job in self.jobs:
                job.cancel()


@dataclass
class Prompt:
    """One prompt of a request: its token ids and its text (what `echo` sends back)."""

    ids: list[int]
    text: str


async def generate(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    rt: Runtime,
    adapter: str | None,
    prompts: list[Prompt],
    *,
    settings: ServerSettings,
    schedulers: dict[str, Scheduler],
    metrics: Metrics,
):
    """Check the body's sampling fields, queue one job per choice on the base's scheduler,
    and answer: an event stream when `stream` is set, else the whole answer once done."""
    chat = isinstance(body, ChatCompletionRequest)
    unsupported(body)
    count = getattr(body, "best_of", None) or body.n
    if len(prompts) * count > settings.max_choices:
        raise APIError(
            400, f"{len(prompts)} prompts x {count} choices is over this server's limit of "
            f"{settings.max_choices} choices per request", code="too_many_choices",
        )  # fmt: skip
    jobs: list[Job] = []
    for prompt in prompts:
        if len(prompt.ids) > settings.max_prompt_tokens:
            raise APIError(
                400, f"the prompt has {len(prompt.ids)} tokens; this server takes at most "
                f"{settings.max_prompt_tokens}", code="prompt_too_long",
            )  # fmt: skip
        room = (rt.max_positions or settings.max_tokens_limit) - len(prompt.ids)
        for generation in generation_requests(
            body, settings, adapter, prompt.ids, room=room, count=count, vocab=rt.vocab_size
        ):
            generation.fit_context = (
                chat and body.max_tokens is None and (body.max_completion_tokens is None)
            )
            jobs.append(Job(asyncio.get_running_loop(), asyncio.Queue(), generation=generation))
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for job in jobs:
            submit(schedulers[rt.base_ref], job)
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    listener = Listener(request, jobs)
    answer = answers.Answer(
        ident=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        created=int(time.time()),
        model=body.model,
        chat=chat,
        request=body,
        prompts=prompts,
        count=count,
        tokens=rt.token_bytes,
    )
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    handed_over = False
    try:
        first = await listener.next()
        if first[1] == "error":
            raise as_api_error(first[2])
        metrics.first_token(endpoint, loop.time() - start)
        timing = Timing(metrics, endpoint, loop)
        timing.saw(first)
        if body.stream:
            handed_over = True  # from here the response cancels the jobs when it ends
            listener.watch = False
            return JobsStream(
                jobs,
                listener,
                _events(answer, listener, first, metrics, timing),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results: dict[int, GenerationResult] = {}
        event = first
        while True:
            i, kind, value = event
            if kind == "error":
                raise as_api_error(value)
            if kind == "done":
                results[i] = value
                if len(results) == len(jobs):
                    break
            event = await listener.next()
            timing.saw(event)
        ordered = [results[i] for i in range(len(jobs))]
        metrics.tokens(sum(len(p.ids) for p in prompts), sum(r.completion_tokens for r in ordered))
        return answer.body(ordered)
    finally:
        if not handed_over:
            listener.close()
            for job in jobs:
                job.cancel()  # a no-op once done; a client gone or an error frees the rows


async def _events(
    answer: answers.Answer, listener: Listener, first, metrics: Metrics, timing: Timing
):
    """The SSE lines from `first` on; never a cut stream without a reason: an error event and
    [DONE] end it whatever fails."""
    try:
        if answer.chat:
            for index in range(answer.count * len(answer.prompts)):
                yield _sse(answer.chunk(index, role=True))
        done: dict[int, GenerationResult] = {}
        event = first
        while True:
            i, kind, value = event
            if kind == "text":
                yield _sse(answer.chunk(i, delta=value))
            elif kind == "done":
                done[i] = value
                yield _sse(answer.chunk(i, result=value))
                if len(done) == len(listener.jobs):
                    break
            else:
                yield _sse(error_body(*_error_fields(as_api_error(value))))
                break
            event = await listener.next()
            timing.saw(event)
        if len(done) == len(listener.jobs):
            results = [done[i] for i in range(len(done))]
            metrics.tokens(
                sum(len(p.ids) for p in answer.prompts),
                sum(r.completion_tokens for r in results),
            )
            if answer.include_usage:
                yield _sse(answer.usage_chunk(results))
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    except Exception as exc:
        log.exception("stream failed")
        yield _sse(error_body(*_error_fields(as_api_error(exc))))
        yield "data: [DONE]\n\n"


class Timing:
    """Time per output token of each choice: from its first event to its end, over the
    tokens after the first (what `adaptory_time_per_output_token_seconds` records)."""

    def __init__(self, metrics: Metrics, endpoint: str, loop) -> None:
        self.metrics, self.endpoint, self.loop = metrics, endpoint, loop
        self.first: dict[int, float] = {}

    def saw(self, event: tuple[int, str, Any]) -> None:
        i, kind, value = event
        now = self.loop.time()
        self.first.setdefault(i, now)
        if kind == "done" and value.completion_tokens > 1:
            spent = (now - self.first[i]) / (value.completion_tokens - 1)
            self.metrics.per_output_token(self.endpoint, spent)


def _error_fields(error: APIError) -> tuple[str, str, str | None]:
    return error.message, error.type, error.code


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
