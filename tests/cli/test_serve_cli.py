"""`adaptory generate | predict | chat | serve` through CliRunner on real tiny adapters."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from serving_helpers import make_classifier, make_lora, make_prefix, reference_greedy, register

from adaptory.adapters.bases.loading import load_base
from adaptory.cli.main import cli
from adaptory.registry import Registry


@pytest.fixture(scope="module")
def filled_home(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("serve-cli")
    reg = Registry(tmp / "home")
    register(reg, make_lora(tiny_llama_dir, tmp / "a", seed=1), "shout", tiny_llama_dir)
    register(reg, make_prefix(tiny_llama_dir, tmp / "p", seed=2), "pfx", tiny_llama_dir)
    labels = ["neg", "pos"]
    folder = make_classifier(tiny_bert_dir, tmp / "s", seed=3, labels=labels)
    register(reg, folder, "sentiment", tiny_bert_dir, task="seq-cls", labels=labels)
    return tmp / "home", tmp


@pytest.fixture
def home(filled_home, monkeypatch):
    monkeypatch.setenv("ADAPTORY_HOME", str(filled_home[0]))
    return filled_home


def test_generate_json_equals_the_adapter_alone(home, tiny_llama_dir):
    _, tmp = home
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "shout", "the cat", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    tokenizer = load_base(str(tiny_llama_dir)).tokenizer
    ids = tokenizer("the cat")["input_ids"]
    expected = reference_greedy(tiny_llama_dir, tmp / "a", ids, 5)
    assert out["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert out["model"] == "shout:1" and out["usage"]["completion_tokens"] == 5
    plain = runner.invoke(
        cli, ["generate", "--base", str(tiny_llama_dir), "the cat", "--max-new-tokens", "3"]
    )
    assert plain.exit_code == 0, plain.output
    streamed = runner.invoke(cli, ["generate", "pfx", "the", "--max-new-tokens", "3", "--seed", "1",
                                   "--temperature", "0.8"])  # fmt: skip
    assert streamed.exit_code == 0, streamed.output


def test_generate_errors(home):
    runner = CliRunner()
    missing = runner.invoke(cli, ["generate", "ghost", "hi"])
    assert missing.exit_code == 3 and "ghost" in missing.output
    usage = runner.invoke(cli, ["generate", "only-a-prompt"])
    assert usage.exit_code == 2


def test_predict(home):
    result = CliRunner().invoke(
        cli, ["predict", "sentiment", "great product", "it broke", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["text"] for r in rows] == ["great product", "it broke"]
    assert all(r["label"] in ("neg", "pos") and set(r["scores"]) == {"neg", "pos"} for r in rows)
    table = CliRunner().invoke(cli, ["predict", "sentiment", "great product"])
    assert table.exit_code == 0 and "great product" in table.output


def test_chat_loop_ends_on_exit_and_eof(home):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["chat", "shout", "--max-new-tokens", "3"], input="hello\n/exit\nnever\n"
    )
    assert result.exit_code == 0, result.output
    eof = runner.invoke(cli, ["chat", "shout", "--max-new-tokens", "2"], input="hi\n")
    assert eof.exit_code == 0, eof.output


def test_serve_help_mentions_the_safe_defaults():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "ADAPTORY_API_KEY" in result.output


def test_labels_and_names_print_as_written_never_as_markup(tmp_path, tiny_bert_dir, monkeypatch):
    """User text is never Rich markup: a label '[red]evil[/red]' prints with its brackets, and a
    path containing '[/]' (which once crashed the error printer) appears in the error."""
    monkeypatch.setenv("ADAPTORY_HOME", str(tmp_path / "home"))
    labels = ["[red]evil[/red]", "[/]"]
    folder = make_classifier(tiny_bert_dir, tmp_path / "c", seed=4, labels=labels)
    register(
        Registry(tmp_path / "home"), folder, "marked", tiny_bert_dir, task="seq-cls", labels=labels
    )
    runner = CliRunner()
    table = runner.invoke(cli, ["predict", "marked", "great product"], terminal_width=200)
    assert table.exit_code == 0, (table.output, table.exception)
    assert "[red]evil[/red]" in table.output and "[/]" in table.output
    missing = runner.invoke(cli, ["import", str(tmp_path / "no[/]such[bold]"), "--name", "x"])
    assert missing.exit_code == 2, (missing.output, missing.exception)
    assert isinstance(missing.exception, SystemExit)
    assert "no[/]such[bold]" in missing.output
