"""Adapters held in memory by a runtime: reading one from the registry, checked as `import`
checks it and then against the base it will run on (fingerprint, method, shapes, layers and
heads of a prefix), into LoRA weights in the runtime's LoraBank, prefix key/values, and a
classification head. Every refusal is a domain error naming the entry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptory.adapters.bases.loading import check_fingerprint
from adaptory.registry.adapter_files import UNSERVABLE_LORA_OPTIONS
from adaptory.registry.errors import ConfigError, InvalidAdapter

# LoRA options whose math the mixed-batch layers do not implement; refused at load, not ignored.


@dataclass
class ResidentAdapter:
    """An adapter held in memory: its LoRA weights per module, or its KV prefix, plus a head."""

    key: str  # "name:version"
    entry: Any
    method: str
    in_bank: bool = False  # its LoRA weights are in the runtime's LoraBank
    prefix: list[tuple[Any, Any]] | None = None  # per layer (keys, values): (heads, P, head_dim)
    head: dict[str, Any] = field(default_factory=dict)  # seq-cls: classifier.* / pooler.* tensors
    labels: list[str] | None = None
    pins: int = 0

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prefix is None else int(self.prefix[0][0].shape[1])


def _strip_key(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.modules_to_save\.[^.]+", "", key)


def _head_width(head: dict) -> int:
    for name in ("classifier.weight", "classifier.out_proj.weight", "score.weight"):
        if name in head:
            return int(head[name].shape[0])
    raise ConfigError("unrecognised classification head")


def read_adapter(rt, entry) -> ResidentAdapter:
    """Read a stored adapter, checked as `import` checks it (entries stored before a check
    existed), then against this base; every refusal is a domain error naming the entry."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from adaptory.registry.adapter_files import WEIGHTS_FILE, validate_adapter_folder

    check_fingerprint(
        entry.base_fingerprint,
        rt.base.fingerprint,
        what=f"adapter {entry.ref}",
        force=rt.force,
    )
    folder = Path(rt.registry.files(entry, verify=True))
    try:
        config = validate_adapter_folder(folder).config
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{entry.ref}: {exc.message}", hint=exc.hint) from None
    method = entry.method or "lora"
    expected_type = {"lora": "LORA", "prefix": "PREFIX_TUNING"}.get(method)
    if config["peft_type"] != expected_type:
        raise ConfigError(
            f"{entry.ref} is catalogued as {method} but its files hold {config['peft_type']}"
        )
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(rt.base.device))
    except SafetensorError as exc:
        raise InvalidAdapter(f"{entry.ref}: {WEIGHTS_FILE} cannot be loaded ({exc})") from None
    adapter = ResidentAdapter(key=entry.ref, entry=entry, method=method)
    if adapter.method == "prefix":
        adapter.prefix = prefix_kv(rt, entry, config, tensors)
        return adapter
    for option in UNSERVABLE_LORA_OPTIONS:
        if config.get(option):
            raise ConfigError(f"{entry.ref}: LoRA option '{option}' is not servable here")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{entry.ref}: LoRA bias='{config['bias']}' is not servable here")
    lora: dict[str, Any] = {}
    for key, tensor in tensors.items():
        name = _strip_key(key)
        if re.search(r"\.lora_[AB](?:\.[^.]+)?\.weight$", name):
            lora[key] = tensor
        elif ".lora_" in name:
            raise ConfigError(f"{entry.ref}: tensor {key!r} is not a linear LoRA weight")
        elif rt.task == "seq-cls":
            name = name.removeprefix(f"{rt.model.base_model_prefix}.")
            adapter.head[name] = tensor.to(torch.float32)
        else:
            raise ConfigError(
                f"{entry.ref}: saves full module weights ({key!r}); only LoRA weights are servable"
            )
    if not lora:
        raise ConfigError(f"{entry.ref}: no LoRA weights found")
    if rt.task == "seq-cls":
        if not any(k.startswith(("classifier.", "score.")) for k in adapter.head):
            raise ConfigError(f"{entry.ref}: no classification head in the adapter's weights")
        labels = (entry.extra or {}).get("labels")
        width = _head_width(adapter.head)
        adapter.labels = list(labels) if labels else [f"LABEL_{i}" for i in range(width)]
        if len(adapter.labels) != width:
            raise ConfigError(f"{entry.ref}: {len(adapter.labels)} labels for a {width}-way head")
    try:  # checks every shape against the base before it changes anything
        rt._bank.add(adapter.key, lora, config)
    except ConfigError as exc:
        raise ConfigError(f"{entry.ref}: {exc.message}", hint=exc.hint) from None
    adapter.in_bank = True
    return adapter


def prefix_kv(rt, entry, config: dict, tensors: dict) -> list[tuple[Any, Any]]:
    """Per-layer (keys, values) from PEFT's saved prompt embeddings (the encoder's output).

    `config` and the tensor's shape were checked against each other by the registry's
    validation; what is checked here is the fit with this base: layers, key/value heads and
    head size (PEFT sizes a prefix by the base's key/value heads), and room in its context.
    """
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError(f"{entry.ref}: encoder-decoder prefix tuning is not servable")
    weight = tensors.get("prompt_embeddings")
    nvt, layers = config["num_virtual_tokens"], config["num_layers"]
    heads, dim = config["num_attention_heads"], config["token_dim"]
    if weight is None or tuple(weight.shape) != (nvt, layers * 2 * dim):
        raise InvalidAdapter(f"{entry.ref}: prompt_embeddings does not match its config")
    base = rt.model.config
    n_layers = base.num_hidden_layers
    kv_heads = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    if layers != n_layers:
        raise ConfigError(f"{entry.ref}: prefix made for {layers} layers, base has {n_layers}")
    if (heads, dim // heads) != (kv_heads, head_dim):
        raise ConfigError(
            f"{entry.ref}: prefix made for {heads} key/value heads of size {dim // heads}; "
            f"this base has {kv_heads} of size {head_dim}",
            hint="the adapter was made for another base",
        )
    if rt.max_positions and nvt >= rt.max_positions:
        raise ConfigError(
            f"{entry.ref}: a prefix of {nvt} virtual tokens leaves no room in this base's "
            f"context of {rt.max_positions} tokens"
        )
    dtype = getattr(rt.model, "dtype", weight.dtype)
    kv = weight.to(dtype).view(nvt, layers * 2, heads, dim // heads).permute(1, 2, 0, 3)
    return [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(layers)]
