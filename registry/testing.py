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
