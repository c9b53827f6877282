"""IA3: learned rescaling of keys, values and the feed-forward input."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptory.adapters.methods import (
    Method,
    head_modules,
    model_type,
    peft_task_type,
    register_method,
)
from adaptory.registry.errors import ConfigError

# (target_modules, feedforward_modules); regexes are full-matched by PEFT. For BERT the
# feed-forward output projection is "layer.N.output.dense" (not "attention.output.dense").
TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (r".*\.(key|value|\d+\.output\.dense)$", r".*\.\d+\.output\.dense$"),
}


@dataclass(frozen=True)
class IA3Spec:
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "module names to rescale (default: per architecture)"}
    )


def to_peft_config(spec: IA3Spec, task: str, model):
    from peft import IA3Config

    kind = model_type(model)
    if spec.target_modules:
        targets, feedforward = list(spec.target_modules), []
    elif kind in TARGETS:
        targets, feedforward = TARGETS[kind]
    else:
        raise ConfigError(
            f"no default IA3 target modules for architecture '{kind}'",
            hint="pass --target-modules",
        )
    return IA3Config(
        task_type=peft_task_type(task),
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=head_modules(model) if task == "seq-cls" else None,
    )


METHOD = register_method(
    Method(
        name="ia3",
        peft_type="IA3",
        tasks=("causal-lm", "seq-cls"),
        spec_cls=IA3Spec,
        build=to_peft_config,
        description="learned rescaling of keys, values and feed-forward inputs",
        default_lr=1e-2,
    )
)
