"""Reading and checking request bodies: the raw body within `max_body_bytes`, then the protocol
model (protocol.py) that type-checks every field, then the runtime's `GenerationRequest`s. A bad
request is a 400 naming the field before any work is queued.

Handlers read the raw `Request` themselves, after the route's dependencies (the API key), so a
refused request is never read; the routes declare their protocol models for /openapi.json."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from adaptory.adapters.serving.http_errors import APIError
from adaptory.adapters.serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from adaptory.adapters.serving.runtime import GenerationRequest
from adaptory.adapters.serving.settings import ServerSettings

M = TypeVar("M", bound=BaseModel)

# the error code of a bad value in each field (the rest: invalid_value)
FIELD_CODES = {
    "model": "invalid_model", "prompt": "invalid_prompt", "messages": "invalid_messages",
    "input": "invalid_input", "stop": "invalid_stop",
}  # fmt: skip


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


async def read(request: Request, model: type[M]) -> M:
    """The body checked against its protocol model."""
    return parse(model, await read_json(request))


def parse(model: type[M], body: dict) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise refusal(exc.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply", code="invalid_json") from None


def refusal(errors: list[dict]) -> APIError:
    """The first validation error as a 400 naming its field (`messages[0].content`)."""
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    # a union reports an error per branch: the deepest one names the field best
    first = max(errors, key=lambda e: len(_field_path(e)))
    path = _field_path(first)
    where = ""
    for part in path:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
    top = path[0] if path else ""
    if first.get("type") == "extra_forbidden":
        return APIError(
            400, f"unknown field '{where}': this server does not implement it",
            code="unknown_parameter",
        )  # fmt: skip
    if first.get("type") == "missing" or (
        path == ["model"] and first.get("input", 0) in ("", None)
    ):
        code = "missing_field" if len(path) == 1 else FIELD_CODES.get(str(top), "invalid_value")
        return APIError(400, f"missing required field '{where}'", code=code)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    got = json.dumps(first.get("input"), default=str)[:60] if "input" in first else None
    text = f"'{where}': {message}" if where else message
    if got is not None and first.get("type") != "value_error":
        text += f" (got {got})"
    return APIError(400, text, code=FIELD_CODES.get(str(top), "invalid_value"))


def _field_path(error: dict) -> list:
    """An error's location without union branch names (`str`, `list[TextPart]`)."""
    return [
        p for p in error.get("loc", ())
        if isinstance(p, int) or (p not in BRANCHES and "[" not in p)
    ]  # fmt: skip


BRANCHES = {"str", "int", "float", "bool", "dict", "list", "TextPart", "function-after"}


def check_token_ids(ids, vocab: int, where: str, code: str = "invalid_value") -> None:
    """400 naming `where` if a token id is outside the vocabulary [0, vocab)."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise APIError(
            400, f"{where}: token id {bad} is outside the vocabulary (0 … {vocab - 1})", code=code
        )


def texts(inputs: str | list[str], limit: int) -> list[str]:
    """/v1/classify's `input`: a string or a non-empty list of at most `limit` strings."""
    value = [inputs] if isinstance(inputs, str) else inputs
    if not value:
        raise APIError(
            400, "'input' must be a string or a non-empty list of strings", code="invalid_input"
        )
    if len(value) > limit:
        raise APIError(
            400, f"'input' has {len(value)} texts; this server classifies at most "
            f"{limit} per request", code="too_many_inputs",
        )  # fmt: skip
    return value


def messages(chat: list[ChatMessage]) -> list[dict]:
    """Chat messages as the chat template takes them: text parts joined, tool calls kept."""
    out = []
    for message in chat:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        clean: dict = {"role": message.role, "content": content if content is not None else ""}
        if message.tool_calls:
            clean["tool_calls"] = [c.model_dump(exclude_none=True) for c in message.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(message, key) is not None:
                clean[key] = getattr(message, key)
        out.append(clean)
    return out


def unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for fields whose meaning this server does not implement (never a silent ignore)."""
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError(
            400, f"response_format '{request.response_format.type}' is not supported: this "
            "server has no constrained decoding; ask for JSON in the prompt and validate it",
            code="unsupported_parameter",
        )  # fmt: skip
    if isinstance(request, CompletionRequest) and request.suffix:
        raise APIError(
            400, "suffix (fill-in-the-middle) is not supported", code="unsupported_parameter"
        )
    if (
        isinstance(request, ChatCompletionRequest)
        and request.tools
        and request.tool_choice != "none"
    ):
        raise APIError(
            400, "tools: this server has no tool-call parser configured; send the tools in "
            "the prompt, or tool_choice 'none'", code="unsupported_parameter",
        )  # fmt: skip


def generation_requests(
    request: CompletionRequest | ChatCompletionRequest,
    settings: ServerSettings,
    adapter: str | None,
    prompt_ids: list[int],
    *,
    room: int,
    count: int,
    vocab: int,
) -> list[GenerationRequest]:
    """`count` runtime requests (choices) for one prompt. `room`: positions the base has left
    after the prompt, which a chat without `max_tokens` may fill (up to `--max-tokens-limit`)."""
    chat = isinstance(request, ChatCompletionRequest)
    limit = settings.max_tokens_limit
    max_tokens = request.max_tokens
    if chat:
        max_tokens = max_tokens if max_tokens is not None else request.max_completion_tokens
        if max_tokens is None:  # OpenAI: as long as the context allows
            max_tokens = max(1, min(limit, room))
    elif max_tokens is None:
        max_tokens = settings.default_max_tokens
    if max_tokens > limit:
        raise APIError(
            400, f"max_tokens must be at most {limit}, got {max_tokens}",
            code="max_tokens_exceeded",
        )  # fmt: skip
    if request.min_tokens > max_tokens:
        raise APIError(
            400, f"'min_tokens' ({request.min_tokens}) must be at most max_tokens ({max_tokens})",
            code="invalid_value",
        )  # fmt: skip
    if request.stream_options is not None and not request.stream:
        raise APIError(
            400, "'stream_options' is only allowed with stream: true", code="invalid_value"
        )
    echo = not chat and request.echo
    if max_tokens == 0 and not echo:
        raise APIError(
            400, "max_tokens 0 scores the prompt: it needs echo", code="max_tokens_exceeded"
        )
    if chat:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= 2**31:
            raise APIError(400, f"logit_bias: '{key}' is not a token id", code="invalid_value")
        check_token_ids([int(key)], vocab, "logit_bias")
        bias[int(key)] = value
    best_of = getattr(request, "best_of", None) or request.n
    ranked = best_of > request.n  # best_of ranks choices by their cumulative logprob
    out = []
    for j in range(count):
        out.append(
            GenerationRequest(
                adapter=adapter,
                prompt_ids=prompt_ids,
                max_new_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=max(0, request.top_k or 0),
                min_p=request.min_p or 0.0,
                seed=None if request.seed is None else (request.seed + j) % 2**63,
                stop=stop,
                stop_token_ids=list(request.stop_token_ids or []),
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                logit_bias=bias,
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                repetition_penalty=request.repetition_penalty or 1.0,
                logprobs=logprobs if logprobs is not None else (0 if ranked else None),
                prompt_logprobs=logprobs if echo and logprobs is not None else None,
            )
        )
    return out
