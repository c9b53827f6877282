"""What each token contributes to the text: its bytes, and the name logprobs give it.

Decoding a token alone is wrong for a token that holds part of a character. Byte-level BPE
(GPT-2, Llama 3, Qwen) and SentencePiece's byte fallback (Llama 2, Mistral) split "é" into two
tokens, and each decodes alone to U+FFFD. Named by that text, the two collide as keys of a legacy
`top_logprobs` dict (one hides the other, and lm-eval's greedy check then reads the wrong
logprob), chat's `bytes` give U+FFFD's three bytes instead of the token's one, and `text_offset`
counts two characters where the text has one. Such a token's bytes are read from its vocabulary
entry instead, and it is named as OpenAI names it: `bytes:\\xc3`.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens
REPLACEMENT = "\ufffd"


@functools.cache
def byte_level_table() -> dict[str, int]:
    """Byte-level BPE's vocabulary alphabet (GPT-2's `bytes_to_unicode`), character to byte:
    printable bytes stand for themselves, the other 68 for the characters from U+0100 on, in
    byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def vocab_bytes(token: str) -> bytes | None:
    """The bytes a vocabulary entry stands for when it is a byte-fallback (`<0xC3>`) or
    byte-level (`Ã`) token; None for any other kind."""
    match = BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    table = byte_level_table()
    if token and all(c in table for c in token):
        return bytes(table[c] for c in token)
    return None


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's own bytes: its decoded text, unless that holds U+FFFD and the vocabulary
    entry says which bytes it stands for. Special tokens as written."""
    if not ids:
        return []
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    pieces = []
    for token, text in zip(ids, texts, strict=True):
        raw = None
        if REPLACEMENT in text:
            raw = vocab_bytes(tokenizer.convert_ids_to_tokens(token))
        pieces.append(raw if raw is not None else text.encode("utf-8"))
    return pieces


def token_name(piece: bytes) -> str:
    """A token's text, or `bytes:\\xNN...` when its bytes are not whole UTF-8 characters."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


class TextOffsets:
    """Where each token starts in the text, in characters, across the chunks of one choice.

    A token that ends inside a character adds nothing until the token that completes it; the
    character then counts once, and both tokens start where it starts. Bytes that never form a
    character count as the U+FFFD that decoding writes for them, before the token that shows
    they never will."""

    def __init__(self, start: int = 0) -> None:
        self.at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, pieces: Iterable[bytes]) -> list[int]:
        """Each piece's starting offset; the text position moves past them."""
        starts = []
        for piece in pieces:
            held, _ = self._decoder.getstate()
            if held and piece and not 0x80 <= piece[0] <= 0xBF:  # not a continuation byte
                starts.append(self.at + len(held.decode("utf-8", errors="replace")))
            else:
                starts.append(self.at)
            self.at += len(self._decoder.decode(piece))
        return starts
