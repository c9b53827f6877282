"""Data: formats, loss masks, label sets, splits, fingerprints and every bad-input case."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptory.adapters.training.data import (
    IGNORE,
    dataset_fingerprint,
    load_dataset,
    peek_format,
    split_dataset,
)
from adaptory.registry.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_are_detected_from_columns(tmp_path):
    cases = {
        "text": [{"text": "a"}],
        "prompt-completion": [{"prompt": "a", "completion": "b"}],
        "chat": [{"messages": [{"role": "assistant", "content": "x"}]}],
        "classification": [{"text": "a", "label": "x"}],
    }
    for fmt, rows in cases.items():
        assert peek_format(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))[0] == fmt
    # labels are ignored for a causal LM
    assert peek_format(tmp_path / "classification.jsonl", task="causal-lm") == ("text", "causal-lm")


def test_prompt_completion_masks_the_prompt_and_appends_eos(tmp_path, llama_tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Shout: the cat", "completion": " THE CAT"}])
    ds = load_dataset(f, tokenizer=llama_tok, max_length=64)
    (ex,) = ds.examples
    prompt_len = len(llama_tok("Shout: the cat")["input_ids"])
    assert ex.labels[:prompt_len] == [IGNORE] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert ex.input_ids[-1] == llama_tok.eos_token_id
    assert llama_tok.decode(ex.input_ids[prompt_len:-1]) == " THE CAT"


def test_text_rows_learn_every_token(tmp_path, llama_tok):
    ds = load_dataset(
        write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}]), tokenizer=llama_tok
    )
    (ex,) = ds.examples
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == llama_tok.eos_token_id


def test_chat_learns_only_assistant_turns(tmp_path, llama_tok):
    msgs = [
        {"role": "system", "content": "be loud"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "THE CAT SAT"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "THE DOG"},
    ]
    ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tokenizer=llama_tok)
    (ex,) = ds.examples
    learned = llama_tok.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    )
    assert "THE CAT SAT" in learned and "THE DOG" in learned
    assert "the cat sat" not in learned and "be loud" not in learned and "<|user|>" not in learned


def test_classification_labels_sorted_and_ints(tmp_path, bert_tok):
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"text": "good", "label": "pos"},
            {"text": "bad", "label": "neg"},
            {"text": "ok", "label": "mid"},
        ],
    )
    ds = load_dataset(f, tokenizer=bert_tok)
    assert ds.task == "seq-cls" and ds.labels == ["mid", "neg", "pos"]
    assert [e.label for e in ds.examples] == [2, 1, 0]
    g = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 10}, {"text": "b", "label": 2}])
    assert load_dataset(g, tokenizer=bert_tok).labels == ["2", "10"]


def test_csv_and_parquet(tmp_path, bert_tok):
    (tmp_path / "d.csv").write_text('text,label\ngood one,1\n"bad, very",0\n')
    ds = load_dataset(tmp_path / "d.csv", tokenizer=bert_tok)
    assert ds.labels == ["0", "1"] and [e.line for e in ds.examples] == [2, 3]
    pq.write_table(pa.table({"text": ["a b", "c d"], "label": ["x", "y"]}), tmp_path / "d.parquet")
    assert load_dataset(tmp_path / "d.parquet", tokenizer=bert_tok).labels == ["x", "y"]


def test_split_is_seeded_and_disjoint(tmp_path, bert_tok):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)]
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", rows), tokenizer=bert_tok)
    a_train, a_eval = split_dataset(ds, 0.2, seed=1)
    b_train, b_eval = split_dataset(ds, 0.2, seed=1)
    _, c_eval = split_dataset(ds, 0.2, seed=2)
    assert [e.line for e in a_eval] == [e.line for e in b_eval] and len(a_eval) == 4
    assert {e.line for e in a_eval}.isdisjoint(e.line for e in a_train)
    assert [e.line for e in c_eval] != [e.line for e in a_eval]


def test_fingerprint_covers_bytes_format_and_tokenizer(tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}])
    a = dataset_fingerprint(f, "text", "tok1", 128)
    assert a == dataset_fingerprint(f, "text", "tok1", 128)
    assert a != dataset_fingerprint(f, "text", "tok2", 128)
    assert a != dataset_fingerprint(f, "classification", "tok1", 128)
    write_jsonl(f, [{"text": "b"}])
    assert a != dataset_fingerprint(f, "text", "tok1", 128)


BAD = [
    ("missing.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', 2, "completion"),
    ("type.jsonl", b'{"text": "a", "label": "x"}\n{"text": 5, "label": "y"}\n', 2, "text"),
    ("empty_text.jsonl", b'{"text": "a"}\n{"text": "a"}\n{"text": "   "}\n', 3, "text"),
    ("badjson.jsonl", b'{"text": "a"}\n{"text": "a"\n', 2, None),
    ("utf8.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, None),
    ("label_type.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": [1]}\n', 2, "label"),
    ("mixed.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": 1}\n', 2, "label"),
    ("role.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "messages[0].role"),
    ("noassist.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n', 1, "messages"),
    ("notobj.jsonl", b'{"text": "a"}\n[1, 2]\n', 2, None),
]


@pytest.mark.parametrize("name,content,line,field", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_line_and_field(tmp_path, llama_tok, name, content, line, field):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset(f, tokenizer=llama_tok)
    err = info.value
    assert err.line == line and err.field == field
    assert f"{f}:{line}:" in err.message
    if field:
        assert f"'{field}'" in err.message


def test_empty_file_and_unknown_eval_label(tmp_path, bert_tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(tmp_path / "empty.jsonl", tokenizer=bert_tok)
    f = write_jsonl(
        tmp_path / "e.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}]
    )
    with pytest.raises(DataError) as info:
        load_dataset(f, tokenizer=bert_tok, labels=["neg", "pos"])
    assert info.value.line == 2 and info.value.field == "label" and "meh" in info.value.message


def test_format_mismatch_and_unknown_format(tmp_path, llama_tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError):
        load_dataset(f, tokenizer=llama_tok, task="seq-cls")
    with pytest.raises(ConfigError):
        load_dataset(f, tokenizer=llama_tok, fmt="poetry")


def test_row_too_long_for_max_length(tmp_path, llama_tok):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the cat " * 50, "completion": " X"}])
    with pytest.raises(DataError) as info:
        load_dataset(f, tokenizer=llama_tok, max_length=16)
    assert info.value.line == 1 and info.value.field == "prompt"


def test_a_hub_name_needs_datasets_and_a_mistyped_file_stays_a_file(tmp_path, monkeypatch):
    import builtins

    from adaptory.adapters.training.data import is_hub_source, read_rows
    from adaptory.registry.errors import DataError

    monkeypatch.chdir(tmp_path)
    assert is_hub_source("imdb") and is_hub_source("org/reviews:test")
    assert not is_hub_source("reviews.jsonl") and not is_hub_source("a/b/c")
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # as on a machine without the package
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="is not a file here") as raised:
        read_rows("org/reviews:test")
    assert "pip install datasets" in raised.value.hint
    with pytest.raises(DataError, match="does not exist"):
        read_rows("reviews.jsonl")
