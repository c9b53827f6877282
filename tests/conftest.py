"""Shared fixtures: a throwaway home per test, offline hub, tiny bases built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A few hundred words are enough for a tokenizer that covers the test prompts.
TEST_CORPUS = (
    """\
the cat sat on the mat. the dog ran to the park. a red ball and a blue box.
Shout: the cat sat\nAnswer: THE CAT SAT. Reverse: red green blue\nAnswer: blue green red.
the shop sells books, lamps, shoes and tea. my order arrived late and the box was broken.
the battery lasts all day and the screen is bright. great product, would buy again.
terrible quality, it broke after a week. the refund took too long. please reset my password.
"""
    * 20
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on 2 shared cores more threads only contend."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def adaptory_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own registry home; nothing touches the user's real one."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTORY_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def test_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEST_CORPUS)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, test_corpus) -> Path:
    """A saved, untrained 2-layer Llama (hidden 64) with a BPE tokenizer trained locally."""
    from adaptory.adapters.bases.tiny import init_base

    out = tmp_path_factory.mktemp("bases") / "tiny-llama"
    init_base(out, size="tiny", corpus=[test_corpus], seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved, untrained 2-layer BERT (hidden 64) with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptory.adapters.bases.loading import BUILTIN_BASES

    out = tmp_path_factory.mktemp("bases") / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_BASES["minilm"].locate()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from adaptory.adapters.bases.loading import BUILTIN_BASES

    return BUILTIN_BASES["minilm"].locate()
