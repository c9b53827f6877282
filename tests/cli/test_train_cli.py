"""`adaptory train` and `adaptory eval` through CliRunner: output, exit codes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.cli.main import cli
from adaptory.registry import Registry

ROWS = [
    {"text": "great product, would buy again", "label": "pos"},
    {"text": "terrible quality, it broke after a week", "label": "neg"},
    {"text": "the battery lasts all day", "label": "pos"},
    {"text": "the refund took too long", "label": "neg"},
] * 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def quick_args(base: Path, data: Path, name: str = "cls") -> list[str]:
    return ["train", "--base", str(base), "--data", str(data), "--name", name,
            "--max-steps", "2", "--batch-size", "4"]  # fmt: skip


def test_train_then_eval(tmp_path, adaptory_home, tiny_bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run(adaptory_home, *quick_args(tiny_bert_dir, data), "--tag", "dev")
    assert result.exit_code == 0, result.output
    assert "trained cls:1 (lora, seq-cls)" in result.output
    assert "accuracy" in result.output and "(base " in result.output
    assert "adaptory eval cls:1" in result.output

    result = run(adaptory_home, "eval", "cls:dev", "--data", str(data), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ref"] == "cls:1" and out["metrics"]["rows"] == len(ROWS)
    assert Registry(adaptory_home).resolve("cls").metrics["evals"]["d.jsonl"]["accuracy"] >= 0


def test_train_json_output_and_toml_config(tmp_path, adaptory_home, tiny_bert_dir):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    toml = tmp_path / "t.toml"
    toml.write_text(
        f'base = "{tiny_bert_dir}"\ndata = "d.jsonl"\nname = "fromtoml"\nmax-steps = 2\n'
        "batch_size = 4\nrank = 4\n"
    )
    result = run(adaptory_home, "train", "--config", str(toml), "--rank", "2", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    assert entry["ref"] == "fromtoml:1"
    assert entry["training_config"]["rank"] == 2  # the flag wins over the file
    assert entry["peft_config"]["r"] == 2


def test_unknown_toml_key(tmp_path, adaptory_home):
    toml = tmp_path / "t.toml"
    toml.write_text('base = "minilm"\ndata = "d.jsonl"\nname = "n"\nlearning_rate = 1\n')
    result = run(adaptory_home, "train", "--config", str(toml))
    assert result.exit_code == 2
    assert "unknown key 'learning_rate'" in result.output and str(toml) in result.output


BAD = [
    ("missing.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b"}'], 2, "label"),
    ("type.jsonl", ['{"text": "a", "label": "x"}', '{"text": 3, "label": "y"}'], 2, "text"),
    ("empty.jsonl", ['{"text": "a", "label": "x"}', '{"text": "", "label": "y"}'], 2, "text"),
    ("json.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"', "{}"], 2, None),
]


@pytest.mark.parametrize("name,lines,line,field", BAD, ids=[b[0] for b in BAD])
def test_bad_data_exit_2_names_file_line_field(
    tmp_path, adaptory_home, tiny_bert_dir, name, lines, line, field
):
    data = write_jsonl(tmp_path / name, lines)
    result = run(adaptory_home, *quick_args(tiny_bert_dir, data))
    assert result.exit_code == 2, result.output
    assert f"{data}:{line}:" in result.output
    if field:
        assert f"(field '{field}')" in result.output
    assert "Traceback" not in result.output
    assert Registry(adaptory_home).list() == []
    assert not (adaptory_home / "runs").exists()  # rejected before a run folder is made


def test_bad_utf8_and_empty_file(tmp_path, adaptory_home, tiny_bert_dir):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n')
    result = run(adaptory_home, *quick_args(tiny_bert_dir, bad))
    assert result.exit_code == 2 and f"{bad}:2:" in result.output and "UTF-8" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run(adaptory_home, *quick_args(tiny_bert_dir, empty))
    assert result.exit_code == 2 and "no rows" in result.output


def test_unknown_label_in_eval_file(tmp_path, adaptory_home, tiny_bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    held = write_jsonl(
        tmp_path / "e.jsonl", [{"text": "fine", "label": "pos"}, {"text": "hm", "label": "meh"}]
    )
    result = run(adaptory_home, *quick_args(tiny_bert_dir, data), "--eval-data", str(held))
    assert result.exit_code == 2
    assert f"{held}:2:" in result.output and "unknown label 'meh'" in result.output
    assert Registry(adaptory_home).list() == []


def test_unsupported_combination_is_refused(tmp_path, adaptory_home, tiny_bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = run(adaptory_home, *quick_args(tiny_bert_dir, data), "--method", "prefix")
    assert result.exit_code == 2
    assert "does not support task seq-cls" in result.output


def test_missing_options_and_nothing_to_resume(adaptory_home):
    result = run(adaptory_home, "train", "--name", "x")
    assert result.exit_code == 2 and "--base" in result.output
    result = run(adaptory_home, "train", "--resume")
    assert result.exit_code == 2 and "no interrupted runs to resume" in result.output


def test_help_lists_every_setting():
    from adaptory.adapters.training.loop import TrainConfig

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for name in TrainConfig.fields():
        flag = {"tags": "--tag", "format": "--format"}.get(name, "--" + name.replace("_", "-"))
        assert flag in result.output, flag
    assert CliRunner().invoke(cli, ["eval", "--help"]).exit_code == 0
