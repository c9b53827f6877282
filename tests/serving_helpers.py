"""Real PEFT adapters on the tiny 4-bit bases, registered, plus single-adapter PEFT references.

Shared by the runtime, server and CLI tests (tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from adaptory.adapters.bases.loading import fingerprint_base, load_base, resolve_base


def make_lora(base_dir: Path, out: Path, *, seed: int, r: int = 4, targets=("q_proj", "v_proj")):
    """A causal LoRA whose weights are random (init_lora_weights=False), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_base(str(base_dir), task="causal-lm")
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=list(targets),
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(base.model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def make_prefix(base_dir: Path, out: Path, *, seed: int, virtual_tokens: int = 3):
    """A prefix-tuning adapter with a perturbed prompt encoder (so the prefix matters)."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    base = load_base(str(base_dir), task="causal-lm")
    torch.manual_seed(seed)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    model = get_peft_model(base.model, config)
    with torch.no_grad():
        for encoder in model.prompt_encoder.values():
            encoder.embedding.weight.normal_(0, 2.0)
    model.save_pretrained(out)
    return out


def make_classifier(base_dir: Path, out: Path, *, seed: int, labels: list[str]):
    """A seq-cls LoRA with a trained-looking random head (PEFT modules_to_save: classifier)."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_base(str(base_dir), task="seq-cls", labels=labels, seed=seed)
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(base.model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            if "classifier" in name and "modules_to_save" in name:
                param.normal_(0, 1.0)
    model.save_pretrained(out)
    return out


def register(reg, folder: Path, name: str, base_dir: Path, *, task: str = "causal-lm", labels=None):
    """Add `folder` to the registry as made on `base_dir` (its real 4-bit fingerprint)."""
    fingerprint = fingerprint_base(resolve_base(str(base_dir)), "nf4")
    return reg.add(
        folder,
        name=name,
        task=task,
        base_model=str(base_dir),
        base_fingerprint=fingerprint.to_dict(),
        extra={"labels": list(labels)} if labels else {},
    )


def reference_greedy(
    base_dir: Path,
    folder: Path | None,
    prompt_ids: list[int],
    n: int,
    *,
    logits: list | None = None,
) -> list[int]:
    """What one adapter produces alone: PeftModel.from_pretrained + full forward passes, greedy.

    With `logits` (a list), each step's last-position logits are appended to it.
    """
    import torch

    model = _reference_model(str(base_dir), str(folder) if folder else None)
    ids = list(prompt_ids)
    eos = model.config.eos_token_id
    out = []
    with torch.inference_mode():
        for _ in range(n):
            step = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
            if logits is not None:
                logits.append(step)
            token = int(torch.argmax(step))
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


_REFERENCES: dict = {}


def _reference_model(base_dir: str, folder: str | None):
    """One single-adapter PEFT model per (base, adapter folder), kept for the session, on the
    fp32 dequantize path (`fp32_4bit_reference`), as `--numerics fp32` serves."""
    from peft import PeftModel

    key = (base_dir, folder)
    if key not in _REFERENCES:
        model = load_base(base_dir, task="causal-lm", dtype="float32").model
        if folder is not None:
            model = PeftModel.from_pretrained(model, folder)
        _REFERENCES[key] = fp32_4bit_reference(model.eval())
    return _REFERENCES[key]


def reference_classify(base_dir: Path, folder: Path, labels: list[str], texts: list[str]):
    import torch
    from peft import PeftModel

    base = load_base(str(base_dir), task="seq-cls", labels=labels, dtype="float32")
    model = fp32_4bit_reference(PeftModel.from_pretrained(base.model, str(folder)).eval())
    enc = base.tokenizer(texts, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        probs = torch.softmax(model(**enc).logits.float(), dim=-1)
    return [labels[int(i)] for i in probs.argmax(-1)], probs.cpu()


def fp32_4bit_reference(model):
    """`model` (bitsandbytes 4-bit, fresh from loading) on the dequantize-then-matmul path that
    training and merging use. On CPUs with AVX512-BF16, bitsandbytes' 4-bit inference kernel
    computes in bfloat16 (~1e-3 on the tiny bases' logits). Returns the model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
