"""The whole product on one laptop, offline: `make demo` runs this.

1. list the built-in bases: the real MiniLM and `tinylm`, a small Llama-style base Adaptory
   pretrains from scratch (`adaptory base pretrain NAME --recipe tinylm`) and ships;
2. train LoRA adapters for three classification domains on MiniLM (4-bit);
3. train LoRA and prefix adapters for two generation domains on tinylm (4-bit);
4. list them and merge two;
5. serve them all from one process and query every adapter through the OpenAI-compatible API,
   mixed and concurrent;
6. end with a table: each adapter's score on held-out data beside the base-only score.

Every step is a plain `adaptory` command (printed before it runs), so the walkthrough in
examples/WALKTHROUGH.md can be followed by hand. The registry lives in a throwaway home unless
--home is given.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
console = Console()

CLASSIFICATION = ["reviews", "support", "news"]
# (adapter name, dataset, method)
GENERATION = [
    ("shout", "shout", "lora"),
    ("reverse", "reverse", "lora"),
    ("shout-prefix", "shout", "prefix"),
]
GEN_BASE = "tinylm"


def adaptory(home: Path, *args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "adaptory.cli.main", "--home", str(home), *args]
    console.print(f"[bold cyan]$ adaptory {shlex.join(args)}[/]")
    if capture:
        proc = subprocess.run(cmd, check=False, text=True, capture_output=True)
        if proc.returncode != 0:
            console.print(proc.stderr)
            raise SystemExit(f"demo step failed: adaptory {shlex.join(args)}")
        return proc.stdout
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): adaptory {shlex.join(args)}")
    return ""


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bases(home: Path) -> None:
    step("1. The built-in bases (shipped, no network)")
    adaptory(home, "base", "list")


# eval.jsonl is the held-out judge of step 6, so `--keep last`: the default (`--keep best`)
# would choose the stored checkpoint by its loss on those very rows.
def train_all(home: Path) -> None:
    step("2. Classification: one LoRA adapter per domain on MiniLM (4-bit)")
    for domain in CLASSIFICATION:
        adaptory(
            home, "train", "--base", "minilm", "--name", domain,
            "--data", str(DATA / domain / "train.jsonl"),
            "--eval-data", str(DATA / domain / "eval.jsonl"), "--epochs", "4",
            "--keep", "last", "--description", f"{domain} classifier (demo)",
        )  # fmt: skip
    step("3. Generation: LoRA and prefix adapters on the from-scratch base")
    for name, dataset, method in GENERATION:
        adaptory(
            home, "train", "--base", GEN_BASE, "--name", name, "--method", method,
            "--data", str(DATA / dataset / "train.jsonl"),
            "--eval-data", str(DATA / dataset / "eval.jsonl"), "--keep", "last",
            "--description", f"{dataset} ({method}, demo)",
        )  # fmt: skip


def list_and_merge(home: Path) -> None:
    step("4. The registry, and one merge")
    adaptory(home, "list")
    adaptory(home, "merge", "shout", "reverse", "--name", "shout-reverse", "--method", "cat")
    adaptory(home, "show", "shout-reverse")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy in time")


def serve_and_query(home: Path) -> dict[str, str]:
    step("5. Serve every adapter from one process; mixed, concurrent requests")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    adapters = CLASSIFICATION + [name for name, _, _ in GENERATION] + ["shout-reverse"]
    preload = [arg for name in adapters for arg in ("--preload", name)]
    args = ["serve", "--port", str(port), "--max-adapters", "8", *preload]
    console.print(f"[bold cyan]$ adaptory {shlex.join(args)} &[/]")
    server = subprocess.Popen(
        [sys.executable, "-m", "adaptory.cli.main", "--home", str(home), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    answers: dict[str, str] = {}
    try:
        wait_healthy(url, server)
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        models = [m.id for m in client.models.list().data]
        console.print(f"GET /v1/models → {len(models)} models: {', '.join(models)}")

        gen_requests = [
            ("shout", "Shout: the red cat sat on the mat\nAnswer:"),
            ("shout-prefix", "Shout: a blue box in the park\nAnswer:"),
            ("reverse", "Reverse: red green blue\nAnswer:"),
            ("shout-reverse", "Reverse: the dog ran home\nAnswer:"),
            (f"base:{GEN_BASE}", "Shout: the red cat sat on the mat\nAnswer:"),
        ]
        cls_requests = [
            ("reviews", "The blender broke after two days and support never answered."),
            ("support", "I was charged twice for my subscription this month."),
            ("news", "Local team wins the championship after a dramatic final."),
        ]

        def complete(model: str, prompt: str) -> tuple[str, str]:
            out = client.completions.create(
                model=model, prompt=prompt, max_tokens=48, temperature=0
            )
            return model, out.choices[0].text.strip()

        def classify(model: str, text: str) -> tuple[str, str]:
            resp = httpx.post(
                f"{url}/v1/classify", json={"model": model, "input": text}, timeout=60
            )
            resp.raise_for_status()
            return model, resp.json()["data"][0]["label"]

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(complete, m, p) for m, p in gen_requests]
            futures += [pool.submit(classify, m, t) for m, t in cls_requests]
            for future in futures:
                model, text = future.result()
                answers[model] = text
        table = Table("model", "request", "answer", title="answers (one server, one batch queue)")
        for model, prompt in gen_requests + cls_requests:
            table.add_row(model, prompt.replace("\n", " ⏎ "), answers[model])
        console.print(table)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return answers


# What a generation adapter must reach on held-out rows (issue #14's bars); a classifier must
# beat its base's accuracy.
EXACT_MATCH_BAR = {"lora": 0.8, "prefix": 0.5}


def summary(home: Path) -> tuple[int, int]:
    """The held-out table; returns (adapters that met their bar, adapters judged)."""
    step("6. What each adapter buys over its base, on held-out data")
    entries = json.loads(adaptory(home, "list", "--json", capture=True))
    # Narrow enough for an 80-column pipe: no task column (the metric says it), names folded.
    table = Table(title="held-out scores")
    for column in ("adapter", "method", "metric", "score", "base", "bar", "verdict"):
        table.add_column(column, overflow="fold", no_wrap=column not in ("adapter", "verdict"))
    met = judged = 0
    for entry in entries:
        metrics, base = entry.get("metrics") or {}, (entry.get("metrics") or {}).get("base") or {}
        if entry["task"] == "seq-cls":
            key = "accuracy"
            bar = base.get(key)
            bar_text = "> base"
        else:
            key = "exact_match"
            bar = EXACT_MATCH_BAR.get(entry["method"])
            bar_text = "—" if bar is None else f">= {bar}"
        value, base_value = metrics.get(key), base.get(key)
        verdict = "not judged"
        if value is not None and bar is not None:
            ok = value > bar if entry["task"] == "seq-cls" else value >= bar
            met, judged = met + ok, judged + 1
            verdict = "[green]met[/]" if ok else "[red]missed[/]"
        table.add_row(
            entry["name"] + f":{entry['version']}",
            entry["method"],
            key.replace("_", " "),
            "—" if value is None else f"{value:.3f}",
            "—" if base_value is None else f"{base_value:.3f}",
            bar_text,
            verdict,
        )
    console.print(table)
    return met, judged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="registry home to use (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp home afterwards")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    home = args.home or Path(tempfile.mkdtemp(prefix="adaptory-demo-"))
    started = time.monotonic()
    console.print(f"[bold]Adaptory demo[/] — home: {home} (offline)")
    try:
        bases(home)
        train_all(home)
        list_and_merge(home)
        serve_and_query(home)
        met, judged = summary(home)
    finally:
        if args.home is None and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    verdict = f"{met} of {judged} adapters met their held-out bar"
    if met < judged:
        verdict += " (see 'missed' above)"
    console.print(f"[bold]done in {minutes:.1f} min[/]: {verdict}.")
    return 0  # every step ran; the table and this line say which adapters met their bar


if __name__ == "__main__":
    sys.exit(main())
