"""A preallocated KV cache where every row owns one slot and its own positions.

Row r's tokens sit at positions [0, length_r) of slot r: its prefix-tuning key/values (if any),
then its prompt, then what it generated. Rows never share a timeline, so a row joins by writing
its own slot (no other row moves), leaves by handing its slot to the last row (one row's copy),
and a decode step writes one column per row at that row's own length.

Shapes are static: the buffers are allocated once (and only grow, rarely, by reallocation), a
forward reads a window of slots [start, start + B) and of positions [0, view). That is what
lets a decode step be captured as a CUDA graph and replayed (decode.py).

transformers' attention calls `cache.update(keys, values, layer_idx, ...)` with the states of
the tokens being computed and attends over what it returns; the mask and position ids are
always passed in ready-made, so nothing else of transformers' Cache interface is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """What one cached token costs: layers × key/value heads × head size, in one dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> KVShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        return 2 * self.layers * self.kv_heads * self.head_dim * element


class RowKVCache:
    """Keys and values of up to `slots` rows of up to `length` positions each, per layer."""

    is_compileable = True  # static buffers; tells transformers not to expect a dynamic cache

    def __init__(self, shape: KVShape, *, slots: int, length: int, device) -> None:
        self.shape = shape
        self.device = torch.device(device)
        self.slots, self.length = slots, length
        size = (slots, shape.kv_heads, length, shape.head_dim)
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.version = 0  # bumped when the buffers are reallocated (captured graphs go stale)
        self._start = 0
        self._cols: torch.Tensor | None = None
        self._view = length

    @property
    def nbytes(self) -> int:
        return self.slots * self.length * self.shape.bytes_per_token

    # -- a forward's window -------------------------------------------------------------

    def window(self, start: int, cols: torch.Tensor, view: int) -> None:
        """The next forward computes rows start.. start + B (B = cols.shape[0]) whose tokens go
        to positions `cols` (B, L), and attends over positions [0, view)."""
        if view > self.length:
            raise ValueError(f"view {view} exceeds the cache length {self.length}")
        self._start, self._cols, self._view = start, cols, view

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """transformers' hook: store this forward's keys/values, return the window to attend."""
        batch = key_states.shape[0]
        keys = self.keys[layer_idx][self._start : self._start + batch]
        values = self.values[layer_idx][self._start : self._start + batch]
        index = self._cols[:, None, :, None].expand(
            -1, key_states.shape[1], -1, key_states.shape[3]
        )
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        return keys[:, :, : self._view], values[:, :, : self._view]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly; transformers must not infer them

    # -- rows joining and leaving -------------------------------------------------------

    def write_prefix(self, slot: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Put a prefix-tuning adapter's per-layer (keys, values) — (kv_heads, P, head_dim) —
        at positions [0, P) of `slot`; returns P."""
        length = int(prefix[0][0].shape[1])
        for layer, (k, v) in enumerate(prefix):
            self.keys[layer][slot, :, :length] = k
            self.values[layer][slot, :, :length] = v
        return length

    def clear(self, slot: int, start: int, end: int) -> None:
        """Zero positions [start, end) of `slot`. Masked positions must hold finite values:
        attention adds the mask to q·k, and NaN + (-inf) is NaN, so a slot reused after a
        broken adapter's row would poison its next row."""
        if end > start:
            for keys, values in zip(self.keys, self.values, strict=True):
                keys[slot, :, start:end] = 0
                values[slot, :, start:end] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions to slot `dst` (a row changing slots)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def grow(self, *, slots: int, length: int, keep_rows: int, keep_length: int) -> None:
        """Reallocate to at least (slots, length), keeping the first `keep_rows` slots' first
        `keep_length` positions."""
        slots, length = max(slots, self.slots), max(length, self.length)
        if (slots, length) == (self.slots, self.length):
            return
        size = (slots, self.shape.kv_heads, length, self.shape.head_dim)
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                new = torch.zeros(size, dtype=old.dtype, device=old.device)
                new[:keep_rows, :, :keep_length] = old[:keep_rows, :, :keep_length]
                buffers[layer] = new
        self.slots, self.length = slots, length
        self.version += 1


def bucket(n: int, *, smallest: int = 1, largest: int | None = None) -> int:
    """The power of two (at least `smallest`) that holds n, capped at `largest`: shapes come from
    a few buckets, so a few captured graphs (or compiled kernels) serve every size."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest) if largest is not None else size
