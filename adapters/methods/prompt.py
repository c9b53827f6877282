"""Prompt tuning: trained virtual token embeddings prepended to the input."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptory.adapters.methods import Method, peft_task_type, register_method
from adaptory.registry.errors import ConfigError


@dataclass(frozen=True)
class PromptSpec:
    virtual_tokens: int = field(default=16, metadata={"help": "number of virtual tokens"})

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise ConfigError(f"virtual tokens must be at least 1, got {self.virtual_tokens}")


def to_peft_config(spec: PromptSpec, task: str, model):
    from peft import PromptTuningConfig

    # For SEQ_CLS PEFT also trains and saves the classification head.
    return PromptTuningConfig(
        task_type=peft_task_type(task), num_virtual_tokens=spec.virtual_tokens
    )


METHOD = register_method(
    Method(
        name="prompt",
        peft_type="PROMPT_TUNING",
        tasks=("causal-lm", "seq-cls"),
        spec_cls=PromptSpec,
        build=to_peft_config,
        description="trained virtual token embeddings before the input",
        default_lr=3e-2,
    )
)
