"""What the benchmarks run: random LoRA adapters in PEFT's saved layout (made, registered, loaded
into PEFT), prompts, and the decode paths compared (the reference greedy decode loop,
transformers' own `generate`, adaptory's Runtime). How they are measured lives in harness.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaptory.adapters.bench.harness import (
    RANK,
    TARGETS,
    BenchSettings,
    _jsonable,
    base_name,
    timed,
)

# --- adapters ------------------------------------------------------------------------------


def lora_shapes(model, targets: Sequence[str] = TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of the base's Linear layers named in targets."""
    shapes = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            shapes[path] = (int(module.in_features), int(module.out_features))
    return shapes


def random_lora(
    shapes: dict[str, tuple[int, int]],
    *,
    r: int = RANK,
    seed: int = 0,
    scale: float = 0.5,
    device: str = "cpu",
    dtype: Any = None,
) -> dict:
    """A random LoRA state dict in PEFT's saved layout (B nonzero, so it changes outputs),
    generated on `device` (seeded per device) in `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for path, (d_in, d_out) in shapes.items():
        a = torch.randn(r, d_in, generator=gen, device=device) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen, device=device) * scale / r**0.5
        state[f"base_model.model.{path}.lora_A.weight"] = a.to(dtype)
        state[f"base_model.model.{path}.lora_B.weight"] = b.to(dtype)
    return state


def raw_lora_bytes(shapes: dict[str, tuple[int, int]], r: int, element_size: int) -> int:
    """An adapter's own bytes: r·(d_in + d_out) elements per adapted matrix."""
    return sum(r * (d_in + d_out) * element_size for d_in, d_out in shapes.values())


def lora_config(base_model: str, *, r: int = RANK, targets: Sequence[str] = TARGETS) -> dict:
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_model),
    )
    return json.loads(json.dumps(config.to_dict(), default=_jsonable))


