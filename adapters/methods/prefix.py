"""Prefix tuning: trained key/value prefixes in every attention layer (causal LM only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptory.adapters.methods import Method, peft_task_type, register_method
from adaptory.registry.errors import ConfigError


@dataclass(frozen=True)
class PrefixSpec:
    virtual_tokens: int = field(default=16, metadata={"help": "prefix length per layer"})
    prefix_projection: bool = field(
        default=False, metadata={"help": "reparametrise the prefix through a 2-layer MLP"}
    )

    def __post_init__(self):
        if self.virtual_tokens < 1:
            raise ConfigError(f"virtual tokens must be at least 1, got {self.virtual_tokens}")


def check(spec: PrefixSpec, task: str, model, quant: str) -> None:
    if getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError("prefix tuning on encoder-decoder models is not supported here")


def to_peft_config(spec: PrefixSpec, task: str, model):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=peft_task_type(task),
        num_virtual_tokens=spec.virtual_tokens,
        prefix_projection=spec.prefix_projection,
        encoder_hidden_size=model.config.hidden_size,
    )


# seq-cls is refused by the task list: transformers 5 classification models (BERT, Llama) take no
# past_key_values, which is how PEFT injects the prefix ("Model does not support past key values").
METHOD = register_method(
    Method(
        name="prefix",
        peft_type="PREFIX_TUNING",
        tasks=("causal-lm",),
        spec_cls=PrefixSpec,
        build=to_peft_config,
        check=check,
        description="trained key/value prefixes in every layer (causal LM)",
        default_lr=1e-2,
        # PEFT: "PREFIX_TUNING does not work with gradient checkpointing" (cached prefixes).
        grad_checkpointing=False,
    )
)
