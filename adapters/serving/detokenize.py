"""Text of a growing token sequence, one decode of a few tokens per new token instead of the
whole sequence every step (which costs O(n²) over a generation).

The method vLLM uses: decode a short window ending at the new token, and a window ending just
before it, both starting at the same earlier token (`prefix_offset`), and keep the difference.
Starting both at the same token cancels what tokenizers do at the start of a decode (a
SentencePiece "▁word" loses its space there); waiting while the text ends in U+FFFD keeps a
character split across byte-level tokens from being emitted half-made.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalText:
    """Appends tokens and keeps `text` equal to decoding them all (skipping special tokens)."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    def add(self, token: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.text += delta
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def finish(self) -> str:
        """Flush what is still held back (an incomplete character at the very end)."""
        rest = self._decode(self.ids[self.prefix_offset :])
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        delta = rest[len(prefix) :] if len(rest) > len(prefix) else ""
        self.text += delta
        self.read_offset = len(self.ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
