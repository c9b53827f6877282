"""A real uvicorn on 127.0.0.1 (free port): the official openai client, SSE over a socket,
concurrent mixed-adapter streams, graceful shutdown (in-thread, and SIGTERM to `adaptory serve`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from serving_helpers import make_lora, make_prefix, register

from adaptory.adapters.serving.runtime import GenerationRequest
from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

KEY = "sk-uvicorn-test"


class ThreadedServer:
    def __init__(self, app) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(30)

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("uvicorn")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "a", seed=1), "lora-a", tiny_llama_dir)
    register(
        reg,
        make_lora(tiny_llama_dir, root / "b", seed=2, targets=("o_proj",)),
        "lora-b",
        tiny_llama_dir,
    )
    register(
        reg,
        make_prefix(tiny_llama_dir, root / "p", seed=3, virtual_tokens=4),
        "pfx",
        tiny_llama_dir,
    )
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)])
    return reg, runtimes, root


@pytest.fixture(scope="module")
def live(setup):
    reg, runtimes, _ = setup
    app = create_app(
        runtimes,
        registry=reg,
        settings=ServerSettings(api_key=KEY, max_batch=6, batch_window_ms=10),
    )
    with ThreadedServer(app) as url:
        yield url, runtimes


def test_openai_client_works_unchanged(live, tiny_llama_dir):
    url, runtimes = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert {"lora-a", "pfx", f"base:{tiny_llama_dir}"} <= ids
    done = client.completions.create(model="lora-a", prompt="the cat", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    rt = runtimes[str(tiny_llama_dir)]
    alone = rt.generate([GenerationRequest(prompt="the cat", adapter="lora-a", max_new_tokens=5)])[
        0
    ]
    assert done.choices[0].text == alone.text
    chat = client.chat.completions.create(
        model="pfx", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    reply = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and isinstance(reply, str)
    stream = client.chat.completions.create(
        model="pfx",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply
    pieces = client.completions.create(
        model="lora-b", prompt="a red", max_tokens=6, temperature=0, stream=True
    )
    whole = client.completions.create(model="lora-b", prompt="a red", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lora-a", prompt="x", max_tokens=2, logprobs=21)


async def _stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> str:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, done = "", False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done
    return text


def test_concurrent_streams_equal_each_adapter_alone(live, tiny_llama_dir):
    url, runtimes = live
    rt = runtimes[str(tiny_llama_dir)]
    cases = [
        (model, prompt, n)
        for model, n in (("lora-a", 7), ("lora-b", 4), ("pfx", 9), (f"base:{tiny_llama_dir}", 5))
        for prompt in ("the cat sat", "my order arrived")
    ]

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            return await asyncio.gather(*(_stream(client, *case) for case in cases))

    texts = asyncio.run(main())
    for (model, prompt, n), text in zip(cases, texts, strict=True):
        adapter = None if model.startswith("base:") else model
        alone = rt.generate([GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=n)])[
            0
        ]
        assert text == alone.text, (model, prompt)


def test_graceful_shutdown_finishes_in_flight_streams(setup):
    reg, runtimes, _ = setup
    app = create_app(runtimes, registry=reg, settings=ServerSettings())
    server = ThreadedServer(app)
    url = server.__enter__()
    received: dict = {}

    def client():
        body = {
            "model": "lora-a",
            "prompt": "the",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        chunks, done = [], False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    received.setdefault("first", time.monotonic())
        received.update(chunks=chunks, done=done)

    worker = threading.Thread(target=client)
    worker.start()
    while "first" not in received and worker.is_alive():
        time.sleep(0.005)
    server.stop()  # stop accepting; the stream in flight must still complete
    worker.join(60)
    assert received["done"]
    assert received["chunks"][-1]["choices"][0]["finish_reason"] in ("length", "stop")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_adaptory_serve_drains(setup, tiny_llama_dir):
    reg, _, root = setup
    port = _free_port()
    env = {**os.environ, "ADAPTORY_HOME": str(root / "home"), "ADAPTORY_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptory.cli.main", "serve", "--port", str(port), "--preload", "lora-a",
         "--base", str(tiny_llama_dir), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {
            "model": "lora-a",
            "prompt": "the",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        lines = []
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not lines:
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        assert "data: [DONE]" in lines
        # uvicorn re-raises the signal it caught once the graceful shutdown is done
        assert proc.wait(60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert KEY not in output
    finally:
        if proc.poll() is None:
            proc.kill()
