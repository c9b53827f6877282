"""Picking each row's next token from its logits: greedy rows all at once on the device, sampled
rows (temperature > 0) one by one with their own seeded generator, and rows whose logits are
unusable (NaN, +inf: broken adapter weights) reported so that row alone can end."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GREEDY_BELOW = 1e-5  # a temperature at or below this is greedy decoding


class NonFiniteLogits(ValueError):
    """A row's logits (or its temperature-scaled logits) hold NaN or +infinity."""


def unusable(logits: torch.Tensor) -> torch.Tensor:
    """Per row (last dim = vocabulary): any NaN, any +inf, or no finite value at all (-inf
    alone masks a token, which is fine)."""
    return (
        torch.isnan(logits).any(-1)
        | torch.isposinf(logits).any(-1)
        | ~torch.isfinite(logits).any(-1)
    )


def pick_tokens(
    logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float], generators
) -> list[int | None]:
    """Next token of each row of `logits` (rows × vocabulary, float32); None for a row whose
    logits cannot be sampled from. One transfer to the host for the greedy rows."""
    bad = unusable(logits)
    sampled = [i for i, t in enumerate(temperatures) if t > GREEDY_BELOW]
    greedy_tokens = torch.argmax(logits, dim=-1)
    tokens: list[int | None] = greedy_tokens.tolist()
    for i, flag in enumerate(bad.tolist()):
        if flag:
            tokens[i] = None
    for i in sampled:
        if tokens[i] is None:
            continue
        try:
            tokens[i] = sample_one(logits[i], temperatures[i], top_ps[i], generators[i])
        except NonFiniteLogits:
            tokens[i] = None
    return tokens


def sample_one(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """One token from softmax(logits / temperature), nucleus-truncated to `top_p` (the most
    likely token always stays, so top_p → 0 is greedy), drawn with the row's own generator."""
    scaled = logits / temperature  # finite logits can overflow at a tiny temperature
    if bool(unusable(scaled)):
        raise NonFiniteLogits
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        cut = cumulative - sorted_probs >= top_p  # keep the smallest set reaching top_p
        cut[0] = False
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
