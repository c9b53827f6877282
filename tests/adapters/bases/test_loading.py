"""Base loading (4-bit for real, on the CPU), fingerprints and the from-scratch builder."""

from __future__ import annotations

import shutil

import pytest
import torch

from adaptory.adapters.bases.loading import (
    check_fingerprint,
    fingerprint_base,
    load_base,
    resolve_base,
)
from adaptory.adapters.bases.tiny import init_base
from adaptory.registry.errors import BaseMismatch, BaseNotFound, ConfigError


def test_causal_base_loads_in_4bit(tiny_llama_dir):
    import bitsandbytes as bnb

    base = load_base(str(tiny_llama_dir), task="causal-lm", quant="nf4", device="cpu")
    layer = base.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    assert base.fingerprint.quant == "nf4+dq"
    ids = base.tokenizer("the cat sat", return_tensors="pt")
    assert "token_type_ids" not in ids
    with torch.no_grad():
        logits = base.model(**ids).logits
    assert logits.shape[-1] == len(base.tokenizer)
    assert torch.isfinite(logits).all()


def test_unquantized_base_matches_4bit_closely_but_not_exactly(tiny_llama_dir):
    q = load_base(str(tiny_llama_dir), task="causal-lm", quant="nf4", device="cpu")
    f = load_base(str(tiny_llama_dir), task="causal-lm", quant="none", device="cpu")
    ids = q.tokenizer("the dog ran to the park", return_tensors="pt")
    with torch.no_grad():
        lq, lf = q.model(**ids).logits, f.model(**ids).logits
    assert not torch.equal(lq, lf)  # quantization really happened
    assert q.fingerprint.weights == f.fingerprint.weights
    assert q.fingerprint.digest != f.fingerprint.digest


def test_seq_cls_head_stays_unquantized_and_is_seeded(tiny_bert_dir):
    import bitsandbytes as bnb

    a = load_base(str(tiny_bert_dir), task="seq-cls", labels=["neg", "pos"], seed=3, device="cpu")
    b = load_base(str(tiny_bert_dir), task="seq-cls", labels=["neg", "pos"], seed=3, device="cpu")
    assert isinstance(a.model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(a.model.classifier) is torch.nn.Linear
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert a.model.config.id2label == {0: "neg", 1: "pos"}


def test_seq_cls_needs_labels(tiny_bert_dir):
    with pytest.raises(ConfigError):
        load_base(str(tiny_bert_dir), task="seq-cls")


def test_fingerprint_is_stable_and_sees_weight_and_tokenizer_changes(tiny_llama_dir, tmp_path):
    first = fingerprint_base(tiny_llama_dir)
    assert first == fingerprint_base(tiny_llama_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert fingerprint_base(copy) == first  # location does not matter
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = fingerprint_base(copy)
    assert changed.weights != first.weights and changed.tokenizer == first.tokenizer
    with pytest.raises(BaseMismatch):
        check_fingerprint(first.to_dict(), changed, what="adapter x:1")
    check_fingerprint(first.to_dict(), changed, what="adapter x:1", force=True)


def test_init_base_is_deterministic(tmp_path, test_corpus):
    a = tmp_path / "a"
    b = tmp_path / "b"
    init_base(a, size="tiny", corpus=[test_corpus], seed=1)
    init_base(b, size="tiny", corpus=[test_corpus], seed=1)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert fingerprint_base(a) == fingerprint_base(b)


def test_builtin_minilm_resolves_offline():
    source = resolve_base("minilm")
    assert (source.path / "model.safetensors").is_file()
    assert source.model_name == "sentence-transformers/all-MiniLM-L6-v2"


def test_unknown_base_is_a_clear_error(tmp_path):
    with pytest.raises(BaseNotFound, match="nope"):
        resolve_base("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseNotFound, match="config.json"):
        resolve_base(str(tmp_path / "empty"))


def test_the_shipped_corpus_is_found_as_package_data():
    """`base init` and the demo build their tokenizer from it (a moved module once lost it)."""
    from adaptory.adapters.bases.tiny import DEFAULT_CORPUS

    assert DEFAULT_CORPUS.is_file() and DEFAULT_CORPUS.stat().st_size > 10_000


def test_builtin_tinylm_is_shipped_and_loads_in_4bit():
    """The generation base ships as package data, byte-level, and loads offline in NF4."""
    from adaptory.adapters.bases.loading import list_bases, load_base

    source = resolve_base("tinylm")
    assert source.kind == "builtin" and source.hub_id is None
    assert source.model_name == str(source.path)  # not on the Hub: configs name the folder
    row = next(r for r in list_bases() if r["name"] == "tinylm")
    assert (row["kind"], row["task"], row["params"]) == ("builtin", "causal-lm", 3_017_984)
    for path in [source.path, *source.path.iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by others"
    base = load_base("tinylm", device="cpu")
    assert base.task == "causal-lm" and len(base.tokenizer) == 260
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
