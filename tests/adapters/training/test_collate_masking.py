"""Batching and label masking, checked against transformers' own collators and the tokenizer
itself: which tokens a prompt-completion, text or chat row learns from, what padding looks like,
and what a classification row keeps.

Written against the mutants of adapters/training/data.py that test_data.py let survive
(docs/TESTING.md); fast, so `make mutation` runs it first for that module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptory.adapters.training.data import IGNORE, Example, collate, tokenize_rows
from adaptory.registry.errors import DataError

PATH = Path("rows.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_llama_dir):
    """The tiny tokenizer made to add `<s>` in front, as most real ones do, so that
    with and without special tokens differ."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    assert tok("the")["input_ids"][0] == bos != tok("the", add_special_tokens=False)["input_ids"][0]
    return tok


def _rows(*rows: dict) -> list[tuple[int, dict]]:
    return list(enumerate(rows, start=1))


# --- collate -----------------------------------------------------------------------------------


def test_collate_pads_like_transformers_seq2seq_collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    examples = [
        Example(line=1, input_ids=[5, 6, 7], labels=[IGNORE, 6, 7]),
        Example(line=2, input_ids=[8], labels=[8]),
        Example(line=3, input_ids=[9, 10, 11, 12, 13], labels=[IGNORE, IGNORE, 11, 12, 13]),
    ]
    pad = tokenizer.pad_token_id
    ours = collate(examples, pad_id=pad, task="causal-lm")
    theirs = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    )
    assert set(ours) == {"input_ids", "attention_mask", "labels"}
    for key in ours:
        assert ours[key].dtype == torch.long, key
        assert ours[key].tolist() == theirs[key].tolist(), key
    assert ours["attention_mask"].tolist()[1] == [1, 0, 0, 0, 0]


def test_collate_for_classification_gives_one_label_per_row(tokenizer):
    from transformers import DataCollatorWithPadding

    examples = [Example(line=1, input_ids=[5, 6], label=1), Example(line=2, input_ids=[7], label=0),
                Example(line=3, input_ids=[8, 9, 10], label=2)]  # fmt: skip
    ours = collate(examples, pad_id=tokenizer.pad_token_id, task="seq-cls")
    theirs = DataCollatorWithPadding(tokenizer)(
        [{"input_ids": e.input_ids, "labels": e.label} for e in examples]
    )
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    assert ours["labels"].dtype == torch.long and ours["labels"].shape == (3,)


def test_collate_options_are_keywords():
    with pytest.raises(TypeError):
        collate([Example(line=1, input_ids=[1], labels=[1])], 0, "causal-lm")  # type: ignore[misc]


# --- what a row learns from ----------------------------------------------------------------------


def test_prompt_completion_masks_the_prompt_and_learns_completion_and_eos(bos_tokenizer):
    tok = bos_tokenizer
    prompt, completion = "Shout: the cat sat\nAnswer:", " THE CAT SAT."
    (example,), _ = tokenize_rows(
        _rows({"prompt": prompt, "completion": completion}),
        path=PATH, fmt="prompt-completion", tokenizer=tok, max_length=128,
    )  # fmt: skip
    p = tok(prompt)["input_ids"]  # with <s>, as a prompt is read at inference
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example.input_ids == p + c
    assert example.labels == [IGNORE] * len(p) + c
    assert (example.prompt, example.completion) == (prompt, completion)


def test_text_rows_learn_every_token_including_the_special_ones(bos_tokenizer):
    tok = bos_tokenizer
    (example,), _ = tokenize_rows(
        _rows({"text": "the dog ran"}), path=PATH, fmt="text", tokenizer=tok, max_length=128
    )
    want = tok("the dog ran")["input_ids"] + [tok.eos_token_id]
    assert example.input_ids == example.labels == want


def test_rows_are_cut_to_max_length_labels_with_them(bos_tokenizer):
    tok = bos_tokenizer
    prompt, completion = "the cat", " sat on the mat and the dog ran to the park"
    (example,), _ = tokenize_rows(
        _rows({"prompt": prompt, "completion": completion}),
        path=PATH, fmt="prompt-completion", tokenizer=tok, max_length=6,
    )  # fmt: skip
    full = tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
    assert example.input_ids == full[:6] and len(example.labels) == 6


def test_a_row_cut_before_its_completion_is_refused(tokenizer):
    with pytest.raises(DataError, match="no tokens to learn from within max_length 2"):
        tokenize_rows(
            _rows({"prompt": "the cat sat on the mat", "completion": " yes"}),
            path=PATH, fmt="prompt-completion", tokenizer=tokenizer, max_length=2,
        )  # fmt: skip


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "HELLO"},
    {"role": "user", "content": "the cat"},
    {"role": "assistant", "content": "THE CAT SAT"},
]


