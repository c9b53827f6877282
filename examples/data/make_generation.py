"""Generate the text-transformation datasets for generation adapters (LoRA / prefix).

    python examples/data/make_generation.py

Writes, deterministically (fixed seed):
  examples/data/shout/{train,eval}.jsonl    prompt "Shout: <words>\\nAnswer:"   -> " <WORDS>"
  examples/data/reverse/{train,eval}.jsonl  prompt "Reverse: <words>\\nAnswer:" -> " <words reversed>"
  examples/data/dates/{train,eval}.jsonl    prompt "Date: 2024-03-15\\nAnswer:" -> " 15 March 2024"
  examples/data/chat/{train,eval}.jsonl     {"messages": [...]}: the shout task phrased as chat

All words come from vocab.py, which make_corpus.py guarantees are in adapters/assets/corpus.txt.
Ends with a self-check (JSON parses, fields, no train/eval overlap, words in corpus).
Everything here is hand-written for Adaptory; CC0-1.0.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import vocab as V

SEED = 20240315
HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "adapters" / "assets" / "corpus.txt"

N_TRAIN, N_EVAL = 400, 60
N_CHAT_TRAIN, N_CHAT_EVAL = 100, 20


def _c(rng: random.Random, xs: list[str]) -> str:
    return rng.choice(xs)


def shout_phrase(rng: random.Random) -> str:
    """A short (3-8 word), roughly grammatical phrase from the corpus vocabulary."""
    d = lambda: _c(rng, V.DETERMINERS)  # noqa: E731
    adj = lambda: _c(rng, V.COLOURS + V.SIZES)  # noqa: E731
    thing = lambda: _c(rng, V.ANIMALS + V.OBJECTS + V.PEOPLE)  # noqa: E731
    animal = lambda: _c(rng, V.ANIMALS + V.PEOPLE)  # noqa: E731
    obj = lambda: _c(rng, V.OBJECTS)  # noqa: E731
    place = lambda: _c(rng, V.PLACES)  # noqa: E731
    vp = lambda: _c(rng, V.VERBS_PAST)  # noqa: E731
    vt = lambda: _c(rng, V.VERBS_TRANS)  # noqa: E731
    prep = lambda: _c(rng, V.PREPOSITIONS)  # noqa: E731
    adv = lambda: _c(rng, V.ADVERBS)  # noqa: E731
    forms = [
        lambda: f"{d()} {adj()} {animal()} {vp()}",
        lambda: f"{d()} {animal()} {vp()} {prep()} the {obj()}",
        lambda: f"the {animal()} {vp()} {prep()} the {obj()}",
        lambda: f"{d()} {adj()} {animal()} {vp()} {prep()} the {place()}",
        lambda: f"{d()} {adj()} {animal()} {vp()} {prep()} {d()} {adj()} {place()}",
        lambda: f"{d()} {animal()} {vt()} {d()} {obj()}",
        lambda: f"{d()} {animal()} {vt()} {d()} {adj()} {obj()}",
        lambda: f"{d()} {adj()} {animal()} {vt()} {d()} {adj()} {obj()} {adv()}",
        lambda: f"{d()} {adj()} {adj()} {thing()}",
        lambda: f"{thing()} and {thing()}",
        lambda: f"{d()} {thing()} and {d()} {thing()}",
        lambda: f"{d()} {obj()} is {adj()}",
        lambda: f"{d()} {thing()} was {adj()} and {adj()}",
        lambda: f"{_c(rng, V.NUMBERS[1:])} {adj()} {V.plural(_c(rng, V.ANIMALS))}",
        lambda: f"{d()} {animal()} {vp()} {adv()}",
        lambda: f"{d()} {animal()} {vp()} with {d()} {_c(rng, V.ANIMALS)}",
    ]
    while True:
        p = rng.choice(forms)()
        n = len(p.split())
        if 3 <= n <= 8:
            return re.sub(r"\ba (?=[aeiou])", "an ", p)


def reverse_words(rng: random.Random) -> list[str]:
    n = rng.choice([3, 3, 4, 4, 4, 5, 5, 6])
    return rng.sample(V.REVERSE_POOL, n)


def unique(gen, n: int, seen: set) -> list:
    out = []
    while len(out) < n:
        x = gen()
        key = tuple(x) if isinstance(x, list) else x
        if key in seen:
            continue
        seen.add(key)
        out.append(x)
    return out


def fmt_date(d: dt.date) -> str:
    return f"{d.day} {V.MONTHS[d.month - 1]} {d.year}"


CHAT_ASKS = [
    "Shout this: {p}",
    "Please shout: {p}",
    "Say this loudly: {p}",
    'Can you shout "{p}"?',
    "Write this in capital letters: {p}",
    "Shout it: {p}",
    "Please say this loud: {p}",
    "Shout the words {p}",
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build() -> dict[str, dict[str, list[dict]]]:
    rng = random.Random(SEED)
    out: dict[str, dict[str, list[dict]]] = {}

    # shout + chat share one pool of phrases, partitioned so no phrase appears twice anywhere
    seen: set = set()
    phrases = unique(lambda: shout_phrase(rng), N_TRAIN + N_EVAL + N_CHAT_TRAIN + N_CHAT_EVAL, seen)
    sh = [{"prompt": f"Shout: {p}\nAnswer:", "completion": " " + p.upper()} for p in phrases]
    out["shout"] = {"train": sh[:N_TRAIN], "eval": sh[N_TRAIN : N_TRAIN + N_EVAL]}
    chat_ph = phrases[N_TRAIN + N_EVAL :]
    chat = []
    for i, p in enumerate(chat_ph):
        ask = CHAT_ASKS[i % len(CHAT_ASKS)] if i < N_CHAT_TRAIN else rng.choice(CHAT_ASKS)
        chat.append(
            {
                "messages": [
                    {"role": "user", "content": ask.format(p=p)},
                    {"role": "assistant", "content": p.upper()},
                ]
            }
        )
    out["chat"] = {"train": chat[:N_CHAT_TRAIN], "eval": chat[N_CHAT_TRAIN:]}

    # reverse: eval word sets are never a permutation of a train word set
    seen_sets: set = set()
    rows = []
    while len(rows) < N_TRAIN + N_EVAL:
        ws = reverse_words(rng)
        key = frozenset(ws)
        if key in seen_sets:
            continue
        seen_sets.add(key)
        rows.append(
            {
                "prompt": f"Reverse: {' '.join(ws)}\nAnswer:",
                "completion": " " + " ".join(reversed(ws)),
            }
        )
    out["reverse"] = {"train": rows[:N_TRAIN], "eval": rows[N_TRAIN:]}

    # dates: 1950-2049, each date used once
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), N_TRAIN + N_EVAL)
    rows = []
    for k in days:
        d = start + dt.timedelta(days=k)
        rows.append({"prompt": f"Date: {d.isoformat()}\nAnswer:", "completion": " " + fmt_date(d)})
    out["dates"] = {"train": rows[:N_TRAIN], "eval": rows[N_TRAIN:]}
    return out


def check(data: dict[str, dict[str, list[dict]]]) -> None:
    corpus_words: set[str] = set()
    if CORPUS.exists():
        corpus_words = set(re.findall(r"[A-Za-z]+", CORPUS.read_text(encoding="utf-8")))
    for domain, splits in data.items():
        keys = {}
        for split in ("train", "eval"):
            path = HERE / domain / f"{split}.jsonl"
            lines = path.read_text(encoding="utf-8").splitlines()
            assert len(lines) == len(splits[split]), path
            ks = set()
            for line in lines:
                r = json.loads(line)
                if domain == "chat":
                    m = r["messages"]
                    assert [x["role"] for x in m] == ["user", "assistant"], r
                    assert all(isinstance(x["content"], str) and x["content"] for x in m), r
                    k = m[0]["content"].lower()
                    words = re.findall(r"[A-Za-z]+", m[0]["content"] + " " + m[1]["content"])
                else:
                    assert set(r) == {"prompt", "completion"}, r
                    assert r["prompt"].endswith("\nAnswer:"), r
                    c = r["completion"]
                    assert c.startswith(" ") and not c.endswith("\n") and c.strip() == c[1:], r
                    k = r["prompt"].split("\n")[0]
                    if domain == "reverse":
                        k = " ".join(sorted(k.split()[1:]))
                    words = re.findall(r"[A-Za-z]+", r["prompt"] + " " + c)
                ks.add(k)
                if corpus_words:
                    missing = [
                        w
                        for w in words
                        if w not in corpus_words and (w.isupper() or w.lower() not in corpus_words)
                    ]
                    assert not missing, (domain, missing)
            assert len(ks) == len(lines), f"duplicate prompts in {path}"
            keys[split] = ks
        assert not keys["train"] & keys["eval"], f"train/eval overlap in {domain}"
    sh = {
        json.loads(x)["prompt"][7:-8]
        for s in ("train", "eval")
        for x in (HERE / "shout" / f"{s}.jsonl").read_text().splitlines()
    }
    ch = {
        json.loads(x)["messages"][1]["content"].lower()
        for s in ("train", "eval")
        for x in (HERE / "chat" / f"{s}.jsonl").read_text().splitlines()
    }
    assert not sh & ch, "shout and chat phrases overlap"
    if not corpus_words:
        print("note: corpus.txt not found; skipped the vocabulary check (run make_corpus.py)")


def main() -> None:
    data = build()
    for domain, splits in data.items():
        for split, rows in splits.items():
            write_jsonl(HERE / domain / f"{split}.jsonl", rows)
    check(data)
    for domain, splits in data.items():
        print(f"{domain}: train={len(splits['train'])} eval={len(splits['eval'])}")


if __name__ == "__main__":
    main()
