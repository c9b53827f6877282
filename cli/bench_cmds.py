"""`adaptory bench`: swap cost, serving throughput, memory and training speed, measured side by
side in one process run (medians over repeats, ratios of medians), printed and saved as JSON;
`bench quality` scores adapters trained with the defaults on held-out data; `bench summary`
gathers the targets of saved runs into one table."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from adaptory.adapters.bases.shapes import SIZES
from adaptory.cli.main import App, pass_app, styled


def _common(fn):
    """Options every benchmark takes."""

    @click.option(
        "--json",
        "json_out",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write results here.",
    )
    @click.option(
        "--device",
        type=click.Choice(["cpu", "cuda"]),
        default=None,
        help="Default: cuda when available, else cpu.",
    )
    @click.option(
        "--size",
        type=click.Choice(list(SIZES)),
        default="small",
        show_default=True,
        help="Random-init Llama-style base (speed and memory do not need training): "
        "tiny|small|base are built once and saved; 1b (Llama-3.2-1B shapes) and 8b "
        "(Llama-3-8B shapes) are built in place on the device, 4-bit from the start.",
    )
    @click.option(
        "--build",
        type=click.Choice(["auto", "folder", "in-place"]),
        default="auto",
        show_default=True,
        help="How the base is made: loaded from its saved folder, or built in place on the "
        "device (auto: in place for 1b and 8b only).",
    )
    @click.option(
        "--base",
        "base_dir",
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        help="Benchmark on this base folder instead of building --size.",
    )
    @click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
    @click.option("--quick", is_flag=True, help="Small shapes, at most 2 repeats (a smoke run).")
    @click.option("--rank", type=click.IntRange(1), default=16, show_default=True,
                  help="LoRA rank of the benchmark's adapters.")  # fmt: skip
    @click.option("--mlp", is_flag=True,
                  help="Adapters on gate/up/down_proj too (default: q/k/v/o_proj).")  # fmt: skip
    @click.option(
        "--threads",
        type=click.IntRange(1),
        help="torch CPU threads (default: torch's; 1 is steadiest on a shared machine).",
    )
    @click.option(
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where bases, adapters and a scratch registry are built and cached "
        "(default: a temporary folder, removed afterwards).",
    )
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _settings(app: App, device, size, base_dir, repeats, quick, workdir, threads, build, rank,
              mlp):  # fmt: skip
    from adaptory.adapters.bases.loading import default_device
    from adaptory.adapters.bench import BenchSettings

    return BenchSettings(
        workdir=workdir,
        size=size,
        device=device or default_device(),
        repeats=repeats,
        quick=quick,
        base_dir=base_dir,
        threads=threads,
        build=build,
        rank=rank,
        mlp=mlp,
        log=lambda line: app.err.print(line, highlight=False),
    )


def _run(app: App, name: str, options: dict, **kwargs) -> dict:
    """Run bench `name` in the given (or a temporary) work folder; print and save it."""
    import tempfile

    from adaptory.adapters.bench import run_bench, write_json

    json_out = options.pop("json_out")
    workdir = options.pop("workdir")
    with tempfile.TemporaryDirectory(prefix="adaptory-bench-") as tmp:
        settings = _settings(app, workdir=workdir or Path(tmp), **options)
        with app.err.status(f"running bench {name} on {settings.device} …"):
            result = run_bench(name, settings, **kwargs)
    render(app, result)
    if json_out:
        write_json(result, json_out)
        app.err.print(f"wrote {json_out}")
    return result


@click.group("bench")
def bench_group() -> None:
    """Measure swap cost, mixed-adapter serving, memory per adapter, training speed and the
    quality of adapters trained with the defaults."""


@bench_group.command("swap")
@_common
@pass_app
def swap_cmd(app: App, **options) -> None:
    """Warm swap, cold load from the registry, and reloading a merged model, side by side."""
    _run(app, "swap", options)


@bench_group.command("serve")
@_common
@click.option("--batch", type=click.IntRange(1), help="Requests per batch (default 32; quick 8).")
@click.option("--new-tokens", type=click.IntRange(1), help="Generated per request (default 32).")
@click.option(
    "-k",
    "--adapters",
    "ks",
    type=click.IntRange(1),
    multiple=True,
    help="Distinct adapters spread over the batch (repeatable; default 8 and 32, plus 2 on "
    "the saved sizes; quick 8).",
)
@click.option("--no-runtime", is_flag=True, help="Skip the Runtime.generate path.")
@click.option("--no-single", is_flag=True, help="Skip the batch-1 variants.")
@click.option(
    "--diagnostics/--no-diagnostics",
    default=None,
    help="Also the model-level decode loop: plain base, LoraBank, PEFT one adapter and swap "
    "per group (default: on for tiny|small|base, off for bases built in place).",
)
@click.option(
    "--hf-compile/--no-hf-compile",
    default=None,
    help="Measure transformers' generate with a static cache and its compiled decode step "
    "(default: on CUDA only).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save a PNG of tokens/s against K (needs matplotlib).",
)
@pass_app
def serve_cmd(app: App, batch, new_tokens, ks, no_runtime, no_single, diagnostics, hf_compile,
              plot, **options) -> None:  # fmt: skip
    """Generated tokens/s with the batch on one adapter or over K adapters: Runtime.generate
    against transformers' own generate (no adapter) and PEFT's adapter_names=."""
    result = _run(
        app,
        "serve",
        options,
        batch=batch,
        new_tokens=new_tokens,
        ks=list(ks) or None,
        runtime=not no_runtime,
        single=not no_single,
        diagnostics=diagnostics,
        hf_compile=hf_compile,
    )
    if plot:
        from adaptory.adapters.bench import plot_serve

        app.err.print(f"wrote {plot_serve(result, plot)}")


@bench_group.command("http")
@_common
@click.option("--clients", type=click.IntRange(1), help="Concurrent clients (default 32).")
@click.option("--requests", type=click.IntRange(1), help="Requests in all (default: --clients).")
@click.option("--new-tokens", type=click.IntRange(1), help="Generated per request (default 32).")
@click.option("-k", "--adapters", "k", type=click.IntRange(1), default=8, show_default=True)
@click.option("--no-hf", is_flag=True, help="Skip transformers' generate.")
@click.option("--hf-compile", is_flag=True,
              help="Also transformers' generate with a static cache, compiled.")  # fmt: skip
@pass_app
def http_cmd(app: App, clients, requests, new_tokens, k, no_hf, hf_compile, **options) -> None:
    """The server end to end under concurrent HTTP clients: p50/p99 latency, time to first
    token, tokens/s, against Runtime.generate and transformers' generate."""
    from adaptory.adapters.bench import serve_available
    from adaptory.registry.errors import ConfigError

    if not serve_available():
        raise ConfigError("`adaptory serve` is not available in this build")
    _run(app, "http", options, clients=clients, requests=requests, new_tokens=new_tokens, k=k,
         hf=not no_hf, hf_compile=hf_compile)  # fmt: skip


