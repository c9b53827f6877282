"""`adaptory bench http`: the server end to end under concurrent clients, against Runtime.generate
at the same concurrency and transformers' own `generate` of the same batch with no adapter."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    base_name,
    bench_loaded,
    interleave,
    rated,
    ratio,
    target,
    timed,
)
from adaptory.adapters.bench.workload import (
    bench_adapters,
    hf_compiled,
    hf_generate,
    register_adapters,
    runtime_for,
)

PROMPT = "the cat sat on the mat and the dog ran to the park"

# --- serve over HTTP -----------------------------------------------------------------------


def wait_healthy(url: str, server, log: Path, *, timeout: float = 120) -> None:
    """Wait for a started `adaptory serve` to answer /health; RuntimeError if it exits or not."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"adaptory serve exited ({server.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"adaptory serve did not become healthy in {timeout:.0f}s; see {log}")


class ThreadedServer:
    """The server app under uvicorn on 127.0.0.1 (a free port) in a thread of this process,
    as `adaptory serve` runs it; the base stays the one this process built."""

    def __init__(self, app) -> None:
        import uvicorn

        from adaptory.adapters.serving import server as serving

        options = {}
        if hasattr(serving, "uvicorn_options") and hasattr(app.state, "settings"):
            options = serving.uvicorn_options(app.state.settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark's uvicorn server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(60)


def server_settings(**wanted):
    """ServerSettings with the fields this server has (the lead's may add or rename some)."""
    import dataclasses

    from adaptory.adapters.serving.server import ServerSettings

    known = {f.name for f in dataclasses.fields(ServerSettings)}
    return ServerSettings(**{k: v for k, v in wanted.items() if k in known})


def load_round(url: str, *, models, clients, requests, max_tokens, stream, timeout) -> dict:
    """One round of the load generator, in its own process (adapters/bench/http_load.py)."""
    import subprocess
    import sys

    options = {
        "url": url,
        "models": models,
        "prompt": PROMPT,
        "clients": clients,
        "requests": requests,
        "max_tokens": max_tokens,
        "stream": stream,
        "timeout": timeout,
    }
    done = subprocess.run(
        [sys.executable, "-m", "adaptory.adapters.bench.http_load", json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    if result["errors"] or len(result["requests"]) != requests:
        raise RuntimeError(
            f"{len(result['requests'])} of {requests} requests succeeded: "
            + "; ".join(result["errors"][:3])
        )
    return result


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, or None when there are none."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class _Load:
    """The requests of one round: `requests` completions from `clients` at a time (in waves),
    request i on refs[i mod k]."""

    clients: int
    requests: int
    new_tokens: int
    k: int
    refs: list[str]

    @property
    def waves(self) -> int:
        return math.ceil(self.requests / self.clients)

    @property
    def tokens(self) -> int:
        return self.requests * self.new_tokens

    def wave(self, index: int) -> range:
        """The requests sent together in wave `index`."""
        return range(index * self.clients, min(self.requests, (index + 1) * self.clients))


def bench_http(
    settings: BenchSettings,
    *,
    clients: int | None = None,
    requests: int | None = None,
    new_tokens: int | None = None,
    k: int = 8,
    hf: bool = True,
    hf_compile: bool = False,
    timeout: float = 300.0,
) -> dict:
    """`clients` concurrent clients send `requests` completions (`new_tokens` each, greedy,
    request i on adapter i mod k) to the server app under uvicorn, in this process, over the
    Runtime this process holds; a separate process plays the clients. Measured side by side:
    the same requests through Runtime.generate (`clients` at a time, one call each), and
    transformers' `generate` of `clients` copies of the prompt on the same base, no adapter."""
    from adaptory.registry import Registry

    quick = settings.quick
    clients = clients or (4 if quick else 32)
    requests = requests or clients
    new_tokens = new_tokens or (4 if quick else 32)
    k = min(k, requests)
    loaded = bench_loaded(settings)
    folders = bench_adapters(loaded, settings, k)
    registry = Registry(settings.workdir / "home-http")
    entries = register_adapters(registry, loaded, folders)
    rt = runtime_for(loaded, registry, settings, max_adapters=k + 1)
    load = _Load(clients, requests, new_tokens, k, [e.ref for e in entries])
    for ref in load.refs:  # resident before anything is timed, as after a server's first requests
        rt.load(ref)
    records: dict[str, list[dict]] = {"http": [], "http_stream": []}
    times, errors = _time_rounds(
        settings, loaded, registry, rt, load, records, hf=hf, hf_compile=hf_compile, timeout=timeout
    )
    results = _http_results(times, load, records)
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    reference, ratios, targets = _http_comparisons(tps, clients)
    return {
        "bench": "http",
        "settings": _settings_dict(
            settings,
            loaded.source.path,
            clients=clients,
            requests=requests,
            new_tokens=new_tokens,
            k=k,
            hf_reference=reference,
            hf_compiled=hf_compiled(loaded.model),
            base_name=base_name(loaded),
        ),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "errors": errors,
        "notes": _http_notes(load),
    }


def _time_rounds(
    settings: BenchSettings,
    loaded,
    registry,
    rt,
    load: _Load,
    records: dict,
    *,
    hf: bool,
    hf_compile: bool,
    timeout: float,
):
    """Serve the runtime's app under uvicorn and time its rounds interleaved with
    Runtime.generate and transformers' generate: (times, errors of dropped compiles)."""
    from adaptory.adapters.serving.server import create_app

    device, clients = settings.device, load.clients
    encoded = loaded.tokenizer([PROMPT] * clients, return_tensors="pt")
    ids = encoded["input_ids"].to(device)
    mask = encoded["attention_mask"].to(device)
    app = create_app(
        {rt.base_ref: rt},
        registry=registry,
        settings=server_settings(
            max_batch=clients,
            max_prompt_tokens=max(64, ids.shape[1] * 2),
            max_tokens_limit=max(16, load.new_tokens),
        ),
    )
    with ThreadedServer(app) as url:
        variants = {
            f"runtime/B={clients}": _runtime_variant(rt, load, device),
            f"http/B={clients}": _http_variant(url, load, records, False, timeout),
            f"http_stream/B={clients}": _http_variant(url, load, records, True, timeout),
        }
        if hf:
            variants[f"hf_generate/B={clients}"] = _hf_variant(
                loaded.model, ids, mask, load, device
            )
        if hf_compile:
            variants[f"hf_static_compile/B={clients}"] = _hf_variant(
                loaded.model, ids, mask, load, device, static=True, compile=True
            )
        errors: dict[str, str] = {}
        times = interleave(
            variants,
            settings.repeats,
            log=settings.say,
            optional=[n for n in variants if n.startswith("hf_static_compile")],
            errors=errors,
        )
    return times, errors


def _runtime_variant(rt, load: _Load, device: str) -> Callable[[], float]:
    """The same requests through Runtime.generate, `clients` per call, scaled to the same token
    count when rows stop early."""
    from adaptory.adapters.serving.runtime import GenerationRequest

    def runtime_run() -> float:
        produced = [0]

        def run():
            for wave in range(load.waves):
                batch = [
                    GenerationRequest(
                        prompt=PROMPT, adapter=load.refs[i % load.k], max_new_tokens=load.new_tokens
                    )
                    for i in load.wave(wave)
                ]
                produced[0] += sum(r.completion_tokens for r in rt.generate(batch))

        return timed(run, device) * load.tokens / max(1, produced[0])

    return runtime_run


def _hf_variant(model, ids, mask, load: _Load, device: str, **options) -> Callable[[], float]:
    """transformers' `generate` of `clients` copies of the prompt (per wave), no adapter."""

    def run() -> float:
        produced = [0]

        def go():
            for wave in range(load.waves):
                rows = len(load.wave(wave))
                produced[0] += hf_generate(
                    model, ids[:rows], mask[:rows], load.new_tokens, **options
                ).numel()

        return timed(go, device) * load.tokens / max(1, produced[0])

    return run


def _http_variant(url: str, load: _Load, records: dict, stream: bool, timeout: float):
    """One round of the load generator against the server; its requests kept in `records`."""

    def run() -> float:
        result = load_round(
            url, models=load.refs, clients=load.clients, requests=load.requests,
            max_tokens=load.new_tokens, stream=stream, timeout=timeout,
        )  # fmt: skip
        records["http_stream" if stream else "http"].append(result)
        produced = sum(r["completion_tokens"] for r in result["requests"])
        return result["wall_s"] * load.tokens / max(1, produced)

    return run


def _http_results(times: dict[str, list[float]], load: _Load, records: dict) -> dict:
    """Each variant's summary and tokens/s; for HTTP also latency percentiles and requests/s,
    and for streaming the time to first token."""
    results = {}
    for name, samples in times.items():
        entry = rated(samples, load.tokens)
        kind = name.split("/")[0]
        if kind in records:
            # latencies over every timed round (the warm-up round is the first recorded)
            rounds = records[kind][-len(samples) :]
            latencies = [r["latency_s"] for rd in rounds for r in rd["requests"]]
            entry["latency_p50_s"] = percentile(latencies, 0.5)
            entry["latency_p99_s"] = percentile(latencies, 0.99)
            entry["requests_per_s"] = load.requests / entry["median_s"]
            if kind == "http_stream":
                ttfts = [r["ttft_s"] for rd in rounds for r in rd["requests"]]
                entry["ttft_p50_s"] = percentile(ttfts, 0.5)
                entry["ttft_p99_s"] = percentile(ttfts, 0.99)
                entry["ttft_missing"] = sum(t is None for t in ttfts)
        results[name] = entry
    return results


def _http_comparisons(tps: dict[str, float], b: int):
    """(transformers' fastest variant or None, ratios, targets) at `b` concurrent clients."""
    hf_names = [n for n in (f"hf_generate/B={b}", f"hf_static_compile/B={b}") if n in tps]
    reference = max(hf_names, key=tps.__getitem__) if hf_names else None
    ratios = {}
    for kind in ("http", "http_stream"):
        value = ratio(tps, f"{kind}/B={b}", f"runtime/B={b}")
        if value is not None:
            ratios[f"{kind} / runtime (B={b})"] = value
        if reference:
            ratios[f"{kind} / HF fastest (B={b})"] = ratio(tps, f"{kind}/B={b}", reference)
    if reference:
        ratios[f"runtime / HF fastest (B={b})"] = ratio(tps, f"runtime/B={b}", reference)
    targets = {
        f"HTTP >= 0.8x Runtime.generate, same concurrency ({b})": target(
            ratio(tps, f"http/B={b}", f"runtime/B={b}"), ">=", 0.8
        ),
        f"HTTP >= 0.8x transformers generate, batch {b}, no adapter": target(
            ratio(tps, f"http/B={b}", reference) if reference else None, ">=", 0.8,
            missing="transformers generate not measured",
        ),
    }  # fmt: skip
    return reference, ratios, targets


def _http_notes(load: _Load) -> list[str]:
    requests, new_tokens, clients = load.requests, load.new_tokens, load.clients
    return [
        f"{requests} completions of {new_tokens} tokens (greedy, the same {PROMPT!r}), "
        f"request i on adapter i mod {load.k}, from {clients} concurrent clients in another "
        "process; the server (FastAPI + scheduler + Runtime, the app `adaptory serve` "
        f"runs) under uvicorn in this process, --max-batch {clients}",
        "http: plain completions; http_stream: stream=true (time to first token = the "
        "first chunk with text); latencies and tokens over every timed round",
        f"runtime: the same requests through Runtime.generate, {clients} per call; HF: "
        f"transformers' generate of {clients} copies of the prompt, no adapter",
    ]


def serve_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("adaptory.cli.serve_cmds") is not None
