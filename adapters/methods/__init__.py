"""Adapter kinds, registered in one place: a new kind is one new file that calls register_method.

A Method names its PEFT type, the tasks it supports, a spec dataclass of its hyperparameters
(help text in field metadata; field names equal TrainConfig's, so a spec is built from a config)
and how a spec becomes a PEFT config for a given model. May import: registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adaptory.registry.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    peft_type: str
    tasks: tuple[str, ...]
    spec_cls: type
    build: Callable[[Any, str, Any], Any]  # (spec, task, model) -> peft config
    description: str = ""
    default_lr: float = 1e-3
    grad_checkpointing: bool = True  # False where PEFT refuses it
    # per-task overrides of default_lr
    task_lr: dict[str, float] = dataclasses.field(default_factory=dict)
    # (spec, task, model, quant) -> None; raises ConfigError for combinations that cannot work
    check: Callable[[Any, str, Any, str], None] | None = None

    def lr_for(self, task: str) -> float:
        return self.task_lr.get(task, self.default_lr)

    def spec_from(self, values: dict | Any) -> Any:
        """Build the spec from a dict or any object with same-named attributes (a TrainConfig)."""
        names = [f.name for f in dataclasses.fields(self.spec_cls)]
        if not isinstance(values, dict):
            values = {n: getattr(values, n) for n in names if hasattr(values, n)}
        return self.spec_cls(**{n: values[n] for n in names if values.get(n) is not None})

    def to_peft_config(self, spec: Any, task: str, model: Any, quant: str = "none"):
        """The PEFT config for `model`; ConfigError (with the reason) when unsupported."""
        if task not in self.tasks:
            raise ConfigError(
                f"method '{self.name}' does not support task {task}",
                hint=f"'{self.name}' supports {', '.join(self.tasks)}; "
                f"methods for {task}: {', '.join(methods_for(task))}",
            )
        if self.check is not None:
            self.check(spec, task, model, quant)
        return self.build(spec, task, model)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'", hint=f"choose one of {', '.join(METHODS)}")
    return METHODS[name]


def methods_for(task: str) -> list[str]:
    return [m.name for m in METHODS.values() if task in m.tasks]


def model_type(model: Any) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def peft_task_type(task: str) -> str:
    return {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}[task]


# Classification heads (and the BERT pooler that feeds them) are trained in full and saved with
# the adapter. PEFT adds classifier/score itself for SEQ_CLS; naming them keeps it explicit.
HEAD_MODULES = {"bert": ["classifier", "pooler"]}
DEFAULT_HEAD = ["classifier", "score"]


def head_modules(model: Any) -> list[str]:
    kind = model_type(model)
    if kind in HEAD_MODULES:
        return list(HEAD_MODULES[kind])
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [n for n in DEFAULT_HEAD if n in names]


def spec_help(method: Method) -> dict[str, str]:
    """Field name -> help text, for --help and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(method.spec_cls)}


# Importing the kinds registers them.
from adaptory.adapters.methods import ia3, lora, prefix, prompt  # noqa: E402, F401

__all__ = [
    "METHODS",
    "Method",
    "get_method",
    "head_modules",
    "methods_for",
    "register_method",
    "spec_help",
]
