"""`adaptory bench train`: `adaptory train` against a plain training loop on the same data."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from adaptory.adapters.bench.harness import (
    BenchSettings,
    PeakRSS,
    _settings_dict,
    bench_base,
    interleave,
    rated,
    rss_bytes,
    sync,
    target,
)

# --- train ---------------------------------------------------------------------------------


def bench_train(
    settings: BenchSettings,
    *,
    batch: int | None = None,
    max_length: int | None = None,
    steps: int | None = None,
) -> dict:
    """Training tokens/s and peak memory of `adaptory train` (adapters/training/loop.py) against
    a plain transformers+PEFT loop on the same base, batches and settings, on the 4-bit and the
    unquantized base. Every run loads its own model; the optimizer steps after the first are
    timed (the first pays one-time costs: kernel selection, allocator growth), so no warm-up
    run is needed."""
    import importlib.util

    from adaptory.adapters.bases.loading import load_tokenizer
    from adaptory.adapters.training.data import load_dataset
    from adaptory.registry import Registry

    quick = settings.quick
    batch = batch or (2 if quick else 8)
    max_length = max_length or (32 if quick else 128)
    steps = max(2, steps or (3 if quick else 8))
    base_dir = bench_base(settings)
    data_file = _train_data(settings.workdir, rows=max(64, steps * batch * 2))
    tokenizer = load_tokenizer(base_dir, "causal-lm")
    dataset = load_dataset(data_file, tokenizer=tokenizer, task="causal-lm", max_length=max_length)
    has_train = importlib.util.find_spec("adaptory.adapters.training.loop") is not None
    registry = Registry(settings.workdir / "home-train")
    timed_tokens = sum(_step_tokens(settings, dataset, tokenizer.pad_token_id, batch, steps)[1:])
    plan = {"batch": batch, "max_length": max_length, "steps": steps}
    memory: dict[str, list[int]] = {}

    def variant(kind: str, quant: str):
        name = f"{kind}/{quant}"
        memory[name] = []

        def run() -> float:
            fn = _adaptory_train_run if kind == "adaptory_train" else _plain_train_run
            seconds, peak = fn(settings, base_dir, data_file, dataset, quant, plan, registry)
            memory[name].append(peak)
            return seconds

        return run

    variants = {}
    for quant in ("nf4", "none"):
        variants[f"plain_peft/{quant}"] = variant("plain_peft", quant)
        if has_train:
            variants[f"adaptory_train/{quant}"] = variant("adaptory_train", quant)
    times = interleave(variants, settings.repeats, warmup=0, log=settings.say)
    results = {
        name: {**rated(samples, timed_tokens), "peak_bytes": int(statistics.median(memory[name]))}
        for name, samples in times.items()
    }
    ratios, targets = _train_comparisons(results, has_train)
    return {
        "bench": "train",
        "settings": _settings_dict(settings, base_dir, **plan),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "notes": _train_notes(settings, plan, data_file, has_train),
    }


def _step_tokens(settings: BenchSettings, dataset, pad: int, batch: int, steps: int) -> list[int]:
    """The non-pad tokens of each step's batch: both loops run these very batches."""
    from adaptory.adapters.training.data import collate
    from adaptory.adapters.training.loop import BatchPlan

    order = BatchPlan(len(dataset), batch_size=batch, grad_accum=1, seed=settings.seed)
    return [
        int(
            collate(
                [dataset.examples[i] for i in order.step(step)[0]], pad_id=pad, task="causal-lm"
            )["attention_mask"].sum()
        )
        for step in range(steps)
    ]


def _train_comparisons(results: dict, has_train: bool) -> tuple[dict, dict]:
    """Ratios (4-bit against unquantized, adaptory train against the plain loop) and targets."""
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {
        "plain nf4 / none tokens/s": tps["plain_peft/nf4"] / tps["plain_peft/none"],
        "plain nf4 / none peak": results["plain_peft/nf4"]["peak_bytes"]
        / results["plain_peft/none"]["peak_bytes"],
    }
    targets = {}
    for quant in ("nf4", "none"):
        slower = None
        if has_train:
            slower = tps[f"plain_peft/{quant}"] / tps[f"adaptory_train/{quant}"]
            ratios[f"adaptory_train time / plain loop time ({quant})"] = slower
        targets[f"adaptory train <= 5% slower than a plain loop ({quant})"] = target(
            slower, "<=", 1.05, missing="adaptory train is not in this build"
        )
    return ratios, targets


