"""The official `openai` client and `langchain-openai` against a real uvicorn on 127.0.0.1,
serving a tiny 4-bit Llama with a LoRA and a prefix adapter from a real registry: every
completions and chat parameter the server implements, sent the way these clients send it.

Oracles: the base's own tokenizer (transformers), each adapter alone under PEFT (its forward's
log-softmax, greedy decoding), the registry's catalog, and the server's own single-choice answers
where a parameter promises equality with them (`n` choices = seeds seed, seed+1, ...; a prompt
list = each prompt alone; a stream = the whole answer; langchain = the openai client)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import httpx
import openai
import pytest
import torch
from serving_helpers import _reference_model, make_lora, make_prefix, reference_greedy, register
from test_server_uvicorn import ThreadedServer
from transformers import AutoConfig, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from adaptory.adapters.serving.server import ServerSettings, build_runtimes, create_app
from adaptory.registry import Registry

KEY = "sk-clients-test"
ATOL = 1e-3  # logprobs against the PEFT reference (fp32 numerics on the CPU)
PROMPT = "the cat sat on the mat"
PROMPTS = ["the cat sat on the mat", "my order arrived late"]
SEED = 1234
EOS = 2  # the tiny Llama's </s> (checked against its tokenizer in the fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("clients")
    reg = Registry(root / "home")
    folders = {
        "lora-a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "pfx": make_prefix(tiny_llama_dir, root / "p", seed=3, virtual_tokens=4),
    }
    for name, folder in folders.items():
        register(reg, folder, name, tiny_llama_dir)
    before = int(time.time())
    runtimes = build_runtimes(reg, bases=[str(tiny_llama_dir)])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert tokenizer.eos_token_id == EOS
    return reg, runtimes, folders, tokenizer, before


@pytest.fixture(scope="module")
def live(setup):
    reg, runtimes, *_ = setup
    app = create_app(
        runtimes,
        registry=reg,
        settings=ServerSettings(api_key=KEY, max_batch=8, batch_window_ms=5),
    )
    with ThreadedServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(live):
    """For vLLM's /tokenize and /detokenize, which are not under /v1 (no openai method)."""
    with httpx.Client(
        base_url=live, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as session:
        yield session


def model_id(name: str, base_dir) -> str:
    return f"base:{base_dir}" if name == "base" else name


def folder_of(setup, name: str):
    return None if name == "base" else setup[2][name]


def reference_logprobs(base_dir, folder, ids: list[int]) -> torch.Tensor:
    """log-softmax of the adapter's own PEFT forward over `ids` (positions × vocabulary)."""
    model = _reference_model(str(base_dir), str(folder) if folder else None)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _from_name(name: str) -> bytes:
    """The bytes a logprobs token name stands for: `bytes:\\xNN...` (a token holding part of a
    character) or the token's text."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name.removeprefix("bytes:").split("\\x")[1:])
    return name.encode("utf-8")


def shown(name: str) -> str:
    """A token name as the tokenizer decodes that token alone (U+FFFD for part of a character)."""
    return _from_name(name).decode("utf-8", errors="replace")


def solo(client, **kwargs):
    """One completion of one prompt with one choice."""
    return client.completions.create(**kwargs).choices[0]


# -- prompts: lists, token ids, /tokenize and /detokenize ------------------------------------------


def test_n_choices_are_the_runs_seeded_seed_plus_j(client):
    """n=2 with a seed: choice j equals a single-choice request seeded seed + j."""
    asked = dict(model="lora-a", prompt=PROMPT, max_tokens=6, temperature=1.0)
    both = client.completions.create(n=2, seed=SEED, **asked)
    assert [c.index for c in both.choices] == [0, 1]
    alone = [solo(client, seed=SEED + j, **asked) for j in range(2)]
    assert [c.text for c in both.choices] == [a.text for a in alone]
    assert [c.finish_reason for c in both.choices] == [a.finish_reason for a in alone]
    assert alone[0].text != alone[1].text  # the seeds differ, so do the samples (seeded)


def test_a_prompt_list_times_n_is_prompt_major_and_usage_sums(client, setup):
    """2 prompts × n=2: 4 choices, prompt by prompt, each its solo run; usage counts each
    prompt's tokens (the tokenizer's count) once and every choice's tokens."""
    tokenizer = setup[3]
    asked = dict(model="pfx", max_tokens=5, temperature=1.0)
    out = client.completions.create(prompt=PROMPTS, n=2, seed=SEED, **asked)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(prompt=p, seed=SEED + j, **asked) for p in PROMPTS for j in (0, 1)
    ]
    assert [c.text for c in out.choices] == [a.choices[0].text for a in alone]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens


