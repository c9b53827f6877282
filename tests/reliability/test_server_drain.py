"""SIGTERM to a real `adaptory serve` process (docs/SERVER.md, "Shutdown"): it stops accepting
connections, the requests in flight finish in full, and the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving_helpers import make_lora, register

from adaptory.registry import Registry

START_S = 120  # deadlines below fail the test with a message; they are not speed claims


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"adaptory serve exited with {proc.returncode}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"adaptory serve did not answer /health within {START_S} s")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_refuses_new_connections(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    register(Registry(home), make_lora(tiny_llama_dir, tmp_path / "a", seed=1), "lora-a",
             tiny_llama_dir)  # fmt: skip
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ADAPTORY_HOME": str(home)}
    env.pop("ADAPTORY_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptory.cli.main", "serve", "--port", str(port),
         "--preload", "lora-a", "--base", str(tiny_llama_dir), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_healthy(proc, url)
        # in flight 1: a long stream; in flight 2: a request whose body is still on its way
        streamed: dict = {"lines": []}
        started = threading.Event()

        def stream() -> None:
            body = {"model": "lora-a", "prompt": "the", "max_tokens": 200, "temperature": 0,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                streamed["status"] = r.status_code
                for line in r.iter_lines():
                    started.set()
                    streamed["lines"].append(line)

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        assert started.wait(START_S), "the stream sent nothing"
        body = json.dumps({"model": "lora-a", "prompt": "a red", "max_tokens": 3}).encode()
        slow = socket.create_connection(("127.0.0.1", port), timeout=120)
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        time.sleep(0.5)  # let uvicorn take the request in before the signal
        proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 60
        while not _refused(port):
            if time.monotonic() > deadline:
                pytest.fail("still accepting new connections 60 s after SIGTERM")
            time.sleep(0.1)

        slow.sendall(body[5:])  # the request that was in flight when the signal came
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = slow.recv(65536)
            assert chunk, f"the in-flight request was dropped: {reply!r}"
            reply += chunk
        slow.close()
        worker.join(START_S)
        assert not worker.is_alive(), "the in-flight stream did not finish"
        assert streamed["status"] == 200
        lines = [ln for ln in streamed["lines"] if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] in ("length", "stop"), last
        status = reply.split(b"\r\n", 1)[0]
        assert status == b"HTTP/1.1 200 OK", reply[:300]
        assert proc.wait(60) in (0, -signal.SIGTERM), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_work_that_reaches_a_stopped_scheduler_gets_503_shutting_down(tmp_path, tiny_llama_dir):
    """The app's side of the drain: once its schedulers have stopped (the last step of the
    shutdown), a request that still reaches it is refused with 503, never queued or hung."""
    from fastapi.testclient import TestClient

    from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app

    reg = Registry(tmp_path / "home")
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)])
    app = create_app(runtimes, registry=reg, settings=ServerSettings(batch_window_ms=5))
    body = {"model": f"base:{tiny_llama_dir}", "prompt": "the cat", "max_tokens": 2}
    with TestClient(app) as client:
        assert client.post("/v1/completions", json=body).status_code == 200
        for scheduler in app.state.schedulers.values():
            scheduler.stop()
        chat = {"model": body["model"], "messages": [{"role": "user", "content": "hi"}]}
        for path, payload in (
            ("/v1/completions", body),
            ("/v1/completions", {**body, "stream": True}),
            ("/v1/chat/completions", chat),
        ):
            response = client.post(path, json=payload)
            assert response.status_code == 503, (path, payload, response.text)
            assert response.json()["error"]["type"] == "server_error"
            assert response.json()["error"]["code"] == "shutting_down"
