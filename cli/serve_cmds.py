"""`adaptory generate | predict | chat | serve`: one-shot use of adapters and the HTTP server.

Each builds a `Runtime` (adapters.runtime) on the adapter's own base, loaded once; `serve` hands
one runtime per base to the FastAPI app (adapters.server) under uvicorn.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from adaptory.cli.main import App, pass_app, styled

BASE_PREFIX = "base:"


def resolve_api_key(api_key: str | None, key_file: Path | None, *, warn=None) -> str | None:
    """The server's key from --api-key / ADAPTORY_API_KEY or from --api-key-file's first line
    (its line ending dropped), or None for no authentication. An empty or blank key, or one
    with surrounding spaces, is refused rather than read as "no key"; so is a file that cannot
    be read, and both ways at once. `warn` is told when others may read the file."""
    from adaptory.registry.errors import ConfigError

    if api_key is None and "ADAPTORY_API_KEY" in os.environ:  # Click reads "" as unset
        api_key = os.environ["ADAPTORY_API_KEY"]
    source = "the API key (--api-key or ADAPTORY_API_KEY)"
    if key_file is not None:
        if api_key is not None:
            raise ConfigError(
                "both an API key (--api-key or ADAPTORY_API_KEY) and --api-key-file are given",
                hint="give the key one way",
            )
        try:
            with open(key_file, encoding="utf-8") as f:
                api_key = f.readline().removesuffix("\n").removesuffix("\r")
                mode = os.fstat(f.fileno()).st_mode
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"--api-key-file {key_file}: cannot read it ({reason})") from None
        source = f"the API key in {key_file} (its first line)"
        if mode & 0o077 and warn is not None:
            warn(f"warning: {key_file} is readable by other users (mode {mode & 0o777:04o}); "
                 f"chmod 600 it", highlight=False)  # fmt: skip
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise ConfigError(
            f"{source} is empty or has surrounding spaces",
            hint="set a real key, or drop --api-key, --api-key-file and ADAPTORY_API_KEY to "
            "serve without authentication",
        )
    return api_key


def _log_to_stderr(level: str) -> None:
    """The serving log (decode mode per base, a failed graph capture) next to uvicorn's."""
    import logging

    logger = logging.getLogger("adaptory")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


class BatchLimit(click.ParamType):
    """`auto` or a positive number of rows."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            rows = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a number of rows", param, ctx)
        if rows < 1:
            self.fail(f"{rows} rows: at least 1", param, ctx)
        return rows


def _common(fn):
    fn = click.option("--quant", type=click.Choice(["nf4", "fp4", "int8", "none"]), default="nf4",
                      show_default=True, help="How to load the base.")(fn)  # fmt: skip
    fn = click.option(
        "--device", default=None, help="cpu, cuda, cuda:1 … (default: best available)"
    )(fn)
    fn = click.option(
        "--force", is_flag=True, help="Load even if the adapter's base fingerprint differs."
    )(fn)
    return fn


def _runtime_for(app: App, ref: str | None, base: str | None, quant, device, force, *, task=None):
    """(runtime, adapter reference or None): the adapter's base unless --base says otherwise."""
    from adaptory.adapters.serving.runtime import Runtime
    from adaptory.registry.errors import BadInput

    if ref is not None and ref.startswith(BASE_PREFIX):
        base, ref = ref[len(BASE_PREFIX) :], None
    entry = app.registry.resolve(ref) if ref else None
    if entry is not None:
        base = base or entry.base_model
        task = entry.task or task
    if not base:
        raise BadInput("no base to load", hint="name an adapter, or pass --base B (or base:B)")
    runtime = Runtime(base, registry=app.registry, task=task, quant=quant, device=device,
                      max_adapters=2, force=force)  # fmt: skip
    if entry is not None:
        runtime.load(entry)
    return runtime, entry.ref if entry else None


@click.command("generate")
@click.argument("args", nargs=-1, required=True, metavar="[REF] PROMPT")
@click.option(
    "--base", "base", help="Base to use (alone: the plain base; with REF: where its base lives)."
)
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True,
              help="0 = greedy.")  # fmt: skip
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable).")
@click.option(
    "--chat", "as_chat", is_flag=True, help="Wrap PROMPT as a user turn in the chat template."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_common
@pass_app
def generate_cmd(app: App, args, base, max_new_tokens, temperature, top_p, seed, stop, as_chat,
                 as_json, quant, device, force) -> None:  # fmt: skip
    """Generate text from PROMPT with adapter REF (or the plain base: --base B, or REF = base:B)."""
    from adaptory.adapters.serving.runtime import GenerationRequest

    if len(args) > 2 or (len(args) == 1 and not base):
        raise click.UsageError("give REF PROMPT, or --base B PROMPT")
    ref, prompt = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    runtime, adapter = _runtime_for(app, ref, base, quant, device, force, task="causal-lm")
    request = GenerationRequest(
        prompt=None if as_chat else prompt,
        messages=[{"role": "user", "content": prompt}] if as_chat else None,
        adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, stop=list(stop),
    )  # fmt: skip
    if as_json:
        result = runtime.generate([request])[0]
        click.echo(json.dumps({
            "model": adapter or f"{BASE_PREFIX}{runtime.base_ref}",
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        }))  # fmt: skip
        return
    runtime.generate([request], on_text=lambda _i, text: _write(text))
    _write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command("predict")
@click.argument("ref")
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--base", "base", help="Where the adapter's base lives, if not where it was made.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per text.")
@_common
@pass_app
def predict_cmd(app: App, ref, texts, base, as_json, quant, device, force) -> None:
    """Classify each TEXT with classification adapter REF: the label and every label's score."""
    from rich.table import Table

    runtime, adapter = _runtime_for(app, ref, base, quant, device, force, task="seq-cls")
    if adapter is None:
        raise click.UsageError("predict needs a classification adapter, not a bare base")
    results = runtime.classify(adapter, list(texts))
    if as_json:
        for text, result in zip(texts, results, strict=True):
            click.echo(json.dumps({"text": text, **result}))
        return
    table = Table("text", "label", "scores")
    for text, result in zip(texts, results, strict=True):
        scores = "  ".join(f"{k} {v:.3f}" for k, v in result["scores"].items())
        table.add_row(text, result["label"], scores)
    app.out.print(table)


@click.command("chat")
@click.argument("ref")
@click.option("--base", "base", help="Base to use (REF may also be base:B for the plain base).")
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True)
@click.option("--seed", type=int, default=None)
@_common
@pass_app
def chat_cmd(
    app: App, ref, base, system, max_new_tokens, temperature, seed, quant, device, force
) -> None:
    """Talk to adapter REF through the base's chat template. /exit or end of input quits."""
    from adaptory.adapters.serving.runtime import GenerationRequest

    runtime, adapter = _runtime_for(app, ref, base, quant, device, force, task="causal-lm")
    messages = [{"role": "system", "content": system}] if system else []
    app.err.print(styled((f"chatting with {adapter or runtime.base_ref}; /exit to quit", "dim")))
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        request = GenerationRequest(messages=list(messages), adapter=adapter, seed=seed,
                                    max_new_tokens=max_new_tokens, temperature=temperature)  # fmt: skip
        reply = runtime.generate([request], on_text=lambda _i, text: _write(text))[0]
        _write("\n")
        messages.append({"role": "assistant", "content": reply.text})


