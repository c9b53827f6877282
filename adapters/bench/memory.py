"""`adaptory bench memory`: memory per resident adapter against merged models, and decoding with
every resident adapter in one batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    base_name,
    bench_base,
    bench_loaded,
    cuda_allocated,
    interleave,
    rated,
    ratio,
    rss_bytes,
    sync,
    target,
)
from adaptory.adapters.bench.workload import (
    bench_adapters,
    lora_config,
    lora_dtype,
    lora_shapes,
    make_adapters,
    prompts,
    random_lora,
    raw_lora_bytes,
    register_adapters,
    runtime_for,
    runtime_timer,
)

# --- memory --------------------------------------------------------------------------------


def bench_memory(
    settings: BenchSettings,
    *,
    counts: Sequence[int] | None = None,
    throughput: bool = True,
    new_tokens: int | None = None,
    prompt_len: int = 16,
) -> dict:
    """Bytes of N resident adapters on one 4-bit base against their raw size and against N
    merged models: a LoraBank sized for each N, then the Runtime holding the largest N (loaded
    from the registry as a server loads them), which then decodes one batch with every row on
    its own adapter against the same batch on one adapter."""
    import gc

    import torch

    counts = sorted(set(counts or ((1, 4) if settings.quick else (1, 10, 100))))
    new_tokens = new_tokens or (4 if settings.quick else 32)
    device = settings.device
    gc.collect()
    rss0, cuda0 = rss_bytes(), cuda_allocated(device)
    loaded = bench_loaded(settings)
    gc.collect()
    base_rss = rss_bytes() - rss0
    base_cuda = cuda_allocated(device) - cuda0
    base_footprint = loaded.model.get_memory_footprint()
    shapes = lora_shapes(loaded.model, settings.targets)
    dtype = lora_dtype(loaded.model, shapes)
    elem = torch.empty((), dtype=dtype).element_size()
    raw = raw_lora_bytes(shapes, settings.rank, elem)

    rows = _bank_rows(settings, loaded, counts, shapes, dtype, raw)
    merged = _one_merged_model(settings, loaded, base_footprint, base_cuda)
    one_base = base_cuda if device.startswith("cuda") else base_footprint
    for row in rows:
        row["one_base_plus_bank_bytes"] = one_base + row["bank_nbytes"]
        row["merged_models_bytes_extrapolated"] = row["adapters"] * merged["bytes"]
        row["merged_over_shared"] = (
            row["merged_models_bytes_extrapolated"] / row["one_base_plus_bank_bytes"]
        )
    marginal, deviation = _linear_fit(rows)
    resident = _runtime_resident(settings, loaded, max(counts), raw, throughput, new_tokens,
                                 prompt_len)  # fmt: skip
    results = {
        "base": {
            "footprint_bytes": base_footprint,
            "rss_delta": base_rss,
            "cuda_allocated_delta": base_cuda,
        },
        "merged_model": merged,
        "adapter_raw_bytes": raw,
        "adapter_theoretical_bytes": raw,
        "adapted_matrices": len(shapes),
        "bank": rows,
        "bank_marginal_bytes_per_adapter": marginal,
        "bank_marginal_over_theory": marginal / raw if marginal else None,
        "runtime": resident,
    }
    return {
        "bench": "memory",
        "settings": _settings_dict(
            settings, loaded.source.path, counts=counts, base_name=base_name(loaded)
        ),
        "results": results,
        "targets": _memory_targets(marginal, deviation, raw, resident, max(counts)),
        "notes": _memory_notes(settings, len(shapes), elem, merged["note"]),
    }


def _bank_rows(settings: BenchSettings, loaded, counts, shapes, dtype, raw: int) -> list[dict]:
    """For each count N: a LoraBank with room for exactly N, filled with N random adapters
    generated on the device, and the bytes it holds (exact) and the process took (noisy)."""
    import gc

    from adaptory.adapters.serving.lora_bank import LoraBank

    device = settings.device
    config = lora_config(str(loaded.source.path), r=settings.rank, targets=settings.targets)
    rows = []
    for n in counts:
        bank = LoraBank(loaded.model, dtype=dtype)
        if hasattr(bank, "reserve"):
            bank.reserve(n)
        gc.collect()
        rss_start, cuda_start = rss_bytes(), cuda_allocated(device)
        for i in range(n):
            state = random_lora(shapes, r=settings.rank, seed=i, device=device, dtype=dtype)
            bank.add(f"a{i}", state, config)
            del state
        gc.collect()
        sync(device)
        nbytes = bank.nbytes()
        rows.append(
            {
                "adapters": n,
                "bank_nbytes": nbytes,
                "bank_bytes_per_adapter": nbytes / n,
                "bank_over_raw": nbytes / (n * raw),
                "rss_delta": rss_bytes() - rss_start,
                "cuda_allocated_delta": cuda_allocated(device) - cuda_start,
            }
        )
        bank.close()
        del bank
        gc.collect()
    return rows


def _linear_fit(rows: list[dict]) -> tuple[float | None, float | None]:
    """(bytes per added adapter between the first and last count, the largest distance of a
    count's bytes from that line, relative); None for both with one count."""
    if len(rows) < 2:
        return None, None
    first, last = rows[0], rows[-1]
    marginal = (last["bank_nbytes"] - first["bank_nbytes"]) / (last["adapters"] - first["adapters"])
    deviation = max(
        abs(
            r["bank_nbytes"] - first["bank_nbytes"] - marginal * (r["adapters"] - first["adapters"])
        )
        / r["bank_nbytes"]
        for r in rows
    )
    return marginal, deviation


def _memory_targets(marginal, deviation, raw: int, resident: dict | None, n: int) -> dict:
    return {
        "bank: marginal bytes per adapter <= 1.2x raw": target(
            marginal / raw if marginal else None, "<=", 1.2, missing="needs two counts"
        ),
        "bank: linear growth (largest deviation from the line <= 1%)": target(
            deviation, "<=", 0.01, missing="needs two counts"
        ),
        f"{n} resident adapters (runtime): memory <= 1.2x raw adapter bytes": target(
            resident["memory_over_raw"] if resident else None, "<=", 1.2,
            missing="runtime not measured",
        ),
        f"K={n} mixed >= 0.85x K=1 (runtime, batch {n})": target(
            (resident or {}).get("mixed_over_single"), ">=", 0.85,
            missing="throughput not measured (needs more than one adapter)",
        ),
    }  # fmt: skip


def _memory_notes(settings: BenchSettings, matrices: int, elem: int, merged_note: str):
    return [
        f"raw: r*(d_in+d_out)*{elem} bytes summed over {matrices} adapted matrices "
        f"(r={settings.rank}, {', '.join(settings.targets)}) = one adapter's own tensors "
        "in the bank's dtype",
        "bank rows: a LoraBank with room for exactly N (reserve) holding N adapters "
        "generated on the device; bank_nbytes includes slot 0, the zero adapter that "
        "plain-base rows gather (one adapter's size, a fixed overhead)",
        "runtime: N adapters loaded from the registry into Runtime(max_adapters=N); its "
        "memory is the larger of its bank's bytes and the device memory the loads took "
        "(CUDA); then one batch of N requests, row i on adapter i (K=N) against all rows "
        "on one adapter (K=1), Runtime.generate",
        merged_note,
        "rss deltas are noisy on CPU (allocator caching); bank_nbytes is exact",
    ]


def _one_merged_model(settings: BenchSettings, loaded, base_footprint: int, base_cuda: int):
    """One merged NF4 model's size: measured from a merged folder for saved bases; a base
    built in place has no folder to merge into, and a merged NF4 model is exactly its size."""
    import gc

    if settings.in_place:
        size = base_cuda if settings.device.startswith("cuda") else base_footprint
        return {
            "bytes": size,
            "footprint_bytes": base_footprint,
            "note": "merged models: N x the base's own 4-bit size (a merged model has the "
            "base's shapes), extrapolated, not loaded",
        }
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.bases.loading import CAUSAL_SKIP_MODULES, quantization_config
    from adaptory.adapters.bench.swap import merged_model_dir

    base_dir = bench_base(settings)
    shapes = lora_shapes(loaded.model, settings.targets)
    folder = make_adapters(
        base_dir, shapes, 1, settings.workdir / "adapters" / f"{base_dir.name}-merge",
        r=settings.rank, targets=settings.targets,
    )[0]  # fmt: skip
    merged_dir = merged_model_dir(settings, base_dir, folder)
    device = settings.device
    gc.collect()
    rss1, cuda1 = rss_bytes(), cuda_allocated(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir),
        quantization_config=quantization_config("nf4", device, CAUSAL_SKIP_MODULES),
        device_map={"": 0 if device == "cuda" else device},
    )
    gc.collect()
    footprint = model.get_memory_footprint()
    rss_delta, cuda_delta = rss_bytes() - rss1, cuda_allocated(device) - cuda1
    del model
    gc.collect()
    return {
        "bytes": cuda_delta if device.startswith("cuda") else footprint,
        "footprint_bytes": footprint,
        "rss_delta": rss_delta,
        "cuda_allocated_delta": cuda_delta,
        "note": "merged models: N x one merged NF4 model's measured size, extrapolated, not loaded",
    }


