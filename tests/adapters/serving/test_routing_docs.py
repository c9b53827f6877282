"""Routing and sampling as docs/SERVER.md promises them, over HTTP against the app in-process:
`NAME`, `NAME:VERSION` and `NAME:TAG`; a new version or a moved tag served without a restart;
imported adapters (no fingerprint) routed by base reference; a fingerprint mismatch refused
unless `--force`; the `adapter` response field; `top_p: 0`.

Which adapter ran is checked by its output: greedy text equal to PEFT's own single-adapter
forward passes (serving_helpers.reference_greedy), not only by the echoed field.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serving_helpers import make_lora, reference_greedy, register

from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

PROMPT = "the cat sat"
N = 6


def _app(reg, tiny_llama_dir, *, force: bool = False):
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)], force=force)
    settings = ServerSettings(batch_window_ms=5, max_tokens_limit=16)
    return create_app(runtimes, registry=reg, settings=settings), runtimes[str(tiny_llama_dir)]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("routing")
    reg = Registry(root / "home")
    folders = {f"v{i}": make_lora(tiny_llama_dir, root / f"v{i}", seed=10 + i) for i in (1, 2, 3)}
    folders["imported"] = make_lora(tiny_llama_dir, root / "imported", seed=20)
    folders["alien"] = make_lora(tiny_llama_dir, root / "alien", seed=21)
    for name in ("shout", "evolving"):  # only the new-version test changes "evolving"
        register(reg, folders["v1"], name, tiny_llama_dir)
        reg.tag(f"{name}:1", "prod")
    reg.add(folders["imported"], name="imported", task="causal-lm",
            base_model=str(tiny_llama_dir))  # fmt: skip  # no fingerprint, as `import` may leave it
    good = reg.resolve("shout:1").base_fingerprint
    reg.add(folders["alien"], name="alien", task="causal-lm", base_model=str(tiny_llama_dir),
            base_fingerprint={**good, "weights": "f" * 64})  # fmt: skip
    app, rt = _app(reg, tiny_llama_dir)
    with TestClient(app) as client:
        yield client, reg, rt, folders


def _complete(client, model: str, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def _expected(rt, tiny_llama_dir, folder) -> str:
    return rt.decode(reference_greedy(tiny_llama_dir, folder, rt.encode(PROMPT), N))


def _ran(client, rt, tiny_llama_dir, model: str, folder, adapter: str | None) -> None:
    """`model` answered 200, named `adapter`, echoed `model`, and produced `folder`'s text."""
    response = _complete(client, model)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    assert body["adapter"] == adapter
    assert body["choices"][0]["text"] == _expected(rt, tiny_llama_dir, folder), model


def test_name_version_tag_and_base_each_run_what_they_name(world, tiny_llama_dir):
    client, reg, rt, folders = world
    _ran(client, rt, tiny_llama_dir, "shout", folders["v1"], "shout:1")
    _ran(client, rt, tiny_llama_dir, "shout:1", folders["v1"], "shout:1")
    _ran(client, rt, tiny_llama_dir, "shout:prod", folders["v1"], "shout:1")
    _ran(client, rt, tiny_llama_dir, f"base:{tiny_llama_dir}", None, None)
    _ran(client, rt, tiny_llama_dir, str(tiny_llama_dir), None, None)
    # the adapters really differ, so equal texts above are not a coincidence
    texts = {_expected(rt, tiny_llama_dir, folders[k]) for k in ("v1", "v2", "v3")}
    assert len(texts | {_expected(rt, tiny_llama_dir, None)}) == 4


def test_chat_completions_carry_the_adapter_field_too(world, tiny_llama_dir):
    client, *_ = world
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    named = client.post("/v1/chat/completions", json={**body, "model": "shout:prod"})
    base = client.post("/v1/chat/completions", json={**body, "model": f"base:{tiny_llama_dir}"})
    assert named.status_code == 200 and base.status_code == 200, (named.text, base.text)
    assert named.json()["adapter"] == "shout:1" and named.json()["model"] == "shout:prod"
    assert base.json()["adapter"] is None