@bench_group.command("scoring")
@_common
@click.option("--batch", type=click.IntRange(1), help="Prompts in the batch (default 32; quick 8).")
@pass_app
def scoring_cmd(app: App, batch, **options) -> None:
    """Scoring prompts (echo + max_tokens 0, as lm-eval's loglikelihood tasks ask) against one
    prefill of the same mixed-adapter batch."""
    _run(app, "scoring", options, batch=batch)


@bench_group.command("memory")
@_common
@click.option(
    "-n",
    "--count",
    "counts",
    type=click.IntRange(1),
    multiple=True,
    help="Resident adapter counts (repeatable; default 1, 10, 100).",
)
@click.option("--no-throughput", is_flag=True,
              help="Skip decoding with every resident adapter in one batch.")  # fmt: skip
@click.option("--new-tokens", type=click.IntRange(1), help="Generated per request (default 32).")
@pass_app
def memory_cmd(app: App, counts, no_throughput, new_tokens, **options) -> None:
    """Memory of N adapters on one 4-bit base against their raw size and N merged models;
    one batch over all N adapters against one."""
    _run(app, "memory", options, counts=list(counts) or None, throughput=not no_throughput,
         new_tokens=new_tokens)  # fmt: skip


@bench_group.command("train")
@_common
@click.option("--steps", type=click.IntRange(2), help="Optimizer steps per run (default 8).")
@pass_app
def train_cmd(app: App, steps, **options) -> None:
    """Training tokens/s and peak memory: 4-bit vs unquantized base (and `adaptory train`)."""
    _run(app, "train", options, steps=steps)


