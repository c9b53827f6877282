"""Registered LoRA adapters on a tiny base, made with PEFT directly, for tests and demos.

`init_lora_weights=False` gives B a random value too, so the adapter changes the outputs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path


def make_lora(
    base_dir: Path,
    out: Path,
    *,
    task: str = "causal-lm",
    r: int = 4,
    alpha: int | None = None,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    labels: Sequence[str] | None = None,
    scale: float = 1.0,
    **config: object,
) -> Path:
    """Save a random LoRA adapter (PEFT format) for the base in `base_dir` to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from adaptory.adapters.bases.loading import load_base

    loaded = load_base(str(base_dir), task=task, quant="none", device="cpu", labels=labels)
    torch.manual_seed(seed)
    peft_config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM",
        **config,
    )
    model = get_peft_model(loaded.model, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
            elif "modules_to_save" in name:  # a trained-looking classification head
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(str(out))
    return Path(out)


def register_lora(
    registry,
    base_dir: Path,
    name: str,
    *,
    task: str = "causal-lm",
    labels: Sequence[str] | None = None,
    eval_file: Path | None = None,
    quant: str = "nf4",
    **kwargs,
):
    """make_lora, then add it to `registry` as `name` with the base's fingerprint; the Entry."""
    from adaptory.adapters.bases.loading import fingerprint_base, resolve_base

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_lora(base_dir, Path(tmp) / "a", task=task, labels=labels, **kwargs)
        config = json.loads((folder / "adapter_config.json").read_text())
        return registry.add(
            folder,
            name=name,
            method="lora",
            task=task,
            base_model=str(base_dir),
            base_fingerprint=fingerprint_base(resolve_base(str(base_dir)), quant).to_dict(),
            training_config={"r": config["r"]},
            dataset={"eval_file": str(eval_file)} if eval_file else {},
            extra={"labels": list(labels)} if labels else {},
        )
