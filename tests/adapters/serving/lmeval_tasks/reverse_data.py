"""Two tiny lm-eval tasks on one rule (reverse three words), read from the jsonl files here.

`adaptory_reverse_gen` (generate_until) asks for the reversed words; `adaptory_reverse_choice`
(multiple_choice, loglikelihood) scores four orders of them. The docs are every ordered triple
of four words, in itertools order: regenerate the files with `python reverse_data.py`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ("red", "green", "blue", "cat")


def make_docs() -> tuple[list[dict], list[dict]]:
    """(generation docs, choice docs): 24 each, deterministic, no randomness."""
    gen, choice = [], []
    for words in itertools.permutations(WORDS, 3):
        question = "Reverse: " + " ".join(words)
        answer = " ".join(reversed(words))
        gen.append({"question": question, "answer": answer})
        # the right order and three wrong ones, the right one at a position that cycles
        wrong = [" ".join(p) for p in itertools.permutations(words) if " ".join(p) != answer][:3]
        label = len(choice) % 4
        choices = wrong[:label] + [answer] + wrong[label:]
        choice.append({"question": question, "choices": choices, "label": label})
    return gen, choice


def _dataset(name: str):
    """The file's docs as the `test` split, built in memory (no datasets cache, no hub)."""
    import datasets

    lines = (HERE / name).read_text().splitlines()
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([json.loads(x) for x in lines])}
    )


def load_gen(**_kwargs):
    return _dataset("reverse_gen.jsonl")


def load_choice(**_kwargs):
    return _dataset("reverse_choice.jsonl")


if __name__ == "__main__":
    for name, docs in zip(("reverse_gen.jsonl", "reverse_choice.jsonl"), make_docs(), strict=True):
        (HERE / name).write_text("".join(json.dumps(doc) + "\n" for doc in docs))
