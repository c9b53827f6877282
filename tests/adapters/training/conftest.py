"""Fixtures shared by the training tests: the tiny bases' tokenizers."""

import pytest

from adaptory.adapters.bases.loading import load_tokenizer


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir, "causal-lm")


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    return load_tokenizer(tiny_bert_dir, "seq-cls")
