"""Measuring models against each other: load a registry adapter on its base, score a model on
eval data, and compare two models' logits on the same prompts (max |Δlogit|, mean KL).

Merging (adapters.merge) and merged export (adapters.export) both judge their result this way;
both sides of every comparison run through the same code so the numbers are comparable.
"""

from __future__ import annotations

from pathlib import Path

from adaptory.registry.errors import DataError

# Quantization label in a fingerprint ("nf4+dq") -> load_base's quant argument.
QUANT_OF_LABEL = {"nf4+dq": "nf4", "fp4+dq": "fp4", "int8": "int8", "none": "none"}

# Held-out prompts when an adapter's eval data is not known.
BUILTIN_PROMPTS = (
    "the cat sat on the mat.",
    "Shout: the dog ran to the park\nAnswer:",
    "my order arrived late and the box was broken.",
    "the battery lasts all day and the screen is bright.",
)


def entry_quant(entry) -> str:
    """The quantization an entry's adapter was trained on (nf4 when unknown)."""
    label = (entry.base_fingerprint or {}).get("quant")
    return QUANT_OF_LABEL.get(label, "nf4")


def entry_labels(entry) -> list[str] | None:
    labels = (entry.extra or {}).get("labels")
    return list(labels) if labels else None


def load_entry_model(registry, entry, *, quant: str | None = None, device: str = "cpu"):
    """(PeftModel, LoadedBase): `entry`'s adapter on its base, quantized as it was trained, with
    the same 4-bit kernels as training and `adaptory eval` (BaseMismatch on another base)."""
    from adaptory.adapters.training.evaluate import load_adapter_model

    model, loaded, _ = load_adapter_model(
        registry, entry.ref, quant=quant or entry_quant(entry), device=device
    )
    return model, loaded


# --- eval data ---------------------------------------------------------------------------------


def held_out_prompts(entry, tokenizer, count: int = 6) -> list[str]:
    """A few texts to compare logits on: the entry's eval data when known, else built-ins."""
    from adaptory.adapters.training.data import read_rows

    data = eval_file(entry)
    if data is not None:
        try:
            texts = [_prompt_text(row, tokenizer) for _, row in read_rows(data)[:count]]
            return [t for t in texts if t] or list(BUILTIN_PROMPTS[:count])
        except DataError:
            pass
    return list(BUILTIN_PROMPTS[:count])


def _prompt_text(row: dict, tokenizer) -> str:
    """The text a model reads for one eval row (prompt+completion, chat, or text)."""
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]) + str(row["completion"])
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    return str(row.get("text") or "")


def eval_file(entry) -> Path | None:
    """The entry's eval data file, if its dataset records one that still exists."""
    value = (entry.dataset or {}).get("eval_file")
    if value and Path(value).is_file():
        return Path(value)
    return None


# --- scoring -----------------------------------------------------------------------------------


def score_on_file(model, tokenizer, entry, data: Path, *, limit: int | None = None) -> dict:
    """Metrics of `model` (an adapter on its base, or a merged model) on `entry`'s kind of data.

    The metrics of `adaptory eval` (adapters.evaluate), generation-based exact match left out:
    the comparison needs the same numbers on both sides, not the slowest ones.
    """
    from adaptory.adapters.training.data import load_dataset
    from adaptory.adapters.training.evaluate import evaluate_model

    dataset = load_dataset(
        Path(data),
        tokenizer=tokenizer,
        task=entry.task,
        max_length=int((entry.training_config or {}).get("max_length") or 128),
        labels=entry_labels(entry),
        limit=limit,
    )
    metrics = evaluate_model(model, tokenizer, entry.task, dataset, generate=False)
    return {k: v for k, v in metrics.items() if k != "confusion_matrix"}


def evaluate_entry_on(registry, entry, data: Path, *, limit: int | None = None) -> dict:
    """Metrics of a registry adapter (on its quantized base) on `data`: the numbers
    `adaptory eval` prints, so merge results sit next to comparable ones."""
    from adaptory.adapters.training.evaluate import evaluate_entry

    metrics = evaluate_entry(registry, entry.ref, Path(data), record=False, limit=limit)
    return {k: v for k, v in metrics.items() if k != "confusion_matrix"}


# --- logits ------------------------------------------------------------------------------------


def prompt_logits(model, tokenizer, prompts: list[str], *, max_length: int = 128):
    """[(logits of one prompt, float32 on CPU, padding dropped)] for each prompt, one at a time
    (no padding, so two models are compared on exactly the same positions)."""
    import torch

    device = next(model.parameters()).device
    out = []
    for text in prompts:
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        with torch.no_grad():
            logits = model(**enc.to(device)).logits
        out.append(logits[0].float().cpu())
    return out


def compare_logits(reference: list, candidate: list) -> dict[str, float]:
    """max |Δlogit| and mean KL(reference ‖ candidate) over every position of every prompt."""
    import torch

    max_abs, kls = 0.0, []
    for ref, cand in zip(reference, candidate, strict=True):
        ref2, cand2 = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        max_abs = max(max_abs, float((ref2 - cand2).abs().max()))
        log_p = torch.log_softmax(ref2.double(), -1)
        log_q = torch.log_softmax(cand2.double(), -1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
    kl = torch.cat(kls)
    return {"max_abs_dlogit": max_abs, "mean_kl": float(kl.mean()), "positions": int(kl.numel())}
