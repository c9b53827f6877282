"""The HTTP server: OpenAI-compatible completions and chat over many adapters on shared bases.

`create_app(runtimes, registry=..., settings=...)` builds a FastAPI app serving one or more bases
(each a `Runtime` with its own LRU and `Scheduler`) from the routers in routes.py, behind the
API key (auth.py) and the middleware that counts every request and turns a crash into a JSON 500
(middleware.py). `build_runtimes` makes the runtimes; `uvicorn_options` bounds what one
connection may hold. Where the rest lives: settings.py (`ServerSettings`), routing.py (which
base and adapter a `model` names), protocol.py (the OpenAI request and response models),
validation.py (request bodies to runtime requests), streaming.py (a request's jobs, SSE),
answers.py (bodies and chunks), http_errors.py (OpenAI-shaped errors), metrics.py (Prometheus).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.datastructures import URL
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adaptory.adapters.serving import routes
from adaptory.adapters.serving.auth import require_api_key
from adaptory.adapters.serving.http_errors import (
    CLIENT_GONE,
    APIError,
    ClientGone,
    api_error,
    error_body,
    error_response,
    validation_message,
)
from adaptory.adapters.serving.metrics import Metrics
from adaptory.adapters.serving.middleware import ErrorsAndMetrics
from adaptory.adapters.serving.routing import Models
from adaptory.adapters.serving.runtime import Runtime
from adaptory.adapters.serving.scheduler import Scheduler
from adaptory.adapters.serving.settings import ServerSettings
from adaptory.registry.errors import AdaptoryError, BadInput

__all__ = ["ServerSettings", "build_runtimes", "create_app", "uvicorn_options"]


def create_app(runtimes: dict[str, Runtime], *, registry, settings: ServerSettings | None = None):
    """A FastAPI app serving `runtimes` ({base ref: Runtime}); schedulers start with the app."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="Adaptory",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # routes.openapi_schema serves it, behind the key
        redirect_slashes=False,  # _unrouted redirects, after the key check
        exception_handlers={
            ClientGone: _client_gone,
            APIError: _api_error,
            AdaptoryError: _adaptory_error,
            RequestValidationError: _invalid_request,
            StarletteHTTPException: _unrouted,
        },
    )
    app.state.settings, app.state.metrics = settings, Metrics()
    app.state.models = Models(registry, runtimes)
    app.state.schedulers, app.state.runtimes = {}, runtimes  # schedulers: see _lifespan
    app.add_middleware(ErrorsAndMetrics, metrics=app.state.metrics)
    app.add_route("/openapi.json", routes.openapi_schema, include_in_schema=False)
    for router in (
        routes.health_router, routes.metrics_router, routes.openai_router,
        routes.classify_router, routes.admin_router,
    ):  # fmt: skip
        # Each route as the app's own, its router's dependencies (the key) built in. FastAPI's
        # include_router would leave one opaque entry per router in app.routes, hiding the
        # routes from whatever walks them (the access test checks each one needs the key).
        app.router.routes.extend(router.routes)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """One scheduler (and its worker thread) per base while the app runs."""
    settings, schedulers = app.state.settings, app.state.schedulers
    for ref, rt in app.state.runtimes.items():
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


# -- exception handlers: every error a JSON body in OpenAI's shape --------------------------


async def _client_gone(request: Request, exc: ClientGone):  # nobody reads it; metrics count it
    body = error_body("the client closed the connection", "invalid_request_error", "gone")
    return JSONResponse(body, status_code=CLIENT_GONE)


async def _api_error(request: Request, exc: APIError):
    if exc.delay_s > 0:  # a refusal a client may retry in a loop: slow the loop, not the server
        await asyncio.sleep(exc.delay_s)
    return error_response(exc)


async def _adaptory_error(request: Request, exc: AdaptoryError):
    return await _api_error(request, api_error(exc))


async def _invalid_request(request: Request, exc: RequestValidationError):
    return JSONResponse(error_body(*validation_message(exc.errors())), status_code=400)


async def _unrouted(request: Request, exc: StarletteHTTPException):
    """An unknown path (404) or a wrong method (405). No router's key check ran, so it runs here
    (but on /health): without the key the answer is 401, and the key guards discovery too."""
    if request.scope["path"] not in routes.OPEN_PATHS:
        try:
            await require_api_key(request)
        except APIError as refusal:
            return error_response(refusal)
    if exc.status_code == 404 and (twin := _slash_twin(request)) is not None:
        return RedirectResponse(url=str(twin))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind, None), status_code=exc.status_code)


def _slash_twin(request: Request) -> URL | None:
    """The URL with its trailing slash toggled, if a route serves that path: Starlette's
    `redirect_slashes`, which answers before any route's dependency (the key) runs."""
    path = request.scope["path"]
    if path == "/":
        return None
    twin = dict(request.scope, path=path.rstrip("/") if path.endswith("/") else path + "/")
    for route in request.app.router.routes:
        if route.matches(twin)[0] is not Match.NONE:
            return URL(scope=twin)
    return None


# -- uvicorn --------------------------------------------------------------------------------


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


# -- runtimes -------------------------------------------------------------------------------


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
