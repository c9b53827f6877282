"""Property tests for everything a user types or feeds: references, names, tags and data rows.

parse_ref / validate_name / validate_tag never raise anything but InvalidReference / InvalidName,
valid ones round-trip; arbitrary JSON in a data row's fields gives DataError naming file, line
and field (or a ConfigError for a format/task mismatch), never another exception.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptory.registry.errors import (
    ConfigError,
    DataError,
    InvalidName,
    InvalidReference,
)
from adaptory.registry.refs import MAX_NAME_LENGTH, Ref, parse_ref, validate_name, validate_tag

NAME_CHARS = string.ascii_letters + string.digits + "._-"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(NAME_CHARS, max_size=MAX_NAME_LENGTH - 1),
)
tags = names.filter(lambda t: not t.isdigit())
anything = st.one_of(
    st.text(),
    st.text(NAME_CHARS + ":/\\ \t\n\x00é", max_size=80),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
EXAMPLES = 300


@settings(max_examples=EXAMPLES, deadline=None)
@given(anything)
def test_parse_ref_raises_only_invalid_reference(text):
    try:
        ref = parse_ref(text)
    except InvalidReference as exc:
        assert exc.message and "\n" not in exc.hint
        return
    assert parse_ref(str(ref)) == ref
    assert str(ref) == text


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.one_of(anything, st.none(), st.integers(), st.lists(st.text(), max_size=2)))
def test_validate_name_and_tag_raise_only_invalid_name(value):
    for check in (validate_name, validate_tag):
        try:
            assert check(value) == value
        except InvalidName as exc:
            assert exc.message


@settings(max_examples=EXAMPLES, deadline=None)
@given(names, st.one_of(st.none(), st.integers(1, 10**12), tags))
def test_valid_references_round_trip(name, selector):
    if selector is None:
        text, expected = name, Ref(name)
    elif isinstance(selector, int):
        text, expected = f"{name}:{selector}", Ref(name, version=selector)
    else:
        text, expected = f"{name}:{selector}", Ref(name, tag=selector)
    assert validate_name(name) == name
    assert parse_ref(text) == expected
    assert str(expected) == text


@settings(max_examples=EXAMPLES, deadline=None)
@given(tags)
def test_valid_tags_are_valid_names_and_never_numbers(tag):
    assert validate_tag(tag) == tag == validate_name(tag)
    with pytest.raises(InvalidName, match="number"):
        validate_tag(str(len(tag)))


# --- data rows -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("text", "prompt", "completion", "messages", "label")
row_values = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values
    | st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "bot", ""]) | json_values},
            optional={"content": json_values},
        ),
        max_size=3,
    ),
    min_size=1,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    good_lines=st.integers(0, 3),
    row=row_values,
    fmt=st.sampled_from([None, "text", "prompt-completion", "chat", "classification"]),
    suffix=st.sampled_from([".jsonl", ".csv"]),
)
def test_arbitrary_json_in_data_fields_gives_data_error_with_file_line_field(
    tokenizer, good_lines, row, fmt, suffix
):
    from adaptory.adapters.training.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        good = {"prompt": "the cat", "completion": " sat", "text": "a red ball", "label": "pos"}
        if suffix == ".jsonl":
            lines = [json.dumps(good)] * good_lines + [json.dumps(row)]
            path.write_text("\n".join(lines) + "\n")
        else:
            import csv
            import io

            columns = sorted(set(good) | set(row))
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            for _ in range(good_lines):
                writer.writerow({c: good.get(c, "") for c in columns})
            writer.writerow({c: v if isinstance(v, str) else json.dumps(v) for c, v in row.items()})
            path.write_text(out.getvalue())
        try:
            dataset = load_dataset(path, tokenizer=tokenizer, fmt=fmt, max_length=32)
        except DataError as exc:
            assert str(path) in exc.message, exc.message
            if exc.line is not None:
                assert f"{path}:{exc.line}:" in exc.message
            if exc.field is not None:
                assert f"(field '{exc.field}')" in exc.message
            return
        except ConfigError as exc:  # e.g. classification data with --format chat
            assert exc.message
            return
        assert dataset.examples


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_as_a_data_file_give_data_error(raw):
    from adaptory.adapters.training.data import read_rows

    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".jsonl", ".csv", ".parquet"):
            path = Path(tmp) / f"data{suffix}"
            path.write_bytes(raw)
            try:
                read_rows(path)
            except DataError as exc:
                assert str(path) in exc.message
