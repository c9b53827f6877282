"""Model sizes of the random-init Llama-style bases, in one table, and a builder that makes a
base of any size in place on its device: the skeleton on the meta device (nothing allocated),
then layer by layer random weights generated on the device and quantized there to 4 bits.

The small sizes (tiny, small, base) are also built on the CPU and saved by `adaptory base init`
(adapters/bases/tiny.py); `1b` (Llama-3.2-1B's shapes) and `8b` (Llama-3-8B's shapes) are only
ever built in place, for benchmarks: their weights never exist in full precision anywhere, so an
8B base costs its 4-bit size on the GPU and nothing on the CPU. Speed and memory do not depend
on the weights being trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaptory.registry.errors import ConfigError


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    tie_embeddings: bool = True
    saved: bool = True  # built on the CPU and saved by `adaptory base init`; else built in place

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Dimensions are multiples of 64 (the 4-bit quantization block size).
SIZES: dict[str, Size] = {
    "tiny": Size(
        hidden=64, intermediate=192, layers=2, heads=4, kv_heads=4, vocab=512, context=256
    ),
    "small": Size(
        hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=2048, context=512
    ),
    "base": Size(
        hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab=8192, context=1024
    ),
    # Llama-3.2-1B: 1,235,814,400 parameters (embeddings tied to the output head)
    "1b": Size(
        hidden=2048,
        intermediate=8192,
        layers=16,
        heads=32,
        kv_heads=8,
        vocab=128256,
        context=8192,
        tie_embeddings=True,
        saved=False,
    ),  # fmt: skip
    # Llama-3-8B: 8,030,261,248 parameters
    "8b": Size(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        vocab=128256,
        context=8192,
        tie_embeddings=False,
        saved=False,
    ),  # fmt: skip
}
SAVED_SIZES = tuple(name for name, size in SIZES.items() if size.saved)
# The in-place bases reuse the small local tokenizer (adapters/bases/tiny.py): its BPE stops
# where the bundled corpus runs out of merges (a few thousand tokens), far below 128,256.
TOKENIZER_VOCAB = 8192
INIT_STD = 0.02  # Llama's initializer_range
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def size_of(size: str | Size) -> Size:
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}'", hint=f"choose one of {', '.join(SIZES)}")
    return SIZES[size]


def llama_config(size: str | Size, *, vocab: int | None = None, tokenizer=None):
    """The transformers LlamaConfig of a size (`vocab` overrides the table's)."""
    from transformers import LlamaConfig

    dims = size_of(size)
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return LlamaConfig(
        vocab_size=vocab or dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=dims.context,
        tie_word_embeddings=dims.tie_embeddings,
        **special,
    )


def skeleton(config):
    """A LlamaForCausalLM on the meta device: every shape, no memory."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def count_params(model) -> int:
    """Parameters of a model (tied ones once), as unquantized weights count them."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


# --- building in place ---------------------------------------------------------------------


def random_base_tokenizer(folder: Path, vocab: int = TOKENIZER_VOCAB):
    """The small local BPE tokenizer, trained once on the bundled corpus and kept in `folder`."""
    from adaptory.adapters.bases.loading import load_tokenizer
    from adaptory.adapters.bases.tiny import DEFAULT_CORPUS, build_tokenizer, read_corpus

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_tokenizer(read_corpus([DEFAULT_CORPUS]), vocab).save_pretrained(str(folder))
    return load_tokenizer(folder, "causal-lm")


def build_random_base(
    size: str | Size,
    folder: Path,
    *,
    device: str,
    quant: str = "nf4",
    seed: int = 0,
    dtype: Any = None,
    tokenizer_vocab: int = TOKENIZER_VOCAB,
):
    """A random-init Llama base of `size` built directly on `device` (LoadedBase, causal-lm).

    The decoder's Linear layers are bitsandbytes 4-bit (quant nf4/fp4, double quantization, as
    `load_base` loads them) or plain; embeddings, norms and the output head are in `dtype`
    (default: the device's compute dtype, bf16 on a GPU). `folder` keeps the tokenizer, the
    config and adaptory_base.json (no weights): the base's identity for fingerprints.

    The model's vocabulary (128,256 at 1b/8b) is larger than the tokenizer's: the output-head
    rows of ids the tokenizer lacks, and of its special tokens, are zero, so greedy decoding
    only ever picks ordinary tokens (decoding an unknown id gives no text at all) and never
    stops early at eos: every path does the same work.
    """
    from adaptory.adapters.bases.loading import (
        QUANTS,
        BaseSource,
        LoadedBase,
        compute_dtype,
        quiet_transformers,
    )

    quiet_transformers()
    if quant not in QUANTS or quant == "int8":
        raise ConfigError(
            f"a base built in place is 4-bit or unquantized, not '{quant}'",
            hint="use quant nf4, fp4 or none",
        )
    dims = size_of(size)
    name = size if isinstance(size, str) else "custom"
    folder = Path(folder)
    tokenizer = random_base_tokenizer(folder, min(dims.vocab, tokenizer_vocab))
    vocab = max(dims.vocab, len(tokenizer))
    config = llama_config(dims, vocab=vocab, tokenizer=tokenizer)
    dtype = dtype or compute_dtype(device)
    config.dtype = dtype
    model, params = _random_model(
        config, tokenizer, device=device, dtype=dtype, quant=quant, seed=seed
    )
    config.save_pretrained(str(folder))
    info = {
        "arch": "llama",
        "size": name,
        "params": params,
        "vocab_size": vocab,
        "tokenizer_vocab": len(tokenizer),
        "seed": seed,
        "pretrained": False,
        "built_in_place": {"device": str(device), "dtype": str(dtype), "quant": quant},
        "description": f"llama {name}, random init built in place on {device} (no weights saved)",
    }
    (folder / "adaptory_base.json").write_text(json.dumps(info, indent=2) + "\n")
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        source=BaseSource(ref=str(folder), path=folder.resolve(), kind="path"),
        task="causal-lm",
        quant=quant,
        device=str(device),
        fingerprint=_fingerprint(
            folder, dims, vocab=vocab, seed=seed, device=device, dtype=dtype, quant=quant
        ),
        extra={"size": name, "params": params, "built_in_place": True},
    )