def write_lora(folder: Path, state: dict, config: dict) -> Path:
    """Save an adapter exactly as PEFT's save_pretrained lays it out."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def adapter_kind(settings: BenchSettings) -> str:
    """The folder (and registry name) part that tells adapters of other ranks/targets apart."""
    return f"r{settings.rank}-{'all' if settings.mlp else 'qkvo'}"


def make_adapters(
    base_dir: Path,
    shapes,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    r: int = RANK,
    targets: Sequence[str] = TARGETS,
    device: str = "cpu",
    dtype: Any = None,
) -> list[Path]:
    """n random LoRA folders (rank r on `targets`) for the base, cached under `out` (which
    should name the base, rank and targets: a cached folder is reused as it is)."""
    config = lora_config(str(base_dir), r=r, targets=targets)
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            state = random_lora(shapes, r=r, seed=seed + i, device=device, dtype=dtype)
            write_lora(folder, state, config)
        folders.append(folder)
    return folders


def bench_adapters(loaded, settings: BenchSettings, n: int, *, seed: int = 0) -> list[Path]:
    """n random adapters (the settings' rank and targets) for a loaded base, generated on its
    device in its compute dtype, cached under the work folder."""
    shapes = lora_shapes(loaded.model, settings.targets)
    out = settings.workdir / "adapters" / base_name(loaded) / adapter_kind(settings)
    return make_adapters(
        loaded.source.path,
        shapes,
        n,
        out,
        seed=seed,
        r=settings.rank,
        targets=settings.targets,
        device=settings.device,
        dtype=lora_dtype(loaded.model, shapes),
    )


def lora_dtype(model, shapes):
    """The dtype the runtime's LoRA bank holds adapters in for this base (its compute dtype)."""
    import torch

    module = model.get_submodule(next(iter(shapes)))
    dtype = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit
    if dtype is None:
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else None
    return dtype or torch.float32


def register_adapters(registry, base, folders: Sequence[Path], quant: str = "nf4"):
    """Add the folders to `registry` as bench-BASE-KIND-a0, … (reusing entries made for this
    very base, by fingerprint). `base` is a base folder or a LoadedBase."""
    from adaptory.adapters.bases.loading import fingerprint_base, resolve_base
    from adaptory.registry.errors import AdapterNotFound

    if hasattr(base, "fingerprint"):
        fingerprint, base_dir = base.fingerprint.to_dict(), Path(base.source.path)
    else:
        base_dir = Path(base)
        fingerprint = fingerprint_base(resolve_base(str(base_dir)), quant).to_dict()
    entries = []
    for folder in folders:
        name = f"bench-{base_dir.name}-{folder.parent.name}-{folder.name}"[:64]
        try:
            entry = registry.resolve(name)
            if (entry.base_fingerprint or {}).get("digest") == fingerprint["digest"]:
                entries.append(entry)
                continue
        except AdapterNotFound:
            pass
        entries.append(
            registry.add(
                folder,
                name=name,
                method="lora",
                task="causal-lm",
                base_model=str(base_dir),
                base_fingerprint=fingerprint,
            )
        )
    return entries


def read_adapter(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return state, json.loads((folder / "adapter_config.json").read_text())


def peft_with_adapters(model, folders: Sequence[Path]):
    """The base wrapped by PEFT with every folder loaded under its folder name."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=folders[0].name)
    for folder in folders[1:]:
        peft_model.load_adapter(str(folder), adapter_name=folder.name)
    peft_model.eval()
    return peft_model


# --- the decode loop -----------------------------------------------------------------------


def prompts(tokenizer, batch: int, length: int, device: str, seed: int = 0):
    """`batch` left-padded prompts of 60-100% of `length` tokens from the base's vocabulary."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = max(1, int(length * 0.6))
    lengths = torch.randint(low, length + 1, (batch,), generator=gen)
    vocab = len(tokenizer)
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    special = max(tokenizer.all_special_ids or [0]) + 1
    for i, n in enumerate(lengths.tolist()):
        ids[i, length - n :] = torch.randint(special, vocab, (n,), generator=gen)
        mask[i, length - n :] = 1
    return ids.to(device), mask.to(device)


def greedy_decode(model, input_ids, attention_mask, new_tokens: int, **forward_kwargs):
    """Greedy tokens (B, new_tokens) with a KV cache; `forward_kwargs` go to every forward
    (PEFT's `adapter_names`). Runs all `new_tokens` steps (no eos stop: equal work per path)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    cache_kwarg = _cache_kwarg(model)
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens = []
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
            **forward_kwargs,
        )
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        ones = mask.new_ones((mask.shape[0], 1))
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, ones], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_kwarg: cache},
                **forward_kwargs,
            )
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1)


def _cache_kwarg(model) -> str:
    """transformers 5.x renames past_key_values to cache; PEFT passes either through."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def spread(names: Sequence[str], batch: int, k: int) -> list[str]:
    """Row i uses adapter i mod k (k adapters spread evenly over the batch)."""
    return [names[i % k] for i in range(batch)]


# --- transformers' own generate ------------------------------------------------------------


def hf_generate(model, input_ids, attention_mask, new_tokens: int, *, static: bool = False,
                compile: bool = False, compile_config: Any = None):  # fmt: skip
    """transformers' `generate`, greedy, no adapter: the dynamic KV cache (its default), or a
    static cache, with its decode step compiled by transformers itself when `compile`. Returns
    the generated ids (rows, steps run)."""
    import torch

    pad = model.generation_config.pad_token_id
    pad = model.config.pad_token_id if pad is None else pad
    options: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": model.config.eos_token_id if pad is None else pad,
    }
    if static:
        options["cache_implementation"] = "static"
    if compile and compile_config is not None:
        options["compile_config"] = compile_config
    if not compile:
        options["disable_compile"] = True
    with torch.inference_mode(), _compile_allowed(model, compile):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    return out[:, input_ids.shape[1] :]


def hf_compiled(model) -> bool:
    """Whether transformers compiled this model's decode step (in a `generate` call so far)."""
    return getattr(model, "_compiled_call", None) is not None


@contextmanager
def _compile_allowed(model, compile: bool):
    """transformers never auto-compiles a model it quantized with bitsandbytes (its quantizer
    says not compileable), though bitsandbytes' 4-bit layers are written to trace under
    torch.compile (custom ops with fake kernels): for the `compile` variant the quantizer is
    hidden for the call."""
    quantizer = getattr(model, "hf_quantizer", None)
    hide = compile and quantizer is not None and not getattr(quantizer, "is_compileable", False)
    if hide:
        model.hf_quantizer = None
    try:
        yield
    finally:
        if hide:
            model.hf_quantizer = quantizer


# --- adaptory's own Runtime ----------------------------------------------------------------


def runtime_for(loaded, registry, settings: BenchSettings, *, max_adapters: int, **options):
    """A Runtime serving the already loaded base (nothing loaded twice); `options` the Runtime
    does not take (an older or newer runtime) are left out."""
    import inspect

    from adaptory.adapters.serving.runtime import Runtime

    accepted = inspect.signature(Runtime).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    if "loaded_base" in accepted:
        kwargs["loaded_base"] = loaded
    return Runtime(
        str(loaded.source.path),
        registry=registry,
        task="causal-lm",
        quant=loaded.quant,
        device=settings.device,
        max_adapters=max_adapters,
        **kwargs,
    )


def _runtime_or_none(base_dir, registry, settings: BenchSettings, *, max_adapters: int):
    try:
        from adaptory.adapters.serving.runtime import Runtime
    except ImportError:
        return None
    return Runtime(
        str(base_dir),
        registry=registry,
        task="causal-lm",
        quant="nf4",
        device=settings.device,
        max_adapters=max_adapters,
    )


def runtime_timer(rt, prompt_ids, adapters, new_tokens: int, device: str) -> Callable[[], float]:
    """A variant for `interleave`: one Runtime.generate call with row i's prompt ids on
    adapters[i]. Rows that stop early at eos did less work: the time is scaled to the same
    token count."""
    from adaptory.adapters.serving.runtime import GenerationRequest

    requests = [
        GenerationRequest(prompt_ids=prompt_ids[i], adapter=a, max_new_tokens=new_tokens)
        for i, a in enumerate(adapters)
    ]
    expected = len(requests) * new_tokens
    count = {"tokens": expected}

    def run():
        count["tokens"] = sum(r.completion_tokens for r in rt.generate(requests))

    return lambda: timed(run, device) * expected / max(1, count["tokens"])
