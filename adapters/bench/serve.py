"""`adaptory bench serve`: mixed-adapter decode throughput of Runtime.generate against
transformers' own fastest single-model path and PEFT's mixed batch, and its plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptory.adapters.bench.harness import (
    BenchSettings,
    _settings_dict,
    base_name,
    bench_loaded,
    interleave,
    rated,
    ratio,
    target,
    timed,
)
from adaptory.adapters.bench.workload import (
    bench_adapters,
    greedy_decode,
    hf_compiled,
    hf_generate,
    peft_with_adapters,
    prompts,
    read_adapter,
    register_adapters,
    runtime_for,
    runtime_timer,
    spread,
)

HF_VARIANTS = ("hf_generate", "hf_static_compile")

# --- serve ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The run's sizes once defaults are filled in."""

    batch: int
    new_tokens: int
    ks: list[int]
    single: bool
    diagnostics: bool
    hf_compile: bool
    hf_compile_config: Any

    @property
    def sizes(self) -> list[int]:
        """The batch sizes measured: the batch, and one request alone when `single`."""
        return [self.batch, 1] if self.single else [self.batch]


@dataclass
class _Variants:
    """The variants to time, in order, and how many rows each decodes."""

    run: dict[str, Callable[[], float]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, rows: int, fn: Callable[[], float]) -> None:
        self.run[name], self.rows[name] = fn, rows


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
    plan = _plan(
        settings, batch, new_tokens, ks, single, diagnostics, hf_compile, hf_compile_config
    )
    loaded = bench_loaded(settings)  # transformers, the bank and the runtime share this model
    folders = bench_adapters(loaded, settings, max([*plan.ks, 1]))
    # PEFT wraps the modules it adapts in place: it gets its own copy of the base
    peft_model = peft_with_adapters(bench_loaded(settings).model, folders)
    input_ids, mask = prompts(
        loaded.tokenizer, plan.batch, prompt_len, settings.device, seed=settings.seed
    )
    variants = _Variants()
    if runtime:
        _add_runtime(variants, plan, settings, loaded, folders, input_ids, mask)
    _add_peft_mixed(variants, plan, settings.device, peft_model, folders, input_ids, mask)
    hf_run = _hf_runner(plan, settings.device, loaded.model, input_ids, mask)
    for rows in plan.sizes:
        variants.add(f"hf_generate/B={rows}", rows, hf_run(rows))
    bank = None
    if plan.diagnostics:
        bank = _add_diagnostics(
            variants, plan, settings.device, loaded.model, peft_model, folders, input_ids, mask
        )
    # last: the compile happens in its warm-up, the slowest and likeliest step to fail
    if plan.hf_compile:
        for rows in plan.sizes:
            options = {"static": True, "compile": True, "compile_config": plan.hf_compile_config}
            variants.add(f"hf_static_compile/B={rows}", rows, hf_run(rows, **options))

    results, errors = _measure(variants, settings, plan.new_tokens)
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    if bank is not None:
        bank.close()
    reference = _hf_reference(tps, plan.sizes)
    return {
        "bench": "serve",
        "settings": _settings_dict(
            settings,
            loaded.source.path,
            batch=plan.batch,
            single=plan.single,
            new_tokens=plan.new_tokens,
            prompt_len=prompt_len,
            ks=list(plan.ks),
            diagnostics=plan.diagnostics,
            hf_compile=plan.hf_compile,
            hf_compiled=hf_compiled(loaded.model),
            hf_reference={str(rows): ref for rows, ref in reference.items()},
            base_name=base_name(loaded),
        ),
        "results": results,
        "ratios": _serve_ratios(tps, plan, reference),
        "targets": _serve_targets(tps, plan.batch, reference),
        "errors": errors,
        "notes": _serve_notes(plan, results, loaded.model),
    }


def _plan(
    settings: BenchSettings,
    batch,
    new_tokens,
    ks,
    single,
    diagnostics,
    hf_compile,
    hf_compile_config,
) -> _Plan:
    """The defaults: smaller in quick mode, fewer K for bases built in place, diagnostics for
    saved bases, transformers' compile on CUDA (forced on for the CPU when asked for)."""
    quick, device = settings.quick, settings.device
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
    return _Plan(batch, new_tokens, ks, single, diagnostics, hf_compile, hf_compile_config)


def _add_runtime(
    variants: _Variants, plan: _Plan, settings: BenchSettings, loaded, folders, input_ids, mask
) -> None:
    """Runtime.generate: the batch on one adapter, spread over each K, and one request alone."""
    from adaptory.registry import Registry

    registry = Registry(settings.workdir / "home")
    entries = register_adapters(registry, loaded, folders)
    rt = runtime_for(loaded, registry, settings, max_adapters=len(folders) + 1)
    refs = [e.ref for e in entries]
    ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]

    def runtime_run(adapters: list[str]) -> Callable[[], float]:
        return runtime_timer(rt, ids, adapters, plan.new_tokens, settings.device)

    b = plan.batch
    variants.add(f"runtime/K=1/B={b}", b, runtime_run([refs[0]] * b))
    for k in plan.ks:
        variants.add(f"runtime/K={k}/B={b}", b, runtime_run(spread(refs, b, k)))
    if plan.single:
        variants.add("runtime/K=1/B=1", 1, runtime_run([refs[0]]))


