"""The HTTP app in-process (TestClient): routing, OpenAI shapes, streaming, errors, auth, metrics,
classification, and adapters that fail alone. Real adapters on the real 4-bit tiny bases."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from serving_helpers import (
    fp32_4bit_reference,
    make_classifier,
    make_lora,
    make_prefix,
    reference_greedy,
    register,
)

from adaptory.adapters.serving.runtime import GenerationRequest
from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("server")
    reg = Registry(root / "home")
    folders = {
        "lora-a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "lora-b": make_lora(tiny_llama_dir, root / "b", seed=2, targets=("k_proj", "up_proj")),
        "pfx-a": make_prefix(tiny_llama_dir, root / "p", seed=3),
    }
    for name, folder in folders.items():
        register(reg, folder, name, tiny_llama_dir)
    labels = ["neg", "pos"]
    folders["sentiment"] = make_classifier(tiny_bert_dir, root / "s", seed=5, labels=labels)
    register(reg, folders["sentiment"], "sentiment", tiny_bert_dir, task="seq-cls", labels=labels)
    # an adapter whose stored weights were altered after registration
    broken = register(reg, make_lora(tiny_llama_dir, root / "x", seed=6), "broken", tiny_llama_dir)
    blob = reg.files(broken, verify=False) / "adapter_model.safetensors"
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x55
    blob.write_bytes(bytes(data))
    # an adapter made for another base: same weights file, wrong fingerprint
    fingerprint = dict(reg.resolve("lora-a").base_fingerprint, weights="f" * 64)
    reg.add(
        folders["lora-a"],
        name="alien",
        base_model=str(tiny_llama_dir),
        base_fingerprint=fingerprint,
    )
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)], preload=["lora-a", "sentiment"])
    settings = ServerSettings(
        api_key=KEY, max_tokens_limit=64, max_prompt_tokens=48, batch_window_ms=20
    )
    app = create_app(runtimes, registry=reg, settings=settings)
    with TestClient(app) as client:
        client.headers.update(AUTH)
        yield client, reg, runtimes, folders


def _causal(runtimes, tiny_llama_dir):
    return runtimes[str(tiny_llama_dir)]


def test_health_is_open_and_everything_else_needs_the_key(served):
    client, *_ = served
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
    ):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert KEY not in r.text
    assert client.post("/v1/completions", headers={"Authorization": ""}, json={}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401


def test_models_lists_bases_and_servable_adapters(served, tiny_llama_dir, tiny_bert_dir):
    client, *_ = served
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {f"base:{tiny_llama_dir}", f"base:{tiny_bert_dir}", "lora-a", "lora-a:1", "pfx-a"} <= ids
    assert "sentiment:1" in ids and "alien" not in ids  # alien's base is not served


def test_completions_equal_each_adapter_alone_under_concurrency(served, tiny_llama_dir):
    client, _, runtimes, folders = served
    rt = _causal(runtimes, tiny_llama_dir)
    cases = [
        (m, p)
        for m in ("lora-a", "lora-b", "pfx-a", f"base:{tiny_llama_dir}")
        for p in ("the cat", "a red ball")
    ]

    def call(case):
        model, prompt = case
        body = {"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0}
        return client.post("/v1/completions", json=body)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, cases))
    for (model, prompt), r in zip(cases, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion"
        folder = folders.get(model)
        expected = reference_greedy(tiny_llama_dir, folder, rt.encode(prompt), 5)
        assert body["choices"][0]["text"] == rt.decode(expected)
        assert body["usage"]["prompt_tokens"] == len(rt.encode(prompt))
        assert body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["finish_reason"] == "length"


def _sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_chat_equals_non_streaming(served):
    client, *_ = served
    body = {
        "model": "lora-b",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion"
    text = whole["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                       "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stop_and_seed(served):
    client, *_ = served
    body = {"model": "pfx-a", "prompt": "the dog", "max_tokens": 8, "temperature": 1.2, "seed": 11}
    one = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == one
    assert len(one) > 2, f"seed 11 sampled only {one!r}: too short to cut at a stop string"
    stop = one[1:3]
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == one[: one.find(stop)]


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        ({"prompt": "x"}, 400, "'model'"),
        ({"model": "lora-a"}, 400, "'prompt'"),
        ({"model": "nope", "prompt": "x"}, 404, "not found"),
        ({"model": "nope:7", "prompt": "x"}, 404, "not found"),
        ({"model": "lora-a", "prompt": "x", "n": 17}, 400, "'n'"),
        ({"model": "lora-a", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "lora-a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "lora-a", "prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"model": "lora-a", "prompt": "the cat sat " * 30}, 400, "prompt has"),
        ({"model": "sentiment", "prompt": "x"}, 400, "classifier"),
        ({"model": "alien", "prompt": "x"}, 404, "does not serve"),
    ],
)
def test_bad_completion_requests(served, payload, status, needle):
    client, *_ = served
    if isinstance(payload, bytes):
        r = client.post(
            "/v1/completions", content=payload, headers={"Content-Type": "application/json"}
        )
    else:
        r = client.post("/v1/completions", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] and "code" in error


def test_bad_chat_and_unknown_route(served):
    client, *_ = served
    r = client.post("/v1/chat/completions", json={"model": "lora-a", "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions", json={"model": "lora-a", "messages": [{"content": "x"}]}
    )
    assert r.status_code == 400
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_a_broken_adapter_fails_alone(served, tiny_llama_dir):
    client, *_ = served
    cases = ["broken", "lora-a", "broken", "pfx-a", "lora-b"]

    def call(model):
        return client.post(
            "/v1/completions", json={"model": model, "prompt": "the", "max_tokens": 3}
        )

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(call, cases))
    for model, r in zip(cases, responses, strict=True):
        if model == "broken":
            assert r.status_code == 500
            assert r.json()["error"]["code"] == "adapter_integrity"
            assert "broken:1" in r.json()["error"]["message"]
        else:
            assert r.status_code == 200, r.text
    r = client.post("/v1/adapters/load", json={"model": "broken"})
    assert r.status_code == 500
    assert client.get("/health").json()["status"] == "ok"


def test_classify(served, tiny_bert_dir):
    client, _, runtimes, _ = served
    texts = ["great product", "terrible quality", "the box was broken"]
    r = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    expected = runtimes[str(tiny_bert_dir)].classify("sentiment", texts)
    assert [d["label"] for d in data] == [e["label"] for e in expected]
    assert set(data[0]["scores"]) == {"neg", "pos"}
    assert client.post("/v1/classify", json={"model": "sentiment", "input": "one"}).json()["data"][
        0
    ]["label"]
    assert client.post("/v1/classify", json={"model": "lora-a", "input": "x"}).status_code == 400
    assert client.post("/v1/classify", json={"model": "sentiment", "input": []}).status_code == 400


def test_admin_load_unload_and_metrics(served, tiny_llama_dir):
    client, _, runtimes, _ = served
    before = client.get("/metrics").text
    r = client.post("/v1/adapters/load", json={"model": "lora-b"})
    assert r.status_code == 200 and "lora-b:1" in r.json()["resident"]
    r = client.post("/v1/adapters/unload", json={"model": "lora-b"})
    assert r.json()["unloaded"] is True and "lora-b:1" not in r.json()["resident"]
    assert client.post("/v1/adapters/load", json={"model": "ghost"}).status_code == 404
    done = client.post(
        "/v1/completions",
        json={"model": "lora-b", "prompt": "the", "max_tokens": 2, "ignore_eos": True},
    )  # exactly 2 tokens (unseeded sampling could end on EOS after one)
    assert done.json()["usage"]["completion_tokens"] == 2, done.text
    after = client.get("/metrics").text
    assert "# TYPE adaptory_requests_total counter" in after
    assert 'adaptory_requests_total{endpoint="/v1/completions",status="200"}' in after
    assert "adaptory_request_latency_seconds_bucket" in after

    def value(text, prefix):
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
        )

    assert (
        value(after, "adaptory_generated_tokens_total")
        >= value(before, "adaptory_generated_tokens_total") + 2
    )
    assert value(after, "adaptory_adapter_evictions_total") > value(
        before, "adaptory_adapter_evictions_total"
    )
    assert (
        value(after, "adaptory_adapter_loads_total")
        >= value(before, "adaptory_adapter_loads_total") + 1
    )
    assert "adaptory_resident_adapters{" in after


def test_no_admin_and_no_key(served, tiny_llama_dir):
    _, reg, runtimes, _ = served
    app = create_app(runtimes, registry=reg, settings=ServerSettings(admin=False))
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 200  # no key configured: open
        r = client.post("/v1/adapters/load", json={"model": "lora-a"})
        assert r.status_code == 403
        rt = _causal(runtimes, tiny_llama_dir)
        alone = rt.generate([GenerationRequest(prompt="the", adapter="lora-a", max_new_tokens=3)])[
            0
        ]
        r = client.post(
            "/v1/completions",
            json={"model": "lora-a", "prompt": "the", "max_tokens": 3, "temperature": 0},
        )
        assert r.json()["choices"][0]["text"] == alone.text


def test_oversized_bodies_are_refused_unread(served):
    client, *_ = served
    limit = client.app.state.settings.max_body_bytes
    big = b'{"model": "lora-a", "prompt": "' + b"a" * (limit + 10) + b'"}'
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "lora-a", "prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = client.post(
        "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_classify_truncates_long_texts_to_the_encoders_length(served, tiny_bert_dir):
    """The tiny BERT has 128 positions but its (MiniLM) tokenizer says 512: a 400-token text
    used to overflow the position table (500). Oracle: PEFT on the text cut to 128 tokens."""
    import torch
    from peft import PeftModel

    from adaptory.adapters.bases.loading import load_base

    client, _, _, folders = served
    long_text = " ".join(["the battery lasts all day and the screen is bright"] * 40)
    texts = [long_text, "great product"]
    r = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    base = load_base(str(tiny_bert_dir), task="seq-cls", labels=["neg", "pos"])
    assert (
        len(base.tokenizer(long_text)["input_ids"])
        > 128
        == base.model.config.max_position_embeddings
    )
    model = fp32_4bit_reference(
        PeftModel.from_pretrained(base.model, str(folders["sentiment"])).eval()
    )
    for text, got in zip(texts, r.json()["data"], strict=True):
        enc = base.tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(model(**enc.to(model.device)).logits.float(), dim=-1)[0].cpu()
        assert got["label"] == ["neg", "pos"][int(probs.argmax())]
        assert [got["scores"]["neg"], got["scores"]["pos"]] == pytest.approx(
            probs.tolist(), abs=1e-4
        )


def test_unloading_an_adapter_in_use_is_a_409(served, tiny_llama_dir):
    client, _, runtimes, _ = served
    rt = _causal(runtimes, tiny_llama_dir)
    held = rt.load("lora-b", pin=True)  # what a running row does to its adapter
    try:
        r = client.post("/v1/adapters/unload", json={"model": "lora-b"})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_in_use" and "lora-b:1" in error["message"]
        assert "lora-b:1" in rt.resident()
    finally:
        rt._release(held)
    r = client.post("/v1/adapters/unload", json={"model": "lora-b"})
    assert r.status_code == 200 and r.json()["unloaded"] is True


TEXT = {"model": "lora-a", "prompt": "the cat", "max_tokens": 2}
CHAT = {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_FIELDS = [
    (TEXT, {"stream": "false"}, "'stream': Input should be a valid boolean"),
    (TEXT, {"stream": 1}, "'stream': Input should be a valid boolean"),
    (TEXT, {"stream": True, "stream_options": "yes"}, "'stream_options': Input should be a valid dict"),
    (TEXT, {"stream": True, "stream_options": [1]}, "'stream_options': Input should be a valid dict"),
    (TEXT, {"stream": True, "stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage'"),
    (TEXT, {"stream_options": 5}, "'stream_options'"),
    (TEXT, {"best_of": True}, "'best_of': Input should be a valid integer"),
    (TEXT, {"best_of": "1"}, "'best_of'"),
    (TEXT, {"best_of": 1, "n": 2}, "best_of (1) must be at least n (2)"),
    (TEXT, {"best_of": 3, "stream": True}, "best_of larger than n cannot be streamed"),
    (TEXT, {"logprobs": 21}, "'logprobs': Input should be less than or equal to 20"),
    (TEXT, {"logprobs": True}, "'logprobs': Input should be a valid integer"),
    (CHAT, {"logprobs": 1}, "'logprobs': Input should be a valid boolean"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    (TEXT, {"echo": "no"}, "'echo': Input should be a valid boolean"),
    (TEXT, {"suffix": "!"}, "suffix"),
    (TEXT, {"logit_bias": {"a": 100}}, "logit_bias: 'a' is not a token id"),
    (TEXT, {"logit_bias": {"5": 101}}, "'logit_bias.5'"),
    (TEXT, {"logit_bias": [5]}, "'logit_bias': Input should be a valid dictionary"),
    (TEXT, {"frequency_penalty": "high"}, "'frequency_penalty'"),
    (TEXT, {"presence_penalty": 3}, "'presence_penalty'"),
    (TEXT, {"repetition_penalty": 0}, "'repetition_penalty'"),
    (TEXT, {"top_k": -2}, "'top_k'"),
    (TEXT, {"min_tokens": "3"}, "'min_tokens'"),
    (TEXT, {"ignore_eos": 1}, "'ignore_eos'"),
    (TEXT, {"stop_token_ids": [-1]}, "'stop_token_ids[0]'"),
    (TEXT, {"user": 42}, "'user': Input should be a valid string"),
    (TEXT, {"n": True}, "'n': Input should be a valid integer"),
    (TEXT, {"n": 0}, "'n'"),
    (TEXT, {"max_tokens": 0}, "max_tokens 0 scores the prompt: it needs echo"),
    (TEXT, {"response_format": {"type": "json_object"}}, "response_format 'json_object' is not supported"),
    (TEXT, {"frobnicate": True}, "unknown field 'frobnicate'"),
    (TEXT, {"min_tokens": 3}, "'min_tokens' (3) must be at most max_tokens (2)"),
    (TEXT, {"stream_options": {"include_usage": True}}, "only allowed with stream: true"),
    (TEXT, {"logit_bias": {"99999": 5}}, "token id 99999 is outside the vocabulary"),
    (TEXT, {"stop": ["x"] * 17}, "'stop'"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "no tool-call parser"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "'messages[0].content[0].text': Input should be a valid string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "'messages[0].content[0].text'"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "missing required field 'messages[0].content[0].text'"),
    (CHAT, {"messages": [{"role": "user", "content": ["hi"]}]}, "'messages[0].content[0]'"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "'messages[0].content[0].type': Input should be 'text'"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, "'content' may be null only"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "colour": "red"}]},
     "unknown field 'messages[0].colour'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "change", "needle"), BAD_FIELDS, ids=[f"{b is CHAT}-{c}" for b, c, _ in BAD_FIELDS]
)
def test_every_field_is_type_checked_before_a_job_is_queued(
    served, tiny_llama_dir, base, change, needle
):
    """These used to reach the scheduler (stream_options: a job ran, then a plain-text 500) or
    pass as something else ("false" streamed, True counted as best_of 1, 0 as logprobs off)."""
    client, *_ = served
    scheduler = client.app.state.schedulers[str(tiny_llama_dir)]
    admitted = scheduler.admitted
    path = "/v1/chat/completions" if base is CHAT else "/v1/completions"
    r = client.post(path, json={**base, **change})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert scheduler.admitted == admitted and scheduler.inbox.empty()


def test_answers_carry_openai_ids_and_objects(served):
    """Completions are `cmpl-…` text_completion objects, chats `chatcmpl-…` chat.completion."""
    client = served[0]
    done = client.post("/v1/completions", json={"model": "lora-a", "prompt": "the cat",
                                                "max_tokens": 2}).json()  # fmt: skip
    chat = client.post("/v1/chat/completions", json={
        "model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
    }).json()  # fmt: skip
    assert done["id"].startswith("cmpl-") and done["object"] == "text_completion", done
    assert chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion", chat
    assert len(done["id"]) == len("cmpl-") + 24 and len(chat["id"]) == len("chatcmpl-") + 24