@bench_group.command("quality")
@click.option("--dev", is_flag=True,
              help="Choose defaults: compare candidate settings on a dev split of each "
              "classification domain's train.jsonl (eval.jsonl is not read).")  # fmt: skip
@click.option("--quick", is_flag=True, help="2 seeds, one classification and one generation "
              "domain (a smoke run).")  # fmt: skip
@click.option("--seeds", type=click.IntRange(1), help="Training seeds per cell (default 5).")
@click.option("--domain", "domains", multiple=True,
              help="Only these domains (repeatable; default reviews, support, news, shout, "
              "reverse, dates).")  # fmt: skip
@click.option("--data", "data_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of domains (default: examples/data of the source tree).")  # fmt: skip
@click.option("--gen-base", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Causal base folder for the generation tasks (default: pretrain a small one "
              "from scratch, cached in --workdir).")  # fmt: skip
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Training runs at a time (processes).")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results here.")  # fmt: skip
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu.")  # fmt: skip
@click.option("--threads", type=click.IntRange(1),
              help="torch CPU threads per training run (default 1).")  # fmt: skip
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where data subsets, runs and the generation base are built and cached "
              "(default: a temporary folder, removed afterwards).")  # fmt: skip
@pass_app
def quality_cmd(app: App, dev, seeds, domains, data_dir, gen_base, jobs, **options) -> None:
    """Held-out scores of adapters trained with the default settings (classification on MiniLM
    from 40, 100 and all rows, generation with LoRA and prefix on tinylm), mean and worst seed
    against the base alone; --dev compares candidate defaults on dev splits instead."""
    kwargs: dict = {"dev": dev, "seeds": seeds, "data_dir": data_dir, "gen_base": gen_base,
                    "jobs": jobs}  # fmt: skip
    if domains:
        from adaptory.adapters.bench.quality import split_domains

        kwargs["classification"], kwargs["generation"] = split_domains(list(domains), data_dir)
    options.update(size="small", base_dir=None, repeats=1, build="auto", rank=16, mlp=False)
    _run(app, "quality", options, **kwargs)


@bench_group.command("summary")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every result, as a list, to this file.")  # fmt: skip
@pass_app
def summary_cmd(app: App, files, json_out) -> None:
    """One table of every target in saved results (`bench … --json FILE`): met or missed by
    how much. A file that is missing or unreadable is listed as such."""
    from rich.table import Table

    from adaptory.registry.errors import BadInput

    if not files:
        raise BadInput("name at least one result file (bench … --json FILE)")
    results, unreadable = [], []
    for file in files:
        try:
            results.append((file, json.loads(file.read_text())))
        except (OSError, ValueError) as exc:
            unreadable.append((file, type(exc).__name__))
    table = Table(title="targets")
    for column in ("bench", "size", "device", "target", "measured", "result"):
        table.add_column(column, justify="right" if column == "measured" else "left")
    for _file, result in results:
        s = result.get("settings", {})
        for name, outcome in (result.get("targets") or {}).items():
            verdict, measured = _verdict(outcome)
            table.add_row(result.get("bench", "?"), str(s.get("size", "?")),
                          str(s.get("device", "?")), name, measured, verdict)  # fmt: skip
    for file, why in unreadable:
        table.add_row(file.stem, "-", "-", "no result", "-", styled((f"missing ({why})", "red")))
    app.out.print(table)
    if json_out:
        from adaptory.adapters.bench import write_json

        write_json({"results": [r for _, r in results]}, json_out)
        app.err.print(f"wrote {json_out}")


