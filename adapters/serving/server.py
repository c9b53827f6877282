"""The HTTP server: OpenAI-compatible completions and chat over many adapters on shared bases.

`create_app(runtimes, registry=..., settings=...)` builds a FastAPI app serving one or more bases
(each a `Runtime` with its own LRU and `Scheduler`). A request's `model` is an adapter reference
(`name`, `name:3`, `name:tag`) routed to the base its entry was made for (matched by fingerprint,
then by base reference), or a base itself (`base:<ref>`). Errors are OpenAI-shaped:
`{"error": {"message", "type", "code"}}`, and every field of a body is type-checked before any
work is queued. When an API key is set every endpoint but /health needs
`Authorization: Bearer <key>`; the key is compared in constant time and never logged. A request
whose client goes away is cancelled: its batch row leaves at the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptory.adapters.serving.runtime import (
    AdapterInUse,
    GenerationRequest,
    GenerationResult,
    Runtime,
)
from adaptory.adapters.serving.scheduler import Job, Scheduler, SchedulerClosed
from adaptory.registry.errors import (
    AdaptoryError,
    BadInput,
    BaseMismatch,
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    NotFound,
)

log = logging.getLogger("adaptory.server")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = (
    "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
    "/v1/adapters/load", "/v1/adapters/unload", "/health", "/metrics",
)  # fmt: skip
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there
CLIENT_GONE = 499  # what the metrics record for a request whose client disconnected (as nginx)


@dataclass
class ServerSettings:
    api_key: str | None = None
    admin: bool = True  # /v1/adapters/load and /unload
    max_batch: int | None = None  # rows decoding together per base; None: as the KV cache allows
    batch_window_ms: float = 5.0
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    max_prompt_tokens: int = 2048
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20  # a request body over this is refused (413) unread
    max_classify_inputs: int = 128  # texts per /v1/classify request; more is refused (400)
    classify_chunk_rows: int = 16  # texts per encoder pass; other requests run between passes
    classify_chunk_tokens: int = 4096  # padded tokens (texts x longest) per encoder pass
    header_timeout_s: float = 10.0  # a connection must finish its request headers in this time
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # the largest request line + headers uvicorn buffers

    def __repr__(self) -> str:  # never show the key
        key = "set" if self.api_key else None
        return f"ServerSettings(api_key={key}, admin={self.admin}, max_batch={self.max_batch})"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def error_body(message: str, type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


def api_error(exc: AdaptoryError) -> APIError:
    """HTTP status for a library error: unknown -> 404, bad input -> 400, damaged -> 500, ..."""
    message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    if isinstance(exc, NotFound | InvalidReference):
        return APIError(404, message, type="not_found_error", code="model_not_found")
    if isinstance(exc, BaseMismatch):
        return APIError(409, message, type="adapter_error", code="base_mismatch")
    if isinstance(exc, IntegrityError):
        return APIError(500, message, type="adapter_error", code="adapter_integrity")
    if isinstance(exc, AdapterInUse):
        return APIError(409, message, code="adapter_in_use")
    if isinstance(exc, InvalidAdapter):
        return APIError(400, message, type="adapter_error", code="invalid_adapter")
    if isinstance(exc, SchedulerClosed):
        return APIError(503, message, type="server_error", code="shutting_down")
    if isinstance(exc, BadInput):
        return APIError(400, message, code="invalid_value")
    return APIError(500, message, type="server_error", code="adapter_error")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


class Gate:
    """ASGI middleware around every route: the API key, the metrics, and a JSON 500 for any
    unexpected exception (never Starlette's plain-text one, and the connection stays usable).

    Pure ASGI rather than `@app.middleware("http")`, whose wrapper hides a client's disconnect
    from the handlers that poll for it.
    """

    def __init__(self, app, *, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        status = None

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        key = self.settings.api_key
        try:
            if key and path != "/health" and not _authorized(Headers(scope=scope), key):
                refusal = JSONResponse(
                    error_body(
                        "missing or wrong API key", "authentication_error", "invalid_api_key"
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await refusal(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if status is not None:  # the response has begun: nothing can replace it
                raise
            log.exception("internal error on %s", path)
            error = _as_api_error(exc)
            await JSONResponse(
                error_body(error.message, error.type, error.code), status_code=error.status
            )(scope, receive, send_and_note)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.observe(endpoint, status or 500, time.perf_counter() - start)


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


# --- metrics -------------------------------------------------------------------------------


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            buckets = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self, bases: dict[str, Runtime], schedulers: dict[str, Scheduler]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        with self.lock:
            family("adaptory_requests_total", "counter", "HTTP requests by endpoint and status.")
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(
                    f'adaptory_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                )
            family("adaptory_prompt_tokens_total", "counter", "Prompt tokens processed.")
            out.append(f"adaptory_prompt_tokens_total {self.prompt_tokens}")
            family("adaptory_generated_tokens_total", "counter", "Tokens generated.")
            out.append(f"adaptory_generated_tokens_total {self.generated_tokens}")
            family("adaptory_request_latency_seconds", "histogram", "Request latency.")
            for endpoint, buckets in sorted(self.latency.items()):
                for bound, n in zip(LATENCY_BUCKETS, buckets, strict=True):
                    out.append(
                        f'adaptory_request_latency_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}'
                    )
                count = self.latency_count[endpoint]
                out.append(
                    f'adaptory_request_latency_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {count}'
                )
                out.append(
                    f'adaptory_request_latency_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}'
                )
                out.append(
                    f'adaptory_request_latency_seconds_count{{endpoint="{endpoint}"}} {count}'
                )
        gauges = [
            ("adaptory_resident_adapters", "gauge", "Adapters resident per base.", "resident"),
            ("adaptory_adapter_loads_total", "counter", "Adapter loads per base.", "loads"),
            (
                "adaptory_adapter_evictions_total",
                "counter",
                "Adapter evictions per base.",
                "evictions",
            ),
            (
                "adaptory_adapter_hits_total",
                "counter",
                "Requests that found their adapter resident.",
                "hits",
            ),
            (
                "adaptory_adapter_load_failures_total",
                "counter",
                "Adapters that failed to load.",
                "load_failures",
            ),
            (
                "adaptory_base_loads_total",
                "counter",
                "Base model loads (one per base, ever).",
                "base_loads",
            ),
        ]
        stats = {ref: rt.stats() for ref, rt in bases.items()}
        for name, kind, help_text, key in gauges:
            family(name, kind, help_text)
            for ref, values in stats.items():
                out.append(f'{name}{{base="{_escape(ref)}"}} {values[key]}')
        per_scheduler = [
            ("adaptory_active_rows", "gauge", "Rows decoding right now.", "active"),
            (
                "adaptory_queued_classify_texts",
                "gauge",
                "Texts of classify requests waiting for their chunk.",
                "classify_backlog",
            ),
            (
                "adaptory_cancelled_requests_total",
                "counter",
                "Requests dropped because their client went away.",
                "cancelled",
            ),
        ]
        for name, kind, help_text, attribute in per_scheduler:
            family(name, kind, help_text)
            for ref, scheduler in schedulers.items():
                value = getattr(scheduler, attribute)
                out.append(f'{name}{{base="{_escape(ref)}"}} {value}')
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- routing -------------------------------------------------------------------------------


class Models:
    """Maps a request's `model` to (runtime, adapter reference or None for the base)."""

    def __init__(self, registry, runtimes: dict[str, Runtime]) -> None:
        self.registry = registry
        self.runtimes = runtimes

    def base_id(self, ref: str) -> str:
        return f"base:{ref}"

    def runtime_for_entry(self, entry) -> Runtime | None:
        fingerprint = entry.base_fingerprint or {}
        for rt in self.runtimes.values():
            fp = rt.base.fingerprint
            if (
                fingerprint.get("weights") == fp.weights
                and fingerprint.get("tokenizer") == fp.tokenizer
            ):
                return rt
        for ref, rt in self.runtimes.items():
            if entry.base_model == ref and (not fingerprint or rt.force):
                return rt
        return None

    def route(self, model: str) -> tuple[Runtime, str | None]:
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' must be a non-empty string", code="missing_model")
        for ref, rt in self.runtimes.items():
            if model in (self.base_id(ref), ref):
                return rt, None
        try:
            entry = self.registry.resolve(model)
        except AdaptoryError as exc:
            raise APIError(
                404, f"model '{model}' not found: {exc.message}", type="not_found_error",
                code="model_not_found",
            ) from None  # fmt: skip
        rt = self.runtime_for_entry(entry)
        if rt is None:
            raise APIError(
                404,
                f"adapter '{entry.ref}' is for base '{entry.base_model}', which this server does not serve",
                type="not_found_error",
                code="model_not_found",
            )
        return rt, entry.ref

    def listing(self) -> list[dict]:
        data = []
        for ref, rt in self.runtimes.items():
            data.append(_model_card(self.base_id(ref), None, rt, ref))
        latest: dict[str, Any] = {}
        for entry in self.registry.list():
            rt = self.runtime_for_entry(entry)
            if rt is None:
                continue
            data.append(_model_card(entry.ref, entry, rt, rt.base_ref))
            latest[entry.name] = (entry, rt)
        for name, (entry, rt) in sorted(latest.items()):
            data.append(_model_card(name, entry, rt, rt.base_ref))
        return data


def _model_card(model_id: str, entry, rt: Runtime, base: str) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "adaptory",
        "base": base,
        "task": entry.task if entry else rt.task,
        "method": entry.method if entry else None,
        "ref": entry.ref if entry else None,
    }


