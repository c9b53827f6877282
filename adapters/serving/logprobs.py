"""Log-probabilities of tokens under a row's raw logits, for `logprobs`, `echo` scoring and
`best_of`: the token's own log-probability and the `k` most likely alternatives, computed on
the device in one pass per step and sent to the host once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_TOP = 20  # alternatives per token, as OpenAI and vLLM allow


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely first


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]
) -> list[TokenLogprob]:
    """Row i of `logits` (rows × vocabulary) scored at `tokens[i]`, with its `ks[i]` most likely
    tokens. Log-softmax in float32, whatever the model's dtype."""
    if not len(tokens):
        return []
    logits = logits.float()
    # log-softmax only where it is read: logit − logsumexp (no vocabulary-sized copy)
    total = torch.logsumexp(logits, dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = (logits.gather(1, index[:, None])[:, 0] - total).tolist()
    k = min(max(ks, default=0), logits.shape[-1])
    if k:
        values, ids = torch.topk(logits, k, dim=-1)
        values, ids = (values - total[:, None]).tolist(), ids.tolist()
    out = []
    for i, token in enumerate(tokens):
        top = list(zip(ids[i][: ks[i]], values[i][: ks[i]], strict=True)) if k else []
        out.append(TokenLogprob(int(token), chosen[i], top))
    return out


def cumulative(entries: Sequence[TokenLogprob | None]) -> float:
    return sum(e.logprob for e in entries if e is not None)
