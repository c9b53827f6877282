"""lm-eval (EleutherAI's lm-evaluation-harness) against an adapter served here: the engine of
`adaptory eval REF --lm-eval TASKS`.

REF's base is served in this process by the app `adaptory serve` runs, under uvicorn on
127.0.0.1 at a free port, and lm-eval's `local-completions` model sends it its requests:
generation tasks as completions, loglikelihood (multiple-choice) tasks as echoed prompts scored
through `logprobs`. The scores are the server's, the numbers a deployed adapter earns. lm-eval
is an optional extra: pip install 'adaptory[eval]'.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptory.registry.errors import BadInput, ConfigError, NotFound

BASE_PREFIX = "base:"
# how lm-eval turns text into tokens (its `tokenizer_backend`)
TOKENIZERS = {
    "base": "the base's own tokenizer files, read here; prompts sent as token ids",
    "server": "the server's /tokenize (lm-eval's remote tokenizer)",
    "none": "no tokenizer, prompts sent as text: generation tasks only",
}


def require_lm_eval():
    """The lm_eval module, or ConfigError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("lm-eval is not installed: pip install 'adaptory[eval]'") from None
    return lm_eval


@dataclass
class Served:
    url: str  # the completions endpoint: http://127.0.0.1:PORT/v1/completions
    model: str  # what requests name: NAME:VERSION, or base:B
    runtime: Any


@contextmanager
def served(
    registry, ref: str, *, quant: str = "nf4", device: str | None = None, force: bool = False
) -> Iterator[Served]:
    """Serve REF (an adapter reference, or base:B) on 127.0.0.1 for as long as the block runs.

    The version is resolved once: a new version stored meanwhile does not change the run."""
    from adaptory.adapters.bench.http import ThreadedServer
    from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app

    options = {"quant": quant, "device": device, "force": force, "max_adapters": 1}
    if ref.startswith(BASE_PREFIX):
        model = ref
        runtimes = build_runtimes(registry, bases=[ref[len(BASE_PREFIX) :]], **options)
    else:
        model = registry.resolve(ref).ref
        runtimes = build_runtimes(registry, preload=[model], **options)
    (runtime,) = runtimes.values()
    if runtime.task != "causal-lm":
        raise ConfigError(f"{model} is a {runtime.task} model: lm-eval scores causal-lm ones")
    context = runtime.max_positions or 2048
    settings = ServerSettings(
        admin=False, max_prompt_tokens=context, max_tokens_limit=context, max_body_bytes=1 << 26
    )
    with ThreadedServer(create_app(runtimes, registry=registry, settings=settings)) as url:
        yield Served(url=f"{url}/v1/completions", model=model, runtime=runtime)


def model_args(served: Served, *, tokenizer: str = "base", batch_size: int = 4) -> dict:
    """lm-eval's `local-completions` arguments for a served model."""
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer '{tokenizer}'", hint=f"one of {list(TOKENIZERS)}")
    rt = served.runtime
    args: dict[str, Any] = {
        "base_url": served.url,
        "model": served.model,
        "batch_size": batch_size,
        # lm-eval truncates to this; without it, 2048 whatever the base holds
        "max_length": rt.max_positions or 2048,
        "max_retries": 1,  # a refused request fails the run at once, with the server's message
    }
    if tokenizer == "base":
        args.update(tokenizer_backend="huggingface", tokenizer=str(rt.base.source.path))
    elif tokenizer == "server":
        args["tokenizer_backend"] = "remote"
    else:
        args.update(tokenizer_backend=None, eos_string=rt.tokenizer.eos_token)
    return args


def task_manager(include_path: Path | None = None):
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def evaluate(
    registry,
    ref: str,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    include_path: Path | None = None,
    batch_size: int = 4,
    tokenizer: str = "base",
    quant: str = "nf4",
    device: str | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results for REF on TASKS (`simple_evaluate`'s dict), scored through the server."""
    lm_eval = require_lm_eval()
    manager = task_manager(include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise NotFound(
            f"no lm-eval task named {', '.join(unknown)}{where}",
            hint="`lm-eval list tasks` lists them; --include-path DIR adds a folder of task YAMLs",
        )
    import requests

    with served(registry, ref, quant=quant, device=device) as server:
        try:
            return lm_eval.simple_evaluate(
                model="local-completions",
                model_args=model_args(server, tokenizer=tokenizer, batch_size=batch_size),
                tasks=list(tasks),
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
            )
        except requests.HTTPError as exc:
            raise BadInput(
                f"the server refused lm-eval's request: {_message(exc.response)}"
            ) from None


def _message(response) -> str:
    """The OpenAI-shaped error's message, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} {response.text[:200]}"


def results_table(results: dict) -> str:
    """lm-eval's own Markdown table of the scores."""
    from lm_eval.utils import make_table

    return make_table(results)
