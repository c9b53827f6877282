"""Measuring models against each other: load a registry adapter on its base, score a model on
eval data, and compare two models' logits on the same prompts (max |Δlogit|, mean KL).

Merging (adapters.merge) and merged export (adapters.export) both judge their result this way;
both sides of every comparison run through the same code so the numbers are comparable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from adaptory.registry.errors import ConfigError, DataError

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
    """(PeftModel, LoadedBase): `entry`'s adapter on its base, quantized as it was trained.

    The base fingerprint (weights and tokenizer) must match the entry's: BaseMismatch otherwise.
    """
    from peft import PeftModel

    from adaptory.adapters.base import check_fingerprint, load_base

    try:  # the training side's loader: the same 4-bit kernels as training and `adaptory eval`
        from adaptory.adapters.evaluate import load_adapter_model
    except ImportError:
        load_adapter_model = None
    if load_adapter_model is not None:
        model, loaded, _ = load_adapter_model(
            registry, entry.ref, quant=quant or entry_quant(entry), device=device
        )
        return model, loaded
    if entry.task == "seq-cls" and not entry_labels(entry):
        raise ConfigError(
            f"{entry.ref} is a classification adapter without its label names (extra['labels'])",
            hint="re-import it with its labels",
        )
    loaded = load_base(
        entry.base_model,
        task=entry.task,
        quant=quant or entry_quant(entry),
        device=device,
        labels=entry_labels(entry),
        home=registry.home,
    )
    check_fingerprint(entry.base_fingerprint, loaded.fingerprint, what=entry.ref)
    model = PeftModel.from_pretrained(loaded.model, str(registry.files(entry)))
    model.eval()
    return model, loaded


# --- eval data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One eval row: the text the model reads, where scored tokens start, and the label."""

    text: str
    prompt: str = ""  # causal-lm: tokens of this prefix are not scored
    label: str | None = None


def read_examples(path: Path, tokenizer, task: str, limit: int | None = None) -> list[Example]:
    """Rows of a JSONL eval file in the shapes Adaptory trains on.

    causal-lm: {"prompt", "completion"} (only completion tokens scored), {"messages"} (rendered
    with the chat template) or {"text"}; seq-cls: {"text", "label"}.
    """
    path = Path(path)
    rows: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not JSON ({exc.msg})", file=path, line=number) from None
            rows.append(_example(row, tokenizer, task, path, number))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise DataError("no rows", file=path)
    return rows


def _example(row: dict, tokenizer, task: str, path: Path, number: int) -> Example:
    if task == "seq-cls":
        if "text" not in row or "label" not in row:
            raise DataError("needs text and label", file=path, line=number)
        return Example(text=str(row["text"]), label=str(row["label"]))
    if "prompt" in row and "completion" in row:
        return Example(text=row["prompt"] + row["completion"], prompt=row["prompt"])
    if "messages" in row:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return Example(text=text)
    if "text" in row:
        return Example(text=str(row["text"]))
    raise DataError("needs prompt+completion, messages or text", file=path, line=number)


def held_out_prompts(entry, tokenizer, count: int = 6) -> list[str]:
    """A few texts to compare logits on: the entry's eval data when known, else built-ins."""
    data = eval_file(entry)
    if data is not None:
        try:
            return [ex.text for ex in read_examples(data, tokenizer, entry.task, limit=count)]
        except DataError:
            pass
    return list(BUILTIN_PROMPTS[:count])


def eval_file(entry) -> Path | None:
    """The entry's eval data file, if its dataset records one that still exists."""
    value = (entry.dataset or {}).get("eval_file")
    if value and Path(value).is_file():
        return Path(value)
    return None


# --- scoring -----------------------------------------------------------------------------------


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_model(
    model,
    tokenizer,
    task: str,
    examples: list[Example],
    *,
    labels: list[str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[str, float]:
    """causal-lm: eval_loss and perplexity (mean over scored tokens); seq-cls: accuracy, macro_f1."""
    import torch

    device = next(model.parameters()).device
    if task == "seq-cls":
        if not labels:
            raise ConfigError("scoring a classifier needs its label names")
        index = {label: i for i, label in enumerate(labels)}
        predicted, gold = [], []
        for batch in _batches(examples, batch_size):
            enc = tokenizer(
                [ex.text for ex in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(device)
            with torch.no_grad():
                logits = model(**enc).logits
            predicted += logits.argmax(-1).tolist()
            gold += [index.get(ex.label, -1) for ex in batch]
        return classification_metrics(predicted, gold, len(labels))
    total, count = 0.0, 0
    for batch in _batches(examples, batch_size):
        enc = tokenizer(
            [ex.text for ex in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        targets = enc["input_ids"].clone()
        targets[enc["attention_mask"] == 0] = -100
        for row, ex in enumerate(batch):
            if ex.prompt:
                skip = len(tokenizer(ex.prompt)["input_ids"])
                start = int((enc["attention_mask"][row] == 1).nonzero()[0])  # left padding
                targets[row, start : start + skip] = -100
        enc = enc.to(device)
        with torch.no_grad():
            logits = model(**enc).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_targets = targets[:, 1:].reshape(-1).to(device)
        loss = torch.nn.functional.cross_entropy(
            shift_logits, shift_targets, ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((shift_targets != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def classification_metrics(predicted: list[int], gold: list[int], classes: int) -> dict:
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    f1s = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold, strict=True))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": correct / max(len(gold), 1),
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }


def score_on_file(model, tokenizer, entry, data: Path, *, limit: int | None = None) -> dict:
    """Metrics of `model` (an adapter on its base, or a merged model) on `entry`'s kind of data.

    Uses adapters.evaluate's metrics when present (generation-based exact match left out: the
    comparison needs the same numbers on both sides, not the slowest ones).
    """
    labels = entry_labels(entry)
    try:
        from adaptory.adapters.data import load_dataset
        from adaptory.adapters.evaluate import evaluate_model
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        dataset = load_dataset(
            Path(data),
            tokenizer=tokenizer,
            task=entry.task,
            max_length=int((entry.training_config or {}).get("max_length") or 128),
            labels=labels,
            limit=limit,
        )
        metrics = evaluate_model(model, tokenizer, entry.task, dataset, generate=False)
        return {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    examples = read_examples(data, tokenizer, entry.task, limit=limit)
    return score_model(model, tokenizer, entry.task, examples, labels=labels)


def evaluate_entry_on(registry, entry, data: Path, *, limit: int | None = None) -> dict:
    """Metrics of a registry adapter (on its quantized base) on `data`.

    Uses adapters.evaluate.evaluate_entry when the training side provides it, so merge results
    sit next to the same numbers `adaptory eval` prints; otherwise scores here.
    """
    try:
        from adaptory.adapters.evaluate import evaluate_entry
    except ImportError:
        evaluate_entry = None
    if evaluate_entry is not None:
        metrics = evaluate_entry(registry, entry.ref, Path(data), record=False, limit=limit)
        return {k: v for k, v in metrics.items() if k != "confusion_matrix"}
    model, loaded = load_entry_model(registry, entry)
    return score_on_file(model, loaded.tokenizer, entry, data, limit=limit)


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