# --- app -----------------------------------------------------------------------------------


def create_app(runtimes: dict[str, Runtime], *, registry, settings: ServerSettings | None = None):
    """A FastAPI app serving `runtimes` ({base ref: Runtime}); schedulers start with the app."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    models = Models(registry, runtimes)
    schedulers: dict[str, Scheduler] = {}

    @asynccontextmanager
    async def lifespan(app):
        for ref, rt in runtimes.items():
            schedulers[ref] = Scheduler(
                rt,
                max_batch=settings.max_batch,
                max_seq_len=settings.max_prompt_tokens + settings.max_tokens_limit,
                window_s=settings.batch_window_ms / 1000,
                classify_rows=settings.classify_chunk_rows,
                classify_tokens=settings.classify_chunk_tokens,
            )
        yield
        # uvicorn has already let in-flight requests finish; drain whatever is still queued.
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in schedulers.values()))

    app = FastAPI(title="Adaptory", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.metrics, app.state.models = settings, metrics, models
    app.state.schedulers, app.state.runtimes = schedulers, runtimes
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc: ClientGone):  # nobody reads it; the metrics count it
        body = error_body("the client closed the connection", "invalid_request_error", "gone")
        return JSONResponse(body, status_code=CLIENT_GONE)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.code), status_code=exc.status)

    @app.exception_handler(AdaptoryError)
    async def _adaptory_error(request, exc: AdaptoryError):
        return await _api_error(request, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return JSONResponse(error_body(*_validation_message(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None), status_code=exc.status_code)

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "bases": {
                ref: {
                    "task": rt.task,
                    "resident": rt.resident(),
                    "numerics": rt.numerics.name,
                    **schedulers[ref].describe(),
                }
                for ref, rt in runtimes.items()
                if ref in schedulers
            },
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint():
        return PlainTextResponse(
            metrics.render(runtimes, schedulers), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def list_models():
        data = await asyncio.to_thread(models.listing)
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(
                400, "'prompt' must be a string (one prompt per request)", code="invalid_prompt"
            )
        rt, adapter = _route_generation(body)
        ids = await asyncio.to_thread(rt.encode, prompt)
        return await _generate(request, body, rt, adapter, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        messages = _messages(body.get("messages"))
        rt, adapter = _route_generation(body)
        try:
            rendered = await asyncio.to_thread(rt.chat_prompt, messages)
        except AdaptoryError as exc:
            raise api_error(exc) from None
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise APIError(400, f"chat template failed: {exc}", code="invalid_messages") from None
        ids = await asyncio.to_thread(rt.encode, rendered, chat=True)
        return await _generate(request, body, rt, adapter, ids, chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await _json(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(
                400, "'input' must be a string or a non-empty list of strings", code="invalid_input"
            )
        if len(texts) > settings.max_classify_inputs:
            raise APIError(
                400, f"'input' has {len(texts)} texts; this server classifies at most "
                f"{settings.max_classify_inputs} per request", code="too_many_inputs",
            )  # fmt: skip
        rt, adapter = models.route(_require(body, "model"))
        if rt.task != "seq-cls":
            raise APIError(
                400,
                f"model '{body['model']}' generates text; use /v1/completions",
                code="wrong_task",
            )
        if adapter is None:
            raise APIError(
                400, "classify with a classification adapter, not the bare base", code="no_head"
            )
        job = Job(
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            classify=[(adapter, t) for t in texts],
        )
        _submit(schedulers[rt.base_ref], job)
        try:
            kind, value = await Listener(request, job).next()
        finally:
            job.cancel()  # a no-op once done; else its remaining chunks are skipped
        if kind == "error":
            raise _as_api_error(value)
        return {
            "object": "list",
            "model": adapter,
            "data": [{"index": i, **row} for i, row in enumerate(value)],
        }

    @app.post("/v1/adapters/load")
    async def load_adapter(request: Request):
        rt, adapter = await _admin_target(request)
        resident = await asyncio.to_thread(rt.load, adapter)
        return {"model": resident.key, "base": rt.base_ref, "resident": rt.resident()}

    @app.post("/v1/adapters/unload")
    async def unload_adapter(request: Request):
        rt, adapter = await _admin_target(request)
        unloaded = await asyncio.to_thread(rt.unload, adapter)
        return {"model": adapter, "unloaded": unloaded, "resident": rt.resident()}

    # -- helpers (closures over settings, models, schedulers) -------------------------------

    async def _admin_target(request: Request):
        if not settings.admin:
            raise APIError(
                403, "admin endpoints are disabled (--no-admin)", type="permission_error"
            )
        body = await _json(request)
        rt, adapter = models.route(_require(body, "model"))
        if adapter is None:
            raise APIError(400, "the base is always loaded; name an adapter", code="invalid_model")
        return rt, adapter

    def _route_generation(body: dict) -> tuple[Runtime, str | None]:
        rt, adapter = models.route(_require(body, "model"))
        if rt.task != "causal-lm":
            raise APIError(
                400, f"model '{body['model']}' is a classifier; use /v1/classify", code="wrong_task"
            )
        return rt, adapter

    async def _generate(request, body: dict, rt: Runtime, adapter, ids: list[int], *, chat: bool):
        generation = _generation_request(body, settings, adapter, ids)
        stream, include_usage = _stream_flags(body)
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens; this server takes at most "
                f"{settings.max_prompt_tokens}", code="prompt_too_long",
            )  # fmt: skip
        job = Job(loop=asyncio.get_running_loop(), events=asyncio.Queue(), generation=generation)
        _submit(schedulers[rt.base_ref], job)
        handed_over = False
        events = Listener(request, job)
        try:
            first = await events.next()
            if first[0] == "error":
                raise _as_api_error(first[1])
            model_name = body["model"]
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            if stream:
                handed_over = True  # from here the response cancels the job when it ends
                return JobStream(
                    job,
                    _sse(job, first, ident, created, model_name, chat, include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            event = first
            while event[0] == "text":
                event = await events.next()
            if event[0] == "error":
                raise _as_api_error(event[1])
            result: GenerationResult = event[1]
            metrics.tokens(result.prompt_tokens, result.completion_tokens)
            return _final_body(ident, created, model_name, result, chat)
        finally:
            if not handed_over:
                job.cancel()  # a no-op once done; a client gone or an error frees the row

    async def _sse(job: Job, first, ident, created, model_name, chat, include_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, *, role: bool = False, usage=None) -> str:
            if chat:
                content = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    content["content"] = delta
                choices = [
                    {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
                ]
            else:
                choices = [
                    {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                ]
            data = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": choices,
            }
            if usage is not None:
                data["choices"], data["usage"] = [], usage
            elif include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk(None, None, role=True)
            event = first
            while True:
                if event[0] == "text":
                    yield chunk(event[1], None)
                elif event[0] == "done":
                    result: GenerationResult = event[1]
                    metrics.tokens(result.prompt_tokens, result.completion_tokens)
                    yield chunk(None, result.finish_reason)
                    if include_usage:
                        yield chunk(None, None, usage=_usage(result))
                    break
                else:
                    error = _as_api_error(event[1])
                    yield f"data: {json.dumps(error_body(error.message, error.type, error.code))}\n\n"
                    break
                event = await job.events.get()
            yield "data: [DONE]\n\n"
        except Exception as exc:  # never a cut stream without a reason: an error event, [DONE]
            log.exception("stream failed")
            error = _as_api_error(exc)
            yield f"data: {json.dumps(error_body(error.message, error.type, error.code))}\n\n"
            yield "data: [DONE]\n\n"

    return app


def uvicorn_options(settings: ServerSettings) -> dict:
    """uvicorn.Config arguments that bound what one connection can hold: a deadline for its
    request headers, the keep-alive idle time and the size of its header block."""
    return {
        "http": _header_deadline_protocol(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def _header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers take over `seconds`.

    uvicorn itself only times out idle keep-alive connections: one that sends a partial
    request line or trickles header bytes would otherwise stay open for ever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # a request is arriving: the clock runs
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # its headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def _submit(scheduler: Scheduler, job: Job) -> None:
    try:
        scheduler.submit(job)
    except SchedulerClosed as exc:
        raise api_error(exc) from None


def _authorized(headers: Headers, key: str) -> bool:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    return hmac.compare_digest(token.strip().encode(), key.encode())


async def _json(request) -> dict:
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no length: count as they come
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
        # lone surrogates ("\ud800") parse but cannot be tokenized: refuse them here
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # bad JSON/UTF-8, deep nesting, 5000-digit ints
        raise APIError(400, f"malformed JSON body: {exc}"[:300], code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _require(body: dict, name: str) -> Any:
    if body.get(name) in (None, ""):
        raise APIError(400, f"missing required field '{name}'", code="missing_field")
    return body[name]


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", code="invalid_messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a 'role'", code="invalid_messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(
                        400, f"messages[{i}].content[{j}]: only text content is supported",
                        code="invalid_messages",
                    )  # fmt: skip
                if not isinstance(part.get("text"), str):
                    raise APIError(
                        400, f"messages[{i}].content[{j}]: 'text' must be a string",
                        code="invalid_messages",
                    )  # fmt: skip
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}] needs string 'content'", code="invalid_messages")
        clean.append({"role": message["role"], "content": content})
    return clean


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise APIError(
            400,
            f"'{name}' must be {'an integer' if kind is int else 'a number'}",
            code="invalid_value",
        )
    if isinstance(value, float) and not math.isfinite(value):  # json.loads accepts NaN, Infinity
        raise APIError(400, f"'{name}' must be a finite number, got {value}", code="invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(
            400, f"'{name}' must be between {low} and {high}, got {value}", code="invalid_value"
        )
    return kind(value)


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    """A boolean field (absent or null: false); "false", 0 and 1 are not booleans."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(
            400, f"'{where or name}' must be true or false, got {json.dumps(value)[:40]}",
            code="invalid_value",
        )  # fmt: skip
    return value


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage), type-checked."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", code="invalid_value")
    return stream, _flag(options, "include_usage", "stream_options.include_usage")


