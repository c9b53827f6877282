"""Train one adapter, top to bottom: data → model → optimizer → loop → eval → checkpoint →
registry.

`train_adapter(TrainConfig(...), registry=...)` is the whole recipe; `adaptory train` is a thin
CLI over it and `accelerate launch` runs the same loop on several devices. With a seed the run is
reproducible on the CPU (identical adapter bytes), and a run resumed from a checkpoint ends with
the same adapter as an uninterrupted one: batches come from a per-epoch seeded permutation, and a
checkpoint (checkpoints.py) holds the adapter, optimizer, scheduler, RNG state and step.
Kept as one module (~900 lines): the recipe reads top to bottom in the order a run takes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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
from adaptory.adapters.training.checkpoints import (
    find_run,
    load_checkpoint,
    mark_finished,
    rng_state,
    runs_dir,
    save_checkpoint,
)
from adaptory.registry.errors import AdaptoryError, ConfigError

SCHEDULES = ("cosine", "linear", "constant")
# Exact match needs one forward pass per generated token: cap the rows it runs on.
EXACT_MATCH_ROWS = 50
PATH_FIELDS = ("data", "eval_data", "output_dir")
KEEP = ("best", "last")
# Module-name lists of a PEFT config that PEFT matches as sets: their order means nothing.
UNORDERED_CONFIG_LISTS = (
    "target_modules",
    "exclude_modules",
    "feedforward_modules",
    "modules_to_save",
)


class TrainingInterrupted(AdaptoryError):
    """Ctrl-C during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


# --- configuration ------------------------------------------------------------------------------


# Defaults sized by the data: enough optimizer steps for a small set to fit (a few dozen rows
# are a few steps per epoch), one epoch or more for a large one; a bounded warm-up.
MIN_STEPS = 160
# Virtual-token methods (prefix and prompt tuning) learn through a few vectors that every layer
# attends to, and need more steps: on a dev split of the reverse task (300 rows, tinylm) prefix
# tuning reached exact match 0 after 152 steps, 0.32 after 304 (docs/BENCHMARKS.md, "Quality").
VIRTUAL_TOKEN_MIN_STEPS = 600
MAX_EPOCHS = 40
MAX_WARMUP = 100
HEAD_LR_FACTOR = 1.0  # default of head_lr_factor (docs/BENCHMARKS.md, "Quality", says why)


def min_steps(method: str) -> int:
    """The fewest optimizer steps a data-sized run of `method` takes (see MIN_STEPS)."""
    return VIRTUAL_TOKEN_MIN_STEPS if method in ("prefix", "prompt") else MIN_STEPS


def auto_epochs(steps_per_epoch: int, method: str = "lora") -> int:
    """Epochs when none are given: at least min_steps(method) steps in all, between 1 and
    MAX_EPOCHS."""
    return max(1, min(MAX_EPOCHS, math.ceil(min_steps(method) / max(1, steps_per_epoch))))


