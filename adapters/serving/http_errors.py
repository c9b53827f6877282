"""The server's errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`: `APIError`
(what a route raises), the HTTP status of each library error, and the JSON answer for each."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from adaptory.adapters.serving.runtime import REFUSAL_DELAY_S, AdapterInUse, AdapterRefused
from adaptory.adapters.serving.scheduler import SchedulerClosed
from adaptory.registry.errors import (
    AdaptoryError,
    BadInput,
    BaseMismatch,
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    NotFound,
)

CLIENT_GONE = 499  # what the metrics record for a request whose client disconnected (as nginx)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.headers = headers
        self.delay_s = delay_s  # the answer waits this long (a refusal a client may loop on)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def error_body(message: str, type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.message, error.type, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


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
    if isinstance(exc, AdapterRefused):
        return APIError(
            400,
            message,
            type="adapter_error",
            code="invalid_adapter",
            headers={"Retry-After": str(max(1, math.ceil(exc.seconds_left)))},
            delay_s=min(REFUSAL_DELAY_S, exc.seconds_left),
        )
    if isinstance(exc, InvalidAdapter):
        return APIError(400, message, type="adapter_error", code="invalid_adapter")
    if isinstance(exc, SchedulerClosed):
        return APIError(503, message, type="server_error", code="shutting_down")
    if isinstance(exc, BadInput):
        return APIError(400, message, code="invalid_value")
    return APIError(500, message, type="server_error", code="adapter_error")


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as the error a client sees: unexpected ones are a JSON 500 naming their type."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdaptoryError):
        return api_error(exc)
    return APIError(
        500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal"
    )


def validation_message(errors: list[dict]) -> tuple[str, str, str]:
    """FastAPI's request-validation errors as (message, type, code): a 400, never a 422."""
    if not errors:
        return "invalid request", "invalid_request_error", "invalid_request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg')}", "invalid_request_error", "invalid_request"
