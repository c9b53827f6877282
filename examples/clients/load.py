"""A bounded load test: N concurrent clients, M requests each, against 127.0.0.1 only.

    adaptory serve --preload shout --preload reverse --max-batch 16
    python examples/clients/load.py --models shout,reverse --clients 8 --requests 4

Reports request latency p50/p99 (and time to first token when streaming) and generated tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from urllib.parse import urlparse

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        tokens = response.json()["usage"]["completion_tokens"]
        elapsed = time.perf_counter() - start
        return elapsed, elapsed, tokens
    tokens = 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as response:  # fmt: skip
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - start
    return elapsed, first if first is not None else elapsed, tokens


async def run(args) -> None:
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise SystemExit(f"refusing to load-test {host}: pass --allow-remote if you own it")
    key = os.environ.get("ADAPTORY_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    models = args.models.split(",")
    results: list[tuple[float, float, int]] = []
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.timeout
    ) as client:

        async def worker(i: int) -> None:
            for j in range(args.requests):
                body = {
                    "model": models[(i + j) % len(models)],
                    "prompt": args.prompt,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                }
                results.append(await one(client, body, args.stream))

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.clients)))
        wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    print(
        f"{len(results)} requests from {args.clients} clients over {len(models)} model(s) in {wall:.2f}s"
    )
    print(f"latency  p50 {percentile(latencies, 0.5) * 1000:.0f} ms   p99 {percentile(latencies, 0.99) * 1000:.0f} ms"
          f"   mean {statistics.mean(latencies) * 1000:.0f} ms")  # fmt: skip
    if args.stream:
        print(
            f"first token  p50 {percentile(ttft, 0.5) * 1000:.0f} ms   p99 {percentile(ttft, 0.99) * 1000:.0f} ms"
        )
    print(f"generated {tokens} tokens: {tokens / wall:.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--models", default="shout", help="comma-separated adapter refs (or base:B)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Shout: the cat sat\nAnswer:")
    parser.add_argument(
        "--stream", action="store_true", help="stream, and report time to first token"
    )
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--allow-remote", action="store_true")
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 1000):
        raise SystemExit("keep it bounded: 1-256 clients, 1-1000 requests each")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
