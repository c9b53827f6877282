"""Hostile HTTP input against a real uvicorn on 127.0.0.1: schemathesis over the app's own OpenAPI
schema, plus hand-made abuse (huge prompts and max_tokens, deep nesting, invalid UTF-8, NaN,
overflowing integers, slow clients). Every answer is a 4xx or a 2xx, never a 5xx, and bounded.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from reliability_helpers import ThreadedServer
from serving_helpers import make_lora, make_prefix, register

from adaptory.adapters.serving.server import (
    ServerSettings,
    build_runtimes,
    create_app,
    uvicorn_options,
)
from adaptory.registry import Registry
from adaptory.registry.testing import make_lora_folder

KEY = "sk-hostile-4c1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_tokens_limit": 32, "max_prompt_tokens": 64}
COUNTS: dict[str, int] = {}  # bad inputs tried, reported at the end of the module


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("hostile-server")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "a", seed=1), "lora-a", tiny_llama_dir)
    register(reg, make_prefix(tiny_llama_dir, root / "p", seed=3), "pfx-a", tiny_llama_dir)
    good = reg.resolve("lora-a")
    # right module names, wrong width: the runtime cannot find out before a forward pass
    reg.add(
        make_lora_folder(root / "w", hidden=32),
        name="wrong-width",
        task="causal-lm",
        base_model=good.base_model,
        base_fingerprint=good.base_fingerprint,
    )
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)], preload=["lora-a"])
    settings = ServerSettings(api_key=KEY, batch_window_ms=20, **LIMITS)
    app = create_app(runtimes, registry=reg, settings=settings)
    with ThreadedServer(app, **uvicorn_options(settings)) as url:  # as `adaptory serve` runs it
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield url, client, app
    print(f"\nHOSTILE-HTTP inputs tried: {COUNTS}")


def _no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text


# --- schemathesis ------------------------------------------------------------------------------

ANY = {}  # JSON Schema "anything": schemathesis generates every JSON type
BODIES = {
    "/v1/completions": {
        "model": {"type": "string", "enum": ["lora-a", "pfx-a", "nope", "lora-a:9"]},
        "prompt": ANY, "max_tokens": ANY, "temperature": ANY, "top_p": ANY, "seed": ANY,
        "stop": ANY, "stream": ANY, "n": ANY, "logprobs": ANY, "stream_options": ANY,
    },
    "/v1/chat/completions": {
        "model": {"type": "string", "enum": ["lora-a", "pfx-a", "nope"]},
        "messages": ANY, "max_tokens": ANY, "max_completion_tokens": ANY, "temperature": ANY,
        "stream": ANY, "stop": ANY, "seed": ANY,
    },
    "/v1/classify": {"model": ANY, "input": ANY},
    "/v1/adapters/load": {"model": ANY},
    "/v1/adapters/unload": {"model": ANY},
}  # fmt: skip


def _schema_with_bodies(raw: dict) -> dict:
    """The app's /openapi.json with each body's fields widened to any JSON type, so schemathesis
    also sends what the published schema forbids (wrong types, unknown models): the server must
    refuse it with a 4xx, never a 5xx. The published schema itself is fuzzed below."""
    for path, properties in BODIES.items():
        post = raw["paths"][path]["post"]
        post["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object", "properties": properties}}
            },
        }
    return raw


def test_schemathesis_every_endpoint_no_5xx_and_responses_match_the_schema(live):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
    )

    url, client, _ = live
    raw = client.get("/openapi.json").json()
    assert set(BODIES) | {"/v1/models", "/health", "/metrics"} <= set(raw["paths"])
    schema = schemathesis.openapi.from_dict(_schema_with_bodies(raw))
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = 5 if operation.method.upper() == "GET" else 25

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal tried
            tried += 1
            if isinstance(case.body, dict) and "max_tokens" not in case.body:
                case.body["max_tokens"] = 2  # keep generation short on 2 CPU cores
            response = case.call(base_url=url, headers=AUTH, timeout=60)
            case.validate_response(
                response,
                checks=[not_a_server_error, content_type_conformance, response_schema_conformance],
            )

        run()
    COUNTS["schemathesis cases"] = tried
    assert tried >= 100


def _published_schema_bounded(raw: dict) -> dict:
    """The app's own /openapi.json, request bodies from its protocol models, with only the sizes
    bounded so 2 CPU cores finish: models limited to served ones, few tokens, choices, prompts."""
    schemas = raw["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": ["lora-a", "pfx-a"]}
        props["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3},
                                         {"type": "null"}]}  # fmt: skip
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        if "best_of" in props:
            props["best_of"] = {"anyOf": [{"type": "integer", "minimum": 2, "maximum": 2},
                                          {"type": "null"}]}  # fmt: skip
        if name == "ChatCompletionRequest":
            props["messages"]["maxItems"] = 3
            props.pop("max_completion_tokens")
            schemas[name]["required"] = sorted({*schemas[name].get("required", []), "max_tokens"})
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for branch in prompt.get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = 3
    return raw


def test_schemathesis_from_the_published_schema_alone(live):
    """Bodies generated from /openapi.json as the server publishes it (the protocol models):
    no 5xx, every response in its documented shape. Only sizes are bounded for the CPU."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
    )

    url, client, _ = live
    schema = schemathesis.openapi.from_dict(
        _published_schema_bounded(client.get("/openapi.json").json())
    )
    tried, answered = 0, Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != "POST" or "adapters" in operation.path:
            continue

        @settings(
            max_examples=15, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal tried
            tried += 1
            response = case.call(base_url=url, headers=AUTH, timeout=120)
            answered[response.status_code] += 1
            case.validate_response(
                response,
                checks=[not_a_server_error, content_type_conformance, response_schema_conformance],
            )

        run()
    print("published-schema cases by status:", dict(answered))
    assert tried >= 40 and answered[200] > 0  # valid bodies were generated, and served


# --- hand-made abuse -----------------------------------------------------------------------------


def _answered(client, path, body, *, within_s: float):
    """POST and return the answer; no answer within `within_s` fails the test (a deadline for a
    hung request, not a speed claim: speed belongs in benchmarks)."""
    try:
        return _post(client, path, body, timeout=within_s)
    except httpx.TimeoutException:
        pytest.fail(f"{path} did not answer {str(body)[:80]} within {within_s} s (hung?)")


def _post(client, path, body=None, *, content=None, headers=None, timeout=None):
    if content is None:
        content = json.dumps(body, allow_nan=True)
    return client.post(
        path,
        content=content,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=timeout if timeout is not None else client.timeout,
    )


HUGE = 10**18
ABUSE = [
    ("prompt of 1 MB", {"model": "lora-a", "prompt": "the cat sat " * 90_000}, "body"),
    ("chat of 5,000 messages", {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}] * 5000}, "prompt"),
    ("max_tokens 10**18", {"model": "lora-a", "prompt": "x", "max_tokens": HUGE}, "max_tokens"),
    ("max_tokens 2**80", {"model": "lora-a", "prompt": "x", "max_tokens": 2**80}, "max_tokens"),
    ("max_tokens -1", {"model": "lora-a", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("max_tokens 1.5", {"model": "lora-a", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("max_tokens 'many'", {"model": "lora-a", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("temperature NaN", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "temperature": float("nan")}, "temperature"),
    ("temperature Infinity", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "temperature": float("inf")}, "temperature"),
    ("top_p NaN", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "top_p": float("nan")}, "top_p"),
    ("seed 2**100", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "seed": 2**100, "temperature": 1}, "seed"),
    ("seed -1", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "seed": -1, "temperature": 1}, "seed"),
    ("model as object", {"model": {"$ne": 1}, "prompt": "x"}, "model"),
    ("model path traversal", {"model": "../../etc/passwd", "prompt": "x"}, "not found"),
    ("model with NUL", {"model": "lora-a\x00", "prompt": "x"}, "not found"),
    ("stop of 10,000 chars", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "stop": ["s" * 10_000]}, None),
    ("stop list of 100", {"model": "lora-a", "prompt": "x", "stop": ["a"] * 100}, "stop"),
    ("prompt list of 2", {"model": "lora-a", "prompt": ["a", "b"]}, None),
    ("prompt list of 10,000", {"model": "lora-a", "prompt": ["a"] * 10_000, "max_tokens": 1}, "choices"),
    ("token ids past the vocabulary", {"model": "lora-a", "prompt": [1, 2**30]}, "outside the vocabulary"),
    ("token id list of lists of 1,000", {"model": "lora-a", "prompt": [[1]] * 1000, "n": 16}, "choices"),
    ("logit_bias of 10,000 entries", {"model": "lora-a", "prompt": "x", "logit_bias": {str(i): 1 for i in range(10_000)}}, "logit_bias"),
    ("prompt token ids", {"model": "lora-a", "prompt": [1, 2, 3]}, None),
    ("messages content list of images", {"model": "lora-a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
    ("messages role object", {"model": "lora-a", "messages": [{"role": {}, "content": "x"}]}, "role"),
    ("unknown role", {"model": "lora-a", "messages": [{"role": "wizard", "content": "x"}], "max_tokens": 2}, None),
    ("stream as string", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "stream": "yes"}, "stream"),
    ("stream 'false'", {"model": "lora-a", "prompt": "x", "max_tokens": 2, "stream": "false"}, "stream"),
    ("stream_options a string", {"model": "lora-a", "prompt": "x", "stream": True, "stream_options": "x"}, "stream_options"),
    ("stream_options a list", {"model": "lora-a", "prompt": "x", "stream": True, "stream_options": []}, "stream_options"),
    ("include_usage 'yes'", {"model": "lora-a", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ("best_of true", {"model": "lora-a", "prompt": "x", "best_of": True}, "best_of"),
    ("logprobs 0", {"model": "lora-a", "prompt": "x", "logprobs": 0}, None),
    ("logprobs 10**6", {"model": "lora-a", "prompt": "x", "logprobs": 10**6}, "logprobs"),
    ("chat part text an int", {"model": "lora-a", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "text"),
    ("chat part text an object", {"model": "lora-a", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}, "text"),
    ("classify 129 texts", {"model": "lora-a", "input": ["x"] * 129}, "at most 128"),
    ("classify a generator", {"model": "lora-a", "input": "x"}, "generates text"),
    ("classify 10,000 inputs of ints", {"model": "lora-a", "input": list(range(10_000))}, "input"),
    ("load the base", {"model": f"base:{'x'}"}, None),
]  # fmt: skip


@pytest.mark.parametrize(("label", "body", "needle"), ABUSE, ids=[a[0] for a in ABUSE])
def test_abusive_bodies_get_a_clear_4xx(live, label, body, needle):
    _, client, _ = live
    path = "/v1/completions"
    if "messages" in body:
        path = "/v1/chat/completions"
    elif "input" in body:
        path = "/v1/classify"
    elif "prompt" not in body:
        path = "/v1/adapters/load"
    response = _answered(client, path, body, within_s=60)
    COUNTS["hand-made bodies"] = COUNTS.get("hand-made bodies", 0) + 1
    _no_5xx(response)
    if needle is not None:
        assert response.status_code in (400, 404, 413, 422), response.text
        assert needle in response.json()["error"]["message"], response.text


RAW = [
    ("invalid UTF-8", b'{"model": "lora-a", "prompt": "\xff\xfe\xfa"}'),
    ("lone surrogate escape", b'{"model": "lora-a", "prompt": "\\ud800", "max_tokens": 2}'),
    ("deeply nested list (100k)", b"[" * 100_000 + b"]" * 100_000),
    ("deeply nested object (50k)", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("nested in a field (20k)", b'{"model": "lora-a", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    ("truncated JSON", b'{"model": "lora-a", "prompt": "x'),
    ("empty body", b""),
    ("JSON array", b"[1, 2, 3]"),
    ("JSON string", b'"hello"'),
    ("NUL bytes", b"\x00" * 1000),
    ("10 MB of spaces", b" " * 10_000_000),
    ("huge number literal", b'{"model": "lora-a", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "raw"), RAW, ids=[r[0] for r in RAW])
@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/adapters/load"]
)
def test_malformed_bodies_get_a_clear_4xx(live, label, raw, path):
    _, client, _ = live
    response = _post(client, path, content=raw)
    COUNTS["malformed bodies"] = COUNTS.get("malformed bodies", 0) + 1
    _no_5xx(response)
    if label == "10 MB of spaces":  # over --max-body-bytes: refused before it is read
        assert response.status_code == 413, response.text
    elif label != "lone surrogate escape":
        assert response.status_code == 400, response.text


def test_a_broken_adapter_fails_alone_even_in_a_shared_batch(live):
    """Concurrent requests: one for an adapter whose tensors do not fit the base, the rest for
    good adapters; the good ones must all succeed."""
    _, client, _ = live
    body = {"prompt": "the cat sat", "max_tokens": 4, "temperature": 0}
    models = ["wrong-width"] + ["lora-a", "pfx-a", "base:" + next(iter(live[2].state.runtimes))] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        responses = list(
            pool.map(lambda m: _post(client, "/v1/completions", {**body, "model": m}), models)
        )
    broken, good = responses[0], responses[1:]
    assert [r.status_code for r in good] == [200] * len(good), [
        r.text for r in good if r.status_code != 200
    ]
    assert broken.status_code in (400, 409, 422), broken.text[:200]
    assert "wrong-width" in broken.json()["error"]["message"]


# --- slow clients --------------------------------------------------------------------------------


def test_a_client_trickling_its_body_does_not_block_others(live):
    url, client, _ = live
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "lora-a", "prompt": "the cat", "max_tokens": 2}).encode()
    slow = []
    for _ in range(4):  # four slow clients at once
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        slow.append(sock)
    try:
        for i in range(3):  # while they trickle, others are answered in full
            for sock in slow:
                sock.sendall(body[i : i + 1])
            fast = _answered(
                client,
                "/v1/completions",
                {"model": "pfx-a", "prompt": "a", "max_tokens": 2},
                within_s=60,
            )
            assert fast.status_code == 200, fast.text
            assert fast.json()["choices"][0]["finish_reason"] in ("length", "stop")
            assert client.get("/health").status_code == 200
            for sock in slow:  # ...before any slow client has sent its whole body
                assert _nothing_received(sock), "a slow client was answered before its body ended"
            time.sleep(0.3)
        for sock in slow:
            sock.sendall(body[3:])
        for sock in slow:
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        for sock in slow:
            sock.close()
    COUNTS["slow clients"] = 4


def _nothing_received(sock: socket.socket) -> bool:
    """True when no byte is waiting on the socket (and it is still open)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)  # bytes, or b"" if closed: either way not "nothing"
        return False
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
        sock.settimeout(30)


def test_a_client_that_sends_headers_and_vanishes_changes_nothing(live):
    """Abandoned bodies leave nothing decoding. (Clients that leave mid-generation, with
    generations too long to end by themselves: test_server_isolation.py.)"""
    url, client, _ = live
    port = int(url.rsplit(":", 1)[1])
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = client.get("/metrics").text
        active = [ln for ln in metrics.splitlines() if ln.startswith("adaptory_active_rows{")]
        if all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in active):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"rows still active: {active}")
    assert (
        _post(
            client, "/v1/completions", {"model": "lora-a", "prompt": "x", "max_tokens": 2}
        ).status_code
        == 200
    )


# --- start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--api-key", ""], {}),
        (["--api-key", "   "], {}),
        (["--api-key", " sk-padded "], {}),
        ([], {"ADAPTORY_API_KEY": ""}),
        ([], {"ADAPTORY_API_KEY": "\t"}),
    ],
    ids=["empty flag", "blank flag", "padded flag", "empty env", "blank env"],
)
def test_an_empty_api_key_refuses_to_start(args, env, monkeypatch):
    """An empty ADAPTORY_API_KEY used to start the server with authentication off."""
    from click.testing import CliRunner

    from adaptory.cli.main import cli

    monkeypatch.delenv("ADAPTORY_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--base", "no-such-base", *args], env=env)
    assert result.exit_code == 2, result.output
    assert "API key" in result.output and "ADAPTORY_API_KEY" in result.output
    assert "Traceback" not in result.output and "no-such-base" not in result.output
