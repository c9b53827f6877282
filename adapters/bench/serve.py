"""`adaptory bench serve`: mixed-adapter decode throughput of Runtime.generate against
transformers' own fastest single-model path and PEFT's mixed batch, and its plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    base_name,
    bench_adapters,
    bench_loaded,
    greedy_decode,
    hf_compiled,
    hf_generate,
    interleave,
    peft_with_adapters,
    prompts,
    ratio,
    read_adapter,
    register_adapters,
    runtime_for,
    spread,
    summary,
    target,
    timed,
)

HF_VARIANTS = ("hf_generate", "hf_static_compile")

# --- serve ---------------------------------------------------------------------------------


def bench_serve(
    settings: BenchSettings,
    *,
    batch: int | None = None,
    new_tokens: int | None = None,
    prompt_len: int = 24,
    ks: Sequence[int] | None = None,
    runtime: bool = True,
    single: bool = True,
    diagnostics: bool | None = None,
    hf_compile: bool | None = None,
    hf_compile_config=None,
) -> dict:
    """Generated tokens/s for one batch of `batch` requests (and one request alone):

    * Runtime.generate with every row on one adapter (K=1) or spread over K adapters;
    * transformers' `generate` on the same base with no adapter: its default (dynamic cache,
      eager) and a static cache with transformers' compiled decode step (on CUDA by default);
    * PEFT's mixed batch (`adapter_names=`) over the same K adapters;
    * diagnostics (default for the small saved sizes): the model-level decode loop on the plain
      base, through a LoraBank, and PEFT with one adapter or swapping per group.
    """
    import torch

    from adaptory.registry import Registry

    quick, device, repeats = settings.quick, settings.device, settings.repeats
    batch = batch or (8 if quick else 32)
    new_tokens = new_tokens or (4 if quick else 32)
    default_ks = (8,) if quick else (8, 32) if settings.in_place else (2, 8, 32)
    ks = sorted({k for k in (ks or default_ks) if 1 < k <= batch})
    diagnostics = (not settings.in_place) if diagnostics is None else diagnostics
    hf_compile = str(device).startswith("cuda") if hf_compile is None else hf_compile
    if batch == 1:
        single = False
    if hf_compile and hf_compile_config is None and not str(device).startswith("cuda"):
        from transformers import CompileConfig

        hf_compile_config = CompileConfig()
        hf_compile_config._compile_all_devices = True  # transformers compiles on accelerators only

    loaded = bench_loaded(settings)  # transformers, the bank and the runtime share this model
    model, tokenizer = loaded.model, loaded.tokenizer
    folders = bench_adapters(loaded, settings, max([*ks, 1]))
    names = [f.name for f in folders]
    # PEFT wraps the modules it adapts in place: it gets its own copy of the base
    peft_model = peft_with_adapters(bench_loaded(settings).model, folders)
    input_ids, mask = prompts(tokenizer, batch, prompt_len, device, seed=settings.seed)
    alone = input_ids[:1, mask[0].bool()], mask[:1, mask[0].bool()]
    shapes = {batch: (input_ids, mask), 1: alone}
    variants: dict[str, Callable[[], float]] = {}
    rows_of: dict[str, int] = {}

    def add(name: str, rows: int, fn: Callable[[], float]) -> None:
        variants[name], rows_of[name] = fn, rows

    rt, entries = None, []
    if runtime:
        registry = Registry(settings.workdir / "home")
        entries = register_adapters(registry, loaded, folders)
        rt = runtime_for(loaded, registry, settings, max_adapters=len(folders) + 1)
        refs = [e.ref for e in entries]
        ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]

        def runtime_run(adapters: list[str]):
            from adaptory.adapters.serving.runtime import GenerationRequest

            requests = [
                GenerationRequest(prompt_ids=ids[i], adapter=a, max_new_tokens=new_tokens)
                for i, a in enumerate(adapters)
            ]
            expected = len(requests) * new_tokens
            count = {"tokens": expected}

            def run():
                results = rt.generate(requests)
                count["tokens"] = sum(r.completion_tokens for r in results)

            # rows that stop early at eos did less work: scale to the same token count
            return lambda: timed(run, device) * expected / max(1, count["tokens"])

        add(f"runtime/K=1/B={batch}", batch, runtime_run([refs[0]] * batch))
        for k in ks:
            add(f"runtime/K={k}/B={batch}", batch, runtime_run(spread(refs, batch, k)))
        if single:
            add("runtime/K=1/B=1", 1, runtime_run([refs[0]]))

    for k in ks:
        rows = spread(names, batch, k)
        add(
            f"peft_mixed/K={k}/B={batch}",
            batch,
            lambda rows=rows: timed(
                lambda: greedy_decode(peft_model, input_ids, mask, new_tokens, adapter_names=rows),
                device,
            ),
        )

    def hf_run(rows: int, **options):
        ids_, mask_ = shapes[rows]
        expected = ids_.shape[0] * new_tokens

        def run() -> float:
            holder = {}
            seconds = timed(
                lambda: holder.setdefault(
                    "n", hf_generate(model, ids_, mask_, new_tokens, **options).numel()
                ),
                device,
            )
            return seconds * expected / max(1, holder["n"])

        return run

    sizes = [batch, 1] if single else [batch]
    for rows in sizes:
        add(f"hf_generate/B={rows}", rows, hf_run(rows))

    bank = None
    if diagnostics:
        from adaptory.adapters.serving.lora_bank import LoraBank

        bank = LoraBank(model)
        for folder in folders:
            bank.add(folder.name, *read_adapter(folder))

        def bank_run(rows):
            def run():
                with bank.rows(rows):
                    greedy_decode(model, input_ids, mask, new_tokens)

            return lambda: timed(run, device)

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
                for name, part in index.items():
                    peft_model.set_adapter(name)
                    greedy_decode(peft_model, input_ids[part], mask[part], new_tokens)

            return lambda: timed(run, device)

        add(f"base/B={batch}", batch, bank_run([None] * batch))
        add(f"bank/K=1/B={batch}", batch, bank_run([names[0]] * batch))
        add(f"peft_single/K=1/B={batch}", batch, peft_single(names[0]))
        for k in ks:
            rows = spread(names, batch, k)
            add(f"bank/K={k}/B={batch}", batch, bank_run(rows))
            add(f"peft_groups/K={k}/B={batch}", batch, peft_groups(rows))

    # last: the compile happens in its warm-up, the slowest and likeliest step to fail
    if hf_compile:
        for rows in sizes:
            add(
                f"hf_static_compile/B={rows}",
                rows,
                hf_run(rows, static=True, compile=True, compile_config=hf_compile_config),
            )

    errors: dict[str, str] = {}
    optional = [n for n in variants if n.startswith("hf_static_compile")]
    times = interleave(variants, repeats, log=settings.say, optional=optional, errors=errors)
    results = {}
    for name, samples in times.items():
        entry = summary(samples)
        entry["batch"] = rows_of[name]
        entry["tokens"] = rows_of[name] * new_tokens
        entry["tokens_per_s"] = entry["tokens"] / entry["median_s"]
        results[name] = entry
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    if bank is not None:
        bank.close()

    reference = {}
    for rows in sizes:
        measured = [f"{v}/B={rows}" for v in HF_VARIANTS if f"{v}/B={rows}" in tps]
        if measured:
            reference[rows] = max(measured, key=tps.__getitem__)
    ratios: dict[str, float] = {}

    def put(name: str, value: float | None) -> None:
        if value is not None:
            ratios[name] = value

    b = batch
    for k in ks:
        put(
            f"runtime K={k} / runtime K=1 (B={b})",
            ratio(tps, f"runtime/K={k}/B={b}", f"runtime/K=1/B={b}"),
        )
        put(f"runtime K={k} / peft_mixed K={k} (B={b})", ratio(tps, f"runtime/K={k}/B={b}", f"peft_mixed/K={k}/B={b}"))  # fmt: skip
    for rows, ref in reference.items():
        for k in [1, *ks] if rows == b else [1]:
            put(
                f"runtime K={k} / HF fastest (B={rows})", ratio(tps, f"runtime/K={k}/B={rows}", ref)
            )
    if f"hf_static_compile/B={b}" in tps:
        put(f"hf static+compile / hf eager (B={b})", ratio(tps, f"hf_static_compile/B={b}", f"hf_generate/B={b}"))  # fmt: skip
    if diagnostics:
        for k in ks:
            put(
                f"bank K={k} / bank K=1 (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"bank/K=1/B={b}")
            )
            put(f"bank K={k} / peft_mixed K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"peft_mixed/K={k}/B={b}"))  # fmt: skip
            put(f"bank K={k} / peft_groups K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"peft_groups/K={k}/B={b}"))  # fmt: skip
            put(f"bank K={k} / runtime K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"runtime/K={k}/B={b}"))  # fmt: skip
        put(f"bank K=1 / base (B={b})", ratio(tps, f"bank/K=1/B={b}", f"base/B={b}"))
        put(f"bank K=1 / peft_single K=1 (B={b})", ratio(tps, f"bank/K=1/B={b}", f"peft_single/K=1/B={b}"))  # fmt: skip

    def vs_reference(variant: str, rows: int) -> float | None:
        return ratio(tps, variant, reference[rows]) if rows in reference else None

    targets = {
        f"runtime K=8 >= 0.9x runtime K=1 (batch {b})": target(
            ratio(tps, f"runtime/K=8/B={b}", f"runtime/K=1/B={b}"), ">=", 0.9,
            missing="runtime K=8 not measured",
        ),
        f"runtime K=8 >= 0.8x HF fastest, no adapter (batch {b})": target(
            vs_reference(f"runtime/K=8/B={b}", b), ">=", 0.8,
            missing="runtime K=8 or HF generate not measured",
        ),
        "runtime K=1 >= 0.8x HF fastest, no adapter (batch 1)": target(
            vs_reference("runtime/K=1/B=1", 1), ">=", 0.8,
            missing="batch 1 not measured",
        ),
    }  # fmt: skip
    for k in (8, 32):
        targets[f"runtime K={k} >= 3x PEFT adapter_names K={k} (batch {b})"] = target(
            ratio(tps, f"runtime/K={k}/B={b}", f"peft_mixed/K={k}/B={b}"),
            ">=",
            3.0,
            missing=f"K={k} not measured",
        )
    notes = [
        "tokens/s = rows x new_tokens / wall time of the whole request batch (prefill "
        "included), greedy; the base and adapters are random: ids the tokenizer lacks are "
        "never generated (their output-head rows are zero on bases built in place)",
        "runtime: Runtime.generate on token ids (its own prefill, decode and text decoding); "
        "HF: transformers' generate on the same base with no adapter; the faster of its "
        "default (hf_generate) and static cache + compiled decode (hf_static_compile) is the "
        "reference; time is scaled to the same token count when rows stop early at eos",
        "peft_mixed: PEFT's adapter_names= on every forward of the model-level decode loop "
        "(bench.greedy_decode), on its own copy of the base",
    ]
    if not hf_compile:
        notes.append(
            "hf_static_compile not measured (transformers compiles generate on accelerators "
            "only; --hf-compile asks for it on the CPU too)"
        )
    elif any(f"hf_static_compile/B={rows}" in results for rows in sizes) and not hf_compiled(model):
        notes.append("hf_static_compile: transformers did not compile (static cache, eager)")
    return {
        "bench": "serve",
        "settings": _settings_dict(
            settings,
            loaded.source.path,
            batch=batch,
            single=single,
            new_tokens=new_tokens,
            prompt_len=prompt_len,
            ks=list(ks),
            diagnostics=diagnostics,
            hf_compile=hf_compile,
            hf_compiled=hf_compiled(model),
            hf_reference={str(rows): ref for rows, ref in reference.items()},
            base_name=base_name(loaded),
        ),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "errors": errors,
        "notes": notes,
    }


def plot_serve(result: dict, out: Path) -> Path:
    """tokens/s against K at the main batch: Runtime.generate, the bank, PEFT's mixed batch and
    PEFT swap-per-group, with transformers' fastest no-adapter path as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["results"]
    s = result["settings"]
    b = s["batch"]
    ks = [1, *s["ks"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    series = [
        ("runtime", "Adaptory Runtime.generate", f"runtime/K=1/B={b}"),
        ("bank", "Adaptory LoraBank (decode loop)", f"bank/K=1/B={b}"),
        ("peft_mixed", "PEFT adapter_names=", f"peft_single/K=1/B={b}"),
        ("peft_groups", "PEFT set_adapter per group", f"peft_single/K=1/B={b}"),
    ]
    for key, label, k1 in series:
        points = [(1, results[k1]["tokens_per_s"])] if k1 in results else []
        points += [
            (k, results[f"{key}/K={k}/B={b}"]["tokens_per_s"])
            for k in ks[1:]
            if f"{key}/K={k}/B={b}" in results
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    reference = (s.get("hf_reference") or {}).get(str(b))
    if reference in results:
        ax.axhline(
            results[reference]["tokens_per_s"],
            color="black",
            ls=":",
            lw=1,
            label=f"transformers {reference.split('/')[0]}, no adapter",
        )
    if f"base/B={b}" in results:
        ax.axhline(results[f"base/B={b}"]["tokens_per_s"], color="grey", ls="--", lw=1,
                   label="base only (decode loop)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("distinct adapters in the batch (K)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        f"{s['size']} base, NF4, {s['device']}: batch {b}, {s['new_tokens']} new tokens",
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