def _add_peft_mixed(
    variants: _Variants, plan: _Plan, device: str, peft_model, folders, input_ids, mask
) -> None:
    """PEFT's mixed batch (`adapter_names=`) over each K, on the reference decode loop."""
    names = [f.name for f in folders]
    for k in plan.ks:
        rows = spread(names, plan.batch, k)
        variants.add(
            f"peft_mixed/K={k}/B={plan.batch}",
            plan.batch,
            lambda rows=rows: timed(
                lambda: greedy_decode(
                    peft_model, input_ids, mask, plan.new_tokens, adapter_names=rows
                ),
                device,
            ),
        )


def _hf_runner(plan: _Plan, device: str, model, input_ids, mask):
    """hf_run(rows, **options): a variant timing transformers' `generate` of the batch (or of
    its first request alone), scaled to the same token count when rows stop early at eos."""
    first = mask[0].bool()
    shapes = {plan.batch: (input_ids, mask), 1: (input_ids[:1, first], mask[:1, first])}

    def hf_run(rows: int, **options) -> Callable[[], float]:
        ids_, mask_ = shapes[rows]
        expected = ids_.shape[0] * plan.new_tokens

        def run() -> float:
            holder = {}
            seconds = timed(
                lambda: holder.setdefault(
                    "n", hf_generate(model, ids_, mask_, plan.new_tokens, **options).numel()
                ),
                device,
            )
            return seconds * expected / max(1, holder["n"])

        return run

    return hf_run


def _add_diagnostics(
    variants: _Variants, plan: _Plan, device: str, model, peft_model, folders, input_ids, mask
):
    """The decode loop on the plain base and through a LoraBank (K=1 and each K), and PEFT with
    one adapter or swapping per group of rows; returns the bank (closed after timing)."""
    import torch

    from adaptory.adapters.serving.lora_bank import LoraBank

    names = [f.name for f in folders]
    new_tokens = plan.new_tokens
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

    batch = plan.batch
    variants.add(f"base/B={batch}", batch, bank_run([None] * batch))
    variants.add(f"bank/K=1/B={batch}", batch, bank_run([names[0]] * batch))
    variants.add(f"peft_single/K=1/B={batch}", batch, peft_single(names[0]))
    for k in plan.ks:
        rows = spread(names, batch, k)
        variants.add(f"bank/K={k}/B={batch}", batch, bank_run(rows))
        variants.add(f"peft_groups/K={k}/B={batch}", batch, peft_groups(rows))
    return bank


def _measure(variants: _Variants, settings: BenchSettings, new_tokens: int):
    """Time the variants interleaved; (results with tokens/s, errors of dropped compiles)."""
    errors: dict[str, str] = {}
    optional = [n for n in variants.run if n.startswith("hf_static_compile")]
    times = interleave(
        variants.run, settings.repeats, log=settings.say, optional=optional, errors=errors
    )
    results = {
        name: rated(samples, variants.rows[name] * new_tokens, batch=variants.rows[name])
        for name, samples in times.items()
    }
    return results, errors


def _hf_reference(tps: dict[str, float], sizes: list[int]) -> dict[int, str]:
    """{rows: the faster of transformers' generate variants measured at that batch size}."""
    reference = {}
    for rows in sizes:
        measured = [f"{v}/B={rows}" for v in HF_VARIANTS if f"{v}/B={rows}" in tps]
        if measured:
            reference[rows] = max(measured, key=tps.__getitem__)
    return reference


def _serve_ratios(tps: dict[str, float], plan: _Plan, reference: dict[int, str]) -> dict:
    """Ratios of tokens/s (of medians) between the variants measured."""
    ratios: dict[str, float] = {}

    def put(name: str, value: float | None) -> None:
        if value is not None:
            ratios[name] = value

    b, ks = plan.batch, plan.ks
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
    if plan.diagnostics:
        for k in ks:
            put(
                f"bank K={k} / bank K=1 (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"bank/K=1/B={b}")
            )
            put(f"bank K={k} / peft_mixed K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"peft_mixed/K={k}/B={b}"))  # fmt: skip
            put(f"bank K={k} / peft_groups K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"peft_groups/K={k}/B={b}"))  # fmt: skip
            put(f"bank K={k} / runtime K={k} (B={b})", ratio(tps, f"bank/K={k}/B={b}", f"runtime/K={k}/B={b}"))  # fmt: skip
        put(f"bank K=1 / base (B={b})", ratio(tps, f"bank/K=1/B={b}", f"base/B={b}"))
        put(f"bank K=1 / peft_single K=1 (B={b})", ratio(tps, f"bank/K=1/B={b}", f"peft_single/K=1/B={b}"))  # fmt: skip
    return ratios


def _serve_targets(tps: dict[str, float], b: int, reference: dict[int, str]) -> dict:
    """The serving targets at batch `b` (and batch 1), met or missed or not measured."""

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
    return targets


def _serve_notes(plan: _Plan, results: dict, model) -> list[str]:
    """What the figures mean, and why transformers' compiled variant is absent or eager."""
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
    compiled = any(f"hf_static_compile/B={rows}" in results for rows in plan.sizes)
    if not plan.hf_compile:
        notes.append(
            "hf_static_compile not measured (transformers compiles generate on accelerators "
            "only; --hf-compile asks for it on the CPU too)"
        )
    elif compiled and not hf_compiled(model):
        notes.append("hf_static_compile: transformers did not compile (static cache, eager)")
    return notes


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