def _runtime_resident(settings, loaded, n, raw, throughput, new_tokens, prompt_len):
    """The Runtime holding n adapters from the registry: its bytes, then K=n against K=1."""
    import gc

    from adaptory.registry import Registry

    try:
        from adaptory.adapters.serving.runtime import GenerationRequest  # noqa: F401 (it exists)
    except ImportError:
        return None
    device = settings.device
    start = time.perf_counter()
    folders = bench_adapters(loaded, settings, n)  # those `bench serve` made are reused
    registry = Registry(settings.workdir / "home-memory")
    entries = register_adapters(registry, loaded, folders)
    settings.say(f"{n} adapters written and registered in {time.perf_counter() - start:.1f}s")
    gc.collect()
    rss_start, cuda_start = rss_bytes(), cuda_allocated(device)
    rt = runtime_for(loaded, registry, settings, max_adapters=n)
    start = time.perf_counter()
    for entry in entries:
        rt.load(entry.ref)
    sync(device)
    load_s = time.perf_counter() - start
    gc.collect()
    held = rt._bank.nbytes()  # the runtime keeps LoRA weights in its LoraBank only
    cuda_delta = cuda_allocated(device) - cuda_start
    memory = max(held, cuda_delta) if device.startswith("cuda") else held
    settings.say(f"{n} adapters loaded into the runtime in {load_s:.1f}s")
    row = {
        "adapters": n,
        "bank_nbytes": held,
        "bytes_per_adapter": held / n,
        "rss_delta": rss_bytes() - rss_start,
        "cuda_allocated_delta": cuda_delta,
        "memory_bytes": memory,
        "raw_bytes": n * raw,
        "memory_over_raw": memory / (n * raw),
        "load_s": load_s,
        "resident": len(rt.resident()),
    }
    if not throughput or n < 2:
        return row
    refs = [e.ref for e in entries]
    ids, mask = prompts(loaded.tokenizer, n, prompt_len, "cpu", seed=settings.seed)
    prompt_ids = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]

    def run(adapters):
        return runtime_timer(rt, prompt_ids, adapters, new_tokens, device)

    variants = {f"runtime/K=1/B={n}": run([refs[0]] * n), f"runtime/K={n}/B={n}": run(refs)}
    times = interleave(variants, settings.repeats, log=settings.say)
    results = {name: rated(samples, n * new_tokens) for name, samples in times.items()}
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    row["throughput"] = results
    row["mixed_over_single"] = ratio(tps, f"runtime/K={n}/B={n}", f"runtime/K=1/B={n}")
    return row
