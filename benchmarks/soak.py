"""Load test of `adaptory serve` on 127.0.0.1: many concurrent clients over 8 adapters (LoRA and
prefix, streaming and not) with an LRU smaller than the working set (--max-adapters 3).

Checks: zero errors; every greedy output equals the answer to the same request sent alone
before the load; the server's RSS (sampled from /proc/<pid>/status) does not grow per request
after warm-up (least-squares slope); adapters were evicted and reloaded without a load failure.
Reports p50/p99 latency, throughput and the RSS slope as JSON.

    python benchmarks/soak.py                 # full: 64 clients, 2,000 requests
    python benchmarks/soak.py --quick         # 8 clients, 80 requests (run by the test suite)
    python benchmarks/soak.py --out soak.json
    python benchmarks/soak.py --numerics bf16 # measures how often outputs differ (not a failure)

All traffic goes to 127.0.0.1; the request count and every timeout are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

PROMPTS = ["the cat sat", "a red ball and a blue box", "my order arrived", "the dog ran to the"]
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 120
RSS_SLOPE_LIMIT = 8 * 1024  # bytes per request after warm-up


def build_adapters(root: Path, home: Path, base_dir: Path | None) -> tuple[str, list[str]]:
    """A tiny base (unless given) and 6 LoRA + 2 prefix adapters, registered in `home`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving_helpers import make_lora, make_prefix, register

    from adaptory.registry import Registry

    if base_dir is None:
        from adaptory.adapters.bases.tiny import init_base

        corpus = root / "corpus.txt"
        corpus.write_text(" ".join(PROMPTS * 50) + " the shop sells books and tea. " * 50)
        base_dir = root / "base"
        init_base(base_dir, size="tiny", corpus=[corpus], seed=0)
    reg = Registry(home)
    targets = [("q_proj", "v_proj"), ("k_proj", "o_proj"), ("up_proj",), ("down_proj", "q_proj")]
    names = []
    for i in range(6):
        folder = make_lora(base_dir, root / f"lora{i}", seed=10 + i, targets=targets[i % 4])
        register(reg, folder, f"lora{i}", base_dir)
        names.append(f"lora{i}")
    for i in range(2):
        folder = make_prefix(base_dir, root / f"pfx{i}", seed=20 + i, virtual_tokens=3 + 2 * i)
        register(reg, folder, f"pfx{i}", base_dir)
        names.append(f"pfx{i}")
    return str(base_dir), names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    home: Path, base: str, port: int, log: Path, max_adapters: int, extra: list[str] = ()
):
    cmd = [
        sys.executable, "-m", "adaptory.cli.main", "--home", str(home), "serve",
        "--base", base, "--port", str(port), "--max-adapters", str(max_adapters),
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def one_request(client, model: str, prompt: str, stream: bool) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text = ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            text += event["choices"][0]["text"]
    return text


async def run_load(url: str, jobs: list[tuple[str, str, bool]], clients: int, done: list[int]):
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[tuple[tuple[str, str, bool], float, str | None, str | None]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client):
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            try:
                text, error = await one_request(client, *job), None
            except Exception as exc:  # every failure is counted, none stops the run
                text, error = None, f"{type(exc).__name__}: {exc}"
            results.append((job, time.perf_counter() - started, text, error))
            done[0] += 1

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return results


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def soak(
    clients: int,
    requests: int,
    max_adapters: int,
    base_dir: Path | None,
    seed: int,
    *,
    numerics: str = "auto",
    device: str | None = None,
) -> dict:
    """One load run against a fresh server; the JSON report, whose `ok` says whether every
    check passed."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="adaptory-soak-") as tmp:
        root = Path(tmp)
        home = root / "home"
        base, names = build_adapters(root, home, base_dir)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = root / "server.log"
        extra = ["--numerics", numerics] + (["--device", device] if device else [])
        proc = start_server(home, base, port, log, max_adapters, extra)
        try:
            from adaptory.adapters.bench import wait_healthy

            wait_healthy(url, proc, log, timeout=180)
            models = names + [f"base:{base}"]
            reference, before = send_alone(url, models)
            rng = random.Random(seed)
            jobs = [
                (rng.choice(models), rng.choice(PROMPTS), rng.random() < 0.5)
                for _ in range(requests)
            ]
            results, samples, rss_start, wall = load_with_rss(url, jobs, clients, proc.pid)
            after = httpx.get(f"{url}/metrics", timeout=30).text
        finally:
            stop_server(proc)
        rss_slope = warm_slope(samples, requests)
        report = {
            "clients": clients,
            "requests": requests,
            "adapters": len(names),
            "max_adapters": max_adapters,
            "distinct_outputs_across_models": len({reference[m, PROMPTS[0]] for m in models}),
            **outcome_report(results, reference, base, numerics),
            **timing_report(results, samples, rss_start, rss_slope, wall),
            **metrics_report(before, after),
        }
        report["ok"] = (
            report["errors"] == 0
            # fp32 promises identical greedy outputs; bf16's divergence is measured, not failed
            and (report["mismatches"] == 0 or numerics == "bf16")
            and report["load_failures"] == 0
            and report["evictions"] > 0
            and report["base_loads"] == 1
            and report["distinct_outputs_across_models"] > 1
            and (requests < 1000 or rss_slope < RSS_SLOPE_LIMIT)  # too few samples below
        )
        return report


def send_alone(url: str, models: list[str]) -> tuple[dict, str]:
    """The references: each (model, prompt) sent alone, one at a time, before the load; and
    the server's metrics text then."""
    import httpx

    reference = {}
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for model in models:
            for prompt in PROMPTS:
                r = client.post("/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                })  # fmt: skip
                r.raise_for_status()
                reference[model, prompt] = r.json()["choices"][0]["text"]
        before = client.get("/metrics").text
    return reference, before


def load_with_rss(url: str, jobs, clients: int, pid: int):
    """Run the load while a thread samples the server's RSS against requests done:
    (results, [(requests done, rss bytes)], rss before the load, wall seconds)."""
    done = [0]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((done[0], rss_bytes(pid)))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_start = rss_bytes(pid)
    sampler.start()
    started = time.perf_counter()
    results = asyncio.run(run_load(url, jobs, clients, done))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    samples.append((done[0], rss_bytes(pid)))
    return results, samples, rss_start, wall


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def outcome_report(results, reference: dict, base: str, numerics: str) -> dict:
    """Errors, and greedy outputs that differ from the same request sent alone."""
    errors = [e for *_, e in results if e]
    mismatches = [
        (job, text, reference[job[0], job[1]])
        for job, _, text, error in results
        if error is None and text != reference[job[0], job[1]]
    ]
    return {
        "errors": len(errors),
        "first_errors": errors[:3],
        "numerics": numerics,
        "mismatches": len(mismatches),
        "mismatch_rate": round(len(mismatches) / max(1, len(results)), 5),
        "mismatches_by_model": dict(Counter(job[0] for job, *_ in mismatches)),
        "mismatches_equal_to_base_output": sum(
            1 for job, text, _ in mismatches if text == reference[f"base:{base}", job[1]]
        ),
        "first_mismatches": [list(map(str, m)) for m in mismatches[:3]],
        "streamed": sum(1 for job, *_ in results if job[2]),
    }


def warm_slope(samples: list[tuple[float, float]], requests: int) -> float:
    """The RSS slope per request after warm-up (the first 20% of requests); 0 when fewer than
    3 samples fall there."""
    warm = [p for p in samples if p[0] >= 0.2 * requests]
    return slope(warm) if len(warm) >= 3 else 0.0


def timing_report(results, samples, rss_start: int, rss_slope: float, wall: float) -> dict:
    """Latency percentiles, throughput, and the server's RSS over the load."""
    latencies = sorted(t for _, t, _, e in results if e is None)
    return {
        "p50_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4)
        if latencies
        else None,
        "throughput_rps": round(len(results) / wall, 2),
        "tokens_per_s": round(len(results) * MAX_TOKENS / wall, 1),
        "wall_s": round(wall, 2),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(samples[-1][1] / 2**20, 1),
        "rss_max_mb": round(max(s[1] for s in samples) / 2**20, 1),
        "rss_slope_bytes_per_request": round(rss_slope, 1),
        "rss_samples": len(samples),
    }


def metrics_report(before: str, after: str) -> dict:
    """Adapter loads and evictions during the load, and failures and base loads in all."""
    return {
        "loads": metric(after, "adaptory_adapter_loads_total")
        - metric(before, "adaptory_adapter_loads_total"),
        "evictions": metric(after, "adaptory_adapter_evictions_total")
        - metric(before, "adaptory_adapter_evictions_total"),
        "load_failures": metric(after, "adaptory_adapter_load_failures_total"),
        "base_loads": metric(after, "adaptory_base_loads_total"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 clients, 80 requests")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--max-adapters", type=int, default=3)
    parser.add_argument("--base", type=Path, help="a saved causal-LM base (default: build tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    parser.add_argument("--numerics", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--device", help="cpu, cuda, … (default: the server's)")
    args = parser.parse_args(argv)
    clients = args.clients or (8 if args.quick else 64)
    requests = args.requests or (80 if args.quick else 2000)
    report = soak(
        clients, requests, args.max_adapters, args.base, args.seed,
        numerics=args.numerics, device=args.device,
    )  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