# --- rendering -----------------------------------------------------------------------------


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _fmt_b(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_value(value: float) -> str:
    return f"{value:.2f}×" if abs(value) >= 0.1 else f"{value:.3g}"


def _verdict(outcome) -> tuple:
    """(styled verdict, measured value as text) of one target: met or missed by how much of
    its threshold, or n/a with the reason (older results hold a plain bool)."""
    if isinstance(outcome, bool):
        return styled(("met", "green") if outcome else ("missed", "red")), "-"
    value, op, threshold = outcome.get("value"), outcome.get("op"), outcome.get("threshold")
    if outcome.get("met") is None or value is None:
        return styled(("n/a", "yellow"), f" ({outcome.get('note') or 'not measured'})"), "-"
    margin = abs(outcome.get("margin", 0.0)) * 100
    word = ("met", "green") if outcome["met"] else ("missed", "red")
    measured = _fmt_value(value) if outcome.get("ratio", True) else f"{value:.3f}"
    return styled(word, f" by {margin:.0f}% ({op} {threshold:g})"), measured


RESULT_COLUMNS = (  # optional per-variant columns, shown when some variant has them
    ("tokens_per_s", "tokens/s", lambda v: f"{v:.1f}"),
    ("latency_p50_s", "p50", _fmt_s),
    ("latency_p99_s", "p99", _fmt_s),
    ("ttft_p50_s", "TTFT p50", _fmt_s),
    ("ttft_p99_s", "TTFT p99", _fmt_s),
    ("peak_bytes", "peak bytes", _fmt_b),
)


def render(app: App, result: dict) -> None:
    from rich.table import Table

    s = result["settings"]
    m = result.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '')} ×{m.get('nproc', '?')}"
    title = (
        f"bench {result['bench']} · {s.get('size')} base ({s.get('params') or '?'} params, "
        f"{s.get('built', 'folder')}) · {s['device']} · {where} · torch {m.get('torch', '')}"
    )
    results = result["results"]
    if result["bench"] == "quality":
        _render_quality(app, result)
    elif result["bench"] == "memory":
        _render_memory(app, title, results)
    else:
        table = Table(title=title)
        table.add_column("variant")
        table.add_column("median", justify="right")
        table.add_column("min", justify="right")
        table.add_column("runs", justify="right")
        rows = [r for r in results.values() if isinstance(r, dict)]
        extra = [c for c in RESULT_COLUMNS if any(c[0] in r for r in rows)]
        for _, header, _ in extra:
            table.add_column(header, justify="right")
        for name, r in results.items():
            cells = [name, _fmt_s(r["median_s"]), _fmt_s(r["min_s"]), str(r["runs"])]
            cells += [fmt(r[key]) if r.get(key) is not None else "-" for key, _, fmt in extra]
            table.add_row(*cells)
        app.out.print(table)
    if result.get("ratios"):
        ratios = Table(title="ratios (of medians)")
        ratios.add_column("ratio")
        ratios.add_column("value", justify="right")
        for name, value in result["ratios"].items():
            ratios.add_row(name, f"{value:.2f}×")
        app.out.print(ratios)
    for name, outcome in result.get("targets", {}).items():
        verdict, measured = _verdict(outcome)
        app.out.print(styled(f"{name}: {measured}  "), verdict, highlight=False)
    for name, error in (result.get("errors") or {}).items():
        app.out.print(styled(("failed", "red"), f"  {name}: {error}"), highlight=False)
    for note in result.get("notes", []):
        app.out.print(styled((note, "dim")), highlight=False)


