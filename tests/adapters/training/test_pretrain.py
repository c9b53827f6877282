"""Pretraining a tiny base from scratch: it learns, saves a loadable base, and is seeded."""

from __future__ import annotations

import json

import pytest

from adaptory.adapters.bases.loading import load_base, read_base_info
from adaptory.adapters.training.pretrain import pretrain_base
from adaptory.registry.errors import ConfigError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(out, corpus, **kw):
    args = {"size": "tiny", "steps": 30, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "seed": 0}
    return pretrain_base(out, corpus=[corpus], show_progress=False, **{**args, **kw})


def test_pretrain_learns_and_saves_a_loadable_base(tmp_path, test_corpus):
    result = run(tmp_path / "b", test_corpus)
    assert {"params", "first_loss", "final_loss", "wall_time_s"} <= set(result)
    assert result["final_loss"] < result["first_loss"] - 1.0
    info = read_base_info(tmp_path / "b")
    assert info["pretrained"] is True and info["steps"] == 30
    assert info["final_loss"] == pytest.approx(result["final_loss"])
    base = load_base(str(tmp_path / "b"), task="causal-lm", device="cpu")
    assert base.tokenizer.chat_template  # the tokenizer from init_base, template included
    json.dumps(result)  # the CLI prints it with --json


def test_pretrain_is_seeded(tmp_path, test_corpus):
    a = run(tmp_path / "a", test_corpus, steps=5)
    b = run(tmp_path / "b", test_corpus, steps=5)
    c = run(tmp_path / "c", test_corpus, steps=5, seed=1)
    weights = {p: (tmp_path / p / "model.safetensors").read_bytes() for p in "abc"}
    assert weights["a"] == weights["b"] and a["final_loss"] == b["final_loss"]
    assert weights["a"] != weights["c"] and c["final_loss"] != a["final_loss"]


def test_pretrain_refuses_bad_settings(tmp_path, test_corpus):
    with pytest.raises(ConfigError):
        run(tmp_path / "x", test_corpus, size="huge")
    with pytest.raises(ConfigError):
        run(tmp_path / "x", test_corpus, seq_len=100_000)
