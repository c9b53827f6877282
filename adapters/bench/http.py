"""`adaptory bench http`: the server end to end under concurrent clients."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    bench_base,
    load_bench_base,
    lora_shapes,
    make_adapters,
    register_adapters,
)

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


def bench_http(
    settings: BenchSettings,
    *,
    clients: int | None = None,
    requests: int | None = None,
    new_tokens: int | None = None,
    k: int = 8,
    timeout: float = 300.0,
) -> dict:
    """The server end to end: `adaptory serve` in a subprocess on a free 127.0.0.1 port,
    `clients` concurrent httpx clients sending `requests` completions over `k` adapters."""
    import socket
    import subprocess
    import sys

    import httpx

    from adaptory.registry import Registry

    quick = settings.quick
    clients = clients or (2 if quick else 16)
    requests = requests or (4 if quick else 64)
    new_tokens = new_tokens or (4 if quick else 32)
    base_dir = bench_base(settings)
    loaded = load_bench_base(base_dir, settings)
    shapes = lora_shapes(loaded.model)
    del loaded
    folders = make_adapters(base_dir, shapes, k, settings.workdir / "adapters" / base_dir.name)
    home = settings.workdir / "home"
    entries = register_adapters(Registry(home), base_dir, folders)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "adaptory.cli.main", "--home", str(home), "serve",
        "--base", str(base_dir), "--host", "127.0.0.1", "--port", str(port),
        "--device", settings.device, "--max-adapters", str(k + 1), "--max-batch", str(clients),
    ]  # fmt: skip
    log = settings.workdir / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log, timeout=120)
        prompt = "the cat sat on the mat and the dog ran to the park"
        for entry in entries:  # load every adapter once, untimed
            httpx.post(
                f"{url}/v1/completions",
                json={"model": entry.ref, "prompt": prompt, "max_tokens": 1},
                timeout=timeout,
            ).raise_for_status()
        latencies: list[float] = []
        produced = [0]
        lock = threading.Lock()
        jobs = iter(range(requests))

        def client() -> None:
            with httpx.Client(timeout=timeout) as http:
                while True:
                    with lock:
                        i = next(jobs, None)
                    if i is None:
                        return
                    start = time.perf_counter()
                    reply = http.post(
                        f"{url}/v1/completions",
                        json={
                            "model": entries[i % k].ref,
                            "prompt": prompt,
                            "max_tokens": new_tokens,
                            "temperature": 0,
                        },
                    )
                    reply.raise_for_status()
                    seconds = time.perf_counter() - start
                    usage = reply.json().get("usage", {})
                    with lock:
                        latencies.append(seconds)
                        produced[0] += int(usage.get("completion_tokens", new_tokens))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    if len(latencies) != requests:
        raise RuntimeError(f"only {len(latencies)} of {requests} requests succeeded; see {log}")
    ordered = sorted(latencies)
    return {
        "bench": "http",
        "settings": _settings_dict(
            settings, base_dir, clients=clients, requests=requests, new_tokens=new_tokens, k=k
        ),
        "results": {
            "latency_p50_s": ordered[len(ordered) // 2],
            "latency_p99_s": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "wall_s": wall,
            "completion_tokens": produced[0],
            "tokens_per_s": produced[0] / wall,
            "requests_per_s": requests / wall,
        },
    }


def serve_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("adaptory.cli.serve_cmds") is not None
