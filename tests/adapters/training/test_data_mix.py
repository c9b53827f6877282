"""Several --data files mixed with weights: rows counted as weighted, one label set for all,
held-out rows split off each file before weighting, the CLI and TOML forms, and the entry's
record of the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptory.adapters.bases.loading import resolve_base
from adaptory.adapters.training.data import parse_source
from adaptory.adapters.training.loop import TrainConfig, load_training_data, train_adapter
from adaptory.cli.main import cli
from adaptory.registry import Registry
from adaptory.registry.errors import AdaptoryError, ConfigError

A_ROWS = [{"text": f"great thing number {i}", "label": "pos"} for i in range(6)] + [
    {"text": f"awful thing number {i}", "label": "neg"} for i in range(6)
]
B_ROWS = [{"sentence": f"where is my parcel {i}", "priority": "urgent"} for i in range(5)] + [
    {"sentence": f"thanks for the help {i}", "priority": "pos"} for i in range(5)
]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts_of(dataset, tokenizer) -> list[str]:
    return [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in dataset.examples]


def test_parse_source():
    assert parse_source("a.jsonl") == ("a.jsonl", 1.0)
    assert parse_source("dir/a.jsonl@2") == ("dir/a.jsonl", 2.0)
    assert parse_source("a.jsonl@0.25") == ("a.jsonl", 0.25)
    assert parse_source("me@host/a.jsonl") == ("me@host/a.jsonl", 1.0)  # an @ in the path
    for bad in ("a.jsonl@0", "a.jsonl@-1", "a.jsonl@nan", "a.jsonl@inf"):
        with pytest.raises(ConfigError, match="positive"):
            parse_source(bad)


def test_weights_count_rows_and_labels_are_the_union(tmp_path, tiny_bert_dir):
    a = write(tmp_path / "a.jsonl", A_ROWS)
    b = write(tmp_path / "b.csv.jsonl", [{"text": r["sentence"], "label": r["priority"]}
                                         for r in B_ROWS])  # fmt: skip
    config = TrainConfig(
        base=str(tiny_bert_dir), data=[f"{a}@2", f"{b}@0.5"], name="mix", eval_split=0,
        max_steps=1, batch_size=4, max_length=32,
    )  # fmt: skip
    train, held = load_training_data(config, resolve_base(str(tiny_bert_dir)), "seq-cls")
    assert held is None and len(train) == 2 * len(A_ROWS) + round(0.5 * len(B_ROWS))
    assert train.labels == ["neg", "pos", "urgent"]  # sorted union of both files' labels
    from adaptory.adapters.bases.loading import load_tokenizer

    tok = load_tokenizer(tiny_bert_dir, "seq-cls")
    seen = texts_of(train, tok)
    for row in A_ROWS:  # weight 2: every row of a twice
        assert seen.count(row["text"]) == 2, row
    b_seen = [t for t in seen if "parcel" in t or "help" in t]
    assert len(b_seen) == round(0.5 * len(B_ROWS)) and len(set(b_seen)) == len(b_seen)


def test_held_out_rows_are_split_before_weighting(tmp_path, tiny_bert_dir):
    """A row repeated 3 times for training never appears among the held-out rows."""
    from adaptory.adapters.bases.loading import load_tokenizer

    a = write(tmp_path / "a.jsonl", A_ROWS)
    b = write(tmp_path / "b.jsonl", [{"text": r["sentence"], "label": r["priority"]}
                                     for r in B_ROWS])  # fmt: skip
    config = TrainConfig(
        base=str(tiny_bert_dir), data=[f"{a}@3", str(b)], name="mix", eval_split=0.25,
        max_steps=1, batch_size=4, max_length=32,
    )  # fmt: skip
    train, held = load_training_data(config, resolve_base(str(tiny_bert_dir)), "seq-cls")
    tok = load_tokenizer(tiny_bert_dir, "seq-cls")
    train_texts, held_texts = set(texts_of(train, tok)), texts_of(held, tok)
    assert held_texts and not train_texts & set(held_texts)
    assert len(held) == round(0.25 * len(A_ROWS)) + round(0.25 * len(B_ROWS))


def test_cli_repeats_data_and_the_entry_records_the_files(tmp_path, tiny_bert_dir):
    a = write(tmp_path / "a.jsonl", A_ROWS)
    b = write(tmp_path / "b.jsonl", [{"text": r["sentence"], "label": r["priority"]}
                                     for r in B_ROWS])  # fmt: skip
    home = tmp_path / "home"
    result = CliRunner().invoke(cli, [
        "--home", str(home), "train", "--base", str(tiny_bert_dir), "--name", "mix",
        "--data", f"{a}@2", "--data", str(b), "--max-steps", "1", "--batch-size", "4",
        "--eval-split", "0", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    entry = Registry(home).resolve("mix")
    files = entry.dataset["files"]
    assert [(Path(f["file"]).name, f["weight"]) for f in files] == [
        ("a.jsonl", 2.0),
        ("b.jsonl", 1.0),
    ]
    assert entry.dataset["rows_train"] == 2 * len(A_ROWS) + len(B_ROWS)


def test_toml_list_is_relative_to_the_file(tmp_path, tiny_bert_dir):
    folder = tmp_path / "cfg"
    folder.mkdir()
    write(folder / "a.jsonl", A_ROWS)
    toml = folder / "mix.toml"
    toml.write_text(f'base = "{tiny_bert_dir}"\nname = "mix"\ndata = ["a.jsonl@0.5", "a.jsonl"]\n')
    config = TrainConfig.from_toml(toml)
    assert config.sources() == [(str(folder / "a.jsonl"), 0.5), (str(folder / "a.jsonl"), 1.0)]


def test_a_file_that_does_not_fit_the_first_files_task_is_refused(tmp_path, tiny_bert_dir):
    """The first file sets the task (classification here); a prompt/completion file cannot be
    read for it, and the error names that file."""
    a = write(tmp_path / "a.jsonl", A_ROWS)
    b = write(tmp_path / "b.jsonl", [{"prompt": "the cat", "completion": " sat"}] * 4)
    config = TrainConfig(
        base=str(tiny_bert_dir), data=[str(a), str(b)], name="mix", max_steps=1, eval_split=0
    )
    home = tmp_path / "home"
    with pytest.raises(AdaptoryError) as raised:
        train_adapter(config, registry=Registry(home), show_progress=False)
    assert "b.jsonl" in str(raised.value.message), raised.value.message
    assert Registry(home).list() == []
