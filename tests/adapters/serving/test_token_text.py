"""Tokens that hold part of a character, on real tokenizers: the shipped byte-level `tinylm`
and a SentencePiece-style BPE with byte fallback built here with `tokenizers`.

Oracles: the text's own UTF-8 bytes, `tokenizers`' byte-level alphabet, and the character spans
the tokenizer reports for each token (`return_offsets_mapping`)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from adaptory.adapters.bases.loading import BUILTIN_BASES
from adaptory.adapters.serving.token_text import (
    TextOffsets,
    byte_level_table,
    token_bytes,
    token_name,
    vocab_bytes,
)

# Every character up to U+024F (control characters, Latin-1, Latin Extended: one- and two-byte
# UTF-8, every continuation byte), then three- and four-byte characters.
TEXT = "".join(chr(c) for c in range(1, 0x250)) + " café 日本語 €5 naïve 🙂👍 x"


@pytest.fixture(scope="module")
def byte_level():
    return AutoTokenizer.from_pretrained(str(BUILTIN_BASES["tinylm"].locate()))


@pytest.fixture(scope="module")
def byte_fallback():
    """Llama 2's layout: letters and "▁" in the vocabulary, everything else as <0xNN> tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def test_the_byte_level_table_is_the_byte_level_alphabet():
    table = byte_level_table()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(table.values()) == list(range(256))
    assert table["!"] == 0x21 and table["Ā"] == 0x00 and table["Ġ"] == 0x20  # GPT-2's "Ġ" space


def test_byte_level_tokens_give_back_the_text_byte_for_byte(byte_level):
    """The shipped byte-level base: the tokens' own bytes, joined, are the text's UTF-8 bytes;
    the tokens that decode alone to U+FFFD are named by their bytes, and every name of a token
    with different bytes differs."""
    ids = byte_level(TEXT, add_special_tokens=False)["input_ids"]
    pieces = token_bytes(byte_level, ids)
    assert b"".join(pieces) == TEXT.encode("utf-8")
    alone = byte_level.batch_decode([[i] for i in ids])
    split = [i for i, text in zip(ids, alone, strict=True) if "\ufffd" in text]
    assert split, "the text must split some character across tokens"
    names = {token_name(p): p for p in pieces}
    assert len(names) == len(set(pieces))
    for token in split:
        (piece,) = token_bytes(byte_level, [token])
        assert token_name(piece).startswith("bytes:\\x")
        assert eval("b'" + token_name(piece).removeprefix("bytes:") + "'") == piece  # noqa: S307


def test_byte_fallback_tokens_are_their_byte(byte_fallback):
    ids = byte_fallback("naïve café", add_special_tokens=False)["input_ids"]
    tokens = byte_fallback.convert_ids_to_tokens(ids)
    assert "<0xC3>" in tokens and "<0xAF>" in tokens and "<0xA9>" in tokens
    pieces = token_bytes(byte_fallback, ids)
    by_token = dict(zip(tokens, pieces, strict=True))
    assert by_token["<0xC3>"] == b"\xc3" and by_token["<0xA9>"] == b"\xa9"
    assert [token_name(by_token[t]) for t in ("<0xC3>", "<0xAF>")] == ["bytes:\\xc3", "bytes:\\xaf"]
    assert by_token["n"] == b"n"  # whole characters keep their decoded text
    assert token_bytes(byte_fallback, [1]) == [b"<s>"]  # special tokens as written


def test_vocab_bytes_reads_only_byte_tokens():
    assert vocab_bytes("<0x0A>") == b"\n"
    assert vocab_bytes("Ã©") == "é".encode()
    assert vocab_bytes("ĠÃ") == b" \xc3"
    assert vocab_bytes("<0x0A") == b"<0x0A"  # not a byte token: five printable characters
    assert vocab_bytes("▁the") is None  # SentencePiece's word marker is not a byte-level char
    assert vocab_bytes("") is None


def test_token_names():
    assert token_name(b" the") == " the"
    assert token_name("é".encode()) == "é"
    assert token_name(b"\xc3") == "bytes:\\xc3"
    assert token_name(b"a\xe6\x97") == "bytes:\\x61\\xe6\\x97"


def test_text_offsets_follow_characters_across_chunks(byte_level):
    """Offsets equal the character starts the tokenizer reports, also when the tokens arrive in
    chunks that cut a character in two."""
    encoded = byte_level(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    pieces = token_bytes(byte_level, ids)
    cut = next(k for k, p in enumerate(pieces) if token_name(p).startswith("bytes:")) + 1
    offsets = TextOffsets(start=7)
    got = offsets.advance(pieces[:cut]) + offsets.advance(pieces[cut:])
    assert got == [7 + start for start, _ in spans]
    assert offsets.at == 7 + len(TEXT)


def test_text_offsets_count_broken_bytes_as_the_replacement_character():
    offsets = TextOffsets()
    # "a\xc3b€" decodes to "a�b€": the lone lead byte is one character, "b" comes after it
    assert offsets.advance([b"a", b"\xc3", b"b", b"\xe2\x82", b"\xac"]) == [0, 1, 2, 3, 3]
    assert offsets.at == len(b"a\xc3b\xe2\x82\xac".decode("utf-8", errors="replace"))


@pytest.mark.parametrize(
    ("after", "starts_at"),
    [
        (b"\x80", 1),  # continuation bytes, lowest and highest: the held character goes on
        (b"\xbf", 1),
        (b"\x7f", 2),  # just below them, just above them, or one only later in the token:
        (b"\xc0", 2),  # the held byte was a broken character, which the token comes after
        (b"b\xa9", 2),
    ],
)
def test_a_token_after_a_held_lead_byte(after, starts_at):
    offsets = TextOffsets()
    assert offsets.advance([b"a", b"\xc3", after]) == [0, 1, starts_at]
    assert offsets.at == len((b"a\xc3" + after).decode("utf-8", errors="replace"))
