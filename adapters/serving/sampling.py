"""Picking each row's next token from its logits: greedy rows all at once on the device, sampled
rows (temperature > 0) one by one with their own seeded generator, and rows whose logits are
unusable (NaN, +inf: broken adapter weights) reported so that row alone can end.

Before picking, a row's own controls reshape its logits, in vLLM's order: `logit_bias`, the
end-of-sequence mask of `min_tokens`, then the repetition, frequency and presence penalties.
The sampler then applies temperature, `top_k`, `top_p` and `min_p`. Reported logprobs are those
of the model's raw logits, before any of this (vLLM's default `raw_logprobs`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature at or below this is greedy decoding


class NonFiniteLogits(ValueError):
    """A row's logits (or its temperature-scaled logits) hold NaN or +infinity."""


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens (the sampling fields of its request)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


@dataclass(frozen=True)
class Controls:
    """What reshapes one row's logits before it samples (all off by default)."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def active(self) -> bool:
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    def apply(
        self,
        logits: torch.Tensor,
        *,
        prompt: Sequence[int],
        generated: Sequence[int],
        ends: Collection[int],
    ) -> torch.Tensor:
        """One row's logits (vocabulary,) reshaped, as a new tensor. `generated` counts every
        sampled token; `ends` are the tokens `min_tokens` keeps out until it is reached."""
        out = logits.clone()
        vocab = out.shape[-1]
        for token, bias in self.logit_bias:
            if token < vocab:
                out[token] += bias
        if self.min_tokens and len(generated) < self.min_tokens:
            masked = [t for t in ends if t < vocab]
            if masked:
                out[masked] = -float("inf")
        if self.repetition_penalty != 1.0:  # CTRL's penalty over prompt and output, as vLLM
            seen = torch.tensor(sorted({*prompt, *generated}), dtype=torch.long)
            seen = seen[seen < vocab].to(out.device)
            values = out[seen]
            out[seen] = torch.where(
                values > 0, values / self.repetition_penalty, values * self.repetition_penalty
            )
        if (self.presence_penalty or self.frequency_penalty) and generated:
            ids = torch.tensor(list(generated), dtype=torch.long, device=out.device)
            ids = ids[ids < vocab]
            counts = torch.zeros(vocab, dtype=out.dtype, device=out.device)
            counts.scatter_add_(0, ids, torch.ones(len(ids), dtype=out.dtype, device=out.device))
            out -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0)
        return out


def unusable(logits: torch.Tensor) -> torch.Tensor:
    """Per row (last dim = vocabulary): any NaN, any +inf, or no finite value at all (-inf
    alone masks a token, which is fine)."""
    return (
        torch.isnan(logits).any(-1)
        | torch.isposinf(logits).any(-1)
        | ~torch.isfinite(logits).any(-1)
    )


def pick_tokens(
    logits: torch.Tensor, samplings: Sequence[Sampling], generators
) -> list[int | None]:
    """Next token of each row of `logits` (rows × vocabulary, float32); None for a row whose
    logits cannot be sampled from. One transfer to the host for the greedy rows."""
    bad = unusable(logits)
    greedy_tokens = torch.argmax(logits, dim=-1)
    tokens: list[int | None] = greedy_tokens.tolist()
    for i, flag in enumerate(bad.tolist()):
        if flag:
            tokens[i] = None
    for i, sampling in enumerate(samplings):
        if sampling.greedy or tokens[i] is None:
            continue
        try:
            tokens[i] = sample_one(logits[i], sampling, generators[i])
        except NonFiniteLogits:
            tokens[i] = None
    return tokens


def sample_one(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    """One token from softmax(logits / temperature), cut to the `top_k` most likely, to the
    nucleus `top_p` and to tokens at least `min_p` times as likely as the best (the most likely
    token always stays, so top_p → 0 is greedy), drawn with the row's own generator."""
    scaled = logits / sampling.temperature  # finite logits can overflow at a tiny temperature
    if bool(unusable(scaled)):
        raise NonFiniteLogits
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -float("inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.min_p > 0:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        cut = cumulative - sorted_probs >= sampling.top_p  # keep the smallest set reaching it
        cut[0] = False
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