def test_token_id_prompts_equal_their_text(client, http, setup, tiny_llama_dir):
    """/tokenize gives the tokenizer's ids; those ids as a prompt (alone, or as a list of id
    lists) give the string prompt's greedy text; /detokenize gives the string back."""
    tokenizer = setup[3]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert tokenizer.bos_token_id not in ids[0]  # this tokenizer adds no BOS
    tokenized = http.post(
        "/tokenize", json={"model": "lora-a", "prompt": PROMPT, "return_token_strs": True}
    )
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["tokens"] == ids[0] and body["count"] == len(ids[0])
    assert body["token_strs"] == [tokenizer.decode([i]) for i in ids[0]]
    assert body["max_model_len"] == 256
    back = http.post("/detokenize", json={"model": "lora-a", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    with_bos = http.post("/detokenize", json={"model": "lora-a", "tokens": [1, *ids[0]]})
    assert with_bos.json() == {"prompt": PROMPT}  # special tokens are skipped, as vLLM

    asked = dict(model="lora-a", max_tokens=6, temperature=0)
    by_text = [solo(client, prompt=p, **asked).text for p in PROMPTS]
    assert solo(client, prompt=ids[0], **asked).text == by_text[0]
    listed = client.completions.create(prompt=ids, **asked)
    assert [c.text for c in listed.choices] == by_text
    assert listed.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    echoed = solo(client, prompt=ids[1], echo=True, **asked)
    assert echoed.text == PROMPTS[1] + by_text[1]


def test_a_token_id_outside_the_vocabulary_is_refused(client, setup):
    vocab = len(setup[3])
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lora-a", prompt=[5, vocab], max_tokens=2)
    assert str(vocab) in str(caught.value)


# -- scoring: echo, logprobs, best_of ---------------------------------------------------------


@pytest.mark.parametrize("name", ["lora-a", "pfx", "base"])
def test_echo_scoring_equals_the_adapter_alone(client, setup, tiny_llama_dir, name):
    """echo + logprobs=2 + max_tokens=0 (lm-eval's loglikelihood request): the prompt back, the
    first token's logprob null, the others PEFT's log-softmax; top dicts hold ≤ 3 entries (the 2
    best and the chosen token) and their best is the row's maximum."""
    tokenizer = setup[3]
    ids = tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(
        model=model_id(name, tiny_llama_dir), prompt=PROMPT, echo=True, logprobs=2, max_tokens=0
    )
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(tiny_llama_dir, folder_of(setup, name), ids)
    for position in range(1, len(ids)):
        expected = ref[position - 1]
        got = lp.token_logprobs[position]
        assert abs(got - float(expected[ids[position]])) <= ATOL, (name, position)
        top = lp.top_logprobs[position]
        assert 2 <= len(top) <= 3
        assert top[lp.tokens[position]] == got
        assert abs(max(top.values()) - float(expected.max())) <= ATOL
        best_two = torch.topk(expected, 2).indices.tolist()
        assert {tokenizer.decode([i]) for i in best_two} <= {shown(name) for name in top}


@pytest.mark.parametrize("name", ["pfx", "lora-a"])
def test_scoring_a_prompt_list_scores_each_prompt(client, setup, tiny_llama_dir, name):
    """lm-eval sends its loglikelihood requests as prompt lists of different lengths: each
    choice scores its own prompt as PEFT does, whatever the others' lengths."""
    tokenizer = setup[3]
    prompts = [*PROMPTS, "a red ball and a blue box. the dog ran to the park"]
    out = client.completions.create(model=name, prompt=prompts, echo=True, logprobs=0, max_tokens=0)
    assert [c.text for c in out.choices] == prompts
    for prompt, choice in zip(prompts, out.choices, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        ref = reference_logprobs(tiny_llama_dir, setup[2][name], ids)
        expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids)
        assert max(abs(a - b) for a, b in zip(got[1:], expected, strict=True)) <= ATOL


def test_greedy_logprobs_equal_the_reference_at_each_step(client, setup, tiny_llama_dir):
    """logprobs=1 on a greedy completion: each token is PEFT's argmax and its logprob PEFT's
    log-softmax at that step; with echo the prompt's tokens come first."""
    tokenizer = setup[3]
    ids = tokenizer(PROMPT)["input_ids"]
    steps: list = []
    expected = reference_greedy(tiny_llama_dir, setup[2]["lora-a"], ids, 6, logits=steps)
    assert len(expected) == 6  # no end of sequence within 6 steps (so all 6 are compared)
    out = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(expected)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in expected]
    for step, (token, logits) in enumerate(zip(expected, steps, strict=True)):
        row = torch.log_softmax(logits.float().cpu(), dim=-1)
        assert abs(lp.token_logprobs[step] - float(row[token])) <= ATOL, step
        assert len(lp.top_logprobs[step]) == 1  # greedy: the best is the chosen token
        assert abs(lp.top_logprobs[step][lp.tokens[step]] - float(row.max())) <= ATOL
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(6)]
    echoed = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True
    ).choices[0]
    assert echoed.text == PROMPT + choice.text
    assert echoed.logprobs.token_logprobs[len(ids) :] == lp.token_logprobs
    assert echoed.logprobs.text_offset[len(ids)] == len(PROMPT)


