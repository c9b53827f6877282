"""Data as users have it: their own column names (--columns), alpaca and sharegpt layouts.

Oracles: a mapped file gives the same examples as the same rows written with the standard
names; an alpaca or sharegpt row gives the same tokens and loss mask as the chat row a person
would write for it by hand."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from adaptory.adapters.training.data import load_dataset, parse_columns, peek_format
from adaptory.registry.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


TICKETS = [
    ("the app crashes on start", "high"),
    ("please add a dark mode", "low"),
    ("cannot log in since the update", "high"),
    ("typo on the about page", "low"),
]


def test_mapped_columns_give_the_examples_of_the_standard_names(tmp_path, bert_tok):
    mine = write_csv(tmp_path / "mine.csv", ["id", "sentence", "priority"],
                     [(i, t, p) for i, (t, p) in enumerate(TICKETS)])  # fmt: skip
    standard = write_csv(tmp_path / "std.csv", ["text", "label"], TICKETS)
    columns = parse_columns("text=sentence,label=priority")
    assert peek_format(mine, columns=columns) == ("classification", "seq-cls")
    got = load_dataset(mine, tokenizer=bert_tok, columns=columns)
    want = load_dataset(standard, tokenizer=bert_tok)
    assert got.labels == want.labels == ["high", "low"]
    assert [(e.input_ids, e.label) for e in got.examples] == [
        (e.input_ids, e.label) for e in want.examples
    ]


def test_without_mapping_the_error_says_how_to_map(tmp_path, bert_tok):
    mine = write_csv(tmp_path / "mine.csv", ["sentence", "priority"], TICKETS)
    with pytest.raises(DataError) as info:
        load_dataset(mine, tokenizer=bert_tok)
    assert "cannot tell the data format" in info.value.message
    assert "--columns text=sentence,label=priority" in info.value.hint


def test_errors_name_the_files_own_column(tmp_path, bert_tok):
    rows = [("fine", "low"), ("broken", ""), ("ok", "high")]
    mine = write_csv(tmp_path / "mine.csv", ["sentence", "priority"], rows)
    with pytest.raises(DataError) as info:
        load_dataset(mine, tokenizer=bert_tok, columns={"text": "sentence", "label": "priority"})
    assert (info.value.line, info.value.field) == (3, "priority")  # header is line 1
    assert info.value.message == f"{mine}:3: empty label (field 'priority')"


def test_a_mapped_column_the_file_lacks_is_named(tmp_path, bert_tok):
    mine = write_csv(tmp_path / "mine.csv", ["sentence", "priority"], TICKETS)
    with pytest.raises(DataError) as info:
        load_dataset(mine, tokenizer=bert_tok, columns={"text": "sentence", "label": "urgency"})
    assert info.value.field == "urgency" and "given for 'label'" in info.value.message


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("text", "not a list of NAME=COLUMN"),
        ("txt=sentence", "which no format reads"),
        ({"text": 3}, "must map names"),
    ],  # fmt: skip
)
def test_bad_column_specs_are_config_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_columns(spec)


ALPACA = [
    {"instruction": "Shout the words.", "input": "the red cat", "output": "THE RED CAT"},
    {"instruction": "Say hello.", "input": "", "output": "hello"},
]
HAND_WRITTEN_CHATS = [
    {"messages": [{"role": "user", "content": "Shout the words.\n\nthe red cat"},
                  {"role": "assistant", "content": "THE RED CAT"}]},
    {"messages": [{"role": "user", "content": "Say hello."},
                  {"role": "assistant", "content": "hello"}]},
]  # fmt: skip


def _same_examples(a, b):
    return [(e.input_ids, e.labels) for e in a.examples] == [
        (e.input_ids, e.labels) for e in b.examples
    ]


def test_alpaca_rows_train_as_the_chat_a_person_would_write(tmp_path, llama_tok):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert peek_format(alpaca) == ("alpaca", "causal-lm")
    got = load_dataset(alpaca, tokenizer=llama_tok, max_length=96)
    want = load_dataset(write_jsonl(tmp_path / "c.jsonl", HAND_WRITTEN_CHATS), tokenizer=llama_tok,
                        max_length=96)  # fmt: skip
    assert got.format == "alpaca" and _same_examples(got, want)
    assert any(label != -100 for label in got.examples[0].labels)


def test_sharegpt_rows_train_as_the_same_chat(tmp_path, llama_tok):
    turns = [
        {"conversations": [{"from": "human", "value": m["messages"][0]["content"]},
                           {"from": "gpt", "value": m["messages"][1]["content"]}]}
        for m in HAND_WRITTEN_CHATS
    ]  # fmt: skip
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", turns)
    assert peek_format(sharegpt) == ("sharegpt", "causal-lm")
    got = load_dataset(sharegpt, tokenizer=llama_tok, max_length=96)
    want = load_dataset(write_jsonl(tmp_path / "c.jsonl", HAND_WRITTEN_CHATS), tokenizer=llama_tok,
                        max_length=96)  # fmt: skip
    assert _same_examples(got, want)


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
         "conversations[1].from", "'from' must be one of"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]},
         "conversations[1].value", "expected a string"),
        ({"conversations": []}, "conversations", "non-empty list"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations",
         "no assistant message"),
    ],
)  # fmt: skip
def test_bad_sharegpt_rows_name_line_and_field(tmp_path, llama_tok, row, field, needle):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_dataset(path, tokenizer=llama_tok)
    assert (info.value.line, info.value.field) == (2, field)
    assert needle in info.value.message


def test_bad_alpaca_rows_name_line_and_field(tmp_path, llama_tok):
    rows = [ALPACA[0], {"instruction": "x", "input": ["not", "text"], "output": "y"}]
    with pytest.raises(DataError) as info:
        load_dataset(write_jsonl(tmp_path / "bad.jsonl", rows), tokenizer=llama_tok)
    assert (info.value.line, info.value.field) == (2, "input")


def test_train_takes_columns_from_the_command_line_and_records_them(
    tmp_path, tiny_bert_dir, adaptory_home
):
    from adaptory.cli.main import cli
    from adaptory.registry import Registry

    data = write_csv(tmp_path / "mine.csv", ["sentence", "priority"], TICKETS * 3)
    args = ["train", "--base", str(tiny_bert_dir), "--data", str(data), "--name", "tickets",
            "--columns", "text=sentence,label=priority", "--max-steps", "2", "--eval-split", "0",
            "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, ["--home", str(adaptory_home), *args])
    assert result.exit_code == 0, result.output
    entry = Registry(adaptory_home).resolve("tickets")
    assert entry.task == "seq-cls" and entry.extra["labels"] == ["high", "low"]
    assert entry.training_config["columns"] == {"text": "sentence", "label": "priority"}