def _train_notes(settings: BenchSettings, plan: dict, data_file: Path, has_train: bool):
    batch, max_length, steps = plan["batch"], plan["max_length"], plan["steps"]
    rank, names = settings.rank, ", ".join(settings.targets)
    notes = [
        f"{steps} optimizer steps of {batch} rows (<= {max_length} tokens, right-padded) from "
        f"{data_file.name}; LoRA r={rank}, alpha={2 * rank}, dropout 0.05 on {names}; "
        "AdamW lr 2e-3, grad-norm clip 1.0; tokens = non-pad tokens",
        f"timed: optimizer steps 2-{steps} (from the end of step 1 to the end of the last, "
        "the device synchronized at both ends; adaptory train through its on_step callback), "
        "so loading, validation, evaluation, saving and first-step costs are left out; on the "
        "CPU both run with the same torch thread count (--threads, else torch's default)",
        "peak_bytes (median over runs): max_memory_allocated (CUDA) or the sampled peak RSS above "
        "the RSS before the run loaded its model (CPU; coarse: allocator caching, load transients)",
    ]
    if not has_train:
        notes.append("adapters/training/loop.py does not exist: `adaptory train` was not measured")
    return notes


def _train_data(workdir: Path, rows: int) -> Path:
    """A JSONL `text` dataset cut from the bundled corpus (or a stock sentence)."""
    from adaptory.adapters.bases.tiny import DEFAULT_CORPUS

    out = workdir / "train-data.jsonl"
    if not out.is_file():
        lines = []
        if DEFAULT_CORPUS.is_file():
            lines = [ln.strip() for ln in DEFAULT_CORPUS.read_text().splitlines() if ln.strip()]
        lines = lines or ["the cat sat on the mat and the dog ran to the park"]
        texts = [" ".join(lines[i % len(lines) : i % len(lines) + 4]) for i in range(rows)]
        out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def _peak_start(device: str) -> int:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return rss_bytes()


def _peak_end(device: str, start: int, sampler: PeakRSS) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return sampler.peak - start


def _plain_train_run(settings, base_dir, data_file, dataset, quant, plan, registry):
    """The textbook loop: load, prepare_model_for_kbit_training, get_peft_model, step."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from adaptory.adapters.bases.loading import load_base
    from adaptory.adapters.bases.quantize import keep_4bit_trainable
    from adaptory.adapters.training.data import collate
    from adaptory.adapters.training.loop import BatchPlan, seed_everything

    device = settings.device
    start = _peak_start(device)
    with PeakRSS() as sampler:
        # loaded exactly as `adaptory train` loads it
        loaded = load_base(str(base_dir), task="causal-lm", quant=quant, device=device,
                           seed=settings.seed)  # fmt: skip
        model = loaded.model
        keep_4bit_trainable(model)
        if quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        seed_everything(settings.seed)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=2 * settings.rank,
            lora_dropout=0.05,
            target_modules=list(settings.targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        order = BatchPlan(len(dataset), batch_size=plan["batch"], grad_accum=1, seed=settings.seed)
        pad = loaded.tokenizer.pad_token_id
        model.train()
        marks = []
        for step in range(plan["steps"]):
            rows = order.step(step)[0]
            batch = collate([dataset.examples[i] for i in rows], pad_id=pad, task="causal-lm")
            batch = {k: v.to(device) for k, v in batch.items()}
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            marks.append(time.perf_counter())
    return marks[-1] - marks[0], _peak_end(device, start, sampler)


def _adaptory_train_run(settings, base_dir, data_file, dataset, quant, plan, registry):
    """`adaptory train`'s recipe (train_adapter) with the same data and settings, no eval."""
    import torch

    from adaptory.adapters.training.loop import TrainConfig, train_adapter

    device = settings.device
    config = TrainConfig(
        base=str(base_dir),
        data=str(data_file),
        name=f"bench-train-{quant}",
        task="causal-lm",
        method="lora",
        eval_split=0.0,
        quant=quant,
        rank=settings.rank,
        alpha=float(2 * settings.rank),
        dropout=0.05,
        target_modules=list(settings.targets),
        lr=2e-3,
        max_steps=plan["steps"],
        batch_size=plan["batch"],
        max_length=plan["max_length"],
        warmup=0,
        schedule="constant",
        max_grad_norm=1.0,
        seed=settings.seed,
        device=device,
        threads=torch.get_num_threads(),  # the plain loop's count (adaptory train's default is 1)
        output_dir=str(settings.workdir / "train-runs" / f"{quant}-{time.time_ns()}"),
    )
    marks = []

    def on_step(step: int, loss: float) -> None:
        sync(device)
        marks.append(time.perf_counter())

    start = _peak_start(device)
    with PeakRSS() as sampler:
        result = train_adapter(config, registry=registry, show_progress=False, on_step=on_step)
    shutil.rmtree(result.run_dir, ignore_errors=True)
    if len(marks) != plan["steps"]:
        raise RuntimeError(f"adaptory train ran {len(marks)} of {plan['steps']} steps")
    return marks[-1] - marks[0], _peak_end(device, start, sampler)
