"""One client cannot hurt another, on a real uvicorn on 127.0.0.1: a row whose adapter gives
non-finite logits fails alone (other rows' text equals their solo runs), a 200-text classify is
served in chunks that let a one-text classify through, a client that goes away is cancelled and
its row leaves the batch, a connection that never finishes its headers is closed, and an
unexpected exception is a JSON 500 on a connection that stays usable.

The causal base is a copy of the tiny base whose position table is 2^20 long (same weights, so
adapters made on the tiny base route to it): a million-token completion cannot end on its own
while a test watches it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from reliability_helpers import ThreadedServer
from safetensors.torch import load_file, save_file
from serving_helpers import make_classifier, make_lora, make_prefix, register

from adaptory.adapters.serving.runtime import GenerationRequest
from adaptory.adapters.serving.scheduler import Job, Scheduler
from adaptory.adapters.serving.server import (
    ServerSettings,
    build_runtimes,
    create_app,
    uvicorn_options,
)
from adaptory.registry import Registry
from adaptory.registry.errors import InvalidAdapter

KEY = "sk-isolation-71f3"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = ["neg", "pos"]
ENDLESS = 1_000_000  # max_tokens of a generation that cannot end during a test


def make_overflowing_lora(base_dir, out):
    """A LoRA whose stored weights are all finite (lora_B = ±1e38) but whose update overflows
    float32 inside the forward pass, so every row using it gets NaN logits. Any check of the
    stored numbers passes it; only the sampler's guard can catch it."""
    make_lora(base_dir, out, seed=7)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if "lora_B" in key:
            tensors[key] = torch.randn(value.shape, generator=generator).sign() * 1e38
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def long_base_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny base with a 2^20-position table (RoPE has no learned positions to run out of)."""
    out = tmp_path_factory.mktemp("long-base") / "tiny-llama-long"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 20
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, tiny_bert_dir, long_base_dir):
    root = tmp_path_factory.mktemp("isolation")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "a", seed=1), "lora-a", tiny_llama_dir)
    register(
        reg,
        make_lora(tiny_llama_dir, root / "b", seed=2, targets=("o_proj",)),
        "lora-b",
        tiny_llama_dir,
    )
    register(reg, make_prefix(tiny_llama_dir, root / "p", seed=3), "pfx", tiny_llama_dir)
    register(
        reg, make_overflowing_lora(tiny_llama_dir, root / "o"), "lora-overflow", tiny_llama_dir
    )
    register(reg, make_lora(tiny_llama_dir, root / "c", seed=4), "lora-c", tiny_llama_dir)
    folder = make_classifier(tiny_bert_dir, root / "s", seed=5, labels=LABELS)
    register(reg, folder, "sentiment", tiny_bert_dir, task="seq-cls", labels=LABELS)
    runtimes = build_runtimes(reg, bases=[str(long_base_dir), str(tiny_bert_dir)])
    return reg, runtimes


@pytest.fixture(autouse=True)
def _fresh_breakers(setup):
    """Each test starts with no adapter refused for its earlier failures (tests run shuffled)."""
    for rt in setup[1].values():
        rt.forget_failures()
    yield


@pytest.fixture(scope="module")
def live(setup):
    reg, runtimes = setup
    settings = ServerSettings(
        api_key=KEY, max_batch=8, batch_window_ms=20, max_tokens_limit=ENDLESS,
        max_classify_inputs=256, classify_chunk_rows=8, classify_chunk_tokens=512,
        header_timeout_s=1.0,
    )  # fmt: skip
    app = create_app(runtimes, registry=reg, settings=settings)

    @app.get("/v1/boom")
    async def boom():  # a route with a bug, for the catch-all
        raise RuntimeError("a bug in a handler")

    with ThreadedServer(app, **uvicorn_options(settings)) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield url, client, app


@pytest.fixture
def one_row(one_row_server):
    """The one-row server, left idle after each test even if the test failed mid-way."""
    yield one_row_server
    _, _, app, base = one_row_server
    scheduler = app.state.schedulers[base]
    for job in [*scheduler.jobs.values(), *scheduler.inbox.queue]:
        if job is not None:
            job.cancel()
    _wait_until(lambda: scheduler.active == 0, "the one-row server did not go idle")


@pytest.fixture(scope="module")
def one_row_server(setup, long_base_dir):
    """A server for the long base alone that decodes one row at a time: the next request
    waits for its first token as long as the running one goes on."""
    reg, runtimes = setup
    long_rt = runtimes[str(long_base_dir)]
    # the runs below must be cut by a disconnect, not by an end-of-sequence token
    alone = long_rt.generate([GenerationRequest(prompt="the cat", max_new_tokens=200)])[0]
    assert alone.finish_reason == "length", alone
    settings = ServerSettings(api_key=KEY, max_batch=1, batch_window_ms=0, max_tokens_limit=ENDLESS)
    app = create_app({str(long_base_dir): long_rt}, registry=reg, settings=settings)
    with ThreadedServer(app, **uvicorn_options(settings)) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield url, client, app, str(long_base_dir)


# --- helpers ---------------------------------------------------------------------------------


def _metric(client: httpx.Client, line_prefix: str) -> float:
    """The value of the /metrics line that starts with `line_prefix` (0 if absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _gauge(client, name: str, base: str) -> float:
    return _metric(client, f'{name}{{base="{base}"}}')


def _answered(client, status: int) -> float:
    return _metric(
        client, f'adaptory_requests_total{{endpoint="/v1/completions",status="{status}"}}'
    )


def _endless(base: str, **extra) -> dict:
    """A greedy completion that runs until its client goes away (see the `one_row` fixture)."""
    return {"model": f"base:{base}", "prompt": "the cat", "max_tokens": ENDLESS,
            "temperature": 0, **extra}  # fmt: skip


def _wait_until(predicate, what: str, seconds: float = 30.0) -> None:
    """Liveness only: poll until `predicate()` holds, fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _open_request(url: str, body: dict) -> socket.socket:
    """POST /v1/completions on a raw socket, leaving the answer unread."""
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict, bytes]:
    """Send one HTTP/1.1 request on a kept-alive socket; read one Content-Length answer."""
    sock.sendall(request)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _streamed_text(events: list) -> str:
    return "".join(
        e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


# --- a row that fails alone --------------------------------------------------------------------


def test_an_adapter_with_non_finite_logits_fails_alone(live, setup, long_base_dir):
    """Sampling (temperature > 0) with an overflowing adapter used to fail every row of its
    batch with "probability tensor contains either inf, nan" (500)."""
    url, client, _ = live
    _, runtimes = setup
    rt = runtimes[str(long_base_dir)]
    base = f"base:{long_base_dir}"
    victims = [
        ("/v1/completions", {"model": "lora-a", "prompt": "the cat sat", "max_tokens": 12,
                             "temperature": 0, "stream": True}),
        ("/v1/completions", {"model": "lora-b", "prompt": "my order", "max_tokens": 10,
                             "temperature": 0.8, "seed": 7}),
        ("/v1/completions", {"model": "pfx", "prompt": "a red ball", "max_tokens": 9,
                             "temperature": 0}),
        ("/v1/completions", {"model": base, "prompt": "the dog", "max_tokens": 8,
                             "temperature": 1.2, "seed": 3, "stream": True}),
        ("/v1/chat/completions", {"model": "lora-a", "max_tokens": 6, "temperature": 0.7,
                                  "seed": 11, "messages": [{"role": "user", "content": "hi"}]}),
    ]  # fmt: skip
    broken = [
        ("/v1/completions", {"model": "lora-overflow", "prompt": "the cat", "max_tokens": 5,
                             "temperature": 1.0, "seed": 1}),
        ("/v1/completions", {"model": "lora-overflow", "prompt": "the cat", "max_tokens": 5,
                             "temperature": 0, "stream": True}),
        ("/v1/chat/completions", {"model": "lora-overflow", "max_tokens": 5, "temperature": 0.7,
                                  "messages": [{"role": "user", "content": "hi"}]}),
    ]  # fmt: skip
    calls = [victims[0], broken[0], victims[1], broken[1], victims[2], victims[3], broken[2]]
    calls.append(victims[4])

    def call(case):
        path, body = case
        if body.get("stream"):
            with client.stream("POST", path, json=body) as r:
                r.read()
                return r
        return client.post(path, json=body)

    for _ in range(2):  # twice: batches form from whoever arrives in the window
        with ThreadPoolExecutor(len(calls)) as pool:
            responses = list(pool.map(call, calls))
        answers = {json.dumps(case): r for case, r in zip(calls, responses, strict=True)}
        for case in broken:
            response = answers[json.dumps(case)]
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "adapter_error" and error["code"] == "invalid_adapter"
            assert "lora-overflow:1" in error["message"] and "non-finite" in error["message"]
        for path, body in victims:
            response = answers[json.dumps((path, body))]
            assert response.status_code == 200, response.text
            if body.get("stream"):
                events = _sse(response)
                assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
                text = _streamed_text(events)
            elif path == "/v1/chat/completions":
                text = response.json()["choices"][0]["message"]["content"]
            else:
                text = response.json()["choices"][0]["text"]
            alone = rt.generate([
                GenerationRequest(
                    prompt=body.get("prompt"), messages=body.get("messages"),
                    adapter=None if body["model"] == base else body["model"],
                    max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                    seed=body.get("seed"),
                )
            ])[0]  # fmt: skip
            assert text == alone.text, (body["model"], text, alone.text)
    assert client.get("/health").json()["status"] == "ok"


def test_an_adapter_failing_again_and_again_is_refused_without_a_prefill(
    live, setup, long_base_dir
):
    """After BREAKER_FAILURES requests in a row with non-finite logits, the adapter is refused
    at admission (same 400 invalid_adapter, saying why) without being prefilled; other adapters
    are unaffected; once the refusal lapses, one request tries it again."""
    from adaptory.adapters.serving.runtime import BREAKER_FAILURES, BREAKER_SECONDS

    _, client, app = live
    rt = setup[1][str(long_base_dir)]
    scheduler = app.state.schedulers[str(long_base_dir)]
    body = {"model": "lora-overflow", "prompt": "the cat", "max_tokens": 3, "temperature": 0}
    for _ in range(BREAKER_FAILURES):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and "non-finite" in r.json()["error"]["message"], r.text
        assert "refused for" not in r.json()["error"]["message"]
    admitted = scheduler.admitted
    for _ in range(3):
        r = client.post("/v1/completions", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "invalid_adapter", r.text
        assert "refused for" in error["message"] and "lora-overflow:1" in error["message"]
        assert 1 <= int(r.headers["retry-after"]) <= BREAKER_SECONDS
    assert scheduler.admitted == admitted  # none of them was prefilled
    ok = client.post("/v1/completions", json={**body, "model": "lora-a"})
    assert ok.status_code == 200 and scheduler.admitted == admitted + 1
    rt._refused_until["lora-overflow:1"] = 0.0  # the refusal has lapsed
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "refused for" not in r.json()["error"]["message"]
    assert "retry-after" not in r.headers
    assert scheduler.admitted == admitted + 2  # tried again: prefilled, failed again


def test_a_failing_row_admitted_with_others_leaves_their_text_untouched(setup, long_base_dir):
    """Rows admitted together: a victim before the failing row used to be prefilled twice (the
    fallback re-added what add_many had already merged), so its first token came twice."""
    _, runtimes = setup
    rt = runtimes[str(long_base_dir)]
    victim = GenerationRequest(
        prompt="the cat sat", adapter="lora-a", max_new_tokens=8, temperature=0.9, seed=5
    )
    broken = GenerationRequest(
        prompt="the cat", adapter="lora-overflow", max_new_tokens=8, temperature=1.0, seed=1
    )
    other = GenerationRequest(prompt="a red ball", adapter="pfx", max_new_tokens=6)
    alone = [rt.generate([r])[0] for r in (victim, other)]
    # a long window: the three arrive within microseconds and are admitted together
    scheduler = Scheduler(rt, max_batch=8, window_s=0.5)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [
            Job(loop=loop, events=asyncio.Queue(), generation=g) for g in (victim, broken, other)
        ]
        for job in jobs:
            scheduler.submit(job)
        answers = []
        for job in jobs:
            events = [await asyncio.wait_for(job.events.get(), 60)]
            while events[-1][0] == "text":
                events.append(await asyncio.wait_for(job.events.get(), 60))
            answers.append(events)
        return answers

    try:
        answers = asyncio.run(main())
    finally:
        scheduler.stop(30)
    for events, solo in zip((answers[0], answers[2]), alone, strict=True):
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "done" and kinds.count("done") == 1, kinds
        assert "".join(v.text for k, v in events if k == "text") == solo.text
        assert events[-1][1].text == solo.text
    assert scheduler.admitted == 3  # one admission, nobody re-added
    (kind, error), *rest = answers[1]
    assert kind == "error" and rest == [] and isinstance(error, InvalidAdapter), answers[1]
    assert "lora-overflow:1" in error.message


def test_a_row_that_breaks_mid_stream_gets_an_error_event_then_done(live, setup, long_base_dir):
    """The stream's adapter turns to NaN after its first token (its weights in the LoRA bank
    overwritten, as a memory fault would): that stream ends with an error event and [DONE];
    the stream sharing its batch goes on to equal its solo run."""
    url, client, _ = live
    _, runtimes = setup
    rt = runtimes[str(long_base_dir)]
    base = f"base:{long_base_dir}"
    victim = {"model": base, "prompt": "the cat", "max_tokens": 300, "temperature": 0}
    doomed = {"model": "lora-c", "prompt": "a red ball", "max_tokens": ENDLESS,
              "temperature": 1.0, "seed": 2}  # fmt: skip
    alone = rt.generate([GenerationRequest(prompt="the cat", max_new_tokens=300)])[0]
    # the doomed row must still be running when its weights break: no end-of-sequence early on
    doomed_alone = GenerationRequest(
        prompt="a red ball", adapter="lora-c", max_new_tokens=200, temperature=1.0, seed=2
    )
    assert rt.generate([doomed_alone])[0].finish_reason == "length"
    result: dict = {}
    victim_started = threading.Event()

    def run_victim():
        with client.stream("POST", "/v1/completions", json={**victim, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    victim_started.set()
                    result["first"] = line
                    break
            result["events"] = [json.loads(result["first"][6:]), *_sse_lines(lines)]

    thread = threading.Thread(target=run_victim)
    thread.start()
    try:
        assert victim_started.wait(30), "the victim stream did not start"
        with client.stream("POST", "/v1/completions", json={**doomed, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            with rt.lock:  # between two decode steps
                slot = rt._bank.slots["lora-c:1"]
                for stack in rt._bank._stacks.values():
                    stack.b[slot].fill_(float("nan"))
                rt._bank._kept = None  # the gathered copies decode keeps are that memory too
            rest = _sse_lines(lines)
    finally:
        thread.join(60)
    assert rest[-1] == "[DONE]"
    errors = [e for e in rest[:-1] if "error" in e]
    assert len(errors) == 1 and rest[-2] is errors[0], rest[-3:]
    assert errors[0]["error"]["code"] == "invalid_adapter"
    assert "lora-c:1" in errors[0]["error"]["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in rest[:-2])
    events = result["events"]
    assert events[-1] == "[DONE]" and _streamed_text(events) == alone.text
    assert rt.unload("lora-c:1")  # its row has left: the broken weights go


def _sse_lines(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --- classification floods ----------------------------------------------------------------------


def test_a_classify_flood_does_not_hold_up_a_one_text_request(
    live, setup, tiny_bert_dir, monkeypatch
):
    """200 texts used to run as one padded pass while another client's one-text request waited
    for all of it; now the flood runs in chunks of 8 and the small request passes between.

    The worker is held inside the flood's first chunk until the small request is queued, so the
    order does not depend on how fast this machine drains the flood."""
    url, client, app = live
    _, runtimes = setup
    rt = runtimes[str(tiny_bert_dir)]
    base = str(tiny_bert_dir)
    scheduler = app.state.schedulers[base]
    gate = threading.Event()
    real = rt.classify_mixed

    def held(rows):
        gate.wait(60)
        return real(rows)

    monkeypatch.setattr(rt, "classify_mixed", held)
    words = "great product terrible quality the box was broken my order arrived late".split()
    flood = [
        " ".join(words[(i * 3 + j) % len(words)] for j in range(8 + i % 30)) for i in range(200)
    ]
    finished: list[str] = []
    answers: dict = {}

    def classify(name, texts):
        answers[name] = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
        finished.append(name)

    big = threading.Thread(target=classify, args=("flood", flood))
    big.start()
    try:
        _wait_until(
            lambda: _gauge(client, "adaptory_queued_classify_texts", base) >= 100,
            "the flood was never queued in chunks",
        )
        small = threading.Thread(target=classify, args=("one", ["the battery lasts all day"]))
        small.start()
        _wait_until(lambda: scheduler.inbox.qsize() >= 1, "the small request never arrived")
        gate.set()
        small.join(120)
    finally:
        gate.set()
        big.join(120)
    assert finished == ["one", "flood"]
    for name, texts in (("one", ["the battery lasts all day"]), ("flood", flood)):
        response = answers[name]
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        solo = [rt.classify("sentiment", [text])[0] for text in texts]
        assert [d["label"] for d in data] == [s["label"] for s in solo]
        for got, want in zip(data, solo, strict=True):
            for label in LABELS:  # padded next to other texts vs alone: float noise only
                assert got["scores"][label] == pytest.approx(want["scores"][label], abs=1e-5)
    assert _gauge(client, "adaptory_queued_classify_texts", base) == 0


def test_classify_refuses_more_texts_than_the_limit(live):
    _, client, app = live
    limit = app.state.settings.max_classify_inputs
    response = client.post(
        "/v1/classify", json={"model": "sentiment", "input": ["x"] * (limit + 1)}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "too_many_inputs" and str(limit) in error["message"]


# --- clients that go away ------------------------------------------------------------------------


def test_a_non_streaming_client_that_disconnects_is_cancelled(one_row):
    url, client, app, base = one_row
    scheduler = app.state.schedulers[base]
    cancelled = _gauge(client, "adaptory_cancelled_requests_total", base)
    gone = _answered(client, 499)
    sock = _open_request(url, _endless(base))
    try:
        _wait_until(lambda: _gauge(client, "adaptory_active_rows", base) == 1, "never admitted")
    finally:
        sock.close()
    _wait_until(
        lambda: _gauge(client, "adaptory_active_rows", base) == 0,
        "the row kept decoding after its client left",
    )
    assert _gauge(client, "adaptory_cancelled_requests_total", base) == cancelled + 1
    _wait_until(lambda: not scheduler.jobs, "the scheduler kept the cancelled row's job")
    _wait_until(lambda: _answered(client, 499) == gone + 1, "the handler never saw the disconnect")


def test_a_stream_that_disconnects_after_its_first_token_is_cancelled(one_row):
    url, client, _, base = one_row
    cancelled = _gauge(client, "adaptory_cancelled_requests_total", base)
    sock = _open_request(url, _endless(base, stream=True))
    try:
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    _wait_until(
        lambda: _gauge(client, "adaptory_active_rows", base) == 0,
        "the row kept decoding after its client left",
    )
    assert _gauge(client, "adaptory_cancelled_requests_total", base) == cancelled + 1


def test_a_stream_that_disconnects_before_its_first_token_is_cancelled(one_row):
    """With one row per batch, a second request waits for the first to end; its client leaves
    while it waits. It must be cancelled then, not prefilled and run once the first ends."""
    url, client, app, base = one_row
    scheduler = app.state.schedulers[base]
    cancelled = _gauge(client, "adaptory_cancelled_requests_total", base)
    gone = _answered(client, 499)
    admitted = scheduler.admitted + 1  # the running one; counted just after its row is active
    running = _open_request(url, _endless(base))
    try:
        _wait_until(
            lambda: (
                _gauge(client, "adaptory_active_rows", base) == 1 and scheduler.admitted == admitted
            ),
            "never admitted",
        )
        waiting = _open_request(url, _endless(base, stream=True))
        _wait_until(lambda: scheduler.inbox.qsize() == 1, "the second request never queued")
        waiting.close()
        _wait_until(
            lambda: _answered(client, 499) == gone + 1, "the waiting client was not seen go"
        )
        assert _gauge(client, "adaptory_active_rows", base) == 1  # the first one still decodes
    finally:
        running.close()
    _wait_until(
        lambda: _gauge(client, "adaptory_active_rows", base) == 0 and scheduler.inbox.empty(),
        "a row kept decoding after its client left",
    )
    assert scheduler.admitted == admitted  # the waiting one was never prefilled
    assert _gauge(client, "adaptory_cancelled_requests_total", base) == cancelled + 2


# --- connections -------------------------------------------------------------------------------


def test_a_connection_that_never_finishes_its_headers_is_closed(live):
    url, client, app = live
    port = int(url.rsplit(":", 1)[1])
    assert app.state.settings.header_timeout_s == 1.0
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    partial = socket.create_connection(("127.0.0.1", port), timeout=30)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert silent.recv(1) == b""  # closed by the server, not timed out here
        assert partial.recv(1) == b""
        header = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 400
        with pytest.raises(OSError):  # one byte every 50 ms: the deadline still holds
            for byte in header:
                trickle.sendall(bytes([byte]))
                time.sleep(0.05)
    finally:
        for sock in (silent, partial, trickle):
            sock.close()
    assert client.get("/health").status_code == 200


def test_an_unexpected_exception_is_json_and_the_connection_stays_open(live):
    url, _, _ = live
    port = int(url.rsplit(":", 1)[1])
    head = f"Host: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        status, headers, body = _exchange(sock, b"GET /v1/boom HTTP/1.1\r\n" + head + b"\r\n")
        assert status == 500 and headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        bad = json.dumps({"model": "lora-a", "prompt": "x", "stream": True, "stream_options": "x"})
        status, _, body = _exchange(
            sock,
            b"POST /v1/completions HTTP/1.1\r\n" + head
            + f"Content-Type: application/json\r\nContent-Length: {len(bad)}\r\n\r\n{bad}".encode(),
        )  # fmt: skip
        assert status == 400 and "stream_options" in json.loads(body)["error"]["message"]
        status, _, body = _exchange(sock, b"GET /health HTTP/1.1\r\n" + head + b"\r\n")
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_breaker_refusal_is_answered_late_so_a_retry_loop_cannot_crowd_the_server():
    """The refusal carries Retry-After (the seconds left, rounded up) and is answered after
    REFUSAL_DELAY_S, or the seconds left when fewer; other invalid adapters are answered at once."""
    from adaptory.adapters.serving.http_errors import api_error
    from adaptory.adapters.serving.runtime import REFUSAL_DELAY_S, AdapterRefused
    from adaptory.registry.errors import InvalidAdapter

    long = api_error(AdapterRefused("refused", seconds_left=12.2))
    assert (long.status, long.code, long.headers) == (400, "invalid_adapter", {"Retry-After": "13"})
    assert long.delay_s == REFUSAL_DELAY_S
    short = api_error(AdapterRefused("refused", seconds_left=0.25))
    assert short.headers == {"Retry-After": "1"} and short.delay_s == 0.25
    plain = api_error(InvalidAdapter("bad header"))
    assert (plain.status, plain.code, plain.delay_s, plain.headers) == (
        400,
        "invalid_adapter",
        0.0,
        None,
    )
