"""`adaptory bench swap`: a warm adapter swap against reloading a merged model and a cold load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    bench_base,
    interleave,
    load_bench_base,
    summary,
    target,
    timed,
)
from adaptory.adapters.bench.workload import (
    _runtime_or_none,
    adapter_kind,
    lora_shapes,
    make_adapters,
    peft_with_adapters,
    read_adapter,
    register_adapters,
)

# --- swap ----------------------------------------------------------------------------------


def bench_swap(settings: BenchSettings, *, batch: int = 8) -> dict:
    """Switching to a resident adapter, loading a cold one from the registry, and reloading a
    base with the adapter merged (the one-model-per-task alternative)."""
    import torch

    from adaptory.adapters.serving.lora_bank import LoraBank
    from adaptory.registry import Registry
    from adaptory.registry.errors import ConfigError

    if settings.in_place:
        raise ConfigError(
            f"bench swap reloads a merged model from a folder; the {settings.size} base is "
            "built in place",
            hint="use --size tiny|small|base (or --base DIR)",
        )
    device = settings.device
    base_dir = bench_base(settings)
    loaded = load_bench_base(base_dir, settings)
    shapes = lora_shapes(loaded.model, settings.targets)
    folders = make_adapters(
        base_dir, shapes, 4, settings.workdir / "adapters" / base_dir.name / adapter_kind(settings),
        r=settings.rank, targets=settings.targets,
    )  # fmt: skip
    registry = Registry(settings.workdir / "home")
    entries = register_adapters(registry, base_dir, folders)
    merged_dir = merged_model_dir(settings, base_dir, folders[0])

    bank = LoraBank(loaded.model)
    for folder in folders[:-1]:
        bank.add(folder.name, *read_adapter(folder))
    peft_model = peft_with_adapters(load_bench_base(base_dir, settings).model, folders[:-1])
    inner = 20 if settings.quick else 200  # warm swaps are microseconds: time a loop of them
    turn = {"i": 0}  # the warm loops take turns over the resident adapters
    variants = _bank_and_peft_variants(
        bank,
        peft_model,
        registry,
        folders,
        entries[-1],
        turn,
        inner=inner,
        batch=batch,
        device=device,
    )
    variants["merged_model_reload"] = _merged_reload(merged_dir, device)
    runtime = _runtime_or_none(base_dir, registry, settings, max_adapters=8)
    if runtime is not None:
        variants.update(_runtime_variants(runtime, entries, turn, inner=inner, device=device))
    with torch.inference_mode():
        times = interleave(variants, settings.repeats, log=settings.say)
    results = {name: summary(t) for name, t in times.items()}
    med = {name: r["median_s"] for name, r in results.items()}
    reload = med["merged_model_reload"]
    ratios = {
        f"merged_reload/{name}": reload / med[name] for name in med if name != "merged_model_reload"
    }
    bank.close()
    return {
        "bench": "swap",
        "settings": _settings_dict(settings, base_dir, batch=batch, adapters=len(folders)),
        "results": results,
        "ratios": ratios,
        "targets": {
            "warm swap >= 100x faster than merged reload": target(
                ratios["merged_reload/warm_bank_rows"], ">=", 100
            ),
            "cold load from registry >= 5x faster than merged reload": target(
                ratios["merged_reload/cold_registry_to_bank"], ">=", 5
            ),
        },
        "notes": [
            "warm: per switch, timed over a loop of "
            f"{inner}; cold: registry verify (re-hash) + safetensors read + install; merged: "
            "from_pretrained of a merged model folder, quantized to NF4 on load",
        ],
    }


def _bank_and_peft_variants(
    bank, peft_model, registry, folders, cold_entry, turn, *, inner: int, batch: int, device: str
) -> dict[str, Callable[[], float]]:
    """Warm switches between the resident adapters (all but the last folder) and a cold load
    of the last one from the registry, into the LoraBank and into PEFT."""
    names = [f.name for f in folders]
    cold = folders[-1]

    def next_name() -> str:
        turn["i"] += 1
        return names[turn["i"] % (len(names) - 1)]

    def warm_bank() -> float:
        def run():
            for _ in range(inner):
                with bank.rows([next_name()] * batch):
                    pass

        return timed(run, device) / inner

    def warm_peft() -> float:
        def run():
            for _ in range(inner):
                peft_model.set_adapter(next_name())

        return timed(run, device) / inner

    def cold_bank() -> float:
        def run():
            folder = registry.files(cold_entry, verify=True)
            bank.add(cold.name, *read_adapter(folder))

        seconds = timed(run, device)
        bank.remove(cold.name)
        return seconds

    def cold_peft() -> float:
        def run():
            peft_model.load_adapter(str(registry.files(cold_entry, verify=True)), cold.name)

        seconds = timed(run, device)
        peft_model.delete_adapter(cold.name)
        return seconds

    return {
        "warm_bank_rows": warm_bank,
        "warm_peft_set_adapter": warm_peft,
        "cold_registry_to_bank": cold_bank,
        "cold_registry_to_peft": cold_peft,
    }


def _merged_reload(merged_dir: Path, device: str) -> Callable[[], float]:
    """Loading the merged model folder, quantized to NF4 on load (the model then dropped)."""
    import gc

    from transformers import AutoModelForCausalLM

    from adaptory.adapters.bases.loading import CAUSAL_SKIP_MODULES, quantization_config

    qconfig = quantization_config("nf4", device, CAUSAL_SKIP_MODULES)

    def merged_reload() -> float:
        holder = {}

        def run():
            holder["m"] = AutoModelForCausalLM.from_pretrained(
                str(merged_dir),
                quantization_config=qconfig,
                device_map={"": 0 if device == "cuda" else device},
            )

        seconds = timed(run, device)
        del holder["m"]
        gc.collect()
        return seconds

    return merged_reload


def _runtime_variants(runtime, entries, turn, *, inner: int, device: str):
    """Runtime.load of a resident adapter (a cache hit) and of a cold one from the registry."""
    refs = [e.ref for e in entries]
    for ref in refs[:-1]:
        runtime.load(ref)

    def warm_runtime() -> float:
        def run():
            for _ in range(inner):
                runtime.load(refs[turn["i"] % (len(refs) - 1)])
                turn["i"] += 1

        return timed(run, device) / inner

    def cold_runtime() -> float:
        seconds = timed(lambda: runtime.load(refs[-1]), device)
        runtime.unload(refs[-1])
        return seconds

    return {"warm_runtime_load_hit": warm_runtime, "cold_registry_to_runtime": cold_runtime}


def merged_model_dir(settings: BenchSettings, base_dir: Path, adapter: Path) -> Path:
    """The base with `adapter` merged in, saved once (unquantized, as a merge step writes it)."""
    from peft import PeftModel

    from adaptory.adapters.bases.loading import load_base

    out = settings.workdir / "merged" / f"{base_dir.name}-{adapter.name}"
    if not (out / "config.json").is_file():
        full = load_base(str(base_dir), task="causal-lm", quant="none", device="cpu")
        merged = PeftModel.from_pretrained(full.model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out))
        full.tokenizer.save_pretrained(str(out))
    return out
