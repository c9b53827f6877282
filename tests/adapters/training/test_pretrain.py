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


def test_bytes_vocab_exercises_and_half_precision(tmp_path, test_corpus):
    """The settings the `tinylm` recipe uses: a byte-level vocabulary, generated exercises mixed
    into the corpus, weights stored in float16."""
    from safetensors import safe_open

    result = run(tmp_path / "b", test_corpus, steps=3, vocab_size=260, exercise_bytes=30_000,
                 save_dtype="float16")  # fmt: skip
    info = read_base_info(tmp_path / "b")
    assert info["vocab_size"] == 260 and info["exercise_bytes"] == 30_000
    assert info["dtype"] == "float16"
    assert result["tokens"] > 28_000  # a token per byte (blank lines become one eos)
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {__import__("torch").float16}
    base = load_base(str(tmp_path / "b"), task="causal-lm", device="cpu")
    assert base.tokenizer.tokenize("Cat CAT") == ["C", "a", "t", "Ġ", "C", "A", "T"]


def test_the_tinylm_recipe_is_what_the_cli_runs(tmp_path, test_corpus):
    """`--recipe tinylm` fills every setting from RECIPES; an option given overrides it."""
    from click.testing import CliRunner

    from adaptory.cli.main import cli

    out = tmp_path / "r"
    res = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "base", "pretrain", "r",
                                   "--recipe", "tinylm", "--steps", "2", "--exercises", "20000",
                                   "--batch-size", "2", "--seq-len", "16", "--corpus",
                                   str(test_corpus), "--out", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    info = read_base_info(out)
    assert (info["steps"], info["exercise_bytes"], info["batch_size"]) == (2, 20_000, 2)
    assert (info["vocab_size"], info["lr"], info["dtype"]) == (260, 2e-3, "float16")


@pytest.mark.parametrize("command", ["init", "pretrain"])
def test_a_built_in_name_is_refused(tmp_path, command):
    """HOME/bases/tinylm would never be used: `--base tinylm` finds the built-in first."""
    from click.testing import CliRunner

    from adaptory.cli.main import cli

    home = tmp_path / "home"
    res = CliRunner().invoke(cli, ["--home", str(home), "base", command, "tinylm"])
    assert res.exit_code == 2 and "built-in base" in res.output and "my-tinylm" in res.output
    assert not (home / "bases" / "tinylm").exists()
