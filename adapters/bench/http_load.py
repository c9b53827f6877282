"""A load generator for `adaptory bench http`, run as its own process so that the clients never
share an interpreter (and its GIL) with the server they measure:

    python -m adaptory.adapters.bench.http_load '{"url": ..., "models": [...], ...}'

`clients` threads start together and send `requests` completions in all (request i names
models[i % len(models)]); it prints one JSON object: the wall time from the start to the last
reply, and per request its latency, its time to first token (streaming) and its tokens.
Imports nothing heavy (httpx only), so it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def run_load(
    url: str,
    *,
    models: list[str],
    prompt: str,
    clients: int,
    requests: int,
    max_tokens: int,
    stream: bool = False,
    timeout: float = 300.0,
) -> dict:
    import httpx

    jobs = iter(range(requests))
    lock = threading.Lock()
    records: list[dict] = []
    errors: list[str] = []
    start_line = threading.Barrier(clients + 1)

    def one(http: httpx.Client, i: int) -> dict:
        body = {
            "model": models[i % len(models)],
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        start = time.perf_counter()
        if not stream:
            reply = http.post(f"{url}/v1/completions", json=body)
            reply.raise_for_status()
            usage = reply.json().get("usage") or {}
            return {
                "latency_s": time.perf_counter() - start,
                "ttft_s": None,
                "completion_tokens": int(usage.get("completion_tokens", 0)),
            }
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        first, tokens = None, 0
        with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: ") :])
                if "error" in data:
                    raise RuntimeError(data["error"].get("message", "error event"))
                if first is None and any(c.get("text") for c in data.get("choices") or []):
                    first = time.perf_counter() - start
                if data.get("usage"):
                    tokens = int(data["usage"].get("completion_tokens", 0))
        latency = time.perf_counter() - start
        return {"latency_s": latency, "ttft_s": first, "completion_tokens": tokens}

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            start_line.wait()
            while True:
                with lock:
                    i = next(jobs, None)
                if i is None:
                    return
                try:
                    record = one(http, i)
                except Exception as exc:  # reported, never a silent shortfall
                    with lock:
                        errors.append(f"request {i}: {type(exc).__name__}: {exc}"[:300])
                    continue
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return {"wall_s": time.perf_counter() - start, "requests": records, "errors": errors}


def main(argv: list[str]) -> int:
    options = json.loads(argv[0])
    url = options.pop("url")
    print(json.dumps(run_load(url, **options)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
