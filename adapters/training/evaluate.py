"""Evaluation: causal-LM loss, perplexity and exact match; classification accuracy, macro-F1 and
the confusion matrix. Also loads a registry adapter onto its (fingerprint-checked) base.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adaptory.adapters.training.data import (
    Dataset,
    batches,
    collate,
    load_dataset,
    parse_columns,
)
from adaptory.adapters.training.generation import greedy_ids
from adaptory.registry.adapter_files import CHAT_TEMPLATE_FILE
from adaptory.registry.errors import ConfigError

EXACT_MATCH_MAX_NEW_TOKENS = 64


def _device(model):
    return next(p.device for p in model.parameters())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def causal_loss(model, tokenizer, dataset: Dataset, *, batch_size: int = 16) -> dict:
    """Token-weighted mean loss over the label tokens, and its perplexity."""
    import torch

    device = _device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in batches(dataset.examples, batch_size):
            batch = _to(collate(chunk, pad_id=tokenizer.pad_token_id, task="causal-lm"), device)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual tokens
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((shift_labels != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_tokens": count}


def exact_match(model, tokenizer, dataset: Dataset, *, limit: int | None = None) -> dict:
    """Share of prompt/completion rows whose greedy completion equals the reference (stripped)."""
    rows = [e for e in dataset.examples if e.prompt is not None][:limit]
    if not rows:
        return {}
    eos = tokenizer.eos_token_id
    hits, samples = 0, []
    for e in rows:
        prompt_ids = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab == -100]
        want = list(tokenizer(e.completion, add_special_tokens=False)["input_ids"])
        target = e.completion.strip()

        def hopeless(new_ids, target=target) -> bool:
            # Every continuation of the text so far, stripped, starts with it stripped: once
            # that is not a prefix of the answer, the row cannot match any more.
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            return "\ufffd" not in text and not target.startswith(text.strip())

        new = greedy_ids(
            model,
            prompt_ids,
            max_new_tokens=min(len(want) + 8, EXACT_MATCH_MAX_NEW_TOKENS),
            eos_id=eos,
            stop=hopeless if len(samples) >= 3 else None,  # samples are shown in full
        )
        got = tokenizer.decode(new, skip_special_tokens=True)
        ok = got.strip() == e.completion.strip()
        hits += ok
        if len(samples) < 3:
            samples.append({"prompt": e.prompt, "expected": e.completion, "generated": got})
    return {"exact_match": hits / len(rows), "exact_match_rows": len(rows), "samples": samples}


def classification_metrics(model, tokenizer, dataset: Dataset, *, batch_size: int = 32) -> dict:
    import torch

    device = _device(model)
    names = dataset.labels or []
    k = len(names)
    matrix = [[0] * k for _ in range(k)]
    total_loss = 0.0
    with torch.no_grad():
        for chunk in batches(dataset.examples, batch_size):
            batch = _to(collate(chunk, pad_id=tokenizer.pad_token_id, task="seq-cls"), device)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            for want, got in zip(labels.tolist(), logits.argmax(-1).tolist(), strict=True):
                matrix[want][got] += 1
    n = max(len(dataset), 1)
    correct = sum(matrix[i][i] for i in range(k))
    f1s = []
    for i in range(k):
        tp = matrix[i][i]
        fp = sum(matrix[j][i] for j in range(k)) - tp
        fn = sum(matrix[i]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    present = [f for i, f in enumerate(f1s) if sum(matrix[i]) or sum(r[i] for r in matrix)]
    return {
        "eval_loss": total_loss / n,
        "accuracy": correct / n,
        "macro_f1": sum(present) / max(len(present), 1),
        "confusion_matrix": {"labels": list(names), "matrix": matrix},
        "eval_rows": len(dataset),
    }


def evaluate_model(
    model,
    tokenizer,
    task: str,
    dataset: Dataset,
    *,
    generate: bool = True,
    limit: int | None = None,
) -> dict:
    """Every metric for the task, with the model in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        if task == "seq-cls":
            return classification_metrics(model, tokenizer, dataset)
        metrics = causal_loss(model, tokenizer, dataset)
        if generate and dataset.format == "prompt-completion":
            metrics.update(exact_match(model, tokenizer, dataset, limit=limit))
        return metrics
    finally:
        model.train(was_training)


def predict_labels(model, tokenizer, texts: list[str], labels: list[str], *, max_length=128):
    """Label names predicted for `texts` (classification adapters)."""
    import torch

    device = _device(model)
    enc = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**_to(dict(enc), device)).logits
    return [labels[i] for i in logits.argmax(-1).tolist()]


# --- registry adapters --------------------------------------------------------------------------


def load_adapter_model(
    registry, ref, *, quant: str | None = None, device: str | None = None, force: bool = False
):
    """(peft_model, LoadedBase, entry) for a registry reference, on its fingerprint-checked base.

    The quantization defaults to what the adapter was trained with.
    """
    from peft import PeftModel

    from adaptory.adapters.bases.loading import check_fingerprint, load_base
    from adaptory.adapters.bases.quantize import keep_4bit_trainable

    entry = registry.resolve(ref)
    if not entry.base_model:
        raise ConfigError(f"{entry.ref} does not record its base model")
    quant = quant or (entry.training_config or {}).get("quant") or "nf4"
    labels = (entry.extra or {}).get("labels")
    base = load_base(
        entry.base_model,
        task=entry.task,
        quant=quant,
        device=device,
        labels=labels,
        seed=(entry.training_config or {}).get("seed", 0),
        home=registry.home,
    )
    check_fingerprint(entry.base_fingerprint, base.fingerprint, what=entry.ref, force=force)
    keep_4bit_trainable(base.model)  # the same 4-bit kernels as training: comparable metrics
    folder = registry.files(entry)
    model = PeftModel.from_pretrained(base.model, str(folder), is_trainable=False)
    model.eval()
    template = folder / CHAT_TEMPLATE_FILE
    if template.is_file():  # trained with --chat-template: chats render as in training
        base.tokenizer.chat_template = template.read_text(encoding="utf-8")
    return model, base, entry


def evaluate_entry(
    registry,
    ref,
    data: Path,
    *,
    fmt: str | None = None,
    record: bool = True,
    limit: int | None = None,
    columns: str | dict | None = None,
) -> dict[str, Any]:
    """Evaluate a registry adapter on a data file; with `record`, store the result under
    metrics["evals"][<file name>] of the entry."""
    model, base, entry = load_adapter_model(registry, ref)
    max_length = int((entry.training_config or {}).get("max_length") or 128)
    dataset = load_dataset(
        Path(data),
        tokenizer=base.tokenizer,
        task=entry.task,
        fmt=fmt,
        max_length=max_length,
        labels=base.labels,
        tokenizer_fingerprint=base.fingerprint.tokenizer,
        limit=limit,
        columns=parse_columns(columns),
    )
    metrics = evaluate_model(model, base.tokenizer, entry.task, dataset)
    metrics["rows"] = len(dataset)
    metrics["dataset_fingerprint"] = dataset.fingerprint
    if record:
        evals = dict((entry.metrics or {}).get("evals") or {})
        evals[Path(data).name] = metrics
        registry.update(entry, metrics={"evals": evals})
    return metrics
