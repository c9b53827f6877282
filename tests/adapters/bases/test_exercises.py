"""The generated exercise corpus the built-in `tinylm` base is pretrained on."""

from __future__ import annotations

import re

import pytest

from adaptory.adapters.bases.exercises import (
    FORBIDDEN,
    OPERATIONS,
    corpus_words,
    exercise_corpus,
)
from adaptory.adapters.bases.tiny import DEFAULT_CORPUS

PROSE = DEFAULT_CORPUS.read_text(encoding="utf-8")

# The function-call phrasing of each operation, checked against Python's own string methods
# (written here, not taken from the module).
CHECKS = {
    "echo": lambda w: " ".join(w),
    "upper": lambda w: " ".join(w).upper(),
    "lower": lambda w: " ".join(w).lower(),
    "title": lambda w: " ".join(x.capitalize() for x in w),
    "backwards": lambda w: " ".join(w[::-1]),
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "swap": lambda w: " ".join([w[-1], *w[1:-1], w[0]]) if len(w) > 1 else w[0],
    "sort": lambda w: " ".join(sorted(w)),
    "double": lambda w: " ".join(x for x in w for _ in range(2)),
    "count": lambda w: "zero one two three four five six seven eight nine ten".split()[len(w)],
    "dashes": lambda w: "-".join(w),
}


@pytest.fixture(scope="module")
def text():
    return exercise_corpus(PROSE, size_bytes=200_000, seed=3)


def test_every_function_call_exercise_is_right(text):
    calls = re.findall(r"^(\w+)\((.*)\) = (.*)$", text, flags=re.MULTILINE)
    seen = {name for name, _, _ in calls}
    assert seen == set(CHECKS), "every operation appears in function-call form"
    for name, arg, result in calls:
        assert result == CHECKS[name](arg.split(" ")), (name, arg, result)


def test_prose_share_and_size(text):
    assert 200_000 <= len(text) < 201_000
    paragraphs = [p.strip() for p in PROSE.split("\n\n") if p.strip()]
    prose_bytes = sum(len(p) for p in text.split("\n\n") if p.strip() in set(paragraphs))
    assert 0.15 < prose_bytes / len(text) < 0.25  # prose_share 0.2


def test_the_example_tasks_format_never_appears(text):
    """A base that had seen `Shout: …` / `Answer:` could do the demo's tasks without an adapter."""
    assert FORBIDDEN.search(text) is None  # the shipped prose has none either
    assert FORBIDDEN.search("Shout: a red cat\nAnswer: A RED CAT")
    assert not {"shout", "reverse", "answer"} & set(corpus_words(PROSE))


def test_seeded(text):
    assert exercise_corpus(PROSE, size_bytes=200_000, seed=3) == text
    assert exercise_corpus(PROSE, size_bytes=200_000, seed=4) != text
    assert len(OPERATIONS) == len(CHECKS)
