"""`adaptory bench quality`: what adapters trained with the default settings score on held-out
data, against the base alone, over several seeds and data sizes (issue #14).

Classification domains train LoRA on MiniLM (4-bit) from 40 and 100 rows and from all of
train.jsonl; generation tasks train LoRA and prefix adapters on the built-in `tinylm` (4-bit), a
small Llama-style base pretrained from scratch on the shipped prose and generated string
exercises. Every training run stores the last adapter (no
choice made on the held-out rows) and is scored on eval.jsonl; the mean and the worst seed are
reported beside the base-only score.

`dev=True` chooses defaults without the held-out files: each domain's train.jsonl is split into
train and dev, and candidate settings are compared on dev only. eval.jsonl is never opened.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adaptory.adapters.bench.harness import BenchSettings, target
from adaptory.registry.errors import ConfigError

CLASSIFICATION = ("reviews", "support", "news")
GENERATION = ("shout", "reverse", "dates")
CLS_SIZES = (40, 100, 400)  # rows sampled from train.jsonl (all of it when it holds fewer)
GEN_SIZES = (400,)
SEEDS = 5
QUICK_SEEDS = 2
SUBSET_SEED = 14  # the rows each size samples: the same for every training seed
DEV_FRACTION = 1 / 3  # of train.jsonl held out as dev in --dev mode, per label
GEN_BASE = "tinylm"  # the built-in generation base (`make demo` uses it too)
GEN_METHODS = ("lora", "prefix")
# A generation adapter's exact-match bar by method (examples/demo.py, issue #14).
EXACT_MATCH_BAR = {"lora": 0.8, "prefix": 0.5}
# Settings compared in --dev mode: TrainConfig overrides, and "min_steps" for a data-sized
# epoch count with another MIN_STEPS (adapters/training/loop.py).
CANDIDATES: dict[str, dict] = {
    "old: 8 epochs, head x1": {"epochs": 8, "head_lr_factor": 1.0},
    "auto epochs, head x1": {"head_lr_factor": 1.0},
    "auto epochs, head x3": {"head_lr_factor": 3.0},
    "auto epochs, head x5": {"head_lr_factor": 5.0},
    "auto epochs (MIN_STEPS 80), head x1": {"min_steps": 80, "head_lr_factor": 1.0},
}


def default_data_dir() -> Path:
    """examples/data of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "examples" / "data"


@dataclass
class Job:
    """One training run: a data file, the file it is scored on, a seed and the settings."""

    key: str  # the cell it belongs to: "domain/rows" (with "candidate|" in dev mode)
    base: str
    data: Path
    eval_data: Path
    seed: int
    overrides: dict
    workdir: Path
    device: str
    threads: int | None