def test_best_of_returns_the_most_likely_of_its_samples(client):
    """best_of=3, n=1: the text of the n=3 request's choice (same seed) with the highest sum of
    token logprobs."""
    asked = dict(model="lora-a", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=SEED)
    three = client.completions.create(n=3, logprobs=0, **asked)
    sums = [sum(c.logprobs.token_logprobs) for c in three.choices]
    assert len(set(sums)) == 3  # no tie (seeded), so "the best" is one choice
    best = three.choices[sums.index(max(sums))].text
    assert sums.index(max(sums)) != 0  # else best_of would agree with plain n=1 by chance
    picked = client.completions.create(best_of=3, n=1, **asked)
    assert len(picked.choices) == 1 and picked.choices[0].index == 0
    assert picked.choices[0].text == best
    assert picked.choices[0].logprobs is None  # not asked for
    two = client.completions.create(best_of=3, n=2, **asked)
    order = sorted(range(3), key=lambda j: -sums[j])[:2]
    assert [c.text for c in two.choices] == [three.choices[j].text for j in order]
    assert [c.index for c in two.choices] == [0, 1]


def test_chat_logprobs_through_the_typed_response(client, setup, tiny_llama_dir):
    """logprobs=True, top_logprobs=2: one entry per generated token, each with 2 alternatives;
    the tokens spell the reply and their logprobs are PEFT's on the chat-rendered prompt."""
    tokenizer = setup[3]
    messages = [{"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    steps: list = []
    expected = reference_greedy(tiny_llama_dir, setup[2]["pfx"], ids, 5, logits=steps)
    out = client.chat.completions.create(
        model="pfx", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    content = choice.logprobs.content
    assert choice.message.content == tokenizer.decode(expected)
    replaced = b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace")
    assert replaced == choice.message.content
    assert out.usage.prompt_tokens == len(ids)
    for step, entry in enumerate(content[: len(expected)]):
        row = torch.log_softmax(steps[step].float().cpu(), dim=-1)
        assert shown(entry.token) == tokenizer.decode([expected[step]])
        assert bytes(entry.bytes) == _from_name(entry.token)
        assert abs(entry.logprob - float(row[expected[step]])) <= ATOL
        assert len(entry.top_logprobs) == 2
        best = torch.topk(row, 2)
        assert [shown(t.token) for t in entry.top_logprobs] == [
            tokenizer.decode([i]) for i in best.indices.tolist()
        ]
        for alt, value in zip(entry.top_logprobs, best.values.tolist(), strict=True):
            assert abs(alt.logprob - value) <= ATOL


SPLIT = "a café in 日本"  # "é", "日" and "本" are split across byte-level tokens


def test_tokens_that_split_a_character_are_named_by_their_bytes(client, http, setup):
    """echo + logprobs=5 on a prompt with non-ASCII characters, which this byte-level tokenizer
    splits into tokens that decode alone to U+FFFD: the names give back the prompt byte for byte,
    no two alternatives share a key (each dict holds the top 5 and the chosen token), the chosen
    token's entry is its own logprob, offsets are the characters' starts the tokenizer reports,
    and /tokenize names the tokens the same way."""
    tokenizer = setup[3]
    encoded = tokenizer(SPLIT, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    out = client.completions.create(model="lora-a", prompt=SPLIT, echo=True, logprobs=5,
                                    max_tokens=0)  # fmt: skip
    lp = out.choices[0].logprobs
    assert b"".join(_from_name(t) for t in lp.tokens) == SPLIT.encode("utf-8")
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)
    assert lp.text_offset == [start for start, _ in encoded["offset_mapping"]]
    for position in range(1, len(ids)):
        top = lp.top_logprobs[position]
        assert top[lp.tokens[position]] == lp.token_logprobs[position]
        # five names for five ids, and the chosen token's if it is not among them
        assert len(top) in (5, 6)
    tokenized = http.post(
        "/tokenize", json={"model": "lora-a", "prompt": SPLIT, "return_token_strs": True}
    )
    assert tokenized.json()["token_strs"] == lp.tokens


def test_chat_logprobs_bytes_are_the_tokens_own(client, setup):
    """A reply forced (logit_bias) to a token holding one byte of a character: its name is
    `bytes:\\xc3` and its `bytes` are [0xc3], not U+FFFD's three."""
    tokenizer = setup[3]
    lead = tokenizer.convert_tokens_to_ids("Ã")  # byte-level BPE's character for byte 0xC3
    out = client.chat.completions.create(
        model="lora-a", messages=[{"role": "user", "content": "hello"}], max_tokens=1,
        temperature=0, logprobs=True, top_logprobs=3, logit_bias={str(lead): 100},
    )  # fmt: skip
    (entry,) = out.choices[0].logprobs.content
    assert entry.token == "bytes:\\xc3" and entry.bytes == [0xC3]
    assert len({t.token for t in entry.top_logprobs}) == 3
    for alt in entry.top_logprobs:
        assert _from_name(alt.token) == bytes(alt.bytes)


# -- streams ------------------------------------------------------------------------------------


def test_completion_stream_with_n_equals_the_whole_answer(client):
    asked = dict(model="lora-a", prompt=PROMPTS, n=2, seed=SEED, max_tokens=6, temperature=1.0)
    whole = client.completions.create(**asked)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = []
    for chunk in client.completions.create(
        stream=True, stream_options={"include_usage": True}, **asked
    ):
        if chunk.usage is not None:
            usage.append(chunk.usage)
            assert chunk.choices == []
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert len(usage) == 1 and usage[0] == whole.usage


def test_chat_stream_with_n_equals_the_whole_answer(client):
    asked = dict(
        model="pfx",
        messages=[{"role": "user", "content": "hello"}],
        n=2,
        seed=SEED,
        max_tokens=6,
        temperature=1.0,
    )
    whole = client.chat.completions.create(**asked)
    assert [c.index for c in whole.choices] == [0, 1]
    texts: dict[int, str] = {0: "", 1: ""}
    roles, usage = set(), []
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **asked
    ):
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for c in chunk.choices:
            if c.delta.role:
                roles.add((c.index, c.delta.role))
            texts[c.index] += c.delta.content or ""
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert texts[0] != texts[1]  # seeds seed and seed+1 (seeded)
    assert len(usage) == 1 and usage[0] == whole.usage


def test_streamed_logprobs_add_up_to_the_whole_answer(client):
    """echo + logprobs=2 + n=2, streamed: per choice, the chunks' tokens, logprobs, top dicts and
    text offsets, concatenated, are the non-streamed answer's."""
    asked = dict(
        model="lora-a", prompt=PROMPT, n=2, seed=SEED, max_tokens=5, temperature=1.0,
        logprobs=2, echo=True,
    )  # fmt: skip
    whole = client.completions.create(**asked)
    fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    got = {i: {f: [] for f in fields} | {"text": ""} for i in (0, 1)}
    for chunk in client.completions.create(stream=True, **asked):
        for c in chunk.choices:
            got[c.index]["text"] += c.text
            for f in fields:
                got[c.index][f] += getattr(c.logprobs, f) if c.logprobs else []
    for i, choice in enumerate(whole.choices):
        assert got[i]["text"] == choice.text and choice.text.startswith(PROMPT)
        for f in fields:
            assert got[i][f] == getattr(choice.logprobs, f), (i, f)


def test_streamed_chat_logprobs_add_up_to_the_whole_answer(client):
    asked = dict(
        model="pfx", messages=[{"role": "user", "content": "hello"}], n=2, seed=SEED,
        max_tokens=5, temperature=1.0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    whole = client.chat.completions.create(**asked)
    got: dict[int, list] = {0: [], 1: []}
    for chunk in client.chat.completions.create(stream=True, **asked):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                got[c.index] += c.logprobs.content
    for i, choice in enumerate(whole.choices):
        assert [e.model_dump() for e in got[i]] == [e.model_dump() for e in choice.logprobs.content]
        spelled = b"".join(_from_name(e.token) for e in got[i])
        assert spelled.decode("utf-8", errors="replace") == choice.message.content


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.completions.create(
            model="lora-a", prompt=PROMPT, max_tokens=3, temperature=0, stream=True
        )
    )
    assert chunks and all(c.usage is None and c.choices for c in chunks)


# -- models -------------------------------------------------------------------------------------


def test_models_retrieve_an_adapter_and_the_base(client, setup, tiny_llama_dir):
    reg, before = setup[0], setup[4]
    entry = reg.resolve("lora-a")
    for ident in ("lora-a", "lora-a:1"):
        card = client.models.retrieve(ident)
        assert card.id == ident and card.object == "model"
        assert card.created == int(datetime.fromisoformat(entry.created_at).timestamp())
        assert card.parent == f"base:{tiny_llama_dir}"
    base = client.models.retrieve(f"base:{tiny_llama_dir}")
    assert base.id == f"base:{tiny_llama_dir}"
    assert before <= base.created <= int(time.time())  # loaded by this module's fixture
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ghost")


# -- sampling controls (vLLM's extras through extra_body) -------------------------------------


def test_logit_bias_forces_a_token(client, setup):
    tokenizer = setup[3]
    (cat,) = tokenizer(" cat", add_special_tokens=False)["input_ids"]
    out = client.completions.create(
        model="pfx", prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(cat): 100},
        logprobs=0,
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.text == tokenizer.decode([cat] * 5)
    assert choice.logprobs.tokens == [" cat"] * 5
    sampled = client.completions.create(
        model="pfx", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=SEED,
        logit_bias={str(cat): 100},
    )  # fmt: skip
    assert sampled.choices[0].text == " cat" * 5


def test_ignore_eos_runs_to_max_tokens(client, setup):
    """With end-of-sequence biased +100 a completion stops at once; with ignore_eos it runs to
    max_tokens (every token is </s>, skipped in the text)."""
    bias = {str(EOS): 100}
    stopped = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=7, temperature=0, logit_bias=bias
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage.completion_tokens == 1  # the </s> is counted, as vLLM
    out = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=7, temperature=0, logit_bias=bias, logprobs=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 7
    assert choice.logprobs.tokens == [setup[3].eos_token] * 7


def test_min_tokens_holds_back_the_end(client, setup):
    out = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=10, temperature=0, logit_bias={str(EOS): 100},
        extra_body={"min_tokens": 3}, logprobs=0,
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and out.usage.completion_tokens == 4
    assert choice.logprobs.tokens[-1] == setup[3].eos_token
    assert setup[3].eos_token not in choice.logprobs.tokens[:3]


def test_min_tokens_over_max_tokens_is_refused(client):
    """As vLLM (SamplingParams: min_tokens must be at most max_tokens), for completions and for
    a chat whose max_tokens is its default (the room left in the context)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="lora-a", prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 5}
        )
    assert "min_tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="lora-a", messages=[{"role": "user", "content": "hi"}],
            extra_body={"min_tokens": 300},
        )  # fmt: skip
    assert "min_tokens" in caught.value.body["message"]


def test_logit_bias_outside_the_vocabulary_is_refused(client, setup, tiny_llama_dir):
    """As vLLM ('token_id(s) [...] in logit_bias contain out-of-vocab token ids'): a bias
    nobody can apply is an error, not a silent no-op; the last id of the logits is fine."""
    vocab = AutoConfig.from_pretrained(str(tiny_llama_dir)).vocab_size  # the logits' width
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="lora-a", prompt=PROMPT, max_tokens=2, logit_bias={str(vocab): 5}
        )
    message = caught.value.body["message"]
    assert "logit_bias" in message and str(vocab) in message
    last = client.completions.create(
        model="lora-a", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=0,
        logit_bias={str(vocab - 1): 100},
    )  # fmt: skip
    assert last.choices[0].logprobs.tokens == [setup[3].decode([vocab - 1])] * 2


def test_stream_options_without_stream_is_refused(client):
    """As vLLM and OpenAI: stream_options only with stream: true."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="lora-a", prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True}
        )
    assert "stream_options" in caught.value.body["message"]


def test_stop_token_ids_end_before_the_token(client, setup, tiny_llama_dir):
    """A greedy run stopped at the last token it had not produced before (PEFT's greedy run
    says which): the text of the tokens before it (vLLM leaves the stop token's text out, and
    counts the token), finish_reason stop."""
    tokenizer = setup[3]
    ids = reference_greedy(
        tiny_llama_dir, setup[2]["lora-a"], tokenizer(PROMPTS[1])["input_ids"], 8
    )
    at = max(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    asked = dict(model="lora-a", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert solo(client, **asked).text == tokenizer.decode(ids)
    out = client.completions.create(extra_body={"stop_token_ids": [ids[at]]}, **asked)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == tokenizer.decode(ids[:at])
    assert out.usage.completion_tokens == at + 1


def _counts(logits, generated):
    return torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=len(logits))


def _frequency(logits, prompt, generated):
    return logits - 0.1 * _counts(logits, generated)


def _presence(logits, prompt, generated):
    return logits - 0.1 * (_counts(logits, generated) > 0)


def _repetition(logits, prompt, generated):
    seen = torch.tensor([[*prompt, *generated]])
    return RepetitionPenaltyLogitsProcessor(1.8)(seen, logits[None])[0]


def _repetition_of_the_output_only(logits, prompt, generated):
    return _repetition(logits, [], generated)


# a control's fields, its definition, and a plausible misreading the test must tell apart
CONTROLS = {
    "frequency_penalty": (dict(frequency_penalty=0.1), _frequency, _presence),
    "presence_penalty": (dict(presence_penalty=0.1), _presence, _frequency),
    "repetition_penalty": (
        dict(extra_body={"repetition_penalty": 1.8}),
        _repetition,
        _repetition_of_the_output_only,
    ),
}


def _greedy_shaped(model, prompt: list[int], shape, steps: int) -> list[int]:
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.tensor([[*prompt, *generated]], device=model.device)
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            generated.append(int(torch.argmax(shape(logits, prompt, generated))))
    return generated


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_penalties_equal_their_formulas_on_peft_logits(client, setup, tiny_llama_dir, control):
    """Greedy with a penalty: each step is the argmax of PEFT's logits reshaped by the
    penalty's definition (OpenAI's frequency/presence formula; transformers' repetition
    processor over prompt and output, as vLLM's), on a prompt whose plain greedy run repeats
    itself; the run differs from the one a misread definition gives."""
    fields, shape, rival = CONTROLS[control]
    tokenizer = setup[3]
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    model = _reference_model(str(tiny_llama_dir), str(setup[2]["lora-a"]))
    plain = reference_greedy(tiny_llama_dir, setup[2]["lora-a"], prompt, 8)
    assert len(set(plain)) < len(plain)  # it repeats, so the penalty has work to do
    expected = _greedy_shaped(model, prompt, shape, 8)
    assert EOS not in expected and expected != plain
    assert expected != _greedy_shaped(model, prompt, rival, 8)
    out = client.completions.create(
        model="lora-a", prompt=PROMPTS[1], max_tokens=8, temperature=0, **fields
    )
    assert out.choices[0].text == tokenizer.decode(expected)


@pytest.mark.parametrize(
    "cut", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}], ids=["top_k", "min_p", "top_p"]
)
def test_truncation_to_one_token_samples_the_greedy_run(client, cut):
    """top_k 1, min_p 1 and a vanishing top_p leave only the most likely token, so sampling at
    temperature 1 gives the greedy text whatever the seed."""
    asked = dict(model="pfx", prompt=PROMPTS[0], max_tokens=6)
    greedy = client.completions.create(temperature=0, **asked).choices[0].text
    fields = {"extra_body": cut} if "top_p" not in cut else cut
    for seed in (SEED, SEED + 1):
        out = client.completions.create(temperature=1.0, seed=seed, **fields, **asked)
        assert out.choices[0].text == greedy
    free = client.completions.create(temperature=1.0, seed=SEED, **asked).choices[0].text
    assert free != greedy  # without the cut, the same seed samples something else


