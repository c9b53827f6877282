"""`adaptory bench scoring`: scoring prompts (echo + max_tokens 0, what lm-eval's loglikelihood
tasks send) against one prefill of the same mixed-adapter batch, side by side."""

from __future__ import annotations

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    bench_loaded,
    interleave,
    summary,
    target,
    timed,
)
from adaptory.adapters.bench.workload import (
    bench_adapters,
    prompts,
    register_adapters,
    runtime_for,
    spread,
)


def bench_scoring(settings: BenchSettings, *, batch: int | None = None, length: int = 64) -> dict:
    """The same `batch` prompts over K LoRA adapters and the bare base: a prefill that samples
    one token (the cheapest generation) against scoring every prompt token with its top-1."""
    import torch

    from adaptory.adapters.serving.decode import BASE, GenerationRequest
    from adaptory.registry import Registry

    batch = batch or (8 if settings.quick else 32)
    loaded = bench_loaded(settings)
    folders = bench_adapters(loaded, settings, 4)
    registry = Registry(settings.workdir / "home")
    entries = register_adapters(registry, loaded.source.path, folders)
    rt = runtime_for(loaded, registry, settings, max_adapters=len(entries))
    names = [e.ref for e in entries] + [BASE]
    adapters = [None if a == BASE else a for a in spread(names, batch, len(names))]
    ids, mask = prompts(rt.tokenizer, batch, length, settings.device)
    rows = [ids[i][mask[i].bool()].tolist() for i in range(batch)]
    decode = rt.new_batch(slots=batch, length=length + 8)

    def run(**fields) -> float:
        requests = [
            (GenerationRequest(prompt_ids=r, adapter=a, **fields), None)
            for r, a in zip(rows, adapters, strict=True)
        ]

        def once() -> None:
            done = decode.add_many(requests)
            decode.drop(list(decode.rows))
            assert all(row.error is None for row in done), [row.error for row in done]

        return timed(once, settings.device)

    variants = {
        "prefill_one_token": lambda: run(max_new_tokens=1),
        "score_prompts": lambda: run(max_new_tokens=0, prompt_logprobs=1),
        "score_prompts_top5": lambda: run(max_new_tokens=0, prompt_logprobs=5),
    }
    with torch.inference_mode():
        for fn in variants.values():  # warm up both paths (allocations, the cache's size)
            fn()
        times = interleave(variants, settings.repeats, log=settings.say)
    results = {name: summary(t) for name, t in times.items()}
    med = {name: r["median_s"] for name, r in results.items()}
    ratios = {
        "score/prefill": med["score_prompts"] / med["prefill_one_token"],
        "score_top5/prefill": med["score_prompts_top5"] / med["prefill_one_token"],
    }
    return {
        "bench": "scoring",
        "settings": _settings_dict(
            settings, loaded.source.path, batch=batch, length=length, adapters=len(entries)
        ),
        "results": results,
        "ratios": ratios,
        "targets": {
            "scoring a mixed batch <= 1.2x one prefill": target(ratios["score/prefill"], "<=", 1.2),
        },
        "notes": [
            f"{batch} prompts of {int(length * 0.6)}-{length} tokens spread over "
            f"{len(entries)} LoRA adapters and the bare base; scoring = echo + max_tokens 0 + "
            "logprobs 1 (lm-eval's loglikelihood request), computed from the prefill's own "
            "hidden states",
        ],
    }
