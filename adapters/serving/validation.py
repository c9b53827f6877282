"""Reading and type-checking request bodies: the raw body within `max_body_bytes`, then each
field, so that a bad request is a 400 naming the field before any work is queued. Handlers read
the raw `Request` (no pydantic body models), which is why /openapi.json declares no bodies."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from adaptory.adapters.serving.http_errors import APIError
from adaptory.adapters.serving.runtime import GenerationRequest
from adaptory.adapters.serving.settings import ServerSettings


async def read_json(request: Request) -> dict:
    """The body as a JSON object; over the size limit is 413, by Content-Length before a byte
    is read, else counted as the chunks arrive."""
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


def require(body: dict, name: str) -> Any:
    if body.get(name) in (None, ""):
        raise APIError(400, f"missing required field '{name}'", code="missing_field")
    return body[name]


def prompt(body: dict) -> str:
    """/v1/completions' `prompt`: one string (a list holding one string is taken too)."""
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise APIError(
            400, "'prompt' must be a string (one prompt per request)", code="invalid_prompt"
        )
    return value


def texts(body: dict, limit: int) -> list[str]:
    """/v1/classify's `input`: a string or a non-empty list of at most `limit` strings."""
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise APIError(
            400, "'input' must be a string or a non-empty list of strings", code="invalid_input"
        )
    if len(value) > limit:
        raise APIError(
            400, f"'input' has {len(value)} texts; this server classifies at most "
            f"{limit} per request", code="too_many_inputs",
        )  # fmt: skip
    return value


def messages(messages) -> list[dict]:
    """Chat `messages` as [{"role", "content"}], text parts of a content list joined."""
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


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage), type-checked."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", code="invalid_value")
    return stream, _flag(options, "include_usage", "stream_options.include_usage")


def generation_request(
    body: dict, settings: ServerSettings, adapter, ids: list[int]
) -> GenerationRequest:
    """The sampling fields of a completion or chat body, checked, as the runtime's request."""
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