def _random_model(config, tokenizer, *, device: str, dtype, quant: str, seed: int):
    """(the model of `config` with random weights on `device`, its parameter count): the
    skeleton on the meta device, its decoder Linears swapped for 4-bit ones unless `quant` is
    none, then materialised module by module."""
    from adaptory.adapters.bases.loading import CAUSAL_SKIP_MODULES, quantization_config

    model = skeleton(config)
    params = count_params(model)
    if quant != "none":
        _four_bit_linears(model, quant, dtype)
    _materialise(model, tokenizer, device=device, dtype=dtype, seed=seed)
    if quant != "none":
        model.is_loaded_in_4bit = True  # what PEFT and prepare_model_for_kbit_training read
        model.config.quantization_config = quantization_config(
            quant, device, CAUSAL_SKIP_MODULES, dtype
        )
    model.eval()
    return model, params


def _fingerprint(folder: Path, dims: Size, *, vocab: int, seed: int, device: str, dtype, quant):
    """The base's identity: its weights are a function of the shapes, seed, device and dtype
    (they are never saved), its tokenizer that of the files in `folder`."""
    import torch

    from adaptory.adapters.bases.loading import Fingerprint, fingerprint_files, quant_label

    identity = {
        "random_init": asdict(dims),
        "vocab": vocab,
        "seed": seed,
        "device": torch.device(device).type,
        "dtype": str(dtype),
        "std": INIT_STD,
    }
    weights = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Fingerprint(
        weights=weights, tokenizer=fingerprint_files(folder)[1], quant=quant_label(quant)
    )


def _four_bit_linears(model, quant: str, dtype) -> None:
    """Swap every decoder Linear for a bitsandbytes Linear4bit, still on the meta device."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, module in list(parent.named_children()):
                if child not in LINEAR_NAMES:
                    continue
                four_bit = bnb.nn.Linear4bit(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type=quant,
                    quant_storage=torch.uint8,
                    device="meta",
                )
                setattr(parent, child, four_bit)


def _materialise(model, tokenizer, *, device: str, dtype, seed: int) -> None:
    """Random weights for the meta skeleton, one module at a time, generated on `device`."""
    import torch
    from torch import nn

    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int):
        return torch.empty(*shape, dtype=dtype, device=device).normal_(0, INIT_STD, generator=gen)

    def frozen(tensor) -> nn.Parameter:
        return nn.Parameter(tensor, requires_grad=False)

    def linear(module) -> None:
        weight = normal(module.out_features, module.in_features)
        if hasattr(module.weight, "quant_type"):  # bitsandbytes Params4bit: quantized on .to()
            import bitsandbytes as bnb

            module.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=module.weight.compress_statistics,
                quant_type=module.weight.quant_type,
                quant_storage=module.weight.quant_storage,
                module=module,
            ).to(device)
        else:
            module.weight = frozen(weight)
        if module.bias is not None:
            module.bias = frozen(torch.zeros(module.out_features, dtype=dtype, device=device))

    def ones(norm) -> None:
        norm.weight = frozen(torch.ones(norm.weight.shape, dtype=dtype, device=device))

    inner = model.model
    embed = normal(*inner.embed_tokens.weight.shape)
    inner.embed_tokens.weight = frozen(_silence(embed, tokenizer))
    for layer in inner.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, module in parent.named_children():
                if child in LINEAR_NAMES:
                    linear(module)
        ones(layer.input_layernorm)
        ones(layer.post_attention_layernorm)
    ones(inner.norm)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    else:
        model.lm_head.weight = frozen(_silence(normal(*model.lm_head.weight.shape), tokenizer))
    # rotary frequencies are computed at construction: rebuild the module on the device
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"the in-place builder left {left[0]} (and {len(left) - 1} more) on meta"
        )


def _silence(weight, tokenizer):
    """Zero the rows of ids greedy decoding must never pick: past the tokenizer, and special."""
    weight[len(tokenizer) :] = 0
    for token_id in tokenizer.all_special_ids:
        weight[token_id] = 0
    return weight
