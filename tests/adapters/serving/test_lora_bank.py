"""The batched mixed-LoRA path gives what PEFT's own mixed batch (adapter_names=) gives."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from adaptory.adapters.bases.loading import load_base
from adaptory.adapters.serving.lora_bank import LoraBank
from adaptory.registry.errors import ConfigError

ADAPTERS = {  # name: (rank, alpha, targets, rslora)
    "a": (4, 8, ["q_proj", "v_proj"], False),
    "b": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "c": (2, 4, ["gate_proj", "down_proj"], True),
}


@pytest.fixture(scope="module")
def saved_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    for seed, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            use_rslora=rslora,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base.model, config, adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base.model = model.unload()
    return root


def _load(folder, name):
    return (
        load_file(folder / name / "adapter_model.safetensors"),
        json.loads((folder / name / "adapter_config.json").read_text()),
    )


def _inputs(tokenizer):
    texts = ["the cat sat on the mat", "a red ball", "the dog ran", "my order arrived late", "tea"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_bank_matches_peft_mixed_batch(tiny_llama_dir, saved_adapters):
    rows = ["a", None, "b", "c", "a"]
    ref_base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    first = "a"
    peft_model = PeftModel.from_pretrained(
        ref_base.model, saved_adapters / first, adapter_name=first
    )
    for name in ADAPTERS:
        if name != first:
            peft_model.load_adapter(saved_adapters / name, adapter_name=name)
    inputs = _inputs(ref_base.tokenizer)
    with torch.no_grad():
        expected = peft_model(**inputs, adapter_names=[r or "__base__" for r in rows]).logits

    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    for name in ADAPTERS:
        bank.add(name, *_load(saved_adapters, name))
    with torch.no_grad(), bank.rows(rows):
        got = base.model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = base.model(**inputs).logits  # outside rows(): the plain base
    torch.testing.assert_close(plain[1], got[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0], got[0])


def test_remove_frees_the_slot_and_reuses_it(tiny_llama_dir, saved_adapters):
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    bank.add("a", *_load(saved_adapters, "a"))
    slot_b = bank.add("b", *_load(saved_adapters, "b"))
    size = bank.nbytes()
    bank.remove("b")
    assert bank.add("c", *_load(saved_adapters, "c")) == slot_b
    assert bank.nbytes() >= size  # stacks keep their slots; nothing reallocated per swap
    with pytest.raises(ConfigError):
        bank.add("a", *_load(saved_adapters, "a"))


def test_dora_is_refused(tiny_llama_dir, saved_adapters):
    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    state, cfg = _load(saved_adapters, "a")
    cfg["use_dora"] = True
    with pytest.raises(ConfigError, match="use_dora"):
        LoraBank(base.model).add("a", state, cfg)


def test_a_slot_freed_by_remove_carries_nothing_into_its_next_adapter(
    tiny_llama_dir, saved_adapters
):
    """ "b" adapts q/k/v/o; once removed, "a" (q and v only) takes its slot. Rows of "a" must get
    exactly PEFT's "a": none of b's k_proj/o_proj weights may stay behind in the slot."""
    ref_base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    peft_model = PeftModel.from_pretrained(ref_base.model, saved_adapters / "a", adapter_name="a")
    inputs = _inputs(ref_base.tokenizer)
    with torch.no_grad():
        expected = peft_model(**inputs).logits

    base = load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")
    bank = LoraBank(base.model)
    bank.add("b", *_load(saved_adapters, "b"))
    freed = bank.slots["b"]
    bank.remove("b")
    bank.add("a", *_load(saved_adapters, "a"))
    assert bank.slots["a"] == freed  # the freed slot was reused
    with torch.no_grad(), bank.rows(["a"] * len(inputs["input_ids"])):
        got = base.model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
