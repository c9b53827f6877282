"""`adaptory bench`: swap cost, serving throughput, memory and training speed, measured side by
side in one process run (medians over repeats, ratios of medians), printed and saved as JSON."""

from __future__ import annotations

import functools
from pathlib import Path

import click

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
        type=click.Choice(["tiny", "small", "base"]),
        default="small",
        show_default=True,
        help="Random-init Llama-style base to build (speed and memory do not need training).",
    )
    @click.option(
        "--base",
        "base_dir",
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        help="Benchmark on this base folder instead of building --size.",
    )
    @click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
    @click.option("--quick", is_flag=True, help="Small shapes, at most 2 repeats (a smoke run).")
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


def _settings(device, size, base_dir, repeats, quick, workdir, threads):
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
    )


def _run(app: App, name: str, options: dict, **kwargs) -> dict:
    """Run bench `name` in the given (or a temporary) work folder; print and save it."""
    import tempfile

    from adaptory.adapters.bench import run_bench, write_json

    json_out = options.pop("json_out")
    workdir = options.pop("workdir")
    with tempfile.TemporaryDirectory(prefix="adaptory-bench-") as tmp:
        settings = _settings(workdir=workdir or Path(tmp), **options)
        with app.err.status(f"running bench {name} on {settings.device} …"):
            result = run_bench(name, settings, **kwargs)
    render(app, result)
    if json_out:
        write_json(result, json_out)
        app.err.print(f"wrote {json_out}")
    return result


@click.group("bench")
def bench_group() -> None:
    """Measure swap cost, mixed-adapter serving, memory per adapter and training speed."""


@bench_group.command("swap")
@_common
@pass_app
def swap_cmd(app: App, **options) -> None:
    """Warm swap, cold load from the registry, and reloading a merged model, side by side."""
    _run(app, "swap", options)


@bench_group.command("serve")
@_common
@click.option("--batch", type=click.IntRange(1), help="Requests per batch (default 32; quick 4).")
@click.option("--new-tokens", type=click.IntRange(1), help="Generated per request (default 32).")
@click.option(
    "-k",
    "--adapters",
    "ks",
    type=click.IntRange(1),
    multiple=True,
    help="Distinct adapters spread over the batch (repeatable; default 2, 8, 32).",
)
@click.option("--no-runtime", is_flag=True, help="Skip the Runtime.generate path.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save a PNG of tokens/s against K (needs matplotlib).",
)
@pass_app
def serve_cmd(app: App, batch, new_tokens, ks, no_runtime, plot, **options) -> None:
    """Generated tokens/s with the batch on the base, on one adapter, or over K adapters:
    Adaptory's batched bank vs PEFT's adapter_names= vs PEFT swap-per-group."""
    result = _run(
        app,
        "serve",
        options,
        batch=batch,
        new_tokens=new_tokens,
        ks=list(ks) or None,
        runtime=not no_runtime,
    )
    if plot:
        from adaptory.adapters.bench import plot_serve

        app.err.print(f"wrote {plot_serve(result, plot)}")


@bench_group.command("http")
@_common
@click.option("--clients", type=click.IntRange(1), help="Concurrent clients (default 16).")
@click.option("--requests", type=click.IntRange(1), help="Requests in all (default 64).")
@click.option("-k", "--adapters", "k", type=click.IntRange(1), default=8, show_default=True)
@pass_app
def http_cmd(app: App, clients, requests, k, **options) -> None:
    """`adaptory serve` end to end under concurrent HTTP clients: p50/p99 latency, tokens/s."""
    from adaptory.adapters.bench import serve_available
    from adaptory.registry.errors import ConfigError

    if not serve_available():
        raise ConfigError("`adaptory serve` is not available in this build")
    _run(app, "http", options, clients=clients, requests=requests, k=k)


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
@pass_app
def memory_cmd(app: App, counts, **options) -> None:
    """Memory of N adapters on one 4-bit base against N merged models; bytes per adapter."""
    _run(app, "memory", options, counts=list(counts) or None)


@bench_group.command("train")
@_common
@pass_app
def train_cmd(app: App, **options) -> None:
    """Training tokens/s and peak memory: 4-bit vs unquantized base (and `adaptory train`)."""
    _run(app, "train", options)


# --- rendering -----------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
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


def render(app: App, result: dict) -> None:
    from rich.table import Table

    s = result["settings"]
    m = result.get("machine", {})
    title = (
        f"bench {result['bench']} · {s.get('size')} base ({s.get('params') or '?'} params) · "
        f"{s['device']} · {m.get('cpu', '')} ×{m.get('nproc', '?')} · torch {m.get('torch', '')}"
    )
    results = result["results"]
    if result["bench"] == "memory":
        _render_memory(app, title, results)
    elif result["bench"] == "http":
        table = Table(title=title)
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in results.items():
            if key.startswith("latency") or key == "wall_s":
                cell = _fmt_s(value)
            else:
                cell = f"{value:.1f}" if isinstance(value, float) else str(value)
            table.add_row(key, cell)
        app.out.print(table)
    else:
        table = Table(title=title)
        table.add_column("variant")
        table.add_column("median", justify="right")
        table.add_column("min", justify="right")
        table.add_column("runs", justify="right")
        extra = [k for k in ("tokens_per_s", "peak_bytes") if k in next(iter(results.values()))]
        for key in extra:
            table.add_column(key.replace("_", " "), justify="right")
        for name, r in results.items():
            cells = [name, _fmt_s(r["median_s"]), _fmt_s(r["min_s"]), str(r["runs"])]
            for key in extra:
                cells.append(f"{r[key]:.1f}" if key == "tokens_per_s" else _fmt_b(r[key]))
            table.add_row(*cells)
        app.out.print(table)
    if result.get("ratios"):
        ratios = Table(title="ratios (of medians)")
        ratios.add_column("ratio")
        ratios.add_column("value", justify="right")
        for name, value in result["ratios"].items():
            ratios.add_row(name, f"{value:.2f}×")
        app.out.print(ratios)
    for name, ok in result.get("targets", {}).items():
        app.out.print(styled(("met", "green") if ok else ("missed", "red"), f"  {name}"))
    for note in result.get("notes", []):
        app.out.print(styled((note, "dim")), highlight=False)


def _render_memory(app: App, title: str, r: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "adapters",
        "bank bytes",
        "per adapter",
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
            _fmt_b(row["rss_delta"]),
            _fmt_b(row["cuda_allocated_delta"]),
            _fmt_b(row["one_base_plus_bank_bytes"]),
            _fmt_b(row["merged_models_bytes_extrapolated"]),
            f"{row['merged_over_shared']:.1f}×",
        )
    app.out.print(table)
    app.out.print(
        f"base footprint {_fmt_b(r['base']['footprint_bytes'])}, one merged model "
        f"{_fmt_b(r['merged_model']['footprint_bytes'])}; theory per adapter "
        f"{_fmt_b(r['adapter_theoretical_bytes'])} over {r['adapted_matrices']} matrices; "
        f"marginal {_fmt_b(r['bank_marginal_bytes_per_adapter'])} "
        f"({(r['bank_marginal_over_theory'] or 0):.2f}× theory)"
    )
    runtime = r.get("runtime")
    if runtime:
        rows = ", ".join(
            f"{row['adapters']}: {_fmt_b(sum(row['tiers'].values()))}" for row in runtime["rows"]
        )
        app.out.print(f"Runtime resident ({'/'.join(runtime['tiers'])}): {rows}")
