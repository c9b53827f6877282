"""Classification on a runtime's shared encoder: rows with different adapters (and heads with
different label counts) in one encoder pass, truncated to what the encoder can position."""

from __future__ import annotations

from adaptory.registry.errors import ConfigError


def classify(rt, ref: str, texts: list[str]) -> list[dict]:
    """Labels and scores of each text under one adapter."""
    return rt.classify_mixed([(ref, t) for t in texts])


def classify_max_length(rt) -> int:
    """Longest input the encoder takes, in tokens; longer texts are truncated to it.

    The tokenizer's `model_max_length` can exceed the model's position table (a small
    encoder saved with its parent's tokenizer), so the table caps it too.
    """
    limit = int(min(rt.tokenizer.model_max_length, 1 << 20))
    positions = rt.max_positions
    if positions:
        embeddings = getattr(rt.model.base_model, "embeddings", None)
        # RoBERTa-style embeddings number positions from padding_idx + 1
        offset = getattr(embeddings, "padding_idx", None)
        limit = min(limit, positions - (offset + 1 if offset is not None else 0))
    return limit


def classify_lengths(rt, texts: list[str]) -> list[int]:
    """Each text's token count as classified (special tokens in, truncated)."""
    with rt._tok_lock:
        ids = rt.tokenizer(texts, truncation=True, max_length=rt.classify_max_length())
    return [len(row) for row in ids["input_ids"]]


def classify_mixed(rt, rows: list[tuple[str, str]]) -> list[dict]:
    """One encoder pass for (adapter ref, text) rows with different adapters and heads."""
    import torch

    if rt.task != "seq-cls":
        raise ConfigError(f"base {rt.base_ref} is a {rt.task} base, not a classifier")
    if not rows:
        return []
    acquired = []
    try:
        with rt.lock:
            for ref, _ in rows:
                acquired.append(rt._acquire(ref))
            limit = rt.classify_max_length()
            with rt._tok_lock:
                enc = rt.tokenizer(
                    [t for _, t in rows],
                    padding=True,
                    truncation=True,
                    max_length=limit,
                    return_tensors="pt",
                )
            enc = {k: v.to(rt.base.device) for k, v in enc.items()}
            with torch.inference_mode(), rt._rows([key for key, _ in acquired]):
                encoder = rt.model.base_model
                out = encoder(**enc)
            results = []
            for i, (_key, adapter) in enumerate(acquired):
                logits = _apply_head(adapter.head, out, i, encoder)
                probs = torch.softmax(logits.float(), dim=-1).tolist()
                scores = dict(zip(adapter.labels, probs, strict=True))
                best = max(range(len(probs)), key=probs.__getitem__)
                results.append({"label": adapter.labels[best], "scores": scores})
            return results
    finally:
        for _key, adapter in acquired:
            rt._release(adapter)


def _apply_head(head: dict, out, row: int, encoder):
    """Logits of one row: BERT-style (pooler + classifier) or RoBERTa-style (dense + out_proj)."""
    import torch
    import torch.nn.functional as F

    hidden = out[0][row : row + 1]  # (1, seq, hidden)
    if "classifier.out_proj.weight" in head:
        x = hidden[:, 0].float()
        x = torch.tanh(
            F.linear(x, head["classifier.dense.weight"], head.get("classifier.dense.bias"))
        )
        return F.linear(
            x, head["classifier.out_proj.weight"], head.get("classifier.out_proj.bias")
        )[0]
    if "classifier.weight" in head:
        if "pooler.dense.weight" in head:
            pooled = torch.tanh(
                F.linear(
                    hidden[:, 0].float(), head["pooler.dense.weight"], head.get("pooler.dense.bias")
                )
            )
        elif len(out) > 1 and out[1] is not None:
            pooled = out[1][row : row + 1].float()
        else:
            pooled = hidden[:, 0].float()
        return F.linear(pooled, head["classifier.weight"], head.get("classifier.bias"))[0]
    raise ConfigError("unrecognised classification head (expected classifier.* weights)")
