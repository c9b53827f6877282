"""/metrics against the real app in-process (real adapters on the tiny 4-bit bases), read with
prometheus_client's own parser: requests, tokens and latency counted as the responses say, the
per-base families for every base, bounded endpoint labels, and the token-timing histograms."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import make_classifier, make_lora, register

from adaptory.adapters.serving.metrics import Metrics, endpoint_label
from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

KEY = "sk-metrics-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER_MD = Path(__file__).resolve().parents[3] / "docs" / "SERVER.md"
PER_BASE_STATS = {  # documented per-base counter/gauge -> its Runtime.stats() key
    "adaptory_resident_adapters": "resident",
    "adaptory_adapter_loads_total": "loads",
    "adaptory_adapter_evictions_total": "evictions",
    "adaptory_adapter_hits_total": "hits",
    "adaptory_adapter_load_failures_total": "load_failures",
    "adaptory_base_loads_total": "base_loads",
}
PER_SCHEDULER = {  # ... and its Scheduler attribute
    "adaptory_active_rows": "active",
    "adaptory_queued_classify_texts": "classify_backlog",
    "adaptory_cancelled_requests_total": "cancelled",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("metrics")
    reg = Registry(root / "home")
    register(reg, make_lora(tiny_llama_dir, root / "a", seed=1), "lora-a", tiny_llama_dir)
    register(reg, make_lora(tiny_llama_dir, root / "b", seed=2), "lora-b", tiny_llama_dir)
    labels = ["neg", "pos"]
    folder = make_classifier(tiny_bert_dir, root / "s", seed=5, labels=labels)
    register(reg, folder, "sentiment", tiny_bert_dir, task="seq-cls", labels=labels)
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)], preload=["lora-a", "sentiment"])
    settings = ServerSettings(api_key=KEY, max_tokens_limit=32, batch_window_ms=5)
    app = create_app(runtimes, registry=reg, settings=settings)
    with TestClient(app) as client:
        client.headers.update(AUTH)
        yield client, app


def scrape(client) -> dict[str, float]:
    """Every sample of /metrics as {'name{label="v",...}': value}, read by prometheus_client."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = s.name + json.dumps(dict(sorted(s.labels.items())), sort_keys=True)
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def picked(samples: dict[str, float], name: str, **labels) -> dict[tuple, float]:
    """The samples called `name` whose labels include `labels`, keyed by their other labels."""
    out = {}
    for key, value in samples.items():
        sample_name, _, label_json = key.partition("{")
        if sample_name != name:
            continue
        have = json.loads("{" + label_json)
        if all(have.get(k) == v for k, v in labels.items()):
            rest = tuple(sorted((k, v) for k, v in have.items() if k not in labels))
            out[rest] = value
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_requests_tokens_and_latency_match_what_was_answered(served):
    client, _ = served
    answered: Counter[tuple[str, str]] = Counter()
    prompt = generated = 0

    def call(method, path, endpoint, **kwargs):
        r = client.request(method, path, **kwargs)
        answered[endpoint, str(r.status_code)] += 1
        return r

    before = scrape(client)
    answered["/metrics", "200"] += 1  # a scrape shows up in the next one
    for body, path in (
        ({"model": "lora-a", "prompt": "the cat", "max_tokens": 3}, "/v1/completions"),
        ({"model": "lora-b", "prompt": ["the", "a dog sat"], "max_tokens": 2}, "/v1/completions"),
        (
            {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            "/v1/chat/completions",
        ),
    ):
        r = call("POST", path, path, json=body)
        assert r.status_code == 200, r.text
        prompt += r.json()["usage"]["prompt_tokens"]
        generated += r.json()["usage"]["completion_tokens"]
    stream = {
        "model": "lora-a", "prompt": "once", "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    r = call("POST", "/v1/completions", "/v1/completions", json=stream)
    assert r.status_code == 200, r.text
    events = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    prompt += usage["prompt_tokens"]
    generated += usage["completion_tokens"]
    assert generated > 0 and prompt > 0

    bad = call("POST", "/v1/completions", "/v1/completions", content=b"{not json")
    assert bad.status_code == 400
    refused = call("GET", "/v1/models", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert call("GET", "/v1/models", "/v1/models").status_code == 200
    assert call("GET", "/v1/models/lora-a", "/v1/models/{model}").status_code == 200
    assert call("GET", "/v1/models/zz-no-such", "/v1/models/{model}").status_code == 404
    assert call("GET", "/v1/models/zz-a/b:7", "/v1/models/{model}").status_code == 404
    assert call("GET", "/nowhere/x1", "other").status_code == 404
    assert call("GET", "/nowhere/x2", "other").status_code == 404
    classified = call(
        "POST", "/v1/classify", "/v1/classify", json={"model": "sentiment", "input": "ok"}
    )
    assert classified.status_code == 200, classified.text
    call("POST", "/tokenize", "/tokenize", json={"model": "lora-a", "prompt": "the cat"})
    call("POST", "/detokenize", "/detokenize", json={"model": "lora-a", "tokens": [1, 2]})
    assert call("GET", "/health", "/health", headers={"Authorization": ""}).status_code == 200
    after = scrape(client)

    counted = {
        (dict(k)["endpoint"], dict(k)["status"]): v
        for k, v in delta(
            picked(after, "adaptory_requests_total"), picked(before, "adaptory_requests_total")
        ).items()
    }
    assert counted == dict(answered)
    assert not any("nowhere" in key or "zz-" in key for key in after)  # no client path as label

    tokens = delta(after, before)
    assert tokens.get("adaptory_prompt_tokens_total{}") == prompt
    assert tokens.get("adaptory_generated_tokens_total{}") == generated

    per_endpoint = Counter()
    for (endpoint, _), n in answered.items():
        per_endpoint[endpoint] += n
    name = "adaptory_request_latency_seconds"
    counts = delta(picked(after, f"{name}_count"), picked(before, f"{name}_count"))
    assert {dict(k)["endpoint"]: v for k, v in counts.items()} == dict(per_endpoint)
    for endpoint, n in per_endpoint.items():
        buckets = delta(
            picked(after, f"{name}_bucket", endpoint=endpoint),
            picked(before, f"{name}_bucket", endpoint=endpoint),
        )
        assert buckets[(("le", "+Inf"),)] == n
        bounds = sorted(buckets, key=lambda k: float(dict(k)["le"]))
        cumulative = [buckets[b] for b in bounds]
        assert cumulative == sorted(cumulative), f"{endpoint}: buckets not cumulative"
        spent = delta(
            picked(after, f"{name}_sum", endpoint=endpoint),
            picked(before, f"{name}_sum", endpoint=endpoint),
        )
        assert spent[()] > 0


def test_every_base_has_its_per_base_series_and_they_read_the_runtimes(served):
    client, app = served
    r = client.post("/v1/adapters/load", json={"model": "lora-b"})
    assert r.status_code == 200, r.text
    causal = r.json()["base"]
    resident = r.json()["resident"]
    samples = scrape(client)
    runtimes, schedulers = app.state.runtimes, app.state.schedulers
    assert len(runtimes) == 2
    for name, key in PER_BASE_STATS.items():
        series = picked(samples, name)
        assert set(series) == {(("base", ref),) for ref in runtimes}, name
        for ref, rt in runtimes.items():
            assert series[(("base", ref),)] == rt.stats()[key], (name, ref)
    for name, attribute in PER_SCHEDULER.items():
        series = picked(samples, name)
        assert set(series) == {(("base", ref),) for ref in schedulers}, name
        for ref, scheduler in schedulers.items():
            assert series[(("base", ref),)] == getattr(scheduler, attribute), (name, ref)
    # what the load endpoint reported, independently of Runtime.stats()
    assert picked(samples, "adaptory_resident_adapters", base=causal)[()] == len(resident)
    for ref in runtimes:
        assert picked(samples, "adaptory_base_loads_total", base=ref)[()] == 1
        assert picked(samples, "adaptory_active_rows", base=ref)[()] == 0


def test_the_documented_table_is_what_the_server_exposes(served):
    client, _ = served
    section = SERVER_MD.read_text().split("### GET /metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(adaptory_[a-z_]+)`", section, flags=re.M))
    assert len(documented) >= 10
    text = client.get("/metrics").text
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    }
    assert exposed == documented
    assert not re.search(r"^\w+_created\b", text, flags=re.M)


def test_first_token_and_per_output_token_are_histograms_per_endpoint():
    metrics, other = Metrics(), Metrics()  # two in one process: private registries
    first = {"/v1/completions": [0.0007, 0.003, 0.003, 0.2], "/v1/chat/completions": [1.5]}
    per_token = {"/v1/completions": [0.004, 0.04]}
    for endpoint, values in first.items():
        for seconds in values:
            metrics.first_token(endpoint, seconds)
    for endpoint, values in per_token.items():
        for seconds in values:
            metrics.per_output_token(endpoint, seconds)
    samples = {}
    for family in text_string_to_metric_families(metrics.render({}, {})):
        for s in family.samples:
            samples[s.name + json.dumps(dict(sorted(s.labels.items())), sort_keys=True)] = s.value
    for name, observed in (
        ("adaptory_time_to_first_token_seconds", first),
        ("adaptory_time_per_output_token_seconds", per_token),
    ):
        counts = picked(samples, f"{name}_count")
        assert {dict(k)["endpoint"]: v for k, v in counts.items()} == {
            e: len(v) for e, v in observed.items()
        }
        for endpoint, values in observed.items():
            assert picked(samples, f"{name}_sum", endpoint=endpoint)[()] == pytest.approx(
                sum(values)
            )
            buckets = picked(samples, f"{name}_bucket", endpoint=endpoint)
            assert len(buckets) >= 10
            for (label,), n in buckets.items():
                bound = float(label[1])
                assert n == sum(v <= bound for v in values), (name, endpoint, label)
    lowest = min(
        float(dict(k)["le"])
        for k in picked(
            samples, "adaptory_time_to_first_token_seconds_bucket", endpoint="/v1/completions"
        )
    )
    assert lowest <= 0.001  # finer than the request latency's lowest bucket
    untouched = other.render({}, {})
    assert "adaptory_time_to_first_token_seconds_count" not in untouched
    assert "adaptory_requests_total{" not in untouched


@pytest.mark.parametrize(
    "path, label",
    [
        ("/v1/models", "/v1/models"),
        ("/v1/models/lora-a", "/v1/models/{model}"),
        ("/v1/models/base:/some/dir", "/v1/models/{model}"),
        ("/v1/models/", "other"),
        ("/v1/completions", "/v1/completions"),
        ("/v1/completions/", "other"),
        ("/tokenize", "/tokenize"),
        ("/detokenize", "/detokenize"),
        ("/V1/MODELS", "other"),
        ("/v1/modelsX", "other"),
        ("/health", "/health"),
    ],
)
def test_endpoint_labels_are_routes_never_client_paths(path, label):
    assert endpoint_label(path) == label


def test_served_requests_record_their_first_token_and_per_token_time(served):
    """Through the app: every completion or chat choice that answers records one first-token
    observation per request, of at most the request's own wall time, and one per-output-token
    observation per choice of 2+ tokens; a refused request records neither."""
    client, _ = served
    ttft, tpot = (
        "adaptory_time_to_first_token_seconds_count",
        ("adaptory_time_per_output_token_seconds_count"),
    )
    before = scrape(client)
    body = {"model": "lora-a", "prompt": ["the cat", "a dog"], "max_tokens": 4, "n": 2}
    body.update(temperature=0, ignore_eos=True)
    started = time.monotonic()
    assert client.post("/v1/completions", json=body).status_code == 200
    wall = time.monotonic() - started
    chat = {"model": "lora-a", "messages": [{"role": "user", "content": "hi"}]}
    chat.update(max_tokens=1, ignore_eos=True)
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    refused = {"model": "lora-a", "prompt": "x", "top_k": -5}
    assert client.post("/v1/completions", json=refused).status_code == 400
    after = scrape(client)

    def grew(name, endpoint):
        return sum(picked(after, name, endpoint=endpoint).values()) - sum(
            picked(before, name, endpoint=endpoint).values()
        )

    assert grew(ttft, "/v1/completions") == 1 and grew(ttft, "/v1/chat/completions") == 1
    seconds = grew("adaptory_time_to_first_token_seconds_sum", "/v1/completions")
    assert 0 < seconds <= wall  # the value is a duration of this request, not a clock reading
    assert grew(tpot, "/v1/completions") == 4  # 2 prompts x n=2, 4 tokens each
    assert grew(tpot, "/v1/chat/completions") == 0  # one token: no time between tokens