def test_chat_rows_learn_exactly_the_assistant_turns(tokenizer):
    (example,), _ = tokenize_rows(
        _rows({"messages": CHAT}), path=PATH, fmt="chat", tokenizer=tokenizer, max_length=512
    )
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert example.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    learned = [t for t in example.labels if t != IGNORE]
    eos = tokenizer.eos_token
    # each assistant turn as the template writes it after its generation prompt, up to and
    # including what closes the turn (eos and the newline)
    want = f"HELLO{eos}\nTHE CAT SAT{eos}\n"
    assert tokenizer.decode(learned) == want
    kept = [i for i, t in enumerate(example.labels) if t != IGNORE]
    assert all(example.labels[i] == example.input_ids[i] for i in kept)
    assert tokenizer.decode([example.input_ids[i] for i in range(kept[0])]).endswith(
        "<|assistant|>\n"
    )


def test_a_template_that_renders_a_finished_assistant_turn_differently_is_refused(tokenizer):
    """An assistant turn rendered alone must be a prefix of the whole conversation; this
    template closes only a conversation's last assistant turn with [END], so the first turn's
    rendering is not a prefix (the user turns before it are)."""
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}[END]{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    with pytest.raises(DataError, match="does not render conversations prefix by prefix"):
        tokenize_rows(_rows({"messages": CHAT}), path=PATH, fmt="chat", tokenizer=tok,
                      max_length=512)  # fmt: skip
    # the same template is fine when the only assistant turn is the last message
    (example,), _ = tokenize_rows(
        _rows({"messages": CHAT[:3]}), path=PATH, fmt="chat", tokenizer=tok, max_length=512
    )
    # the newline after [END] is a whitespace token whose offsets the tokenizer trims to nothing:
    # it cannot be placed in the text, so it is not learned
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "HELLO[END]"


def test_every_assistant_turn_is_checked_not_only_the_turns_before_it(tokenizer):
    """Two user turns before each assistant turn: the conversation up to the first assistant
    turn (not just the one before it) must be a prefix of the whole, or the row is refused."""
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}[END]{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    turns = [("user", "hi"), ("user", "shout it"), ("assistant", "HI"),
             ("user", "again"), ("user", "louder"), ("assistant", "HI!")]  # fmt: skip
    messages = [{"role": r, "content": c} for r, c in turns]
    with pytest.raises(DataError, match="does not render conversations prefix by prefix"):
        tokenize_rows(_rows({"messages": messages}), path=PATH, fmt="chat", tokenizer=tok,
                      max_length=512)  # fmt: skip


def test_chat_ids_are_the_rendered_text_without_added_special_tokens(bos_tokenizer):
    """The template writes every special token itself; the tokenizer adds none (no second
    `<s>`), so the ids are exactly the rendered conversation's."""
    tok = bos_tokenizer
    (example,), _ = tokenize_rows(
        _rows({"messages": CHAT}), path=PATH, fmt="chat", tokenizer=tok, max_length=512
    )
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert example.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert example.input_ids[0] != tok.bos_token_id


def test_a_conversation_opened_by_the_assistant_learns_from_its_first_token(tokenizer):
    messages = [{"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "hi"}]
    (example,), _ = tokenize_rows(
        _rows({"messages": messages}), path=PATH, fmt="chat", tokenizer=tokenizer, max_length=64
    )
    assert example.labels[0] == example.input_ids[0] != IGNORE
    first_turn = tokenizer.apply_chat_template(messages[:1], tokenize=False)
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == first_turn


def test_tokenize_options_are_keywords(tokenizer):
    with pytest.raises(TypeError):
        tokenize_rows(_rows({"text": "a"}), PATH, "text", tokenizer, 8)  # type: ignore[misc]


# --- classification ----------------------------------------------------------------------------


def test_classification_texts_are_truncated_to_max_length(bos_tokenizer):
    long = "the cat sat on the mat and the dog ran to the park " * 3
    examples, labels = tokenize_rows(
        _rows({"text": long, "label": "b"}, {"text": "a red ball", "label": "a"}),
        path=PATH, fmt="classification", tokenizer=bos_tokenizer, max_length=8,
    )  # fmt: skip
    assert labels == ["a", "b"]
    assert examples[0].input_ids == bos_tokenizer(long, truncation=True, max_length=8)["input_ids"]
    assert len(examples[0].input_ids) == 8 and examples[0].label == 1
    assert examples[1].label == 0


def test_classification_needs_two_labels(tokenizer):
    with pytest.raises(DataError, match=r"needs at least two labels, found \['pos'\]"):
        tokenize_rows(
            _rows({"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}),
            path=PATH, fmt="classification", tokenizer=tokenizer, max_length=16,
        )  # fmt: skip


def test_no_classification_rows_is_a_data_error_not_a_crash(tokenizer):
    with pytest.raises(DataError, match=r"needs at least two labels, found \[\]"):
        tokenize_rows([], path=PATH, fmt="classification", tokenizer=tokenizer, max_length=16)
