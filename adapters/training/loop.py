"""Train one adapter, top to bottom: data → model → optimizer → loop → eval → checkpoint →
registry.

`train_adapter(TrainConfig(...), registry=...)` is the whole recipe; `adaptory train` is a thin
CLI over it and `accelerate launch` runs the same loop on several devices. With a seed the run is
reproducible on the CPU (identical adapter bytes), and a run resumed from a checkpoint ends with
the same adapter as an uninterrupted one: batches come from a per-epoch seeded permutation, and a
checkpoint holds the adapter, optimizer, scheduler, RNG state and step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from adaptory.adapters.bases.loading import QUANTS, TASKS
from adaptory.adapters.bases.quantize import keep_4bit_trainable
from adaptory.adapters.methods import get_method
from adaptory.registry.errors import AdaptoryError, ConfigError, IntegrityError

SCHEDULES = ("cosine", "linear", "constant")
# Exact match needs one forward pass per generated token: cap the rows it runs on.
EXACT_MATCH_ROWS = 50
PATH_FIELDS = ("data", "eval_data", "output_dir")


class TrainingInterrupted(AdaptoryError):
    """Ctrl-C during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


# --- configuration ------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every setting of a training run (each is an `adaptory train` flag and a TOML key)."""

    base: str | None = None
    data: str | None = None
    name: str | None = None
    task: str | None = None  # default: seq-cls if the data has a label column, else causal-lm
    method: str = "lora"
    eval_data: str | None = None
    eval_split: float | None = None  # default 0.1 without eval_data; 0 turns evaluation off
    format: str | None = None
    quant: str = "nf4"
    # method hyperparameters (see adapters/methods)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    dora: bool = False
    rslora: bool = False
    virtual_tokens: int = 16
    prefix_projection: bool = False
    # optimisation
    lr: float | None = None  # default: the method's (LoRA 2e-3, 5e-4 seq-cls; prefix/IA3 1e-2)
    epochs: int = 8
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    grad_checkpointing: bool = False
    warmup: float = 0.1  # a fraction of the steps if < 1, else a number of steps
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int | None = None  # steps; default once per epoch
    early_stopping: int | None = None  # patience, in evaluations without a better eval loss
    checkpoint_every: int | None = None  # steps
    seed: int = 0
    max_length: int = 128
    output_dir: str | None = None
    resume: str | None = None  # a run dir; "" means the latest run in HOME/runs
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    device: str | None = None
    threads: int | None = None  # CPU threads for torch; default 1 (see cpu_threads)

    def __post_init__(self) -> None:
        for name in PATH_FIELDS + ("resume",):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        self.tags = list(self.tags or [])
        if self.resume is not None:
            return  # the run's stored config is used (and was validated when it started)
        missing = [n for n in ("base", "data", "name") if not getattr(self, n)]
        if missing:
            raise ConfigError(
                f"missing {', '.join('--' + m for m in missing)}",
                hint="adaptory train --base BASE --data FILE --name NAME (or --config FILE)",
            )
        from adaptory.adapters.training.data import normalize_format
        from adaptory.registry.refs import validate_name, validate_tag

        validate_name(self.name)
        for tag in self.tags:
            validate_tag(tag)
        self.format = normalize_format(self.format)
        _choice("task", self.task, TASKS, optional=True)
        _choice("quant", self.quant, QUANTS)
        _choice("schedule", self.schedule, SCHEDULES)
        method = get_method(self.method)
        method.spec_from(self)  # validates the method's hyperparameters
        if self.grad_checkpointing and not method.grad_checkpointing:
            raise ConfigError(
                f"method '{self.method}' does not work with gradient checkpointing (PEFT)",
                hint="drop --grad-checkpointing, or use lora",
            )
        if self.task is not None and self.task not in method.tasks:
            raise ConfigError(
                f"method '{self.method}' does not support task {self.task}",
                hint=f"'{self.method}' supports {', '.join(method.tasks)}",
            )
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "early_stopping", "checkpoint_every", "threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.eval_data and self.eval_split:
            raise ConfigError("pass either eval_data or eval_split, not both")
        if self.eval_split is not None and not 0 <= self.eval_split < 1:
            raise ConfigError(f"eval_split must be in [0, 1), got {self.eval_split}")
        if self.early_stopping and self.eval_split == 0 and not self.eval_data:
            raise ConfigError("early stopping needs evaluation data (eval_data or eval_split)")

    def learning_rate(self, task: str) -> float:
        return self.lr if self.lr is not None else get_method(self.method).lr_for(task)

    @property
    def held_out_fraction(self) -> float:
        if self.eval_data:
            return 0.0
        return 0.1 if self.eval_split is None else self.eval_split

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Settings from a TOML file (keys as field names, '-' or '_'), then `overrides` (the
        flags given on the command line). Relative paths in the file are relative to it."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        known = set(cls.fields())
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                close = [k for k in known if k.startswith(name[:3])]
                raise ConfigError(
                    f"{path}: unknown key '{key}'",
                    hint=f"did you mean {', '.join(sorted(close))}?"
                    if close
                    else "see `adaptory train --help` for the settings",
                )
            if name in PATH_FIELDS and isinstance(value, str) and not Path(value).is_absolute():
                value = str((path.parent / value).resolve())
            values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _choice(name: str, value, choices, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in choices:
        raise ConfigError(f"unknown {name} '{value}'", hint=f"choose one of {', '.join(choices)}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class TrainResult:
    entry: Any  # registry Entry
    metrics: dict
    run_dir: Path
    loss_history: list[dict]
    steps: int
    wall_time_s: float
    stopped_early: bool = False


# --- run directory & checkpoints ---------------------------------------------------------------


def runs_dir(home: Path) -> Path:
    return Path(home) / "runs"


def find_run(home: Path, resume: str) -> Path:
    """The run folder to resume: a path or run name, or ("") the latest interrupted run."""
    if resume:
        run = Path(resume).expanduser()
        if not run.is_dir():
            candidate = runs_dir(home) / resume
            run = candidate if candidate.is_dir() else run
    else:
        runs = sorted(
            (
                p
                for p in runs_dir(home).glob("*")
                if (p / "config.json").is_file() and not (p / "result.json").is_file()
            ),
            key=lambda p: p.stat().st_mtime,
        )
        runs = [p for p in runs if any((p / name).is_dir() for name in CHECKPOINT_FOLDERS)]
        if not runs:
            raise ConfigError(f"no interrupted runs to resume in {runs_dir(home)}")
        run = runs[-1]
    if not (run / "config.json").is_file():
        raise ConfigError(f"{run} is not a training run folder (no config.json)")
    if (run / "result.json").is_file():
        ref = json.loads((run / "result.json").read_text()).get("ref")
        raise ConfigError(f"run {run.name} already finished (registered as {ref})")
    find_checkpoint(run)  # refuses now, with the reason, if no usable checkpoint is there
    return run


# A checkpoint is written into checkpoint.tmp, then checkpoint -> checkpoint.old and
# checkpoint.tmp -> checkpoint; a kill between those renames leaves two complete copies.
CHECKPOINT_FOLDERS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")


def _write_synced(path: Path, write) -> dict:
    """Write a file with `write(path)`, fsync it, and return its size and sha256."""
    import hashlib

    write(path)
    digest = hashlib.sha256()
    with open(path, "rb+") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, *, model, optimizer, scheduler, rng: dict, state: dict, best: dict | None
) -> None:
    """Replace run_dir/checkpoint atomically and durably: every file fsynced, state.json (with
    each file's size and sha256) written last, folders renamed, the run folder fsynced."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
    }
    files = {
        "adapter_model.safetensors": _write_synced(
            tmp / "adapter_model.safetensors", lambda p: save_file(weights, str(p))
        ),
        "optimizer.pt": _write_synced(
            tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p)
        ),
        "scheduler.pt": _write_synced(
            tmp / "scheduler.pt", lambda p: torch.save(scheduler.state_dict(), p)
        ),
        "rng.pt": _write_synced(tmp / "rng.pt", lambda p: torch.save(rng, p)),
    }
    if best is not None:
        files["best_adapter.safetensors"] = _write_synced(
            tmp / "best_adapter.safetensors", lambda p: save_file(best, str(p))
        )
    _write_synced(
        tmp / "state.json", lambda p: p.write_text(json.dumps({**state, "files": files}, indent=1))
    )
    _fsync_dir(tmp)
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None if it is complete and intact)."""
    import hashlib

    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json (incomplete)"
    except (OSError, ValueError) as exc:
        return f"state.json is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json has no step"
    files = state.get("files")
    if not isinstance(files, dict):  # written before checkpoints recorded their files
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, record in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != record.get("size"):
            return f"{name} is truncated or altered ({size} of {record.get('size')} bytes)"
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != record.get("sha256"):
            return f"{name} is altered (sha256 differs)"
    return None


def find_checkpoint(run_dir: Path) -> Path:
    """The run's newest intact checkpoint folder (see CHECKPOINT_FOLDERS); IntegrityError naming
    what is wrong with each copy when none is usable."""
    usable, problems = [], []
    for name in CHECKPOINT_FOLDERS:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            usable.append((json.loads((folder / "state.json").read_text())["step"], folder))
        else:
            problems.append(f"{name}/{problem}")
    if usable:
        return max(usable, key=lambda item: item[0])[1]
    if not problems:
        raise ConfigError(f"{run_dir} has no checkpoint to resume from")
    raise IntegrityError(
        f"{run_dir} has no usable checkpoint: {'; '.join(problems)}",
        hint="start the run again without --resume",
    )


def load_checkpoint(run_dir: Path, *, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore adapter, optimizer, scheduler and RNG from the newest intact checkpoint; return
    (state, best adapter weights)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = find_checkpoint(run_dir)
    try:
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        best_file = ckpt / "best_adapter.safetensors"
        best = load_file(str(best_file)) if best_file.is_file() else None
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise IntegrityError(
            f"{ckpt} cannot be restored ({type(exc).__name__}: {str(exc)[:200]})",
            hint="start the run again without --resume",
        ) from exc
    state.pop("files", None)
    return state, best


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def cpu_threads(n: int | None, device: str):
    """Run with `n` torch threads on the CPU (default 1), restoring the count afterwards.

    Adapter training feeds small matrices (a batch of short rows through a frozen 4-bit base):
    measured on 2 cores, one thread took 0.1 s per MiniLM step where two took 0.7 s, because
    every op then waits on an OpenMP barrier, worst of all on a machine others are using.
    """
    import torch

    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- pieces of the loop -------------------------------------------------------------------------


class BatchPlan:
    """Which example indices each optimizer step uses: a seeded permutation per epoch, cut into
    micro-batches of batch_size per process, grad_accum micro-batches per step."""

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        processes: int = 1,
        rank: int = 0,
    ) -> None:
        self.n, self.batch_size, self.grad_accum = n, batch_size, grad_accum
        self.seed, self.processes, self.rank = seed, processes, rank
        self.micro_per_epoch = math.ceil(n / (batch_size * processes))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def step(self, step: int) -> list[list[int]]:
        out = []
        for j in range(self.grad_accum):
            micro = step * self.grad_accum + j
            epoch, within = divmod(micro, self.micro_per_epoch)
            width = self.batch_size * self.processes
            rows = self._perm(epoch)[within * width : (within + 1) * width]
            mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                out.append(mine)
        return out


def loss_targets(batch: dict, task: str, *, shifted: bool = True) -> int:
    """How many targets the model's mean loss on a collated batch averages over: its rows for
    seq-cls; for a causal LM its label tokens after the shift by one (nothing predicts the first
    position), or all of them when PEFT prompt tuning puts virtual tokens before the first."""
    from adaptory.adapters.training.data import IGNORE

    labels = batch["labels"]
    if task == "seq-cls":
        return len(labels)
    return int((labels[:, 1:] if shifted else labels).ne(IGNORE).sum())


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class StopRequest:
    """First Ctrl-C asks the loop to stop at the next step boundary (where a checkpoint is
    consistent); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def load_training_data(config: TrainConfig, tokenizer, task: str, tokenizer_fp: str):
    """(train, eval or None): the data file, and the eval file or a seeded held-out split.
    Every row of both is validated here, before the model is even loaded."""
    from adaptory.adapters.training.data import load_dataset, split_dataset

    data = load_dataset(
        Path(config.data),
        tokenizer=tokenizer,
        task=task,
        fmt=config.format,
        max_length=config.max_length,
        tokenizer_fingerprint=tokenizer_fp,
    )
    if config.eval_data:
        held = load_dataset(
            Path(config.eval_data),
            tokenizer=tokenizer,
            task=task,
            fmt=config.format or data.format,
            max_length=config.max_length,
            labels=data.labels,
            tokenizer_fingerprint=tokenizer_fp,
        )
        return data, held
    if config.held_out_fraction > 0:
        return split_dataset(data, config.held_out_fraction, config.seed)
    return data, None


# --- the recipe ---------------------------------------------------------------------------------


def train_adapter(
    config: TrainConfig,
    *,
    registry,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train an adapter as `config` says and add it to `registry`; return what happened.

    `on_step(step, loss)` runs after every optimizer step (a KeyboardInterrupt raised there is
    handled like Ctrl-C: checkpoint, then TrainingInterrupted).
    """
    from adaptory.adapters.bases.loading import default_device

    device = config.device or default_device()
    with cpu_threads(config.threads, "cpu" if device == "cpu" else "accelerator"):
        return _train(config, registry=registry, show_progress=show_progress, on_step=on_step)


def _train(config: TrainConfig, *, registry, show_progress: bool, on_step) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training

    from adaptory.adapters.bases.loading import (
        fingerprint_base,
        load_base,
        load_tokenizer,
        quiet_transformers,
        resolve_base,
    )
    from adaptory.adapters.training.data import collate, peek_format
    from adaptory.adapters.training.evaluate import evaluate_model
    from adaptory.adapters.training.progress import TrainProgress

    quiet_transformers()
    started = time.perf_counter()
    home = Path(registry.home)

    # -- the run folder (fresh, or the one being resumed: its stored config wins) --
    if config.resume is not None:
        run_dir = find_run(home, config.resume)
        stored = json.loads((run_dir / "config.json").read_text())
        config = TrainConfig(**{**stored, "resume": None})
        resuming = True
    else:
        resuming = False

    # -- data: validated in full before the model loads --
    source = resolve_base(config.base, home)
    fmt, task = peek_format(Path(config.data), config.format, config.task)
    method = get_method(config.method)
    if task not in method.tasks:
        raise ConfigError(
            f"method '{method.name}' does not support task {task}",
            hint=f"'{method.name}' supports {', '.join(method.tasks)}",
        )
    tokenizer_fp = fingerprint_base(source, config.quant).tokenizer
    train_ds, eval_ds = load_training_data(
        config, load_tokenizer(source.path, task), task, tokenizer_fp
    )

    if not resuming:  # only once the data is known to be good
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir = (
            Path(config.output_dir)
            if config.output_dir
            else runs_dir(home) / f"{config.name}-{stamp}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    # -- model: the quantized base, its metrics, then the adapter --
    base = load_base(
        config.base,
        task=task,
        quant=config.quant,
        device=config.device,
        labels=train_ds.labels,
        seed=config.seed,
        home=home,
    )
    keep_4bit_trainable(base.model)
    tokenizer = base.tokenizer
    spec = method.spec_from(config)
    peft_config = method.to_peft_config(spec, task, base.model, config.quant)
    base_metrics: dict = {}
    if eval_ds is not None and not resuming:
        base_metrics = evaluate_model(base.model, tokenizer, task, eval_ds, limit=EXACT_MATCH_ROWS)
    model = base.model
    if config.quant != "none":
        # Freezes the base and upcasts non-quantized weights to fp32 (a no-op on the CPU).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    seed_everything(config.seed)
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT's NoMatchingPeftModuleError and its other config checks
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if hasattr(m, "in_features")})  # fmt: skip
        raise ConfigError(
            f"{config.method} cannot be applied to {config.base}: {exc}",
            hint=f"this base's linear layers: {', '.join(linear)}",
        ) from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # -- optimizer and schedule --
    accelerator = Accelerator(cpu=base.device == "cpu")
    plan = BatchPlan(
        len(train_ds),
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seed=config.seed,
        processes=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate(task),
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config.schedule, warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(model)
    eval_every = config.eval_every or plan.steps_per_epoch

    step, history, best, stale = 0, [], None, 0
    best_loss = math.inf
    tokens_seen, train_time = 0, 0.0
    if resuming:
        state, best = load_checkpoint(
            run_dir, model=peft_model, optimizer=optimizer, scheduler=scheduler
        )
        if state["dataset_fingerprint"] != train_ds.fingerprint:
            raise ConfigError(
                f"{config.data} changed since run {run_dir.name} started", hint="start a new run"
            )
        step, history, stale = state["step"], state["loss_history"], state["stale"]
        best_loss, base_metrics = state["best_loss"], state["base_metrics"]
        tokens_seen, train_time = state["tokens"], state["train_time_s"]
    else:
        seed_everything(config.seed)

    def checkpoint(rng: dict) -> None:
        if accelerator.is_main_process:
            save_checkpoint(
                run_dir,
                model=peft_model,
                optimizer=optimizer,
                scheduler=scheduler,
                rng=rng,
                best=best,
                state={
                    "step": step,
                    "total_steps": total_steps,
                    "loss_history": history,
                    "stale": stale,
                    "best_loss": best_loss,
                    "base_metrics": base_metrics,
                    "dataset_fingerprint": train_ds.fingerprint,
                    "tokens": tokens_seen,
                    "train_time_s": train_time,
                },
            )

    # -- the loop --
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    stopped_early = False
    pad = tokenizer.pad_token_id
    shifted = method.peft_type != "PROMPT_TUNING"
    try:
        with (
            StopRequest() as stop,
            TrainProgress(
                total_steps,
                enabled=show_progress and accelerator.is_main_process,
                start=step,
                description=config.name,
            ) as progress,
        ):
            model.train()
            while step < total_steps:
                rng = rng_state()  # the state a checkpoint taken before this step must restore
                if stop.requested:
                    checkpoint(rng)
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                micro = [
                    collate([train_ds.examples[i] for i in rows], pad_id=pad, task=task)
                    for rows in plan.step(step)
                ]
                # Each micro-batch's mean loss weighs by its share of the step's targets, so the
                # step's loss is the mean over all of them, as one batch of the same rows gives.
                targets = [loss_targets(batch, task, shifted=shifted) for batch in micro]
                step_loss, step_tokens = 0.0, 0
                try:
                    for j, batch in enumerate(micro):
                        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                        step_tokens += int(batch["attention_mask"].sum())
                        sync = j == len(micro) - 1
                        ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
                        with ctx:
                            out = model(**batch)
                            if targets[j]:
                                loss = out.loss * (targets[j] / sum(targets))
                            else:  # rows cut to no targets: mean over none is NaN; add nothing
                                loss = out.logits.sum() * 0.0  # still backward, for DDP's sync
                            accelerator.backward(loss)
                        step_loss += float(loss.detach())
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
                        )
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                except KeyboardInterrupt:
                    # Parameters are untouched until optimizer.step: the last finished step is
                    # a consistent checkpoint with this step's starting RNG.
                    optimizer.zero_grad(set_to_none=True)
                    checkpoint(rng)
                    raise
                step += 1
                train_time += time.perf_counter() - t0
                tokens_seen += step_tokens
                history.append({"step": step, "loss": round(step_loss, 6), "lr": lr})
                progress.update(step, loss=step_loss, lr=lr, tokens=step_tokens)

                if eval_ds is not None and (step % eval_every == 0 or step == total_steps):
                    point = evaluate_model(peft_model, tokenizer, task, eval_ds, generate=False)
                    history.append(
                        {"step": step, **{k: v for k, v in point.items() if isinstance(v, float)}}
                    )
                    if point["eval_loss"] < best_loss - 1e-6:
                        best_loss, stale = point["eval_loss"], 0
                        if config.early_stopping:
                            best = {
                                k: v.detach().cpu().clone()
                                for k, v in get_peft_model_state_dict(peft_model).items()
                            }
                    else:
                        stale += 1
                    if config.early_stopping and stale >= config.early_stopping:
                        stopped_early = True
                        progress.note(
                            f"early stopping at step {step}: eval loss has not improved "
                            f"for {stale} evaluations"
                        )
                        break
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint(rng_state())
                if on_step is not None:
                    try:
                        on_step(step, step_loss)
                    except KeyboardInterrupt:
                        checkpoint(rng_state())
                        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted at step {step} of {total_steps}; checkpoint saved in {run_dir}",
            hint=f"resume with: adaptory train --resume {run_dir}",
        ) from None
    finally:
        torch.use_deterministic_algorithms(deterministic)

    # -- final evaluation (on the best adapter when early stopping kept one) --
    if best is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, best)
    metrics: dict = {}
    if eval_ds is not None:
        metrics = evaluate_model(peft_model, tokenizer, task, eval_ds, limit=EXACT_MATCH_ROWS)
        metrics["base"] = base_metrics
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics["train_loss"] = train_losses[-1] if train_losses else None

    # -- the adapter files, then the registry --
    adapter_dir = run_dir / "adapter"
    if accelerator.is_main_process:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(str(adapter_dir))
        cfg_file = adapter_dir / "adapter_config.json"
        peft_cfg = json.loads(cfg_file.read_text())
        peft_cfg["base_model_name_or_path"] = base.source.model_name
        cfg_file.write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - started
    entry = None
    if accelerator.is_main_process:
        from adaptory.adapters.training.data import source_label

        dataset = {
            "file": source_label(config.data),
            "format": train_ds.format,
            "fingerprint": train_ds.fingerprint,
            "rows_train": len(train_ds),
            "rows_eval": len(eval_ds) if eval_ds is not None else 0,
        }
        if config.eval_data:
            dataset["eval_file"] = source_label(config.eval_data)
        else:
            dataset["eval_split"] = config.held_out_fraction
        extra = {
            "wall_time_s": round(wall, 3),
            "train_time_s": round(train_time, 3),
            "peak_memory_bytes": peak_memory_bytes(),
            "tokens_per_s": round(tokens_seen / train_time, 1) if train_time else None,
            "trainable_params": trainable,
            "steps": step,
            "total_steps": total_steps,
            "stopped_early": stopped_early,
            "run_dir": str(run_dir),
            "device": base.device,
        }
        if train_ds.labels:
            extra["labels"] = train_ds.labels
        training_config = {
            **config.to_dict(),
            "task": task,
            "format": train_ds.format,
            "lr": config.learning_rate(task),
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
        }
        entry = registry.add(
            adapter_dir,
            name=config.name,
            method=method.name,
            task=task,
            base_model=config.base,
            base_fingerprint=base.fingerprint.to_dict(),
            training_config=training_config,
            dataset=dataset,
            metrics=metrics,
            loss_history=history,
            parents=[],
            tags=config.tags,
            description=config.description,
            extra=extra,
        )
        (run_dir / "result.json").write_text(
            json.dumps({"ref": entry.ref, "metrics": metrics}, indent=1)
        )
    return TrainResult(
        entry=entry,
        metrics=metrics,
        run_dir=run_dir,
        loss_history=history,
        steps=step,
        wall_time_s=wall,
        stopped_early=stopped_early,
    )
