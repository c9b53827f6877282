"""`adaptory bench memory`: memory per resident adapter against merged models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adaptory.adapters.bench.harness import (
    RANK,
    TARGETS,
    BenchSettings,
    _runtime_or_none,
    _settings_dict,
    bench_base,
    cuda_allocated,
    load_bench_base,
    lora_config,
    lora_shapes,
    make_adapters,
    random_lora,
    register_adapters,
    rss_bytes,
    write_lora,
)
from adaptory.adapters.bench.swap import merged_model_dir

# --- memory --------------------------------------------------------------------------------


def bench_memory(settings: BenchSettings, *, counts: Sequence[int] | None = None) -> dict:
    """Resident memory with N adapters on one 4-bit base (the bank, and the Runtime when there
    is one) against N merged models, and bytes per adapter against r·(d_in+d_out)·dtype."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.bases.loading import CAUSAL_SKIP_MODULES, quantization_config
    from adaptory.adapters.serving.lora_bank import LoraBank

    counts = list(counts or ((1, 4) if settings.quick else (1, 10, 100)))
    device = settings.device
    base_dir = bench_base(settings)
    gc.collect()
    rss0, cuda0 = rss_bytes(), cuda_allocated(device)
    loaded = load_bench_base(base_dir, settings)
    gc.collect()
    base_rss = rss_bytes() - rss0
    base_cuda = cuda_allocated(device) - cuda0
    base_footprint = loaded.model.get_memory_footprint()
    shapes = lora_shapes(loaded.model)
    bank = LoraBank(loaded.model)
    config = lora_config(str(base_dir))
    elem = torch.empty((), dtype=bank.dtype or _bank_dtype(loaded.model, shapes)).element_size()
    theory = sum(RANK * (d_in + d_out) * elem for d_in, d_out in shapes.values())

    rows = []
    added = 0
    gc.collect()
    rss_start, cuda_start = rss_bytes(), cuda_allocated(device)
    for n in counts:
        while added < n:
            state = {k: v.to(device) for k, v in random_lora(shapes, seed=added).items()}
            bank.add(f"a{added}", state, config)
            del state
            added += 1
        gc.collect()
        nbytes = bank.nbytes()
        rows.append(
            {
                "adapters": n,
                "bank_nbytes": nbytes,
                "bank_bytes_per_adapter": nbytes / n,
                "rss_delta": rss_bytes() - rss_start,
                "cuda_allocated_delta": cuda_allocated(device) - cuda_start,
                "merged_models_bytes_extrapolated": None,  # filled below
            }
        )
    bank.close()
    del bank
    # one merged model's size, measured; N merged models are extrapolated as N x that
    folder = make_adapters(base_dir, shapes, 1, settings.workdir / "adapters" / base_dir.name)[0]
    merged_dir = merged_model_dir(settings, base_dir, folder)
    qconfig = quantization_config("nf4", device, CAUSAL_SKIP_MODULES)
    gc.collect()
    rss1, cuda1 = rss_bytes(), cuda_allocated(device)
    merged = AutoModelForCausalLM.from_pretrained(
        str(merged_dir),
        quantization_config=qconfig,
        device_map={"": 0 if device == "cuda" else device},
    )
    gc.collect()
    merged_rss = rss_bytes() - rss1
    merged_cuda = cuda_allocated(device) - cuda1
    merged_footprint = merged.get_memory_footprint()
    del merged
    gc.collect()
    one_model = merged_cuda if device.startswith("cuda") else merged_footprint
    for row in rows:
        row["merged_models_bytes_extrapolated"] = row["adapters"] * one_model
        row["one_base_plus_bank_bytes"] = (
            base_cuda if device.startswith("cuda") else base_footprint
        ) + row["bank_nbytes"]
        row["merged_over_shared"] = (
            row["merged_models_bytes_extrapolated"] / row["one_base_plus_bank_bytes"]
        )
    marginal = None
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        marginal = (last["bank_nbytes"] - first["bank_nbytes"]) / (
            last["adapters"] - first["adapters"]
        )

    runtime_rows = _runtime_memory(settings, base_dir, shapes, counts)
    results = {
        "base": {
            "footprint_bytes": base_footprint,
            "rss_delta": base_rss,
            "cuda_allocated_delta": base_cuda,
        },
        "merged_model": {
            "footprint_bytes": merged_footprint,
            "rss_delta": merged_rss,
            "cuda_allocated_delta": merged_cuda,
        },
        "adapter_theoretical_bytes": theory,
        "adapted_matrices": len(shapes),
        "bank": rows,
        "bank_marginal_bytes_per_adapter": marginal,
        "bank_marginal_over_theory": marginal / theory if marginal else None,
        "runtime": runtime_rows,
    }
    growth = [r["bank_nbytes"] for r in rows]
    linear = marginal is not None and all(
        abs(growth[i] - (growth[0] + marginal * (rows[i]["adapters"] - rows[0]["adapters"])))
        <= 0.01 * growth[i]
        for i in range(len(rows))
    )
    return {
        "bench": "memory",
        "settings": _settings_dict(
            settings, base_dir, counts=counts, rank=RANK, targets=list(TARGETS)
        ),
        "results": results,
        "targets": {
            "marginal bytes per adapter <= 1.2x theory": marginal is not None
            and marginal / theory <= 1.2,
            "linear growth": linear,
        },
        "notes": [
            f"theory: sum over {len(shapes)} adapted matrices of r*(d_in+d_out)*{elem} bytes, r={RANK}",
            "bank_nbytes includes slot 0, the zero adapter that plain-base rows gather "
            "(a fixed overhead of one adapter)",
            "merged models: N x one merged NF4 model's measured size, extrapolated, not loaded",
            "rss deltas are noisy on CPU (allocator caching); bank_nbytes is exact",
        ],
    }


