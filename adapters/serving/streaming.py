"""A completion's answer from its job's events: one JSON body, or server-sent events (OpenAI's
chunks, then `data: [DONE]`). A request whose client goes away is cancelled: its batch row
leaves at the next decode step, whether it was waiting, gathering or streaming."""

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

from adaptory.adapters.serving.http_errors import (
    APIError,
    ClientGone,
    api_error,
    as_api_error,
    error_body,
)
from adaptory.adapters.serving.metrics import Metrics
from adaptory.adapters.serving.runtime import GenerationResult
from adaptory.adapters.serving.scheduler import Job, Scheduler, SchedulerClosed
from adaptory.adapters.serving.settings import ServerSettings
from adaptory.adapters.serving.validation import generation_request, stream_flags

log = logging.getLogger("adaptory.server")

DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there


def submit(scheduler: Scheduler, job: Job) -> None:
    """Queue `job`; a scheduler that is draining answers 503 `shutting_down`."""
    try:
        scheduler.submit(job)
    except SchedulerClosed as exc:
        raise api_error(exc) from None


class Listener:
    """Reads a job's events for its handler while watching the client: `next()` raises
    ClientGone once the client has disconnected (checked every DISCONNECT_POLL_S, also while
    events keep coming, as they do for a long non-streamed completion)."""

    def __init__(self, request: Request, job: Job) -> None:
        self.request, self.job = request, job
        self.checked = time.monotonic()

    async def next(self) -> tuple[str, Any]:
        while True:
            now = time.monotonic()
            if now - self.checked >= DISCONNECT_POLL_S:
                self.checked = now
                if await self.request.is_disconnected():
                    raise ClientGone
            if not self.job.events.empty():
                return self.job.events.get_nowait()
            try:
                return await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                pass


class JobStream(StreamingResponse):
    """Server-sent events of one job; however the response ends (done, or the client went
    away mid-stream), the job is cancelled so its row leaves the batch at the next step."""

    def __init__(self, job: Job, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def generate(
    request: Request,
    body: dict,
    adapter: str | None,
    ids: list[int],
    *,
    chat: bool,
    base: str,
    settings: ServerSettings,
    schedulers: dict[str, Scheduler],
    metrics: Metrics,
):
    """Check the body's sampling fields, queue the job on `base`'s scheduler, and answer: a
    JobStream when `stream` is set, else the whole completion as one body once it is done."""
    generation = generation_request(body, settings, adapter, ids)
    stream, include_usage = stream_flags(body)
    if len(ids) > settings.max_prompt_tokens:
        raise APIError(
            400, f"the prompt has {len(ids)} tokens; this server takes at most "
            f"{settings.max_prompt_tokens}", code="prompt_too_long",
        )  # fmt: skip
    job = Job(loop=asyncio.get_running_loop(), events=asyncio.Queue(), generation=generation)
    submit(schedulers[base], job)
    handed_over = False
    events = Listener(request, job)
    try:
        first = await events.next()
        if first[0] == "error":
            raise as_api_error(first[1])
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        answer = Answer(ident, int(time.time()), body["model"], chat, include_usage)
        if stream:
            handed_over = True  # from here the response cancels the job when it ends
            return JobStream(
                job,
                answer.events(job, first, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = first
        while event[0] == "text":
            event = await events.next()
        if event[0] == "error":
            raise as_api_error(event[1])
        result: GenerationResult = event[1]
        metrics.tokens(result.prompt_tokens, result.completion_tokens)
        return answer.body(result)
    finally:
        if not handed_over:
            job.cancel()  # a no-op once done; a client gone or an error frees the row


@dataclass
class Answer:
    """One completion's answer: what each of its chunks or its body repeats, and their shape
    (`text_completion` or `chat.completion`)."""

    ident: str
    created: int
    model: str
    chat: bool
    include_usage: bool

    async def events(self, job: Job, first, metrics: Metrics):
        """The SSE lines from `first` on; never a cut stream without a reason: an error event
        and [DONE] end it whatever fails."""
        try:
            if self.chat:
                yield self.chunk(None, None, role=True)
            event = first
            while True:
                if event[0] == "text":
                    yield self.chunk(event[1], None)
                elif event[0] == "done":
                    result: GenerationResult = event[1]
                    metrics.tokens(result.prompt_tokens, result.completion_tokens)
                    yield self.chunk(None, result.finish_reason)
                    if self.include_usage:
                        yield self.chunk(None, None, usage=usage(result))
                    break
                else:
                    yield _error_event(as_api_error(event[1]))
                    break
                event = await job.events.get()
            yield "data: [DONE]\n\n"
        except Exception as exc:
            log.exception("stream failed")
            yield _error_event(as_api_error(exc))
            yield "data: [DONE]\n\n"

    def chunk(
        self, delta: str | None, finish: str | None, *, role: bool = False, usage=None
    ) -> str:
        if self.chat:
            content = {"role": "assistant", "content": ""} if role else {}
            if delta:
                content["content"] = delta
            choices = [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        data = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            data["choices"], data["usage"] = [], usage
        elif self.include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    def body(self, result: GenerationResult) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice.update(logprobs=None, finish_reason=result.finish_reason)
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(result),
            "adapter": result.adapter,
        }


def usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _error_event(error: APIError) -> str:
    return f"data: {json.dumps(error_body(error.message, error.type, error.code))}\n\n"
