"""The endpoints, one FastAPI router per group: `health_router` (/health), `metrics_router`
(/metrics), `openai_router` (/v1/models[/{id}], /v1/completions, /v1/chat/completions, and
vLLM's /tokenize, /detokenize, /tokenizer_info),
`classify_router` (/v1/classify) and `admin_router` (/v1/adapters/load and /unload). Every
router but health carries `auth.require_api_key` as a dependency, so it runs before a handler.

Handlers reach what the app shares (settings, models, runtimes, schedulers, metrics) through the
dependencies below, which read `request.app.state`; they read the raw body themselves
(validation.py), after the dependencies, so a refused request is never read.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from adaptory.adapters.serving import protocol, validation
from adaptory.adapters.serving.auth import require_api_key
from adaptory.adapters.serving.http_errors import APIError, api_error, as_api_error
from adaptory.adapters.serving.metrics import Metrics
from adaptory.adapters.serving.routing import Models
from adaptory.adapters.serving.runtime import Runtime
from adaptory.adapters.serving.scheduler import Job, Scheduler
from adaptory.adapters.serving.settings import ServerSettings
from adaptory.adapters.serving.streaming import Listener, Prompt, generate, submit
from adaptory.registry.errors import AdaptoryError


async def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def _models(request: Request) -> Models:
    return request.app.state.models


async def _runtimes(request: Request) -> dict[str, Runtime]:
    return request.app.state.runtimes


async def _schedulers(request: Request) -> dict[str, Scheduler]:
    return request.app.state.schedulers  # filled when the app starts (its lifespan)


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[ServerSettings, Depends(_settings)]
ModelsDep = Annotated[Models, Depends(_models)]
RuntimesDep = Annotated[dict[str, Runtime], Depends(_runtimes)]
SchedulersDep = Annotated[dict[str, Scheduler], Depends(_schedulers)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


async def require_admin(settings: SettingsDep) -> None:
    """403 for /v1/adapters/* when the server runs with --no-admin."""
    if not settings.admin:
        raise APIError(403, "admin endpoints are disabled (--no-admin)", type="permission_error")


KEY = [Depends(require_api_key)]
health_router = APIRouter()  # the one group open without the key
metrics_router = APIRouter(dependencies=KEY)
openai_router = APIRouter(dependencies=KEY)
classify_router = APIRouter(dependencies=KEY)
admin_router = APIRouter(dependencies=[*KEY, Depends(require_admin)])


@health_router.get("/health")
async def health(runtimes: RuntimesDep, schedulers: SchedulersDep):
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


OPEN_PATHS = frozenset(route.path for route in health_router.routes)  # never behind the key


@metrics_router.get("/metrics", response_class=PlainTextResponse)
async def metrics_endpoint(metrics: MetricsDep, runtimes: RuntimesDep, schedulers: SchedulersDep):
    return PlainTextResponse(metrics.render(runtimes, schedulers), media_type=metrics.content_type)


async def openapi_schema(request: Request) -> JSONResponse:
    """/openapi.json, behind the key like every route but /health. FastAPI's own (switched off
    with `openapi_url=None`) would not be; this is it otherwise: a plain route, any method."""
    await require_api_key(request)
    app = request.app
    schema = with_protocol_schemas(app.openapi())
    root_path = request.scope.get("root_path", "").rstrip("/")
    if root_path and app.root_path_in_servers:
        if root_path not in {s.get("url") for s in schema.get("servers", [])}:
            schema = {**schema, "servers": [{"url": root_path}] + schema.get("servers", [])}
    return JSONResponse(schema)


def with_protocol_schemas(schema: dict) -> dict:
    """The app's schema with the protocol models under components/schemas (the routes'
    request bodies point there)."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema(
        [(m, "validation") for m in protocol.REQUESTS],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    return schema


# -- OpenAI: models, completions, chat --------------------------------------------------------


def _body(model) -> dict:
    """A route's request body in /openapi.json: its protocol model (handlers read the raw body
    themselves, after the key check, so FastAPI does not declare it)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _answers(model, *, stream: bool = False) -> dict:
    content = {"application/json": {"schema": model.model_json_schema()}}
    if stream:  # server-sent events, each `data:` line a chunk object or [DONE]
        content["text/event-stream"] = {"schema": {}}
    error = {"application/json": {"schema": protocol.ErrorResponse.model_json_schema()}}
    return {200: {"content": content}, 400: {"description": "bad request", "content": error}}


@openai_router.get("/v1/models", responses=_answers(protocol.ModelList))
async def list_models(models: ModelsDep):
    data = await asyncio.to_thread(models.listing)
    return {"object": "list", "data": data}


@openai_router.get("/v1/models/{model_id:path}", responses=_answers(protocol.ModelCard))
async def retrieve_model(model_id: str, models: ModelsDep):
    return await asyncio.to_thread(models.card, model_id)


@openai_router.post(
    "/v1/completions",
    openapi_extra=_body(protocol.CompletionRequest),
    responses=_answers(protocol.CompletionResponse, stream=True),
)
async def completions(
    request: Request,
    settings: SettingsDep,
    models: ModelsDep,
    schedulers: SchedulersDep,
    metrics: MetricsDep,
):
    body = await validation.read(request, protocol.CompletionRequest)
    rt, adapter = _generation_target(models, body.model)
    prompts = await asyncio.to_thread(_prompts, rt, body.prompt)
    return await generate(
        request, body, rt, adapter, prompts,
        settings=settings, schedulers=schedulers, metrics=metrics,
    )  # fmt: skip


def _prompts(rt: Runtime, prompt) -> list[Prompt]:
    """`prompt` as (token ids, text) pairs: a string, strings, token ids or lists of them."""
    if isinstance(prompt, str):
        return [Prompt(rt.encode(prompt), prompt)]
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    vocab = len(rt.tokenizer)
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            out.append(Prompt(rt.encode(item), item))
            continue
        validation.check_token_ids(item, vocab, f"prompt[{i}]", code="invalid_prompt")
        out.append(Prompt(list(item), rt.decode(list(item))))
    return out


@openai_router.post(
    "/v1/chat/completions",
    openapi_extra=_body(protocol.ChatCompletionRequest),
    responses=_answers(protocol.ChatCompletionResponse, stream=True),
)
async def chat_completions(
    request: Request,
    settings: SettingsDep,
    models: ModelsDep,
    schedulers: SchedulersDep,
    metrics: MetricsDep,
):
    body = await validation.read(request, protocol.ChatCompletionRequest)
    rt, adapter = _generation_target(models, body.model)
    rendered = await _render(rt, validation.messages(body.messages), adapter=adapter)
    ids = await asyncio.to_thread(rt.encode, rendered, chat=True)
    return await generate(
        request, body, rt, adapter, [Prompt(ids, rendered)],
        settings=settings, schedulers=schedulers, metrics=metrics,
    )  # fmt: skip


async def _render(
    rt: Runtime,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    adapter: str | None = None,
):
    try:
        return await asyncio.to_thread(
            rt.render_chat, messages, add_generation_prompt=add_generation_prompt, adapter=adapter
        )
    except AdaptoryError as exc:
        raise api_error(exc) from None
    except Exception as exc:  # a template that rejects the conversation (roles, order)
        raise APIError(400, f"chat template failed: {exc}", code="invalid_messages") from None


def _generation_target(models: Models, model: str) -> tuple[Runtime, str | None]:
    rt, adapter = models.route(model)
    if rt.task != "causal-lm":
        raise APIError(400, f"model '{model}' is a classifier; use /v1/classify", code="wrong_task")
    return rt, adapter


# -- vLLM: tokenize, detokenize ------------------------------------------------------------------


@openai_router.post(
    "/tokenize",
    openapi_extra=_body(protocol.TokenizeRequest),
    responses=_answers(protocol.TokenizeResponse),
)
async def tokenize(request: Request, models: ModelsDep):
    body = await validation.read(request, protocol.TokenizeRequest)
    rt, adapter = (models.route(body.model) if body.model is not None
                   else (models.tokenizer_of(None), None))  # fmt: skip
    if body.messages is not None:
        text = await _render(
            rt,
            validation.messages(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            adapter=adapter,
        )
        special = bool(body.add_special_tokens)  # a template writes its own special tokens
    else:
        text, special = body.prompt, body.add_special_tokens is not False
    ids = await asyncio.to_thread(rt.encode, text, chat=not special)
    strings = await asyncio.to_thread(rt.token_strings, ids) if body.return_token_strs else None
    return {
        "count": len(ids),
        "max_model_len": rt.max_positions,
        "tokens": ids,
        "token_strs": strings,
    }


@openai_router.post(
    "/detokenize",
    openapi_extra=_body(protocol.DetokenizeRequest),
    responses=_answers(protocol.DetokenizeResponse),
)
async def detokenize(request: Request, models: ModelsDep):
    body = await validation.read(request, protocol.DetokenizeRequest)
    rt = models.tokenizer_of(body.model)
    validation.check_token_ids(body.tokens, len(rt.tokenizer), "tokens")
    return {"prompt": await asyncio.to_thread(rt.decode, body.tokens)}


@openai_router.get("/tokenizer_info", responses=_answers(protocol.TokenizerInfo))
async def tokenizer_info(models: ModelsDep, model: str | None = None):
    """vLLM's GET /tokenizer_info (`?model=` picks a base when several are served)."""
    tok = models.tokenizer_of(model).tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": models.tokenizer_of(model).max_positions,
    }


# -- classify ---------------------------------------------------------------------------------


@classify_router.post("/v1/classify", openapi_extra=_body(protocol.ClassifyRequest))
async def classify(
    request: Request, settings: SettingsDep, models: ModelsDep, schedulers: SchedulersDep
):
    body = await validation.read(request, protocol.ClassifyRequest)
    texts = validation.texts(body.input, settings.max_classify_inputs)
    rt, adapter = models.route(body.model)
    if rt.task != "seq-cls":
        raise APIError(
            400, f"model '{body.model}' generates text; use /v1/completions", code="wrong_task"
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
    submit(schedulers[rt.base_ref], job)
    listener = Listener(request, [job])
    try:
        _, kind, value = await listener.next()
    finally:
        listener.close()
        job.cancel()  # a no-op once done; else its remaining chunks are skipped
    if kind == "error":
        raise as_api_error(value)
    return {
        "object": "list",
        "model": adapter,
        "data": [{"index": i, **row} for i, row in enumerate(value)],
    }


# -- admin: load and unload -------------------------------------------------------------------


@admin_router.post("/v1/adapters/load", openapi_extra=_body(protocol.AdapterRequest))
async def load_adapter(request: Request, models: ModelsDep):
    rt, adapter = await _admin_target(request, models)
    resident = await asyncio.to_thread(rt.load, adapter)
    return {"model": resident.key, "base": rt.base_ref, "resident": rt.resident()}


@admin_router.post("/v1/adapters/unload", openapi_extra=_body(protocol.AdapterRequest))
async def unload_adapter(request: Request, models: ModelsDep):
    rt, adapter = await _admin_target(request, models)
    unloaded = await asyncio.to_thread(rt.unload, adapter)
    return {"model": adapter, "unloaded": unloaded, "resident": rt.resident()}


async def _admin_target(request: Request, models: Models) -> tuple[Runtime, str]:
    body = await validation.read(request, protocol.AdapterRequest)
    rt, adapter = models.route(body.model)
    if adapter is None:
        raise APIError(400, "the base is always loaded; name an adapter", code="invalid_model")
    return rt, adapter