def test_chat_without_max_tokens_runs_to_the_context(client, setup):
    """No max_tokens, end of sequence suppressed: the reply fills the base's 256 positions
    after the prompt (OpenAI's default), not a fixed 16 tokens."""
    tokenizer = setup[3]
    messages = [{"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    out = client.chat.completions.create(
        model="lora-a", messages=messages, temperature=0, logit_bias={str(EOS): -100}
    )
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 256 - prompt_tokens


def test_a_max_tokens_over_the_context_is_a_clear_400(client):
    """An explicit max_tokens is the client's, not a ceiling: past the base's 256 positions it
    is refused (as vLLM does), never silently shortened; only a chat without one fills the
    rest."""
    messages = [{"role": "user", "content": "hello"}]
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="lora-a", messages=messages, **{field: 256})
        assert "context of 256 tokens" in str(caught.value)
    # a completion's max_tokens null is its default (16), also a limit the context must hold
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lora-a", prompt=[5] * 250, max_tokens=None)
    assert "max_new_tokens (16) exceeds the base's context of 256 tokens" in str(caught.value)


# -- chat history, tools, response_format, unknown fields --------------------------------------


def test_assistant_tool_calls_in_the_history_are_accepted(client):
    history = [
        {"role": "user", "content": "what is the weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(
        model="lora-a", messages=history, max_tokens=3, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1


def test_tools_and_json_response_format_are_refused_by_name(client):
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="lora-a", messages=messages, tools=[tool])
    assert "tools" in str(caught.value)
    none = client.chat.completions.create(
        model="lora-a", messages=messages, tools=[tool], tool_choice="none", max_tokens=2
    )
    assert none.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="lora-a", messages=messages, response_format={"type": "json_object"}
        )
    assert "json_object" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="lora-a", messages=messages, extra_body={"guided_json": {"type": "object"}}
        )
    assert caught.value.body["code"] == "unknown_parameter"
    assert "guided_json" in caught.value.body["message"]


