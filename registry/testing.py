"""Small real PEFT adapter folders for tests, written without building a model (no torch needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def lora_config(
    *,
    r: int = 4,
    base_model: str = "tiny-llama",
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    task_type: str = "CAUSAL_LM",
    **overrides: object,
) -> dict:
    """An adapter_config.json dict as LoraConfig(...).save_pretrained writes it (the common fields)."""
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    config.update(overrides)
    return config


def make_lora_folder(
    folder: Path,
    *,
    r: int = 4,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    base_model: str = "tiny-llama",
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    config_overrides: dict | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with lora_A/lora_B tensors of a Llama."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = lora_config(r=r, base_model=base_model, target_modules=target_modules)
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module in target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def prefix_config(
    *,
    virtual_tokens: int = 3,
    layers: int = 2,
    heads: int = 4,
    token_dim: int = 64,
    base_model: str = "tiny-llama",
    **overrides: object,
) -> dict:
    """An adapter_config.json dict as PrefixTuningConfig(...).save_pretrained writes it."""
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": virtual_tokens,
        "num_layers": layers,
        "num_attention_heads": heads,
        "token_dim": token_dim,
        "encoder_hidden_size": token_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "revision": None,
        "auto_mapping": None,
    }
    config.update(overrides)
    return config


def make_prefix_folder(
    folder: Path,
    *,
    virtual_tokens: int = 3,
    layers: int = 2,
    heads: int = 4,
    token_dim: int = 64,
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """Write a prefix-tuning folder for a Llama: prompt_embeddings of shape (virtual tokens,
    layers x 2 x token_dim), PEFT's saved key/value prefixes (the defaults fit the tiny Llama)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = prefix_config(
        virtual_tokens=virtual_tokens, layers=layers, heads=heads, token_dim=token_dim
    )
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((virtual_tokens, layers * 2 * token_dim), dtype=np.float32)
    save_file({"prompt_embeddings": weight}, str(folder / "adapter_model.safetensors"))
    return folder