def bench_quality(
    settings: BenchSettings,
    *,
    dev: bool = False,
    seeds: int | None = None,
    classification: tuple[str, ...] | None = None,
    generation: tuple[str, ...] | None = None,
    cls_sizes: tuple[int, ...] = CLS_SIZES,
    candidates: dict[str, dict] | None = None,
    data_dir: Path | None = None,
    cls_base: str = "minilm",
    gen_base: Path | str | None = None,
    gen_methods: tuple[str, ...] = GEN_METHODS,
    jobs: int = 1,
    overrides: dict | None = None,
    first_seed: int = 0,
) -> dict:
    """Train adapters with the default settings on every domain, size and seed and score them
    on held-out data (or, with `dev`, compare `candidates` on a dev split of train.jsonl).
    `overrides` (TrainConfig fields) apply to every run, over the candidate's; training seeds
    run from `first_seed` (to add seeds to an earlier run)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    quick = settings.quick
    seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
    if classification is None:
        classification = CLASSIFICATION[:1] if quick else CLASSIFICATION
    if generation is None:
        generation = () if dev else (GENERATION[:1] if quick else GENERATION)
    if dev and generation:
        raise ConfigError("--dev compares defaults on the classification domains only")
    for name in (*classification, *generation):
        if not (data_dir / name / "train.jsonl").is_file():
            raise ConfigError(
                f"{data_dir / name / 'train.jsonl'} does not exist",
                hint="pass the folder holding the domains (examples/data of the source tree)",
            )
    splits = settings.workdir / "quality-data"
    run_root = settings.workdir / "quality-runs"
    variants = (candidates or CANDIDATES) if dev else {"defaults": {}}
    variants = {name: {**v, **(overrides or {})} for name, v in variants.items()}
    plan: list[Job] = []
    cells: dict[str, dict] = {}

    def add(key: str, base: str, train: Path, scored: Path, settings_used: dict) -> None:
        plan.extend(
            Job(
                key=key,
                base=base,
                data=train,
                eval_data=scored,
                seed=seed,
                overrides=settings_used,
                workdir=run_root,
                device=settings.device,
                threads=settings.threads,
            )
            for seed in range(first_seed, first_seed + seeds)
        )

    for domain in classification:
        if dev:
            pool, scored = _dev_split(data_dir / domain / "train.jsonl", splits / domain)
        else:
            pool, scored = data_dir / domain / "train.jsonl", data_dir / domain / "eval.jsonl"
        for size in cls_sizes:
            train_file, rows = _subset(pool, size, splits / domain)
            for variant, settings_used in variants.items():
                key = f"{domain}/{rows}" if not dev else f"{variant}|{domain}/{rows}"
                cells[key] = {"domain": domain, "task": "seq-cls", "metric": "accuracy",
                              "rows": rows, "scored_on": scored.name, "variant": variant,
                              "method": "lora"}  # fmt: skip
                add(key, cls_base, train_file, scored, settings_used)
    gen_ref = str(gen_base if gen_base is not None else GEN_BASE) if generation else None
    for domain in generation:
        for size in GEN_SIZES:
            train_file, rows = _subset(data_dir / domain / "train.jsonl", size, splits / domain)
            for method in gen_methods:
                key = f"{domain}/{rows}/{method}"
                cells[key] = {"domain": domain, "task": "causal-lm", "metric": "exact_match",
                              "rows": rows, "scored_on": "eval.jsonl", "variant": "defaults",
                              "method": method}  # fmt: skip
                add(key, gen_ref, train_file, data_dir / domain / "eval.jsonl",
                    {**variants["defaults"], "method": method})  # fmt: skip
    settings.say(f"quality: {len(plan)} training runs ({jobs} at a time)")
    runs = _run_all(plan, jobs, settings)
    results = {key: _cell(info, runs[key]) for key, info in cells.items()}
    out = {
        "bench": "quality",
        "settings": {
            "size": "minilm" + (f" + {Path(gen_ref).name}" if gen_ref else ""),
            "params": None,
            "built": "folder",
            "device": settings.device,
            "quick": quick,
            "dev": dev,
            "seeds": list(range(first_seed, first_seed + seeds)),
            "cls_base": cls_base,
            "gen_base": gen_ref,
            "cls_sizes": list(cls_sizes),
            "data": str(data_dir),
            "jobs": jobs,
        },
        "results": results,
        "notes": _notes(dev, seeds),
    }
    if dev:
        out["candidates"] = _rank(results, variants)
        out["chosen"] = out["candidates"][0]["name"]
    else:
        out["targets"] = _targets(results)
    return out


def split_domains(names: list[str], data_dir: Path | None = None) -> tuple[tuple, tuple]:
    """(classification, generation) domains among `names`: those whose train.jsonl rows have a
    label, and the rest."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cls, gen = [], []
    for name in names:
        train = data_dir / name / "train.jsonl"
        try:
            first = next(line for line in train.read_text(encoding="utf-8").splitlines() if line)
            row = json.loads(first)
        except (OSError, StopIteration, ValueError):
            raise ConfigError(
                f"domain '{name}': {train} is missing, empty or not JSONL",
                hint=f"domains here: {', '.join(CLASSIFICATION + GENERATION)}",
            ) from None
        (cls if isinstance(row, dict) and "label" in row else gen).append(name)
    return tuple(cls), tuple(gen)


