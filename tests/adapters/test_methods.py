"""Adapter kinds: registry of methods, PEFT configs, refused combinations, the saved head."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from adaptory.adapters.bases.loading import load_base
from adaptory.adapters.bases.quantize import keep_4bit_trainable
from adaptory.adapters.methods import METHODS, get_method, methods_for, spec_help
from adaptory.registry.errors import ConfigError


def test_every_method_is_registered_with_help():
    assert set(METHODS) >= {"lora", "prefix", "prompt", "ia3"}
    for method in METHODS.values():
        assert method.tasks and method.peft_type and method.default_lr > 0
        assert all(spec_help(method).values()), method.name
    assert methods_for("seq-cls") == ["ia3", "lora", "prompt"] or set(methods_for("seq-cls")) == {
        "ia3",
        "lora",
        "prompt",
    }
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("adapterdrop")


def test_spec_validation():
    lora = get_method("lora")
    assert lora.spec_from({"rank": 4, "dora": True}).rank == 4
    with pytest.raises(ConfigError):
        lora.spec_from({"rank": 0})
    with pytest.raises(ConfigError):
        get_method("prefix").spec_from({"virtual_tokens": 0})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only spin (bitsandbytes' OpenMP dequant
    stalls badly on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert_cls(tiny_bert_dir):
    base = load_base(str(tiny_bert_dir), task="seq-cls", labels=["a", "b"], device="cpu")
    keep_4bit_trainable(base.model)
    return base


@pytest.fixture(scope="module")
def llama_lm(tiny_llama_dir):
    return load_base(str(tiny_llama_dir), task="causal-lm", device="cpu")


def test_default_targets_per_architecture(bert_cls, llama_lm):
    lora = get_method("lora")
    cfg = lora.to_peft_config(lora.spec_from({}), "causal-lm", llama_lm.model)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    cfg = lora.to_peft_config(lora.spec_from({}), "seq-cls", bert_cls.model)
    assert "attention.output.dense" in cfg.target_modules and "dense" not in cfg.target_modules
    assert set(cfg.modules_to_save) >= {"classifier", "pooler"}
    cfg = lora.to_peft_config(
        lora.spec_from({"target_modules": ["all"]}), "causal-lm", llama_lm.model
    )
    assert "down_proj" in cfg.target_modules


def test_prefix_on_classification_is_refused_with_a_reason(bert_cls):
    with pytest.raises(ConfigError, match="does not support task seq-cls") as info:
        get_method("prefix").to_peft_config(
            get_method("prefix").spec_from({}), "seq-cls", bert_cls.model
        )
    assert "lora" in info.value.hint


def test_bert_pooler_stays_unquantized(bert_cls):
    import torch

    assert type(bert_cls.model.bert.pooler.dense) is torch.nn.Linear


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_seq_cls_head_and_pooler_are_saved(tmp_path, tiny_bert_dir, method):
    from peft import get_peft_model

    base = load_base(str(tiny_bert_dir), task="seq-cls", labels=["a", "b"], device="cpu")
    m = get_method(method)
    model = get_peft_model(base.model, m.to_peft_config(m.spec_from({}), "seq-cls", base.model))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys)
    assert any("pooler" in k for k in keys)