# -- langchain-openai with its defaults --------------------------------------------------------


class Recorder:
    """The JSON bodies a client sends, through its own httpx client (nothing is changed)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.statuses: list[int] = []

    def http_client(self) -> httpx.Client:
        return httpx.Client(
            event_hooks={"request": [self._request], "response": [self._response]}, timeout=60
        )

    def _request(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.content))

    def _response(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)


def test_langchain_llm_batch_and_generate_send_prompt_lists(client, live):
    """langchain_openai.OpenAI with its defaults (temperature 0.7, top_p 1, penalties 0, n 1;
    max_tokens lowered: its 256 overflows this base's 256-position context) sends the prompts as
    one list; each text equals that prompt completed alone with the same seed."""
    from langchain_openai import OpenAI

    recorder = Recorder()
    llm = OpenAI(
        model="lora-a", base_url=f"{live}/v1", api_key=KEY, max_tokens=6, seed=SEED,
        max_retries=0, http_client=recorder.http_client(),
    )  # fmt: skip
    prompts = [*PROMPTS, "a red ball"]
    expected = [
        solo(
            client, model="lora-a", prompt=p, max_tokens=6, temperature=0.7, top_p=1, seed=SEED
        ).text
        for p in prompts
    ]
    assert llm.batch(prompts) == expected
    generated = llm.generate(prompts)
    assert [g[0].text for g in generated.generations] == expected
    assert recorder.statuses and set(recorder.statuses) == {200}
    sent = recorder.bodies[-1]
    assert sent["prompt"] == prompts  # the list that used to be refused
    defaults = {
        "temperature": 0.7,
        "top_p": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "n": 1,
    }
    assert defaults.items() <= sent.items()
    assert llm.invoke(PROMPTS[0]) == expected[0]
    assert "".join(llm.stream(PROMPTS[0])) == expected[0]
    assert recorder.bodies[-1]["stream"] is True and set(recorder.statuses) == {200}


def test_langchain_llm_default_max_tokens_overflowing_the_context_is_a_clear_400(live):
    """langchain's default max_tokens (256) plus any prompt exceeds this base's 256 positions:
    a 400 that says so (vLLM answers the same), not a truncated or failed generation."""
    from langchain_openai import OpenAI

    llm = OpenAI(model="lora-a", base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    assert llm.max_tokens == 256
    with pytest.raises(openai.BadRequestError) as caught:
        llm.invoke(PROMPT)
    assert "context of 256 tokens" in str(caught.value)


def test_langchain_chat_invoke_stream_and_batch(client, live):
    from langchain_openai import ChatOpenAI

    recorder = Recorder()
    chat = ChatOpenAI(
        model="pfx", base_url=f"{live}/v1", api_key=KEY, max_tokens=6, temperature=0,
        max_retries=0, http_client=recorder.http_client(),
    )  # fmt: skip
    questions = ["hello", "what is the weather?"]
    expected = [
        client.chat.completions.create(
            model="pfx", messages=[{"role": "user", "content": q}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
        for q in questions
    ]
    reply = chat.invoke(questions[0])
    assert reply.content == expected[0]
    assert reply.usage_metadata["output_tokens"] >= 1
    streamed = list(chat.stream(questions[0]))
    assert "".join(c.content for c in streamed) == expected[0]
    assert [r.content for r in chat.batch(questions)] == expected
    # the async client (AsyncOpenAI under langchain's ainvoke/abatch), requests in flight together
    assert [r.content for r in asyncio.run(chat.abatch(questions))] == expected
    assert recorder.statuses and set(recorder.statuses) == {200}
    assert any(b.get("stream") for b in recorder.bodies)
    with_logprobs = ChatOpenAI(
        model="pfx", base_url=f"{live}/v1", api_key=KEY, max_tokens=4, temperature=0,
        max_retries=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    answer = with_logprobs.invoke(questions[0])
    content = answer.response_metadata["logprobs"]["content"]
    spelled = b"".join(bytes(c["bytes"]) for c in content)
    assert spelled.decode("utf-8", errors="replace") == answer.content
    assert all(len(c["top_logprobs"]) == 2 for c in content)


def test_langchain_chat_with_nothing_but_its_defaults(live, setup):
    """ChatOpenAI(model, base_url, api_key) sends only model, stream and messages: no
    max_tokens, so the reply may run to the end of the context (unseeded sampling)."""
    from langchain_openai import ChatOpenAI

    recorder = Recorder()
    chat = ChatOpenAI(
        model="lora-a", base_url=f"{live}/v1", api_key=KEY, max_retries=0,
        http_client=recorder.http_client(),
    )  # fmt: skip
    reply = chat.invoke("hello")
    assert recorder.bodies == [
        {"model": "lora-a", "stream": False, "messages": [{"role": "user", "content": "hello"}]}
    ]
    assert recorder.statuses == [200]
    tokenizer = setup[3]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    room = 256 - len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    usage = reply.usage_metadata
    assert 1 <= usage["output_tokens"] <= room
    finish = reply.response_metadata["finish_reason"]
    assert finish == "stop" or (finish == "length" and usage["output_tokens"] == room)