@click.command("serve")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 = all)."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--base", "bases", multiple=True, help="A base to serve (repeatable).")
@click.option(
    "--preload", multiple=True, help="Adapter to load at start (repeatable); its base is served."
)
@click.option("--max-adapters", type=click.IntRange(1), default=8, show_default=True,
              help="Resident adapters per base (LRU).")  # fmt: skip
@click.option("--api-key", envvar="ADAPTORY_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")  # fmt: skip
@click.option("--api-key-file", envvar="ADAPTORY_API_KEY_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Read the key from this file's first line instead (it stays out of the "
                   "process's command line and environment).")  # fmt: skip
@click.option("--no-admin", is_flag=True, help="Disable /v1/adapters/load and /unload.")
@click.option("--max-batch", type=BatchLimit(), default="auto", show_default=True,
              help="Most rows decoding together per base; auto: as many as half the free GPU "
                   "memory (a quarter of free RAM) holds as KV cache, at most 256.")  # fmt: skip
@click.option("--numerics", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True,
              help="Compute dtype. fp32: a request's greedy output in a batch equals it sent "
                   "alone; bf16: faster on GPUs, logits within 0.5 (docs/SERVER.md). auto: fp32 "
                   "on CPU, bf16 on GPU.")  # fmt: skip
@click.option("--decode", "decode_mode", type=click.Choice(["auto", "eager", "cuda-graphs", "compile"]),
              default="auto", show_default=True,
              help="How decode steps run; auto: CUDA graphs on a GPU (eager if capture fails), "
                   "eager on CPU.")  # fmt: skip
@click.option("--batch-window-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long an idle scheduler waits to gather a batch.")  # fmt: skip
@click.option("--max-tokens-limit", type=click.IntRange(1), default=512, show_default=True,
              help="Largest max_tokens a request may ask for.")  # fmt: skip
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=2048, show_default=True)
@click.option("--max-body-bytes", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="Largest request body; larger ones get 413 without being read.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)  # fmt: skip
@_common
@pass_app
def serve_cmd(app: App, host, port, bases, preload, max_adapters, api_key, api_key_file, no_admin,
              max_batch, numerics, decode_mode, batch_window_ms, max_tokens_limit,
              max_prompt_tokens, max_body_bytes, log_level, quant, device, force) -> None:  # fmt: skip
    """Serve adapters over an OpenAI-compatible HTTP API (completions, chat, classify).

    \b
    Each base is loaded once; adapters load on first use into a per-base LRU. A request's
    `model` is an adapter reference (name, name:3, name:tag) or a base (base:B).
    SIGTERM / Ctrl-C: stop accepting, finish in-flight requests, exit.
    """
    import uvicorn

    from adaptory.adapters.serving.server import (
        ServerSettings,
        build_runtimes,
        create_app,
        uvicorn_options,
    )

    api_key = resolve_api_key(api_key, api_key_file, warn=app.err.print)
    runtimes = build_runtimes(app.registry, bases=list(bases), preload=list(preload),
                              max_adapters=max_adapters, quant=quant, device=device, force=force,
                              numerics=numerics, decode=decode_mode)  # fmt: skip
    settings = ServerSettings(
        api_key=api_key, admin=not no_admin, max_batch=max_batch,
        batch_window_ms=batch_window_ms, max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
    )  # fmt: skip
    web = create_app(runtimes, registry=app.registry, settings=settings)
    for ref, rt in runtimes.items():
        app.err.print(f"base {ref} ({rt.task}, {rt.base.quant}, {rt.numerics.name} on "
                      f"{rt.base.device}); resident: {', '.join(rt.resident()) or '-'}",
                      highlight=False)  # fmt: skip
    auth = "on" if settings.api_key else "off"
    app.err.print(f"serving on http://{host}:{port} (auth {auth})", highlight=False)
    for name in ("ADAPTORY_API_KEY", "ADAPTORY_API_KEY_FILE"):
        os.environ.pop(name, None)  # not inherited by anything this process starts
    _log_to_stderr(log_level)
    config = uvicorn.Config(
        web, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
        **uvicorn_options(settings),
    )  # fmt: skip
    uvicorn.Server(config).run()
