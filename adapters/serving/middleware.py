"""The ASGI middleware around every request: it records the request in the metrics and turns
any unexpected exception into an OpenAI-shaped JSON 500 (never Starlette's plain-text one, and
the connection stays usable)."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse

from adaptory.adapters.serving.http_errors import as_api_error, error_body
from adaptory.adapters.serving.metrics import Metrics, endpoint_label

log = logging.getLogger("adaptory.server")


class ErrorsAndMetrics:
    """Pure ASGI rather than `@app.middleware("http")`, whose wrapper hides a client's disconnect
    from the handlers that poll for it."""

    def __init__(self, app, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

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

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            if status is not None:  # the response has begun: nothing can replace it
                raise
            log.exception("internal error on %s", path)
            error = as_api_error(exc)
            await JSONResponse(
                error_body(error.message, error.type, error.code), status_code=error.status
            )(scope, receive, send_and_note)
        finally:
            self.metrics.observe(endpoint_label(path), status or 500, time.perf_counter() - start)