# --- data ---------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _by_label(rows: list[dict], seed: int) -> list[list[dict]]:
    """The rows shuffled (seeded), grouped by label (one group for unlabelled rows)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("label", "")), []).append(row)
    return [groups[k] for k in sorted(groups)]


def _subset(source: Path, size: int, out_dir: Path) -> tuple[Path, int]:
    """`size` rows of `source` sampled with SUBSET_SEED, labels taken in turn (balanced as far as
    the file allows); all of it when it holds no more. Returns the file and its row count."""
    rows = _read_rows(source)
    if size >= len(rows):
        return source, len(rows)
    groups = _by_label(rows, SUBSET_SEED + size)
    picked: list[dict] = []
    while len(picked) < size:
        for group in groups:
            if group and len(picked) < size:
                picked.append(group.pop())
    random.Random(SUBSET_SEED).shuffle(picked)
    return _write_rows(out_dir / f"{source.stem}-{size}.jsonl", picked), size


def _dev_split(train: Path, out_dir: Path) -> tuple[Path, Path]:
    """train.jsonl cut into (train, dev) files: DEV_FRACTION of every label to dev, seeded."""
    pool, dev = [], []
    for group in _by_label(_read_rows(train), SUBSET_SEED):
        cut = round(len(group) * DEV_FRACTION)
        dev += group[:cut]
        pool += group[cut:]
    rng = random.Random(SUBSET_SEED)
    rng.shuffle(pool)
    rng.shuffle(dev)
    return _write_rows(out_dir / "dev-train.jsonl", pool), _write_rows(out_dir / "dev.jsonl", dev)


# --- runs ---------------------------------------------------------------------------------


def _run_all(plan: list[Job], jobs: int, settings: BenchSettings) -> dict[str, list[dict]]:
    """Every job's outcome, grouped by cell; `jobs` > 1 runs them in that many processes."""
    runs: dict[str, list[dict]] = {}

    def done(job: Job, outcome: dict) -> None:
        runs.setdefault(job.key, []).append(outcome)
        settings.say(
            f"  {job.key} seed {job.seed}: {outcome['score']:.3f} (base {outcome['base']:.3f}, "
            f"{outcome['steps']} steps, {outcome['wall_s']:.0f}s)"
        )

    if jobs <= 1:
        for job in plan:
            done(job, run_job(job))
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for job, outcome in zip(plan, pool.map(run_job, plan), strict=True):
                done(job, outcome)
    for outcomes in runs.values():
        outcomes.sort(key=lambda o: o["seed"])
    return runs


