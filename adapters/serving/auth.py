"""The API key: with `api_key` set every route but /health needs `Authorization: Bearer <key>`.

`require_api_key` is the FastAPI dependency the routers carry; it runs before a handler reads a
byte of the body, so a refused request is never read. The key is compared in constant time and
never logged or echoed.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.datastructures import Headers

from adaptory.adapters.serving.http_errors import APIError


def authorized(headers: Headers, key: str) -> bool:
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    return hmac.compare_digest(token.strip().encode(), key.encode())


async def require_api_key(request: Request) -> None:
    """Refuse (401, with a Bearer challenge) a request without the server's key, if it has one."""
    key = request.app.state.settings.api_key
    if key and not authorized(request.headers, key):
        raise APIError(
            401,
            "missing or wrong API key",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
