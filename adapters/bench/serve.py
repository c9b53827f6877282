"""`adaptory bench serve`: mixed-adapter decode throughput (bank, PEFT, the runtime) and its plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from adaptory.adapters.bench.harness import (
    RANK,
    TARGETS,
    BenchSettings,
    _runtime_or_none,
    _settings_dict,
    bench_base,
    greedy_decode,
    interleave,
    load_bench_base,
    lora_shapes,
    make_adapters,
    peft_with_adapters,
    prompts,
    read_adapter,
    register_adapters,
    spread,
    summary,
    timed,
)

# --- serve ---------------------------------------------------------------------------------


def bench_serve(
    settings: BenchSettings,
    *,
    batch: int | None = None,
    new_tokens: int | None = None,
    prompt_len: int = 24,
    ks: Sequence[int] | None = None,
    runtime: bool = True,
) -> dict:
    """Generated tokens/s for one batch: all on the base, all on one adapter, or spread over K
    adapters, through the bank, PEFT's mixed batch, PEFT swap-per-group and the Runtime."""
    import torch

    from adaptory.adapters.serving.lora_bank import LoraBank
    from adaptory.registry import Registry

    quick = settings.quick
    batch = batch or (4 if quick else 32)
    new_tokens = new_tokens or (4 if quick else 32)
    ks = [k for k in (ks or ((2,) if quick else (2, 8, 32))) if k <= batch]
    device, repeats = settings.device, settings.repeats
    base_dir = bench_base(settings)

    bank_base = load_bench_base(base_dir, settings)
    shapes = lora_shapes(bank_base.model)
    n_adapters = max([*ks, 1])
    folders = make_adapters(
        base_dir, shapes, n_adapters, settings.workdir / "adapters" / base_dir.name
    )
    names = [f.name for f in folders]
    bank = LoraBank(bank_base.model)
    for folder in folders:
        bank.add(folder.name, *read_adapter(folder))
    peft_model = peft_with_adapters(load_bench_base(base_dir, settings).model, folders)
    input_ids, mask = prompts(bank_base.tokenizer, batch, prompt_len, device, seed=settings.seed)
    model = bank_base.model
    tokens = batch * new_tokens

    def bank_run(rows):
        def run():
            with bank.rows(rows):
                greedy_decode(model, input_ids, mask, new_tokens)

        return lambda: timed(run, device)

    def peft_mixed(rows):
        return lambda: timed(
            lambda: greedy_decode(peft_model, input_ids, mask, new_tokens, adapter_names=rows),
            device,
        )

    def peft_single(name):
        def run():
            peft_model.set_adapter(name)
            greedy_decode(peft_model, input_ids, mask, new_tokens)

        return lambda: timed(run, device)

    def peft_groups(rows):
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).append(i)
        index = {n: torch.tensor(r, device=device) for n, r in groups.items()}

        def run():
            for name, rows_of in index.items():
                peft_model.set_adapter(name)
                greedy_decode(peft_model, input_ids[rows_of], mask[rows_of], new_tokens)

        return lambda: timed(run, device)

    variants: dict[str, Callable[[], float]] = {
        "base": bank_run([None] * batch),
        "bank/K=1": bank_run([names[0]] * batch),
        "peft_single/K=1": peft_single(names[0]),
    }
    for k in ks:
        rows = spread(names, batch, k)
        variants[f"bank/K={k}"] = bank_run(rows)
        variants[f"peft_mixed/K={k}"] = peft_mixed(rows)
        variants[f"peft_groups/K={k}"] = peft_groups(rows)

    rt = None
    if runtime:
        registry = Registry(settings.workdir / "home")
        entries = register_adapters(registry, base_dir, folders)
        rt = _runtime_or_none(base_dir, registry, settings, max_adapters=n_adapters + 1)
    if rt is not None:
        from adaptory.adapters.serving.runtime import GenerationRequest

        refs = [e.ref for e in entries]
        ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]

        def runtime_run(rows):
            requests = [
                GenerationRequest(prompt_ids=ids[i], adapter=r, max_new_tokens=new_tokens)
                for i, r in enumerate(rows)
            ]
            count = {"tokens": tokens}

            def run():
                results = rt.generate(requests)
                count["tokens"] = sum(r.completion_tokens for r in results)

            return lambda: timed(run, device) * tokens / max(1, count["tokens"])

        variants["runtime/K=1"] = runtime_run([refs[0]] * batch)
        for k in ks:
            variants[f"runtime/K={k}"] = runtime_run(spread(refs, batch, k))

    times = interleave(variants, repeats)
    results = {}
    for name, samples in times.items():
        entry = summary(samples)
        entry["tokens_per_s"] = tokens / entry["median_s"]
        results[name] = entry
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {}
    for k in ks:
        ratios[f"bank K={k} / bank K=1"] = tps[f"bank/K={k}"] / tps["bank/K=1"]
        ratios[f"bank K={k} / peft_mixed K={k}"] = tps[f"bank/K={k}"] / tps[f"peft_mixed/K={k}"]
        ratios[f"bank K={k} / peft_groups K={k}"] = tps[f"bank/K={k}"] / tps[f"peft_groups/K={k}"]
        if rt is not None:
            ratios[f"runtime K={k} / runtime K=1"] = tps[f"runtime/K={k}"] / tps["runtime/K=1"]
            ratios[f"bank K={k} / runtime K={k}"] = tps[f"bank/K={k}"] / tps[f"runtime/K={k}"]
    ratios["bank K=1 / base"] = tps["bank/K=1"] / tps["base"]
    ratios["bank K=1 / peft_single K=1"] = tps["bank/K=1"] / tps["peft_single/K=1"]
    targets = {}
    if 8 in ks:
        targets["bank K=8 >= 0.9x bank K=1"] = ratios["bank K=8 / bank K=1"] >= 0.9
    for k in (8, 32):
        if k in ks:
            targets[f"bank K={k} >= 1.5x peft_mixed K={k}"] = (
                ratios[f"bank K={k} / peft_mixed K={k}"] >= 1.5
            )
    bank.close()
    return {
        "bench": "serve",
        "settings": _settings_dict(
            settings,
            base_dir,
            batch=batch,
            new_tokens=new_tokens,
            prompt_len=prompt_len,
            ks=list(ks),
            rank=RANK,
            targets=list(TARGETS),
        ),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            "tokens/s = batch x new_tokens / wall time of the whole request batch "
            "(prefill included), greedy, KV cache, no eos stop",
            "runtime: Runtime.generate (per-request prefill, text decoding each step); its "
            "time is scaled to the same token count when rows stop early at eos",
        ],
    }


def plot_serve(result: dict, out: Path) -> Path:
    """tokens/s against K for the batched bank, PEFT's mixed batch and PEFT swap-per-group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["results"]
    ks = [1, *result["settings"]["ks"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    series = [
        ("bank", "Adaptory LoraBank (batched)", "bank/K=1"),
        ("peft_mixed", "PEFT adapter_names=", "peft_single/K=1"),
        ("peft_groups", "PEFT set_adapter per group", "peft_single/K=1"),
        ("runtime", "Adaptory Runtime.generate", "runtime/K=1"),
    ]
    for key, label, k1 in series:
        points = [(1, results[k1]["tokens_per_s"])] if k1 in results else []
        points += [
            (k, results[f"{key}/K={k}"]["tokens_per_s"])
            for k in ks[1:]
            if f"{key}/K={k}" in results
        ]
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.axhline(results["base"]["tokens_per_s"], color="grey", ls="--", lw=1, label="base only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("distinct adapters in the batch (K)")
    ax.set_ylabel("generated tokens / s")
    s = result["settings"]
    ax.set_title(
        f"{s['size']} base, NF4, {s['device']}: batch {s['batch']}, {s['new_tokens']} new tokens",
        fontsize=10,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
