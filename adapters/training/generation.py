"""Greedy decoding by plain full forward passes, for every adapter kind.

No `model.generate`: with transformers 5, PEFT's prefix-tuning `generate()` can ignore the
prefix that `forward()` applies, so an eval built on it would score the base, not the adapter.
A full forward per new token costs O(n^2) but is exact for LoRA, prefix, prompt and IA3 alike,
and the prompts here are short.
"""

from __future__ import annotations

from collections.abc import Callable


def greedy_ids(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    device=None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Token ids greedily generated after `prompt_ids` (eos excluded), one row at a time.

    `stop(new_ids)` may end generation early (an exact-match scorer that already knows the
    answer is wrong)."""
    import torch

    device = device or next(p.device for p in model.parameters())
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            token = int(logits[0, -1].argmax())
            if eos_id is not None and token == eos_id:
                break
            out.append(token)
            if stop is not None and stop(out):
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return out


def generate_text(model, tokenizer, prompt: str | list[int], *, max_new_tokens: int = 64) -> str:
    """The greedy continuation of `prompt` (a string, or token ids) as text."""
    ids = prompt if isinstance(prompt, list) else list(tokenizer(prompt)["input_ids"])
    was_training = model.training
    model.eval()
    try:
        new = greedy_ids(model, ids, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(new, skip_special_tokens=True)