def _bank_dtype(model, shapes):
    from adaptory.adapters.serving.lora_bank import _compute_dtype

    path = next(iter(shapes))
    return _compute_dtype(model.get_submodule(path))


def _runtime_memory(settings: BenchSettings, base_dir: Path, shapes, counts) -> dict | None:
    """Bytes the Runtime holds for N resident adapters (it has one tier: its device)."""
    import gc
    import tempfile as _tempfile

    from adaptory.registry import Registry

    try:
        from adaptory.adapters.serving.runtime import Runtime  # noqa: F401
    except ImportError:
        return None
    registry = Registry(settings.workdir / "home-memory")
    config = lora_config(str(base_dir))
    needed = max(counts)
    folders = []
    with _tempfile.TemporaryDirectory() as tmp:
        for i in range(needed):
            folders.append(
                write_lora(Path(tmp) / f"m{i}", random_lora(shapes, seed=1000 + i), config)
            )
        entries = register_adapters(registry, base_dir, folders)
    rt = _runtime_or_none(base_dir, registry, settings, max_adapters=needed)
    tier = "cuda" if settings.device.startswith("cuda") else "cpu"
    rows = []
    loaded = 0
    gc.collect()
    rss_start, cuda_start = rss_bytes(), cuda_allocated(settings.device)
    for n in counts:
        while loaded < n:
            rt.load(entries[loaded].ref)
            loaded += 1
        gc.collect()
        held = rt._bank.nbytes()  # the runtime keeps LoRA weights in its LoraBank only
        rows.append(
            {
                "adapters": n,
                "tiers": {tier: held},
                "bytes_per_adapter": held / n,
                "rss_delta": rss_bytes() - rss_start,
                "cuda_allocated_delta": cuda_allocated(settings.device) - cuda_start,
            }
        )
    return {
        "tiers": [tier],
        "rows": rows,
        "note": "the Runtime has one tier (its device); no CPU/GPU LRU tiers",
    }
