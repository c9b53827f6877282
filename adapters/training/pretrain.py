"""Pretrain a small Llama-style base from scratch on local text, so there is a real base to adapt.

The tokenizer is trained on the corpus (tinybase.init_base), the text is tokenized once and packed
into fixed-length sequences, and the model trains with AdamW under warmup + cosine decay. Seeded:
the same corpus, size and seed give the same base.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from adaptory.registry.errors import ConfigError

# Named recipes: every setting of a base Adaptory ships, so `adaptory base pretrain NAME --recipe
# R` rebuilds it (bit for bit on the same torch version and CPU). `tinylm` is the built-in
# generation base: the small shape with a byte-level vocabulary (no BPE merges: a letter is a
# token, so case and word order are operations on tokens) pretrained on the shipped prose mixed
# with generated string exercises (adapters/bases/exercises.py), then saved in float16.
RECIPES: dict[str, dict] = {
    "tinylm": {
        "size": "small",
        "vocab_size": 260,
        "exercise_bytes": 8_000_000,
        "steps": 3000,
        "seq_len": 128,
        "batch_size": 32,
        "lr": 2e-3,
        "seed": 0,
        "warmup": 0.03,
        "save_dtype": "float16",
    },
}


def pack_tokens(texts: list[str], tokenizer) -> list[int]:
    """The corpus as one token stream, documents (and lines) separated by eos."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        for para in text.split("\n\n"):
            if para.strip():
                stream.extend(tokenizer(para.strip(), add_special_tokens=False)["input_ids"])
                stream.append(eos)
    return stream


def text_tokens(texts: list[str], tokenizer, seq_len: int):
    """The texts as one tensor of token ids; ConfigError if they cannot fill a sequence."""
    import torch

    stream = torch.tensor(pack_tokens(texts, tokenizer), dtype=torch.long)
    if len(stream) < seq_len + 2:
        raise ConfigError(f"the corpus has {len(stream)} tokens, fewer than seq_len {seq_len}")
    return stream


def pretrain_base(
    target: Path,
    *,
    corpus: list[Path] | None = None,
    size: str = "small",  # these defaults are `adaptory base pretrain`'s
    steps: int = 300,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    show_progress: bool = True,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.1,
    vocab_size: int | None = None,
    exercise_bytes: int = 0,
    save_dtype: str | None = None,
) -> dict:
    """Build, pretrain and save a base at `target`; return params, first/final loss, timing.

    `vocab_size` overrides the size's BPE vocabulary (260: bytes only, no merges);
    `exercise_bytes` > 0 pretrains on the corpus mixed with that many bytes of generated
    exercises (adapters/bases/exercises.py) instead of the corpus alone; `save_dtype` stores
    the weights in that dtype ("float16": half the size).
    """
    import torch

    from adaptory.adapters.bases.exercises import exercise_corpus
    from adaptory.adapters.bases.tiny import (
        DEFAULT_CORPUS,
        SIZES,
        init_base,
        read_corpus,
        save_base,
    )
    from adaptory.adapters.training.progress import TrainProgress

    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}'", hint=f"choose one of {', '.join(SIZES)}")
    if seq_len > SIZES[size].context:
        raise ConfigError(f"seq_len {seq_len} exceeds the {size} context of {SIZES[size].context}")
    started = time.perf_counter()
    files = list(corpus) if corpus else [DEFAULT_CORPUS]
    texts = read_corpus(files)
    if exercise_bytes:
        texts = [exercise_corpus("\n\n".join(texts), size_bytes=exercise_bytes, seed=seed)]
    model, tokenizer, info = init_base(
        Path(target), size=size, corpus=files, texts=texts, seed=seed, vocab_size=vocab_size
    )
    stream = text_tokens(texts, tokenizer, seq_len)
    # Hold out the last 5% of the stream to report a validation loss.
    split = int(len(stream) * 0.95)
    train_tokens, val_tokens = stream[:split], stream[split:]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    optimizer, scheduler = make_optimizer(model, lr, steps, warmup, min_lr_ratio)
    with TrainProgress(steps, description="pretraining", enabled=show_progress) as progress:
        losses, history = train_steps(
            model, train_tokens, optimizer, scheduler, gen, steps, seq_len, batch_size, progress
        )
    model.eval()
    val_loss = _validation_loss(model, val_tokens, seq_len)
    tail = losses[-min(20, len(losses)) :]
    final_loss = sum(tail) / len(tail)
    wall = time.perf_counter() - started
    info.update(
        {
            "pretrained": True,
            "steps": steps,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "lr": lr,
            "first_loss": losses[0],
            "final_loss": final_loss,
            "val_loss": val_loss,
            "corpus_tokens": len(stream),
            "exercise_bytes": exercise_bytes,
            "wall_time_s": round(wall, 2),
            "description": f"llama {size}, pretrained {steps} steps on "
            + ", ".join(Path(f).name for f in files)
            + (" with generated exercises" if exercise_bytes else ""),
        }
    )
    if save_dtype:
        model.to(getattr(torch, save_dtype))
        info["dtype"] = save_dtype
    save_base(model, tokenizer, Path(target), info)
    return {
        "path": str(target),
        "params": info["params"],
        "first_loss": losses[0],
        "final_loss": final_loss,
        "val_loss": val_loss,
        "steps": steps,
        "tokens": len(stream),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "loss_history": history,
    }


def make_optimizer(model, lr: float, steps: int, warmup: float, min_lr_ratio: float):
    """AdamW (weight decay on matrices only) under linear warmup, then cosine decay to
    min_lr_ratio of the peak."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup_steps = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(
    model, tokens, optimizer, scheduler, gen, steps: int, seq_len: int, batch_size: int, progress
) -> tuple[list[float], list[dict]]:
    """`steps` optimizer steps, each on batch_size windows of seq_len tokens drawn at random
    (from `gen`); return every step's loss and the loss history kept (every 10th step)."""
    import torch

    losses: list[float] = []
    history: list[dict] = []
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            history.append({"step": step + 1, "loss": round(losses[-1], 4)})
        progress.update(step + 1, loss=losses[-1], lr=current_lr, tokens=batch.numel())
    return losses, history


def _validation_loss(model, tokens, seq_len: int) -> float | None:
    import torch

    chunks = [tokens[i : i + seq_len] for i in range(0, len(tokens) - seq_len, seq_len)][:32]
    if not chunks:
        return None
    with torch.no_grad():
        batch = torch.stack(chunks)
        return float(model(input_ids=batch, labels=batch).loss)