@dataclass
class TrainConfig:
    """Every setting of a training run (each is an `adaptory train` flag and a TOML key)."""

    base: str | None = None
    data: str | list[str] | None = None  # a file, or several to mix (FILE@WEIGHT)
    name: str | None = None
    task: str | None = None  # default: seq-cls if the data has a label column, else causal-lm
    method: str = "lora"
    eval_data: str | None = None
    eval_split: float | None = None  # default 0.1 without eval_data; 0 turns evaluation off
    format: str | None = None
    columns: dict[str, str] | None = None  # format's column -> the file's ("text=sentence,...")
    chat_template: str | None = None  # a name (chatml, llama-3, zephyr) or a Jinja file
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
    head_lr_factor: float | None = None  # a classifier's new head: lr x this (HEAD_LR_FACTOR)
    epochs: int | None = None  # default: sized by the data (`auto_epochs`)
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    grad_checkpointing: bool = False
    warmup: float = 0.1  # a fraction of the steps if < 1 (at most MAX_WARMUP), else a number
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int | None = None  # steps; default once per epoch
    early_stopping: int | None = None  # patience, in evaluations without a better eval loss
    keep: str = "best"  # the adapter stored: the one with the best eval loss, or the "last"
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
        if isinstance(self.data, list | tuple):  # several files to mix (FILE@WEIGHT each)
            self.data = [str(d) for d in self.data] if len(self.data) != 1 else str(self.data[0])
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
        from adaptory.adapters.training.data import normalize_format, parse_columns
        from adaptory.registry.refs import validate_name, validate_tag

        validate_name(self.name)
        self.columns = parse_columns(self.columns)
        for tag in self.tags:
            validate_tag(tag)
        self.format = normalize_format(self.format)
        if self.chat_template is not None:
            from adaptory.adapters.training.data import chat_template_text

            chat_template_text(self.chat_template)  # a known name or a readable template file
        _choice("task", self.task, TASKS, optional=True)
        _choice("quant", self.quant, QUANTS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("keep", self.keep, KEEP)
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
        for name in ("batch_size", "grad_accum", "max_length"):
            _positive(name, getattr(self, name))
        for name in (
            "epochs", "max_steps", "eval_every", "early_stopping", "checkpoint_every", "threads"
        ):  # fmt: skip
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.head_lr_factor is not None and not self.head_lr_factor > 0:
            raise ConfigError(f"head_lr_factor must be positive, got {self.head_lr_factor}")
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

    def warmup_steps(self, total_steps: int) -> int:
        if self.warmup >= 1:
            return int(self.warmup)
        return min(MAX_WARMUP, int(self.warmup * total_steps))

    def total_steps(self, steps_per_epoch: int) -> int:
        """`max_steps`, else `epochs` (or the data-sized default) times the epoch's steps."""
        if self.max_steps:
            return self.max_steps
        return (self.epochs or auto_epochs(steps_per_epoch, self.method)) * steps_per_epoch

    def head_lr(self, task: str) -> float | None:
        """The learning rate of a classifier's newly initialised head (None: no head)."""
        if task != "seq-cls":
            return None
        factor = self.head_lr_factor if self.head_lr_factor is not None else HEAD_LR_FACTOR
        return self.learning_rate(task) * factor

    def as_used(self, task: str, fmt: str, total_steps: int) -> dict[str, Any]:
        """Every setting as the run used it (the registry's training_config): the defaults that
        depend on the data resolved, and the step counts."""
        return {
            **self.to_dict(),
            "task": task,
            "format": fmt,
            "lr": self.learning_rate(task),
            "warmup_steps": self.warmup_steps(total_steps),
            "total_steps": total_steps,
            "head_lr": self.head_lr(task),
        }

    def sources(self) -> list[tuple[str, float]]:
        """The training data files and their weights (`data` is one FILE or a list of
        FILE@WEIGHT)."""
        from adaptory.adapters.training.data import parse_source

        items = self.data if isinstance(self.data, list) else [self.data]
        return [parse_source(item) for item in items]

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
            if name == "chat_template" and isinstance(value, str):
                from adaptory.adapters.training.data import CHAT_TEMPLATES

                value = value if value in CHAT_TEMPLATES else str((path.parent / value).resolve())
            elif name in PATH_FIELDS and isinstance(value, str):
                value = _relative_to(path, value)
            elif name == "data" and isinstance(value, list):
                value = [_relative_to(path, str(v)) for v in value]
            values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _relative_to(toml: Path, value: str) -> str:
    """A path written in a TOML file, relative to the file (a data weight `@W` kept)."""
    from adaptory.adapters.training.data import is_hub_source, parse_source

    source, weight = parse_source(value)
    if Path(source).is_absolute() or is_hub_source(source):
        return value
    resolved = str((toml.parent / source).resolve())
    return resolved if weight == 1.0 and "@" not in value else f"{resolved}@{weight:g}"


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
    """What a run ended with: its registry entry (None on other processes than the main one),
    final metrics, run folder and loss history."""

    entry: Any  # registry Entry
    metrics: dict
    run_dir: Path
    loss_history: list[dict]
    steps: int
    wall_time_s: float
    stopped_early: bool = False


# --- threads, determinism, seeds ---------------------------------------------------------------


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


@contextlib.contextmanager
def deterministic_algorithms():
    """Run with torch's deterministic algorithms (a warning where an op has none), as seeded
    runs promise identical adapters; the previous setting comes back afterwards."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


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


def make_optimizer(model, config: TrainConfig, task: str, total_steps: int):
    """AdamW over the trainable (adapter) parameters, and its learning-rate schedule."""
    import torch

    head_lr = config.head_lr(task)
    adapter, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if head_lr and "modules_to_save" in name else adapter).append(param)
    groups = [{"params": adapter}] + ([{"params": head, "lr": head_lr}] if head else [])
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate(task), weight_decay=config.weight_decay
    )
    warmup_steps = config.warmup_steps(total_steps)
    return optimizer, make_scheduler(optimizer, config.schedule, warmup_steps, total_steps)


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


# --- the state of a run -------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves besides the weights (state.json), and what the
    registry entry reports about the training."""

    step: int = 0
    loss_history: list[dict] = field(default_factory=list)
    stale: int = 0  # evaluations since the eval loss last improved
    best_loss: float = math.inf
    best: dict | None = None  # the best adapter's weights (with keep="best")
    best_step: int | None = None  # the step they are from
    base_metrics: dict = field(default_factory=dict)
    tokens: int = 0
    train_time_s: float = 0.0
    stopped_early: bool = False

    @classmethod
    def restored(cls, state: dict, best: dict | None) -> RunState:
        """The state a checkpoint saved (see `saved`)."""
        return cls(
            step=state["step"],
            loss_history=state["loss_history"],
            stale=state["stale"],
            best_loss=state["best_loss"],
            best=best,
            best_step=state.get("best_step"),
            base_metrics=state["base_metrics"],
            tokens=state["tokens"],
            train_time_s=state["train_time_s"],
        )

    def saved(self, total_steps: int, dataset_fingerprint: str) -> dict:
        """state.json of a checkpoint taken now."""
        return {
            "step": self.step,
            "total_steps": total_steps,
            "loss_history": self.loss_history,
            "stale": self.stale,
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "base_metrics": self.base_metrics,
            "dataset_fingerprint": dataset_fingerprint,
            "tokens": self.tokens,
            "train_time_s": self.train_time_s,
        }

    def record_step(self, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """Count a finished optimizer step and add it to the loss history."""
        self.step += 1
        self.train_time_s += seconds
        self.tokens += tokens
        self.loss_history.append({"step": self.step, "loss": round(loss, 6), "lr": lr})

    def train_losses(self) -> list[float]:
        return [h["loss"] for h in self.loss_history if "loss" in h]


# --- set-up -------------------------------------------------------------------------------------


def resumed_config(config: TrainConfig, home: Path) -> tuple[TrainConfig, Path | None]:
    """With --resume, the run folder and the config the run started with (it wins over any other
    settings); without, the config as given and no folder yet."""
    if config.resume is None:
        return config, None
    run_dir = find_run(home, config.resume)
    stored = json.loads((run_dir / "config.json").read_text())
    return TrainConfig(**{**stored, "resume": None}), run_dir


def method_and_task(config: TrainConfig):
    """The adapter method and the task (from --task or the data's columns), checked to fit."""
    from adaptory.adapters.training.data import peek_format

    _, task = peek_format(Path(config.sources()[0][0]), config.format, config.task, config.columns)
    method = get_method(config.method)
    if task not in method.tasks:
        raise ConfigError(
            f"method '{method.name}' does not support task {task}",
            hint=f"'{method.name}' supports {', '.join(method.tasks)}",
        )
    return method, task


def load_training_data(config: TrainConfig, source, task: str):
    """(train, eval or None): the data file, and the eval file or a seeded held-out split,
    tokenized for base `source`. Every row of both is validated here, before the model loads."""
    from adaptory.adapters.bases.loading import fingerprint_base, load_tokenizer
    from adaptory.adapters.training.data import load_dataset, split_dataset

    tokenizer_fp = fingerprint_base(source, config.quant).tokenizer
    tokenizer = load_tokenizer(source.path, task)
    use_chat_template(tokenizer, config)

    def load(path, labels=None):
        return load_dataset(
            Path(path),
            tokenizer=tokenizer,
            task=task,
            fmt=config.format,
            max_length=config.max_length,
            labels=labels,
            tokenizer_fingerprint=tokenizer_fp,
            columns=config.columns,
        )

    sources = config.sources()
    if len(sources) > 1 or sources[0][1] != 1.0:
        return _mixed_data(config, sources, load)
    data = load(sources[0][0])
    if config.eval_data:
        held = load_dataset(
            Path(config.eval_data),
            tokenizer=tokenizer,
            task=task,
            fmt=config.format or data.format,
            max_length=config.max_length,
            labels=data.labels,
            tokenizer_fingerprint=tokenizer_fp,
            columns=config.columns,
        )
        return data, held
    if config.held_out_fraction > 0:
        return split_dataset(data, config.held_out_fraction, config.seed)
    return data, None


def _mixed_data(config: TrainConfig, sources, load):
    """Several data files (each FILE@WEIGHT): one label set for all, each file's held-out split
    taken before weighting (so no repeated row is in both), the training rows mixed."""
    from adaptory.adapters.training.data import mix_datasets, split_dataset

    parts = [(load(path), weight) for path, weight in sources]
    names = {tuple(d.labels) for d, _ in parts if d.labels}
    if len(names) > 1:  # classification files with different label sets: their union
        union = sorted({label for group in names for label in group})
        parts = [(load(path, union), weight) for path, weight in sources]
    if config.eval_data:
        held = load(config.eval_data, parts[0][0].labels)
        return mix_datasets(parts, config.seed), held
    if config.held_out_fraction <= 0:
        return mix_datasets(parts, config.seed), None
    splits = [(split_dataset(d, config.held_out_fraction, config.seed), w) for d, w in parts]
    train = mix_datasets([(t, w) for (t, _), w in splits], config.seed)
    held = mix_datasets([(e, 1.0) for (_, e), _ in splits], config.seed)
    return train, held


def use_chat_template(tokenizer, config: TrainConfig) -> str | None:
    """Give the tokenizer the run's --chat-template (None: keep the base's); return its text."""
    if config.chat_template is None:
        return None
    from adaptory.adapters.training.data import chat_template_text

    tokenizer.chat_template = chat_template_text(config.chat_template)
    return tokenizer.chat_template


def new_run_dir(config: TrainConfig, home: Path) -> Path:
    """A fresh run folder (--output-dir, or HOME/runs/NAME-TIME) holding the run's config.json."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = (
        Path(config.output_dir) if config.output_dir else runs_dir(home) / f"{config.name}-{stamp}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return run_dir


def load_model(config: TrainConfig, method, task: str, labels, base_eval, home: Path):
    """(the quantized base, the model to train, the base's metrics): the base loaded as the run
    says, measured on `base_eval` (the eval data, or None), then given the adapter."""
    from adaptory.adapters.bases.loading import load_base
    from adaptory.adapters.training.evaluate import evaluate_model

    base = load_base(config.base, task=task, quant=config.quant, device=config.device,
                     labels=labels, seed=config.seed, home=home)  # fmt: skip
    keep_4bit_trainable(base.model)
    peft_config = method.to_peft_config(method.spec_from(config), task, base.model, config.quant)
    base_metrics: dict = {}
    if base_eval is not None:
        base_metrics = evaluate_model(
            base.model, base.tokenizer, task, base_eval, limit=EXACT_MATCH_ROWS
        )
    return base, add_adapter(base.model, peft_config, config), base_metrics


def add_adapter(model, peft_config, config: TrainConfig):
    """The base prepared for training (k-bit, gradient checkpointing) and wrapped by PEFT, the
    adapter initialised from the run's seed."""
    from peft import get_peft_model, prepare_model_for_kbit_training

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
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT's NoMatchingPeftModuleError and its other config checks
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if hasattr(m, "in_features")})  # fmt: skip
        raise ConfigError(
            f"{config.method} cannot be applied to {config.base}: {exc}",
            hint=f"this base's linear layers: {', '.join(linear)}",
        ) from None


def resume_state(run_dir: Path, config: TrainConfig, dataset, model, optimizer, scheduler):
    """Restore the newest intact checkpoint of `run_dir` into the model, optimizer, scheduler and
    RNG; return the run's state. The data must be what the run started with."""
    state, best = load_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    if state["dataset_fingerprint"] != dataset.fingerprint:
        raise ConfigError(
            f"{config.data} changed since run {run_dir.name} started", hint="start a new run"
        )
    return RunState.restored(state, best)


# --- the steps of the loop ----------------------------------------------------------------------


def step_batches(dataset, rows: list[list[int]], pad: int, task: str, shifted: bool):
    """The collated micro-batches of one optimizer step and how many targets each holds."""
    from adaptory.adapters.training.data import collate

    micro = [collate([dataset.examples[i] for i in r], pad_id=pad, task=task) for r in rows]
    return micro, [loss_targets(batch, task, shifted=shifted) for batch in micro]


def optimizer_step(
    model, micro: list[dict], targets: list[int], accelerator, optimizer, scheduler, clip
) -> tuple[float, int, float]:
    """Forward and backward every micro-batch, then clip, step and advance the schedule; return
    (the step's loss, its tokens, the learning rate it used).

    Each micro-batch's mean loss weighs by its share of the step's targets, so the step's loss is
    the mean over all of them, as one batch of the same rows gives. `clip` is (the trainable
    parameters, max norm), or None.
    """
    total, last = sum(targets), len(micro) - 1
    step_loss, step_tokens = 0.0, 0
    for j, batch in enumerate(micro):
        step_tokens += int(batch["attention_mask"].sum())  # on the CPU: no device sync
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(model) if j < last else contextlib.nullcontext():
            out = model(**batch)
            if targets[j]:
                loss = out.loss * (targets[j] / total)
            else:  # rows cut to no targets: mean over none is NaN; add nothing
                loss = out.logits.sum() * 0.0  # still backward, for DDP's sync
            accelerator.backward(loss)
        step_loss += float(loss.detach())
    if clip is not None:
        accelerator.clip_grad_norm_(*clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, step_tokens, lr


def evaluate_step(model, tokenizer, task: str, dataset, state: RunState, *, keep_best: bool):
    """Evaluate the adapter now: the point joins the loss history, the best eval loss (and with
    `keep_best` the best adapter's weights) is kept, and evaluations without progress counted."""
    from adaptory.adapters.training.evaluate import evaluate_model

    point = evaluate_model(model, tokenizer, task, dataset, generate=False)
    state.loss_history.append(
        {"step": state.step, **{k: v for k, v in point.items() if isinstance(v, float)}}
    )
    if point["eval_loss"] < state.best_loss - 1e-6:
        state.best_loss, state.stale = point["eval_loss"], 0
        if keep_best:
            state.best_step = state.step
            state.best = trainable_weights(model)
    else:
        state.stale += 1


def trainable_weights(model) -> dict:
    """A copy of every trainable parameter by name (the adapter, and a classifier's head).
    Not PEFT's saved state dict: for prefix tuning with a projection that holds the projected
    key/values, which cannot be loaded back into the model being trained."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_weights(model, weights: dict) -> None:
    """Put back what `trainable_weights` copied (or, from a checkpoint of an older version,
    PEFT's state dict)."""
    import torch

    params = dict(model.named_parameters())
    if not all(name in params for name in weights):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
        return
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


# --- after the loop -----------------------------------------------------------------------------


def final_metrics(model, tokenizer, task: str, dataset, state: RunState) -> dict:
    """The adapter's metrics on the eval data (on the best adapter when one was kept), next to
    the base's, and the last training loss."""
    from adaptory.adapters.training.evaluate import evaluate_model

    if state.best is not None:
        restore_weights(model, state.best)
    metrics: dict = {}
    if dataset is not None:
        metrics = evaluate_model(model, tokenizer, task, dataset, limit=EXACT_MATCH_ROWS)
        metrics["base"] = state.base_metrics
    losses = state.train_losses()
    metrics["train_loss"] = losses[-1] if losses else None
    return metrics


def save_adapter(model, folder: Path, base_model: str) -> Path:
    """The adapter as a PEFT folder naming `base_model`, its config canonical."""
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    cfg_file = folder / "adapter_config.json"
    peft_cfg = json.loads(cfg_file.read_text())
    peft_cfg["base_model_name_or_path"] = base_model
    cfg_file.write_text(canonical_adapter_config(peft_cfg))
    return folder


def canonical_adapter_config(config: dict) -> str:
    """adapter_config.json text that depends only on the settings, so that identical weights and
    settings give identical files and digests: keys sorted, and the name lists whose order PEFT
    ignores sorted without repeats (PEFT keeps target_modules and the like as sets and saves them
    in set order, which changes from one process to the next with Python's string hashing; it
    appends its own head names to modules_to_save, and a merge concatenates the parents')."""
    config = dict(config)
    for key in UNORDERED_CONFIG_LISTS:
        names = config.get(key)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            config[key] = sorted(set(names))
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def dataset_record(config: TrainConfig, train, held_out) -> dict:
    """What the registry keeps about the data: files, format, fingerprint, sizes."""
    from adaptory.adapters.training.data import source_label

    sources = config.sources()
    dataset = {
        "file": source_label(sources[0][0]),
        "format": train.format,
        "fingerprint": train.fingerprint,
        "rows_train": len(train),
        "rows_eval": len(held_out) if held_out is not None else 0,
    }
    if len(sources) > 1 or sources[0][1] != 1.0:
        dataset["files"] = [{"file": source_label(f), "weight": w} for f, w in sources]
        dataset["formats"] = train.extra.get("formats", [train.format])
    if config.eval_data:
        dataset["eval_file"] = source_label(config.eval_data)
    else:
        dataset["eval_split"] = config.held_out_fraction
    return dataset


def run_plan(config: TrainConfig, task: str, train_ds, eval_ds, plan, total_steps: int) -> str:
    """The run's first line: what the data is and the settings chosen for it."""
    rows = f"{len(train_ds)} {train_ds.format} rows" + (
        f", {len(eval_ds)} held out" if eval_ds is not None else ", no evaluation"
    )
    keep = "the best by eval loss" if config.keep == "best" and eval_ds is not None else "the last"
    return (
        f"{rows}; {total_steps} steps ({plan.steps_per_epoch} per epoch), lr "
        f"{config.learning_rate(task):.2g}"
        + (
            f" (head {config.head_lr(task):.2g})"
            if config.head_lr(task) not in (None, config.learning_rate(task))
            else ""
        )
        + f", warm-up {config.warmup_steps(total_steps)} steps, "
        f"{config.schedule}; storing {keep} adapter"
    )


def run_record(
    state: RunState, wall: float, total_steps: int, trainable: int, run_dir: Path, base, labels
) -> dict:
    """What the registry keeps about the run (`extra`): time, memory, throughput, steps, where
    it ran, and a classifier's label names."""
    extra = {
        "wall_time_s": round(wall, 3),
        "train_time_s": round(state.train_time_s, 3),
        "peak_memory_bytes": peak_memory_bytes(),
        "tokens_per_s": (
            round(state.tokens / state.train_time_s, 1) if state.train_time_s else None
        ),
        "trainable_params": trainable,
        "steps": state.step,
        "total_steps": total_steps,
        "stopped_early": state.stopped_early,
        "kept": (
            {"which": "best", "step": state.best_step, "eval_loss": state.best_loss}
            if state.best is not None
            else {"which": "last", "step": state.step}
        ),
        "run_dir": str(run_dir),
        "device": base.device,
    }
    if labels:
        extra["labels"] = labels
    return extra


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
    """The recipe as one function on purpose, read top to bottom like nanoGPT's train.py: set-up
    (data, model, optimizer and schedule, resume), the loop (step, evaluate, checkpoint, stop),
    then the final evaluation and the registry entry. Each step is a named helper above."""
    from accelerate import Accelerator

    from adaptory.adapters.bases.loading import quiet_transformers, resolve_base
    from adaptory.adapters.training.progress import TrainProgress

    quiet_transformers()
    started = time.perf_counter()
    home = Path(registry.home)

    # -- data: validated in full before the model loads (a resumed run keeps its stored config) --
    config, run_dir = resumed_config(config, home)
    resuming = run_dir is not None
    source = resolve_base(config.base, home)
    method, task = method_and_task(config)
    train_ds, eval_ds = load_training_data(config, source, task)
    run_dir = run_dir or new_run_dir(config, home)

    # -- model: the quantized base, its metrics (when the run starts), then the adapter --
    base_eval = None if resuming else eval_ds
    base, model, base_metrics = load_model(config, method, task, train_ds.labels, base_eval, home)
    tokenizer = base.tokenizer
    template = use_chat_template(tokenizer, config)
    state = RunState(base_metrics=base_metrics)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # -- optimizer and schedule, then the checkpoint to resume from --
    accelerator = Accelerator(cpu=base.device == "cpu")
    plan = BatchPlan(len(train_ds), batch_size=config.batch_size, grad_accum=config.grad_accum,
                     seed=config.seed, processes=accelerator.num_processes,
                     rank=accelerator.process_index)  # fmt: skip
    total_steps = config.total_steps(plan.steps_per_epoch)
    optimizer, scheduler = make_optimizer(model, config, task, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(model)
    if resuming:
        state = resume_state(run_dir, config, train_ds, peft_model, optimizer, scheduler)
    else:
        seed_everything(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = (params, config.max_grad_norm) if config.max_grad_norm else None
    eval_every = config.eval_every or plan.steps_per_epoch
    pad, shifted = tokenizer.pad_token_id, method.peft_type != "PROMPT_TUNING"

    def checkpoint(rng: dict) -> None:
        """Save the run as it stands, to go on with RNG state `rng` (the main process writes)."""
        if accelerator.is_main_process:
            save_checkpoint(run_dir, model=peft_model, optimizer=optimizer, scheduler=scheduler,
                            rng=rng, best=state.best,
                            state=state.saved(total_steps, train_ds.fingerprint))  # fmt: skip

    # -- the loop: step, evaluate, checkpoint; Ctrl-C stops at a step boundary --
    progress = TrainProgress(total_steps, enabled=show_progress and accelerator.is_main_process,
                             start=state.step, description=config.name)  # fmt: skip
    progress.note(run_plan(config, task, train_ds, eval_ds, plan, total_steps))
    try:
        with deterministic_algorithms(), StopRequest() as stop, progress:
            model.train()
            while state.step < total_steps:
                rng = rng_state()  # the state a checkpoint taken before this step must restore
                if stop.requested:
                    checkpoint(rng)
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                micro, targets = step_batches(train_ds, plan.step(state.step), pad, task, shifted)
                try:
                    loss, tokens, lr = optimizer_step(
                        model, micro, targets, accelerator, optimizer, scheduler, clip
                    )
                except KeyboardInterrupt:
                    # Parameters are untouched until optimizer.step: the last finished step is
                    # a consistent checkpoint with this step's starting RNG.
                    optimizer.zero_grad(set_to_none=True)
                    checkpoint(rng)
                    raise
                state.record_step(loss, lr, tokens, time.perf_counter() - t0)
                progress.update(state.step, loss=loss, lr=lr, tokens=tokens)

                if eval_ds is not None and (
                    state.step % eval_every == 0 or state.step == total_steps
                ):
                    evaluate_step(peft_model, tokenizer, task, eval_ds, state,
                                  keep_best=config.keep == "best")  # fmt: skip
                    if config.early_stopping and state.stale >= config.early_stopping:
                        state.stopped_early = True
                        progress.note(
                            f"early stopping at step {state.step}: eval loss has not improved "
                            f"for {state.stale} evaluations"
                        )
                        break
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    checkpoint(rng_state())
                if on_step is not None:
                    try:
                        on_step(state.step, loss)
                    except KeyboardInterrupt:
                        checkpoint(rng_state())
                        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"interrupted at step {state.step} of {total_steps}; checkpoint saved in {run_dir}",
            hint=f"resume with: adaptory train --resume {run_dir}",
        ) from None

    # -- final evaluation, the adapter files, then the registry --
    metrics = final_metrics(peft_model, tokenizer, task, eval_ds, state)
    adapter_dir = run_dir / "adapter"
    if accelerator.is_main_process:
        save_adapter(peft_model, adapter_dir, base.source.model_name)
        if template is not None:  # serving and `eval` render chats with it, not the base's
            from adaptory.registry.adapter_files import CHAT_TEMPLATE_FILE

            (adapter_dir / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - started
    entry = None
    if accelerator.is_main_process:
        entry = registry.add(
            adapter_dir, name=config.name, method=method.name, task=task, base_model=config.base,
            base_fingerprint=base.fingerprint.to_dict(), metrics=metrics,
            training_config=config.as_used(task, train_ds.format, total_steps),
            dataset=dataset_record(config, train_ds, eval_ds), loss_history=state.loss_history,
            parents=[], tags=config.tags, description=config.description,
            extra=run_record(state, wall, total_steps, trainable, run_dir, base, train_ds.labels),
        )  # fmt: skip
        mark_finished(run_dir, entry.ref, metrics)
    return TrainResult(entry=entry, metrics=metrics, run_dir=run_dir,
                       loss_history=state.loss_history, steps=state.step, wall_time_s=wall,
                       stopped_early=state.stopped_early)  # fmt: skip
