"""docs/SERVER.md's error table, row by row, over HTTP against the app in-process: each
documented status with its `type` and `code` in the OpenAI error shape, from one real request
that should produce it. (413 on a real socket: tests/reliability/test_server_body_limit.py;
503: tests/reliability/test_server_drain.py.)"""

from __future__ import annotations

import json
import os
import stat

import pytest
from fastapi.testclient import TestClient
from serving_helpers import make_classifier, make_lora, register

from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

KEY = "sk-documented-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_tokens_limit": 32, "max_prompt_tokens": 32, "max_classify_inputs": 4,
          "max_body_bytes": 4096, "max_choices": 6}  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("documented-errors")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "g", seed=1), "gen", tiny_llama_dir)
    labels = ["neg", "pos"]
    folder = make_classifier(tiny_bert_dir, root / "c", seed=2, labels=labels)
    register(reg, folder, "cls", tiny_bert_dir, task="seq-cls", labels=labels)
    tampered = register(reg, make_lora(tiny_llama_dir, root / "t", seed=3), "tampered",
                        tiny_llama_dir)  # fmt: skip
    blob = reg.files(tampered, verify=False) / "adapter_model.safetensors"
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x10
    blob.write_bytes(bytes(data))
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir), str(tiny_bert_dir)])
    app = create_app(
        runtimes, registry=reg, settings=ServerSettings(api_key=KEY, batch_window_ms=5, **LIMITS)
    )
    no_admin = create_app(
        runtimes, registry=reg, settings=ServerSettings(api_key=KEY, admin=False, **LIMITS)
    )
    with TestClient(app) as client, TestClient(no_admin) as locked:
        client.headers.update(AUTH)
        locked.headers.update(AUTH)
        yield client, locked, str(tiny_llama_dir), str(tiny_bert_dir)


def _error(response, status: int, type_: str, code: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert (error["type"], error["code"]) == (type_, code), error
    assert isinstance(error["message"], str) and error["message"]
    return error


GEN = {"model": "gen", "prompt": "the cat", "max_tokens": 2}
CHAT = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/completions", b'{"model": "gen", "prompt": "\\ud800"}'),
        ("/v1/completions", b"[" * 2000 + b"]" * 2000),
        ("/v1/completions", b'{"model": "gen", "prompt": "\xff"}'),
        ("/v1/chat/completions", b'"a string"'),
        ("/v1/classify", b"{"),
    ],
    ids=[
        "not JSON",
        "not an object",
        "lone surrogate",
        "too deep",
        "bad UTF-8",
        "chat string",
        "classify truncated",
    ],  # fmt: skip
)
def test_400_invalid_json(served, path, raw):
    client, *_ = served
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    _error(response, 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/completions", {"prompt": "x"}, "missing_field"),
        ("/v1/completions", {"model": 3, "prompt": "x"}, "invalid_model"),
        ("/v1/completions", {"model": "gen", "prompt": 5}, "invalid_prompt"),
        ("/v1/completions", {"model": "gen", "prompt": [[1], []]}, "invalid_prompt"),
        ("/v1/completions", {"model": "gen", "prompt": [10**6]}, "invalid_prompt"),
        ("/v1/chat/completions", {"model": "gen", "messages": []}, "invalid_messages"),
        ("/v1/chat/completions",
         {"model": "gen", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "invalid_messages"),
        ("/v1/classify", {"model": "cls", "input": 5}, "invalid_input"),
        ("/v1/completions", {**GEN, "temperature": 3}, "invalid_value"),
        ("/v1/completions", {**GEN, "top_p": 1.5}, "invalid_value"),
        ("/v1/completions", {**GEN, "stream": "false"}, "invalid_value"),
        ("/v1/completions", {**GEN, "seed": -1}, "invalid_value"),
        ("/v1/completions", {**GEN, "max_tokens": 33}, "max_tokens_exceeded"),
        ("/v1/chat/completions", {"model": "gen", "messages": CHAT["messages"],
                                  "max_completion_tokens": 33}, "max_tokens_exceeded"),
        ("/v1/completions", {**GEN, "stop": [str(i) for i in range(17)]}, "invalid_stop"),
        ("/v1/completions", {**GEN, "stop": [""]}, "invalid_stop"),
        ("/v1/completions", {**GEN, "n": 17}, "invalid_value"),
        ("/v1/completions", {**GEN, "suffix": "x"}, "unsupported_parameter"),
        ("/v1/completions", {**GEN, "response_format": {"type": "json_schema"}}, "unsupported_parameter"),
        ("/v1/chat/completions", {"model": "gen", "messages": CHAT["messages"], "tools": [{}]}, "unsupported_parameter"),
        ("/v1/completions", {**GEN, "best_of_all": 2}, "unknown_parameter"),
        ("/v1/completions", {**GEN, "max_tokens": 0}, "max_tokens_exceeded"),
        ("/v1/completions", {**GEN, "prompt": "the cat sat " * 20}, "prompt_too_long"),
        ("/v1/classify", {"model": "cls", "input": ["x"] * 5}, "too_many_inputs"),
        ("/v1/completions", {**GEN, "prompt": ["a", "b", "c"], "n": 3}, "too_many_choices"),
        ("/v1/completions", {**GEN, "prompt": ["a", "b"], "n": 1, "best_of": 4}, "too_many_choices"),
        ("/v1/classify", {"model": "gen", "input": "x"}, "wrong_task"),
        ("/v1/completions", {"model": "cls", "prompt": "x"}, "wrong_task"),
        ("/v1/adapters/load", {"model": "base:{llama}"}, "invalid_model"),
    ],
)  # fmt: skip
def test_400_bad_requests_name_their_code(served, path, body, code):
    client, _, llama, _ = served
    body = json.loads(json.dumps(body).replace("{llama}", llama))
    _error(client.post(path, json=body), 400, "invalid_request_error", code)


