"""The hot-swap runtime on the real 4-bit tiny bases: mixed LoRA/prefix/base batches equal each
adapter alone under PEFT, rows joining mid-decode, LRU eviction without base reloads, refusals."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from serving_helpers import (
    make_classifier,
    make_lora,
    make_prefix,
    reference_classify,
    reference_greedy,
    register,
)

from adaptory.adapters.serving.runtime import DecodeBatch, GenerationRequest, Runtime
from adaptory.registry import Registry
from adaptory.registry.errors import BaseMismatch, ConfigError, IntegrityError

PROMPTS = ["the cat sat", "a red ball and a blue box", "my order", "the dog ran to the park. the"]


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama_dir):
    """A registry with two LoRA and two prefix adapters (different virtual-token counts)."""
    root = tmp_path_factory.mktemp("runtime")
    reg = Registry(root / "home")
    folders = {
        "lora-a": make_lora(tiny_llama_dir, root / "a", seed=1),
        "lora-b": make_lora(
            tiny_llama_dir, root / "b", seed=2, targets=("q_proj", "o_proj", "down_proj")
        ),
        "pfx-a": make_prefix(tiny_llama_dir, root / "p", seed=3, virtual_tokens=3),
        "pfx-b": make_prefix(tiny_llama_dir, root / "q", seed=4, virtual_tokens=5),
    }
    for name, folder in folders.items():
        register(reg, folder, name, tiny_llama_dir)
    folders[None] = None
    runtime = Runtime(str(tiny_llama_dir), registry=reg, max_adapters=8)
    return reg, folders, runtime


def _check_against_reference(base_dir, folders, rows, steps):
    for row in rows:
        ref_logits: list = []
        expected = reference_greedy(
            base_dir, folders[row.request.adapter], row.prompt_ids, steps, logits=ref_logits
        )
        assert row.result.token_ids == expected, row.request
        for mine, theirs in zip(row.logits, ref_logits, strict=False):
            assert torch.allclose(mine, theirs, atol=1e-4), (
                row.request,
                (mine - theirs).abs().max(),
            )


def test_mixed_batch_equals_each_adapter_alone(causal, tiny_llama_dir):
    reg, folders, runtime = causal
    requests = [
        GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], adapter=adapter, max_new_tokens=6)
        for i, adapter in enumerate(
            [None, "lora-a", "pfx-a", "lora-b", "lora-a", "pfx-b", None, "pfx-a"]
        )
    ]
    batch = DecodeBatch(runtime, keep_logits=True)
    rows = batch.add_many([(r, None) for r in requests])
    while batch.active:
        batch.step()
    _check_against_reference(tiny_llama_dir, folders, rows, 6)
    # the adapters really change outputs, so equality above means each row got its own adapter
    first = {(r.request.adapter, r.request.prompt): r.logits[0] for r in rows}
    assert not torch.allclose(first[None, PROMPTS[0]], first["lora-a", PROMPTS[0]], atol=1e-3)
    assert not torch.allclose(first[None, PROMPTS[2]], first["pfx-a", PROMPTS[2]], atol=1e-3)


def test_fp32_serving_keeps_the_dequantize_path(causal):
    """On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit layer on its first inference
    forward and computes it in bfloat16 from then on; `--numerics fp32` must not let it, so
    that served logits are those of training and `adaptory eval`. After serving, no 4-bit
    layer is repacked (on other CPUs this holds either way)."""
    import bitsandbytes as bnb

    _reg, _folders, runtime = causal
    assert runtime.numerics.name == "fp32"
    batch = DecodeBatch(runtime)
    batch.add_many(
        [(GenerationRequest(prompt=PROMPTS[0], adapter="lora-a", max_new_tokens=2), None)]
    )
    while batch.active:
        batch.step()
    layers = [m for m in runtime.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert layer.support_avx512bf16_for_cpu is False
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_rows_join_and_leave_between_steps(causal, tiny_llama_dir):
    reg, folders, runtime = causal
    batch = DecodeBatch(runtime, keep_logits=True)
    rows = batch.add_many(
        [
            (GenerationRequest(prompt=PROMPTS[1], adapter="pfx-b", max_new_tokens=6), None),
            (GenerationRequest(prompt=PROMPTS[2], adapter="lora-a", max_new_tokens=2), None),
        ]
    )
    batch.step()
    batch.step()  # the lora-a row has finished and left
    assert batch.active == 1
    rows += batch.add_many(
        [
            (GenerationRequest(prompt=PROMPTS[3], adapter="pfx-a", max_new_tokens=4), None),
            (GenerationRequest(prompt=PROMPTS[0], adapter=None, max_new_tokens=5), None),
            (GenerationRequest(prompt=PROMPTS[0], adapter="lora-b", max_new_tokens=5), None),
        ]
    )
    while batch.active:
        batch.step()
    for row in rows:
        _check_against_reference(tiny_llama_dir, folders, [row], row.request.max_new_tokens)


def test_seeded_sampling_does_not_depend_on_the_batch(causal):
    _, _, runtime = causal
    request = GenerationRequest(
        prompt=PROMPTS[0], adapter="lora-b", max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7
    )
    alone = runtime.generate([request])[0]
    others = [GenerationRequest(prompt=p, adapter="pfx-a", max_new_tokens=3) for p in PROMPTS]
    mixed = runtime.generate([*others, request])[-1]
    assert alone.token_ids == mixed.token_ids
    assert runtime.generate([request])[0].token_ids == alone.token_ids


def test_top_p_zero_is_greedy(causal):
    _, _, runtime = causal
    greedy = GenerationRequest(prompt=PROMPTS[1], adapter="lora-a", max_new_tokens=8)
    nucleus = GenerationRequest(
        prompt=PROMPTS[1], adapter="lora-a", max_new_tokens=8, temperature=1.0, top_p=0.0, seed=3
    )
    a, b = runtime.generate([greedy, nucleus])
    assert a.token_ids == b.token_ids


def test_stop_sequences_streaming_and_usage(causal):
    _, _, runtime = causal
    full = runtime.generate(
        [GenerationRequest(prompt=PROMPTS[1], adapter="lora-b", max_new_tokens=10)]
    )[0]
    assert full.finish_reason == "length" and full.completion_tokens == 10
    assert full.prompt_tokens == len(runtime.encode(PROMPTS[1]))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), full.text
    pieces: list[str] = []
    cut = runtime.generate(
        [GenerationRequest(prompt=PROMPTS[1], adapter="lora-b", max_new_tokens=10, stop=[stop])],
        on_text=lambda i, text: pieces.append(text),
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == cut.text


def test_chat_uses_the_chat_template(causal):
    _, _, runtime = causal
    messages = [{"role": "user", "content": "the cat sat"}]
    rendered = runtime.chat_prompt(messages)
    assert rendered.endswith("<|assistant|>\n")
    by_messages = runtime.generate(
        [GenerationRequest(messages=messages, adapter="lora-a", max_new_tokens=4)]
    )
    by_ids = runtime.generate(
        [
            GenerationRequest(
                prompt_ids=runtime.encode(rendered, chat=True), adapter="lora-a", max_new_tokens=4
            )
        ]
    )
    assert by_messages[0].token_ids == by_ids[0].token_ids


def test_lru_evicts_and_reloads_without_touching_the_base(causal, tiny_llama_dir):
    reg, folders, _ = causal
    runtime = Runtime(str(tiny_llama_dir), registry=reg, max_adapters=2)
    model = runtime.model
    request = lambda ref: GenerationRequest(prompt=PROMPTS[0], adapter=ref, max_new_tokens=4)  # noqa: E731
    first = runtime.generate([request("lora-a")])[0].token_ids
    runtime.generate([request("lora-b")])
    runtime.generate([request("pfx-a")])  # evicts lora-a (least recently used)
    assert runtime.resident() == ["lora-b:1", "pfx-a:1"]
    assert runtime.stats()["evictions"] == 1
    wrapped = [m for m in model.modules() if type(m).__name__ == "_Mixed"]
    assert all("lora-a:1" not in m.adapters for m in wrapped)  # its tensors are gone
    again = runtime.generate([request("lora-a")])[0].token_ids  # reloaded, evicting lora-b
    assert again == first
    runtime.generate([request("lora-a")])
    stats = runtime.stats()
    assert (stats["loads"], stats["evictions"], stats["base_loads"]) == (4, 2, 1)
    assert stats["hits"] >= 1
    assert runtime.model is model and runtime.base.model is model
    assert runtime.unload("lora-a") and not runtime.unload("lora-a")
    assert runtime.resident() == ["pfx-a:1"]
    # a batch needing more adapters than the bound keeps them all until its rows finish
    three = runtime.generate([request("lora-a"), request("lora-b"), request("pfx-b")])
    assert three[0].token_ids == first and len(runtime.resident()) == 2


def test_refusals_fail_only_that_adapter(causal, tiny_llama_dir, tmp_path):
    reg, folders, runtime = causal
    wrong = dict(reg.resolve("lora-a").base_fingerprint, weights="0" * 64)
    reg.add(folders["lora-a"], name="alien", base_model=str(tiny_llama_dir), base_fingerprint=wrong)
    with pytest.raises(BaseMismatch):
        runtime.load("alien")
    entry = reg.add(make_lora(tiny_llama_dir, tmp_path / "t", seed=9), name="tampered",
                    base_fingerprint=reg.resolve("lora-a").base_fingerprint)  # fmt: skip
    blob = reg.files(entry, verify=False) / "adapter_model.safetensors"
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        runtime.load("tampered")
    assert "tampered:1" not in runtime.resident()
    ok = runtime.generate([GenerationRequest(prompt="the", adapter="lora-a", max_new_tokens=2)])
    assert len(ok[0].token_ids) == 2


def test_classification_mixed_heads_equal_peft(tmp_path, tiny_bert_dir):
    reg = Registry(tmp_path / "home")
    texts = ["great product, would buy again", "terrible quality", "please reset my password"]
    specs = {"sentiment": ["neg", "pos"], "topic": ["billing", "shipping", "account"]}
    folders = {}
    for i, (name, labels) in enumerate(specs.items()):
        folders[name] = make_classifier(tiny_bert_dir, tmp_path / name, seed=10 + i, labels=labels)
        register(reg, folders[name], name, tiny_bert_dir, task="seq-cls", labels=labels)
    runtime = Runtime(str(tiny_bert_dir), registry=reg, task="seq-cls")
    rows = [(name, text) for text in texts for name in ("topic", "sentiment")]
    got = runtime.classify_mixed(rows)
    for name, labels in specs.items():
        expected, probs = reference_classify(tiny_bert_dir, folders[name], labels, texts)
        mine = [g for (n, _), g in zip(rows, got, strict=True) if n == name]
        assert [m["label"] for m in mine] == expected
        for m, p in zip(mine, probs, strict=True):
            assert list(m["scores"]) == labels
            assert torch.allclose(torch.tensor(list(m["scores"].values())), p, atol=1e-4)
    assert runtime.classify("sentiment", texts[:1])[0]["label"] in specs["sentiment"]
    with pytest.raises(ConfigError):
        runtime.generate([GenerationRequest(prompt="x", adapter="sentiment")])


def test_wrong_task_is_refused(causal, tmp_path, tiny_bert_dir):
    reg, _, runtime = causal
    folder = make_classifier(tiny_bert_dir, tmp_path / "c", seed=1, labels=["a", "b"])
    register(reg, folder, "clf", tiny_bert_dir, task="seq-cls", labels=["a", "b"])
    with pytest.raises(ConfigError, match="seq-cls"):
        runtime.load("clf")