def run_job(job: Job) -> dict:
    """Train one adapter (the last step's adapter kept) and score it, and the base, on the job's
    scoring file; the run's folders are removed afterwards."""
    from adaptory.adapters.training.loop import BatchPlan, TrainConfig, train_adapter
    from adaptory.registry import Registry

    overrides = dict(job.overrides)
    min_steps = overrides.pop("min_steps", None)
    config = TrainConfig(
        base=job.base,
        data=str(job.data),
        eval_data=str(job.eval_data),
        name="quality",
        seed=job.seed,
        keep="last",
        eval_every=10**9,  # scored once, at the end: nothing is chosen on these rows
        device=job.device,
        threads=job.threads,
        **overrides,
    )
    if min_steps is not None:
        rows = sum(1 for line in job.data.read_text(encoding="utf-8").splitlines() if line)
        per_epoch = BatchPlan(rows, batch_size=config.batch_size, grad_accum=config.grad_accum,
                              seed=0).steps_per_epoch  # fmt: skip
        config.epochs = max(1, math.ceil(min_steps / per_epoch))
    home = job.workdir / f"home-{os.getpid()}-{time.time_ns()}"  # the run's own registry
    started = time.perf_counter()
    try:
        result = train_adapter(config, registry=Registry(home), show_progress=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    metric = "accuracy" if "accuracy" in result.metrics else "exact_match"
    if metric not in result.metrics or metric not in result.metrics["base"]:
        raise ConfigError(f"{job.eval_data}: no accuracy or exact match was measured on it")
    return {
        "seed": job.seed,
        "score": float(result.metrics[metric]),
        "base": float(result.metrics["base"][metric]),
        "steps": result.steps,
        "rows_scored": result.metrics.get("eval_rows") or result.metrics.get("exact_match_rows"),
        "eval_loss": result.metrics.get("eval_loss"),
        "base_eval_loss": result.metrics["base"].get("eval_loss"),
        "samples": result.metrics.get("samples", [])[:2],  # generation: what it wrote
        "wall_s": time.perf_counter() - started,
    }


# --- summaries ----------------------------------------------------------------------------


def _cell(info: dict, outcomes: list[dict]) -> dict:
    scores = [o["score"] for o in outcomes]
    bases = [o["base"] for o in outcomes]
    return {
        **info,
        "mean": statistics.fmean(scores),
        "worst": min(scores),
        "best": max(scores),
        "base_only": statistics.fmean(bases),
        "scores": scores,
        "base_scores": bases,
        "steps": outcomes[0]["steps"],
        "rows_scored": outcomes[0]["rows_scored"],
        "eval_loss": _mean_of(o.get("eval_loss") for o in outcomes),
        "base_eval_loss": _mean_of(o.get("base_eval_loss") for o in outcomes),
        "samples": outcomes[0].get("samples") or [],
        "wall_s": sum(o["wall_s"] for o in outcomes),
    }


def _mean_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _rank(results: dict, variants: dict) -> list[dict]:
    """Candidates best first: by mean dev score over the cells, then by mean worst seed."""
    ranked = []
    for name in variants:
        mine = [r for r in results.values() if r["variant"] == name]
        ranked.append({
            "name": name,
            "settings": variants[name],
            "mean": statistics.fmean(r["mean"] for r in mine),
            "worst": statistics.fmean(r["worst"] for r in mine),
            "cells": len(mine),
        })  # fmt: skip
    ranked.sort(key=lambda c: (-round(c["mean"], 6), -round(c["worst"], 6)))
    return ranked


def _targets(results: dict) -> dict:
    """Classification: the worst seed beats the base alone; generation: the mean reaches the
    exact-match bar."""
    targets = {}
    for key, r in results.items():
        if r["task"] == "seq-cls":
            threshold = max(r["base_only"], 1e-9)
            targets[f"{key}: worst seed accuracy >= base-only"] = target(
                r["worst"], ">=", threshold, ratio=False
            )
        else:
            bar = EXACT_MATCH_BAR[r["method"]]
            targets[f"{key}: mean exact match >= {bar}"] = target(r["mean"], ">=", bar, ratio=False)
    return targets


def _notes(dev: bool, seeds: int) -> list[str]:
    from adaptory.adapters.training.loop import (
        EXACT_MATCH_ROWS,
        HEAD_LR_FACTOR,
        MIN_STEPS,
        VIRTUAL_TOKEN_MIN_STEPS,
    )

    notes = [
        f"{seeds} training seeds per cell (seed = head init, adapter init and batch order); "
        f"rows sampled once per size with seed {SUBSET_SEED}, labels in turn",
        "`adaptory train`'s defaults (data-sized epochs: at least "
        f"{MIN_STEPS} steps, {VIRTUAL_TOKEN_MIN_STEPS} for prefix tuning; head lr "
        f"x{HEAD_LR_FACTOR:g}); the last step's adapter is scored "
        "(keep=last), so nothing is chosen on the scored rows",
        "base-only: the base with no adapter (for classification, with the same seed's newly "
        f"initialised head); exact match on the first {EXACT_MATCH_ROWS} scored rows",
    ]
    if dev:
        notes.append(
            f"dev mode: {DEV_FRACTION:.0%} of each label of train.jsonl is the dev set, the rest "
            "the training pool; eval.jsonl is not read"
        )
    return notes