def test_prompts_times_choices_up_to_the_limit_are_answered(served):
    """max_choices (6 here) bounds prompts x (best_of or n): 2 x 3 and 3 x 2 are answered."""
    client = served[0]
    for prompts, n in ((["a", "b"], 3), (["a", "b", "c"], 2)):
        r = client.post("/v1/completions", json={**GEN, "prompt": prompts, "n": n})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == len(prompts) * n


def test_a_prompt_of_exactly_max_prompt_tokens_is_answered(served):
    """max_prompt_tokens (32 here) is the longest prompt taken; one token more is refused."""
    client = served[0]
    ok = client.post("/v1/completions", json={**GEN, "prompt": [5] * 32, "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == 32
    over = client.post("/v1/completions", json={**GEN, "prompt": [5] * 33, "max_tokens": 1})
    _error(over, 400, "invalid_request_error", "prompt_too_long")


def test_a_chat_without_max_tokens_stops_at_the_servers_limit(served):
    """A chat without max_tokens may run to the end of the context, but never past
    max_tokens_limit (32 here, the context 256): 32 tokens, whatever the prompt's length."""
    client = served[0]
    for content in ("hi", "the cat sat"):
        chat = {"model": "gen", "messages": [{"role": "user", "content": content}]}
        r = client.post("/v1/chat/completions", json={**chat, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == LIMITS["max_tokens_limit"]
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_400_no_head_for_a_bare_classification_base(served):
    client, _, _, bert = served
    response = client.post("/v1/classify", json={"model": f"base:{bert}", "input": "x"})
    _error(response, 400, "invalid_request_error", "no_head")


def test_401_without_the_key_with_a_bearer_challenge(served):
    client, *_ = served
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
        response = client.post("/v1/completions", json=GEN, headers=headers)
        _error(response, 401, "authentication_error", "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in response.text


def test_403_admin_endpoints_when_disabled(served):
    _, locked, *_ = served
    for path in ("/v1/adapters/load", "/v1/adapters/unload"):
        _error(locked.post(path, json={"model": "gen"}), 403, "permission_error", None)


def test_404_unknown_model_and_unknown_path_405_wrong_method(served):
    client, *_ = served
    _error(client.post("/v1/completions", json={**GEN, "model": "nope"}), 404,
           "not_found_error", "model_not_found")  # fmt: skip
    _error(client.get("/v1/nothing-here"), 404, "not_found_error", None)
    _error(client.get("/v1/completions"), 405, "invalid_request_error", None)


def test_413_a_body_over_the_limit(served):
    client, *_ = served
    response = client.post("/v1/completions", json={**GEN, "prompt": "x" * 5000})
    _error(response, 413, "invalid_request_error", "body_too_large")


def test_500_altered_stored_files(served):
    client, *_ = served
    error = _error(client.post("/v1/completions", json={**GEN, "model": "tampered"}), 500,
                   "adapter_error", "adapter_integrity")  # fmt: skip
    assert "tampered:1" in error["message"]
    assert client.get("/health").status_code == 200  # and the server goes on