def _render_memory(app: App, title: str, r: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "adapters",
        "bank bytes",
        "per adapter",
        "÷ raw",
        "RSS Δ",
        "CUDA Δ",
        "1 base + bank",
        "N merged (extrap.)",
        "merged / shared",
    ):
        table.add_column(col, justify="right")
    for row in r["bank"]:
        table.add_row(
            str(row["adapters"]),
            _fmt_b(row["bank_nbytes"]),
            _fmt_b(row["bank_bytes_per_adapter"]),
            f"{row['bank_over_raw']:.2f}×" if "bank_over_raw" in row else "-",
            _fmt_b(row["rss_delta"]),
            _fmt_b(row["cuda_allocated_delta"]),
            _fmt_b(row["one_base_plus_bank_bytes"]),
            _fmt_b(row["merged_models_bytes_extrapolated"]),
            f"{row['merged_over_shared']:.1f}×",
        )
    app.out.print(table)
    raw = r.get("adapter_raw_bytes", r.get("adapter_theoretical_bytes"))
    app.out.print(
        f"base footprint {_fmt_b(r['base']['footprint_bytes'])}; one adapter raw "
        f"{_fmt_b(raw)} over {r['adapted_matrices']} matrices; bank marginal "
        f"{_fmt_b(r['bank_marginal_bytes_per_adapter'])} "
        f"({(r['bank_marginal_over_theory'] or 0):.2f}× raw)",
        highlight=False,
    )
    runtime = r.get("runtime")
    if runtime and "memory_bytes" in runtime:
        app.out.print(
            f"Runtime with {runtime['adapters']} resident: bank {_fmt_b(runtime['bank_nbytes'])}, "
            f"device memory taken {_fmt_b(runtime['cuda_allocated_delta'])}, "
            f"{runtime['memory_over_raw']:.3f}× raw ({_fmt_b(runtime['raw_bytes'])}); "
            f"loaded in {runtime['load_s']:.1f}s",
            highlight=False,
        )
        for name, row in (runtime.get("throughput") or {}).items():
            app.out.print(
                f"  {name}: median {_fmt_s(row['median_s'])}, {row['tokens_per_s']:.1f} tokens/s",
                highlight=False,
            )


def _render_quality(app: App, result: dict) -> None:
    from rich.table import Table

    s, m = result["settings"], result.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '')} ×{m.get('nproc', '?')}"
    seeds = len(s.get("seeds") or [])
    scored = "dev split of train.jsonl" if s.get("dev") else "held-out eval.jsonl"
    table = Table(title=f"bench quality · {seeds} seeds · scored on {scored} · {s['device']} · "
                  f"{where}")  # fmt: skip
    for column in ("variant", "domain", "method", "rows", "metric", "mean", "worst seed",
                   "base only", "steps"):  # fmt: skip
        right = column not in ("variant", "domain", "method", "metric")
        table.add_column(column, justify="right" if right else "left")
    for r in result["results"].values():
        table.add_row(r["variant"], r["domain"], r.get("method", "lora"), str(r["rows"]),
                      r["metric"], f"{r['mean']:.3f}", f"{r['worst']:.3f}",
                      f"{r['base_only']:.3f}", str(r["steps"]))  # fmt: skip
    app.out.print(table)
    if result.get("candidates"):
        ranked = Table(title="candidates, best first (mean over cells)")
        for column in ("candidate", "dev mean", "mean worst seed"):
            ranked.add_column(column, justify="left" if column == "candidate" else "right")
        for c in result["candidates"]:
            ranked.add_row(c["name"], f"{c['mean']:.3f}", f"{c['worst']:.3f}")
        app.out.print(ranked)
        app.out.print(f"chosen: {result['chosen']}", highlight=False)
    # targets and notes: printed by render() after this, as for every bench