def _unsupported(body: dict) -> None:
    """Refuse OpenAI options this server does not implement, and type-check the ignored ones."""
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:  # `in (None, False)` would let 0 in
        raise APIError(400, "logprobs are not supported", code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and (
        isinstance(best_of, bool) or not isinstance(best_of, int) or best_of != 1
    ):
        raise APIError(400, "best_of is not supported (only 1)", code="unsupported_parameter")
    if body.get("top_logprobs") is not None:
        raise APIError(400, "top_logprobs is not supported", code="unsupported_parameter")
    if _flag(body, "echo"):
        raise APIError(400, "echo is not supported", code="unsupported_parameter")
    if body.get("suffix") not in (None, ""):
        raise APIError(400, "suffix is not supported", code="unsupported_parameter")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise APIError(400, "'logit_bias' must be an object", code="invalid_value")
    if logit_bias:
        raise APIError(400, "logit_bias is not supported", code="unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):  # accepted and ignored
        _number(body, name, 0.0, float, -2.0, 2.0)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise APIError(400, "'user' must be a string", code="invalid_value")


def _generation_request(
    body: dict, settings: ServerSettings, adapter, ids: list[int]
) -> GenerationRequest:
    n = _number(body, "n", 1, int)
    if n != 1:
        raise APIError(400, "only n=1 is supported", code="unsupported_n")
    _unsupported(body)
    limit = settings.max_tokens_limit
    max_tokens = _number(body, "max_tokens", None, int)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", settings.default_max_tokens, int)
    if max_tokens < 1 or max_tokens > limit:
        raise APIError(
            400,
            f"max_tokens must be between 1 and {limit}, got {max_tokens}",
            code="max_tokens_exceeded",
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(
            400, "'stop' must be a string or a list of up to 4 strings", code="invalid_stop"
        )
    return GenerationRequest(
        adapter=adapter,
        prompt_ids=ids,
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        seed=_number(body, "seed", None, int, 0, 2**63 - 1),  # torch seeds are 64-bit
        stop=stop,
    )


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdaptoryError):
        return api_error(exc)
    return APIError(
        500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal"
    )


def _usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _final_body(ident: str, created: int, model: str, result: GenerationResult, chat: bool) -> dict:
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
    else:
        choice = {
            "index": 0,
            "text": result.text,
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
    return {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(result),
        "adapter": result.adapter,
    }


def _validation_message(errors: list[dict]) -> tuple[str, str, str]:
    if not errors:
        return "invalid request", "invalid_request_error", "invalid_request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg')}", "invalid_request_error", "invalid_request"


def build_runtimes(
    registry,
    *,
    bases: list[str] = (),
    preload: list[str] = (),
    max_adapters: int = 8,
    quant: str = "nf4",
    device: str | None = None,
    force: bool = False,
    numerics: str = "auto",
    decode: str = "auto",
) -> dict[str, Runtime]:
    """Runtimes for the given bases plus the bases of the preloaded adapters; preload those."""
    from adaptory.adapters.bases.loading import BUILTIN_BASES

    entries = [registry.resolve(ref) for ref in preload]
    tasks: dict[str, str] = {}
    for entry in entries:
        if not entry.base_model:
            raise BadInput(f"{entry.ref} does not name its base; pass --base")
        tasks.setdefault(entry.base_model, entry.task or "causal-lm")
    for ref in bases:
        if ref not in tasks:
            known = [e.task for e in registry.list(base=ref) if e.task]
            default = BUILTIN_BASES[ref].default_task if ref in BUILTIN_BASES else "causal-lm"
            tasks[ref] = known[-1] if known else default
    if not tasks:
        raise BadInput("nothing to serve", hint="pass --base B and/or --preload REF")
    runtimes = {
        ref: Runtime(
            ref,
            registry=registry,
            task=task,
            quant=quant,
            device=device,
            max_adapters=max_adapters,
            force=force,
            numerics=numerics,
            decode=decode,
        )  # fmt: skip
        for ref, task in tasks.items()
    }
    models = Models(registry, runtimes)
    for entry in entries:
        rt = models.runtime_for_entry(entry) or runtimes[entry.base_model]
        rt.load(entry)
    return runtimes
