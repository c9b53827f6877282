"""One client hurts only itself: a real `adaptory serve` on 127.0.0.1 serving a tiny Llama (LoRA
adapters, one of them overflowing to NaN logits) and a tiny BERT (a classifier).

Victims send greedy completions and one-text classifications, first alone (quiet), then while
flooders keep 200 texts of /v1/classify in flight and sample the overflowing adapter at
temperature 1.0 (noisy). Checks: every victim answer equals its solo reference in both phases
(labels exactly, scores within 1e-5), the flood is served (200) and the broken adapter answered
400 `invalid_adapter`, no 500 anywhere, and the victims' p99 latency under the flood stays within
2x their quiet p99 (the reliability issue's target). Prints one JSON report.

    python benchmarks/isolation.py              # 4 victims x 40 requests per phase
    python benchmarks/isolation.py --quick      # 2 victims x 12 requests per phase
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import free_port, start_server  # noqa: E402

PROMPTS = ["the cat sat", "a red ball and a blue box", "my order arrived", "the dog ran to the"]
TEXTS = ["great product, would buy again", "it broke after a week", "the refund took too long"]
FLOOD_TEXTS = 100  # per flooding request; two flooders keep 200 in flight
MAX_TOKENS = 16
P99_TARGET = 2.0


def build(root: Path, home: Path) -> tuple[Path, Path]:
    """A tiny Llama with two LoRA adapters and an overflowing one; a tiny BERT classifier."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from safetensors.torch import load_file, save_file
    from serving_helpers import make_classifier, make_lora, register
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptory.adapters.bases.loading import BUILTIN_BASES
    from adaptory.adapters.bases.tiny import init_base
    from adaptory.registry import Registry

    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(PROMPTS + TEXTS) * 80)
    llama = root / "llama"
    init_base(llama, size="tiny", corpus=[corpus], seed=0)
    bert = root / "bert"
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_BASES["minilm"].locate()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    reg = Registry(home)
    for i in range(2):
        register(reg, make_lora(llama, root / f"lora{i}", seed=i + 1), f"lora{i}", llama)
    overflow = make_lora(llama, root / "overflow", seed=7)
    tensors = load_file(str(overflow / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if "lora_B" in key:  # finite on disk, overflows float32 in the forward pass
            tensors[key] = torch.randn(value.shape, generator=gen).sign() * 1e38
    save_file(tensors, str(overflow / "adapter_model.safetensors"), metadata={"format": "pt"})
    register(reg, overflow, "overflow", llama)
    labels = ["neg", "pos"]
    folder = make_classifier(bert, root / "clf", seed=3, labels=labels)
    register(reg, folder, "clf", bert, task="seq-cls", labels=labels)
    return llama, bert


def victim_jobs(n: int) -> list[tuple[str, dict]]:
    jobs = []
    for i in range(n):
        if i % 2:
            jobs.append(("/v1/classify", {"model": "clf", "input": [TEXTS[i % len(TEXTS)]]}))
        else:
            jobs.append(("/v1/completions", {"model": f"lora{i % 4 // 2}", "max_tokens": MAX_TOKENS,
                                             "prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0}))  # fmt: skip
    return jobs


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def answer(path: str, body: dict):
    if path == "/v1/classify":
        row = body["data"][0]
        return row["label"], [round(v, 5) for v in row["scores"].values()]
    return body["choices"][0]["text"]


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return a[0] == b[0] and all(abs(x - y) <= 1e-5 for x, y in zip(a[1], b[1], strict=True))
    return a == b


NOISES = {"both": ("flooder", "flooder", "breaker", "breaker"), "flood": ("flooder", "flooder"),
          "broken": ("breaker", "breaker")}  # fmt: skip


async def phase(url: str, victims: int, per_victim: int, noisy: bool, noise: str = "both") -> dict:
    import httpx

    jobs = victim_jobs(per_victim)
    latencies, answers, statuses, by_kind = [], [], Counter(), {}
    stop = asyncio.Event()

    async def victim(client):
        for path, body in jobs:
            started = time.perf_counter()
            r = await client.post(path, json=body)
            latencies.append(time.perf_counter() - started)
            by_kind.setdefault(path, []).append(latencies[-1])
            statuses[r.status_code] += 1
            answers.append(
                (path, json.dumps(body), answer(path, r.json()) if r.status_code == 200 else None)
            )

    async def flooder(client):
        texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(FLOOD_TEXTS)]
        while not stop.is_set():
            r = await client.post("/v1/classify", json={"model": "clf", "input": texts})
            statuses[f"flood {r.status_code}"] += 1

    async def breaker(client):
        while not stop.is_set():
            r = await client.post("/v1/completions", json={"model": "overflow", "prompt": "the cat",
                                                           "max_tokens": 8, "temperature": 1.0})  # fmt: skip
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else "ok"
            statuses[f"broken {r.status_code} {code}"] += 1

    locals_ = {"flooder": flooder, "breaker": breaker}
    limits = httpx.Limits(max_connections=victims + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        noise = (
            [asyncio.create_task(locals_[name](client)) for name in NOISES[noise]] if noisy else []
        )
        if noisy:
            await asyncio.sleep(0.5)  # the flood is in flight before the victims start
        await asyncio.gather(*(victim(client) for _ in range(victims)))
        stop.set()
        await asyncio.gather(*noise)
    return {
        "p50_s": quantile(latencies, 0.5),
        "p99_s": quantile(latencies, 0.99),
        "p99_s_by_endpoint": {k: round(quantile(v, 0.99), 4) for k, v in by_kind.items()},
        "answers": answers,
        "statuses": dict(statuses),
    }


def run(victims: int, per_victim: int, noise: str = "both") -> dict:
    import httpx

    from adaptory.adapters.bench import wait_healthy

    with tempfile.TemporaryDirectory(prefix="adaptory-isolation-") as tmp:
        root = Path(tmp)
        home = root / "home"
        llama, bert = build(root, home)
        port, log = free_port(), root / "server.log"
        proc = start_server(
            home, str(llama), port, log, 8, ["--base", str(bert), "--numerics", "fp32"]
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, log, timeout=180)
            with httpx.Client(base_url=url, timeout=120) as client:  # solo references
                reference = {}
                for path, body in victim_jobs(per_victim):
                    r = client.post(path, json=body)
                    r.raise_for_status()
                    reference[path, json.dumps(body)] = answer(path, r.json())
            quiet = asyncio.run(phase(url, victims, per_victim, noisy=False))
            noisy = asyncio.run(phase(url, victims, per_victim, noisy=True, noise=noise))
        finally:
            proc.terminate()
            proc.wait(60)
    report: dict = {"victims": victims, "requests_per_victim": per_victim, "noise": noise}
    for name, result in (("quiet", quiet), ("noisy", noisy)):
        wrong = [
            a for a in result["answers"] if a[2] is None or not same(a[2], reference[a[0], a[1]])
        ]
        report[name] = {
            "p50_s": round(result["p50_s"], 4),
            "p99_s": round(result["p99_s"], 4),
            "p99_s_by_endpoint": result["p99_s_by_endpoint"],
            "victim_answers_differing_from_solo": len(wrong),
            "statuses": result["statuses"],
        }
    report["p99_noisy_over_quiet"] = round(noisy["p99_s"] / quiet["p99_s"], 2)
    statuses = noisy["statuses"]
    report["ok"] = (
        report["quiet"]["victim_answers_differing_from_solo"] == 0
        and report["noisy"]["victim_answers_differing_from_solo"] == 0
        and not any(str(k).endswith("500") or " 500 " in str(k) for k in statuses)
        and all(
            k.startswith("broken 400 invalid_adapter")
            for k in statuses
            if str(k).startswith("broken")
        )
        and (statuses.get("flood 200", 0) > 0 or "flooder" not in NOISES[noise])
        and report["p99_noisy_over_quiet"] <= P99_TARGET
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 victims x 12 requests per phase")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--noise", choices=sorted(NOISES), default="both",
        help="the noisy phase's clients: the classify flood, the broken-adapter loops, or both",
    )  # fmt: skip
    args = parser.parse_args(argv)
    report = run(2, 12, args.noise) if args.quick else run(4, 40, args.noise)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