def test_a_new_version_and_a_moved_tag_are_served_without_a_restart(world, tiny_llama_dir):
    client, reg, rt, folders = world
    before = client.get("/v1/models").json()["data"]
    assert {m["id"]: m["ref"] for m in before}["evolving"] == "evolving:1"
    register(reg, folders["v2"], "evolving", tiny_llama_dir)  # same app, same runtimes
    _ran(client, rt, tiny_llama_dir, "evolving", folders["v2"], "evolving:2")
    _ran(client, rt, tiny_llama_dir, "evolving:1", folders["v1"], "evolving:1")
    _ran(client, rt, tiny_llama_dir, "evolving:prod", folders["v1"], "evolving:1")
    reg.tag("evolving:2", "prod")
    _ran(client, rt, tiny_llama_dir, "evolving:prod", folders["v2"], "evolving:2")
    listed = {m["id"]: m["ref"] for m in client.get("/v1/models").json()["data"]}
    assert listed["evolving"] == "evolving:2" and listed["evolving:1"] == "evolving:1"
    assert "evolving:prod" not in listed  # tags are not listed
    register(reg, folders["v3"], "evolving", tiny_llama_dir)
    _ran(client, rt, tiny_llama_dir, "evolving", folders["v3"], "evolving:3")


def test_an_imported_adapter_without_a_fingerprint_routes_by_its_base_reference(
    world, tiny_llama_dir
):
    client, reg, rt, folders = world
    assert not reg.resolve("imported").base_fingerprint
    _ran(client, rt, tiny_llama_dir, "imported", folders["imported"], "imported:1")
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {"imported", "imported:1"} <= ids


def test_a_fingerprint_mismatch_is_404_naming_the_base_unless_forced(world, tiny_llama_dir):
    client, reg, _, folders = world
    response = _complete(client, "alien")
    assert response.status_code == 404, response.text
    assert response.json()["error"] == {
        "message": f"adapter 'alien:1' is for base '{tiny_llama_dir}', which this server does "
        "not serve",
        "type": "not_found_error",
        "code": "model_not_found",
    }
    assert "alien" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    forced_app, forced_rt = _app(reg, tiny_llama_dir, force=True)
    with TestClient(forced_app) as forced:
        _ran(forced, forced_rt, tiny_llama_dir, "alien", folders["alien"], "alien:1")
        assert "alien:1" in {m["id"] for m in forced.get("/v1/models").json()["data"]}


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("nobody", "model 'nobody' not found"),
        ("shout:99", "model 'shout:99' not found"),
        ("shout:no-such-tag", "model 'shout:no-such-tag' not found"),
        ("a:b:c", "model 'a:b:c' not found"),
        ("../etc", "model '../etc' not found"),
    ],
)
def test_unknown_and_invalid_references_are_404_model_not_found(world, model, needle):
    client, *_ = world
    response = _complete(client, model)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("not_found_error", "model_not_found")
    assert error["message"].startswith(needle), error["message"]


@pytest.mark.parametrize(
    ("model", "code"),
    [
        (None, "missing_field"),
        ("", "missing_field"),
        (3, "invalid_model"),
        (["shout"], "invalid_model"),
    ],
)
def test_a_missing_or_non_string_model_is_400(world, model, code):
    client, *_ = world
    response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code), error
    assert "'model'" in error["message"], error


SEEDS = range(6)


def test_top_p_zero_keeps_only_the_most_likely_token(world, tiny_llama_dir):
    """SERVER.md: `top_p` 0 is greedy (the nucleus keeps the most likely token), whatever the
    temperature and seed; with `top_p` 1 the same seeds sample other texts."""
    client, _, rt, folders = world
    greedy = _expected(rt, tiny_llama_dir, folders["v1"])
    hot = {"temperature": 1.8}
    for seed in SEEDS:
        body = _complete(client, "shout:1", top_p=0, seed=seed, **hot).json()
        assert body["choices"][0]["text"] == greedy, seed
    sampled = [
        _complete(client, "shout:1", top_p=1, seed=seed, **hot).json()["choices"][0]["text"]
        for seed in SEEDS
    ]
    assert any(text != greedy for text in sampled), "seeds 0-5 all sampled the greedy text"
