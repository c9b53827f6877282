"""A generated pretraining corpus of string exercises, so a small base learns to manipulate text.

A base pretrained only on plain prose cannot be taught to upper-case or reorder words by an
adapter trained on a few hundred rows: the adapter would have to learn the skill itself. Real
bases learn such skills in pretraining and an adapter teaches them a task's format. This corpus
does the same at toy scale: plain prose (the shipped corpus) mixed with exercises that apply a
dozen operations (copy, upper and lower case, title case, word order reversed, first / last word,
words swapped, sorted, doubled, counted, joined, template sentences) to random phrases drawn
from the prose's own words, each operation written in several phrasings.

No exercise uses the phrasing of the example data sets (`Shout: …`, `Reverse: …`, an
`Answer:` line): a task in that format is new to the base, so an adapter has to learn it, and
the base alone does not do it (the demo prints the base-only score beside each adapter's).

Deterministic: the same seed and size give the same text. Generated, so CC0-1.0 like the prose.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

# The example tasks' own format, which must never occur (see the module docstring); their
# instruction words are also kept out of the exercises' phrases.
INSTRUCTION_WORDS = ("shout", "reverse", "answer")
FORBIDDEN = re.compile(rf"\b({'|'.join(INSTRUCTION_WORDS)})\b\s*:", re.IGNORECASE)

Operation = Callable[[list[str]], str]


def _title(words: list[str]) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in words)


def _swap(words: list[str]) -> str:
    if len(words) < 2:
        return " ".join(words)
    return " ".join([words[-1], *words[1:-1], words[0]])


COUNTS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# name → (operation, phrasings). A phrasing has {x} (the input) and {y} (the result).
OPERATIONS: dict[str, tuple[Operation, list[str]]] = {
    "copy": (
        lambda w: " ".join(w),
        ['Say "{x}" again: "{y}".', "echo({x}) = {y}", "Copy this line.\n{x}\n{y}"],
    ),
    "upper": (
        lambda w: " ".join(w).upper(),
        [
            'In capital letters, "{x}" is "{y}".',
            "upper({x}) = {y}",
            "Write it in capitals.\n{x}\n{y}",
            "{x} -> {y} (all caps)",
        ],
    ),
    "lower": (
        lambda w: " ".join(w).lower(),
        [
            'In small letters, "{x}" is "{y}".',
            "lower({x}) = {y}",
            "Write it in small letters.\n{x}\n{y}",
        ],
    ),
    "title": (
        _title,
        ['As a title, "{x}" is "{y}".', "title({x}) = {y}"],
    ),
    "backwards": (
        lambda w: " ".join(reversed(w)),
        [
            'Read from the last word to the first, "{x}" is "{y}".',
            "backwards({x}) = {y}",
            "Put the words in the opposite order.\n{x}\n{y}",
            "{x} -> {y} (last word first)",
        ],
    ),
    "first": (lambda w: w[0], ['The first word of "{x}" is "{y}".', "first({x}) = {y}"]),
    "last": (lambda w: w[-1], ['The last word of "{x}" is "{y}".', "last({x}) = {y}"]),
    "swap": (_swap, ['With the first and last words swapped, "{x}" is "{y}".', "swap({x}) = {y}"]),
    "sorted": (
        lambda w: " ".join(sorted(w)),
        ['In alphabetical order, "{x}" is "{y}".', "sort({x}) = {y}"],
    ),
    "double": (
        lambda w: " ".join(x for word in w for x in (word, word)),
        ['Every word twice: "{x}" is "{y}".', "double({x}) = {y}"],
    ),
    "count": (
        lambda w: COUNTS[len(w)],
        ['"{x}" has {y} words.', "count({x}) = {y}"],
    ),
    "dashes": (
        lambda w: "-".join(w),
        ['With dashes, "{x}" is "{y}".', "dashes({x}) = {y}"],
    ),
}

TEMPLATES = [
    "Dear {Name}, thank you for the {a}. We hope the {b} is {c} too.",
    "Note to {Name}: the {a} is in the {b}.",
    "{Name} asked for a {a} and a {b}, and got a {c}.",
    "Order for {Name}: one {a}, two {b}. Total: {n}.",
]


def corpus_words(prose: str, limit: int = 400) -> list[str]:
    """The `limit` most common lower-case words of the prose (2+ letters), most common first."""
    counts = Counter(re.findall(r"\b[a-z]{2,}\b", prose))
    ranked = [word for word, _ in counts.most_common() if word not in INSTRUCTION_WORDS]
    return ranked[:limit]


def exercise(rng: random.Random, words: list[str]) -> str:
    """One exercise: an operation applied to a random phrase, or a filled template."""
    if rng.random() < 0.08:
        template = rng.choice(TEMPLATES)
        return template.format(
            Name=rng.choice(words).capitalize(),
            a=rng.choice(words),
            b=rng.choice(words),
            c=rng.choice(words),
            n=rng.randint(2, 99),
        )
    name = rng.choice(sorted(OPERATIONS))
    operation, phrasings = OPERATIONS[name]
    phrase = [rng.choice(words) for _ in range(rng.randint(1, 8))]
    if name == "lower":
        phrase = [w.upper() if rng.random() < 0.7 else w.capitalize() for w in phrase]
    return rng.choice(phrasings).format(x=" ".join(phrase), y=operation(phrase))


def exercise_corpus(prose: str, *, size_bytes: int, seed: int = 0, prose_share: float = 0.2) -> str:
    """Exercises and prose paragraphs, blank-line separated, about `size_bytes` long.

    `prose_share` of the bytes are paragraphs of `prose` (cycled in order); the rest exercises.
    """
    rng = random.Random(seed)
    words = corpus_words(prose)
    paragraphs = [p.strip() for p in prose.split("\n\n") if p.strip()]
    parts: list[str] = []
    total = prose_bytes = 0
    next_para = 0
    while total < size_bytes:
        if paragraphs and prose_bytes < prose_share * total:
            part = paragraphs[next_para % len(paragraphs)]
            next_para += 1
            prose_bytes += len(part) + 2
        else:
            part = exercise(rng, words)
            found = FORBIDDEN.search(part)
            if found:
                raise AssertionError(f"an exercise is in the example format {found.group()!r}")
        parts.append(part)
        total += len(part) + 2
    return "\n\n".join(parts) + "\n"
