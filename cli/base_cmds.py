"""`adaptory base …` (make and list base models) and `adaptory doctor`."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import click
from rich.table import Table

from adaptory.cli.main import App, pass_app, styled


@click.group("base")
def base_group() -> None:
    """Make and list base models (built-in, or built from scratch here, offline)."""


def _target(app: App, name: str, out: Path | None) -> Path:
    from adaptory.adapters.bases.loading import BUILTIN_BASES, bases_dir, check_base_name
    from adaptory.registry.errors import ConfigError

    check_base_name(name)
    if name in BUILTIN_BASES and out is None:  # `--base NAME` would find the built-in first
        raise ConfigError(
            f"'{name}' is the name of a built-in base",
            hint=f"choose another name (e.g. my-{name}), or pass --out FOLDER",
        )
    return out if out is not None else bases_dir(app.home) / name


def _refuse_existing(target: Path, force: bool) -> None:
    from adaptory.registry.errors import ConfigError

    if target.exists() and not force:
        raise ConfigError(
            f"{target} already exists", hint="pass --force to replace it, or choose another name"
        )


@base_group.command("init")
@click.argument("name")
@click.option("--arch", type=click.Choice(["llama"]), default="llama", show_default=True)
@click.option(
    "--size", type=click.Choice(["tiny", "small", "base"]), default="tiny", show_default=True
)
@click.option(
    "--corpus",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="Text file(s) to train the tokenizer on. Default: the corpus shipped with Adaptory.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save here instead of HOME/bases/NAME.",
)
@click.option("--force", is_flag=True, help="Replace an existing base of that name.")
@pass_app
def base_init(app: App, name, arch, size, corpus, seed, out, force) -> None:
    """Build an untrained Llama-style base NAME with a tokenizer trained on local text."""
    from adaptory.adapters.bases.tiny import init_base

    target = _target(app, name, out)
    _refuse_existing(target, force)
    with app.err.status(f"building {arch} {size} base '{name}'"):
        _, _, info = init_base(target, arch=arch, size=size, corpus=list(corpus) or None, seed=seed)
    app.out.print(
        styled(
            ("made", "green"),
            " base ",
            (name, "bold"),
            f" ({info['params']:,} params, vocab {info['vocab_size']}) at {target}",
        )  # fmt: skip
    )
    app.out.print(f"use it with: adaptory train --base {target if out else name} …")


@base_group.command("pretrain")
@click.argument("name")
@click.option(
    "--corpus",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="Text file(s) to pretrain on (and train the tokenizer on). Default: the shipped corpus.",
)
@click.option(
    "--recipe",
    type=click.Choice(["tinylm"]),
    help="Every setting of a base Adaptory ships (tinylm: the built-in generation base); "
    "options given as well override it.",
)
@click.option(
    "--size", type=click.Choice(["tiny", "small", "base"]), help="Model shape. [default: small]"
)
@click.option("--steps", type=click.IntRange(1), help="Optimizer steps. [default: 300]")
@click.option("--seq-len", type=click.IntRange(8), help="Tokens per sequence. [default: 128]")
@click.option("--batch-size", type=click.IntRange(1), help="Sequences per step. [default: 16]")
@click.option("--lr", type=float, help="Peak learning rate. [default: 0.003]")
@click.option("--vocab", "vocab_size", type=click.IntRange(260), help="Tokenizer vocabulary "
              "(260: bytes only, no merges). [default: the size's]")  # fmt: skip
@click.option(
    "--exercises",
    "exercise_bytes",
    type=click.IntRange(0),
    help="Mix this many bytes of generated string exercises into the corpus. [default: 0]",
)
@click.option("--seed", type=int, help="Seeds the tokenizer, weights and batches. [default: 0]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing base of that name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def base_pretrain(app: App, name, corpus, recipe, out, force, as_json, **given) -> None:
    """Pretrain a small Llama-style base NAME from scratch on local text (no network)."""
    from adaptory.adapters.training.pretrain import RECIPES, pretrain_base

    settings = dict(RECIPES[recipe]) if recipe else {}  # what is not set: pretrain_base's defaults
    settings.update({key: value for key, value in given.items() if value is not None})
    target = _target(app, name, out)
    _refuse_existing(target, force)
    result = pretrain_base(
        target, corpus=list(corpus) or None, show_progress=not as_json, **settings
    )
    if as_json:
        app.out.print_json(json.dumps(result))
        return
    app.out.print(
        styled(
            ("pretrained", "green"),
            " base ",
            (name, "bold"),
            f" ({result['params']:,} params) at {target}: loss {result['first_loss']:.2f} → "
            f"{result['final_loss']:.2f} in {result['wall_time_s']:.0f}s",
        )  # fmt: skip
    )


@base_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_app
def base_list(app: App, as_json: bool) -> None:
    """List the built-in bases and those made under HOME/bases."""
    from adaptory.adapters.bases.loading import list_bases

    rows = list_bases(app.home)
    if as_json:
        app.out.print_json(json.dumps(rows))
        return
    table = Table("name", "kind", "task", "params", "description")
    for row in rows:
        params = f"{row['params']:,}" if row.get("params") else ""
        table.add_row(row["name"], row["kind"], row["task"], params, row.get("description", ""))
    app.out.print(table)


def doctor_report(home: Path) -> dict:
    """What this machine can do: versions, CUDA, whether 4-bit really runs, where the home is."""
    import importlib.metadata as md

    report: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            report[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            report[pkg] = None
    import torch

    report["cuda"] = torch.cuda.is_available()
    report["cuda_devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if report["cuda"]
        else []
    )
    report["four_bit"] = _four_bit_works()
    report["home"] = str(home)
    report["home_writable"] = _writable(home)
    report["catalog"] = _catalog_state(home)
    from adaptory.adapters.bases.loading import BUILTIN_BASES

    minilm = BUILTIN_BASES["minilm"].locate()
    report["minilm"] = str(minilm) if minilm else None
    return report


def _four_bit_works() -> str:
    try:
        from adaptory.adapters.bases.loading import default_device, quiet_transformers

        quiet_transformers()  # before bitsandbytes is imported: it warns at import time
        import bitsandbytes as bnb
        import torch

        device = default_device()
        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
        layer = layer.to(device)
        out = layer(torch.ones(1, 64, device=device))
        return f"yes ({device})" if torch.isfinite(out).all() else "no (non-finite output)"
    except Exception as exc:  # report, don't crash: this is the diagnostic command
        return f"no ({type(exc).__name__}: {exc})"


def _catalog_state(home: Path) -> dict:
    """The catalog's health, entries, and stored adapters it does not reference."""
    from adaptory.registry import Registry
    from adaptory.registry.errors import AdaptoryError

    registry = Registry(home)
    state: dict = {"path": str(registry.catalog.path), "exists": registry.catalog.exists()}
    try:
        state["problems"] = registry.catalog_problems()
        state["entries"] = None if state["problems"] else len(registry.list())
        loose = None if state["problems"] else registry.unreferenced()
    except AdaptoryError as exc:  # e.g. a missing catalog next to stored adapters
        state["problems"], state["entries"], loose = [exc.message], None, None
    state["blobs"] = len(registry.store.digests())
    state["unreferenced_removed"] = len(loose.collectable) if loose else None
    state["unreferenced_unknown"] = len(loose.unknown) if loose else None
    state["ok"] = not state["problems"] and not (loose and loose.unknown)
    return state


def _writable(home: Path) -> bool:
    probe = home if home.exists() else home.parent
    while not probe.exists():
        probe = probe.parent
    import os

    return os.access(probe, os.W_OK)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def doctor_cmd(app: App, as_json: bool) -> None:
    """Versions, CUDA, whether 4-bit works here, the home, and the catalog's health.

    Exits 1 when the catalog is damaged or stored adapters are missing from it."""
    report = doctor_report(app.home)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        if not report["catalog"]["ok"]:
            raise SystemExit(1)
        return
    table = Table("check", "value", show_header=False)
    for key, value in report.items():
        if key == "catalog":
            continue
        table.add_row(key, str(value))
    catalog = report["catalog"]
    if catalog["ok"]:
        summary = f"ok: {catalog['entries']} entries, {catalog['blobs']} stored adapters"
        if catalog["unreferenced_removed"]:
            summary += f" ({catalog['unreferenced_removed']} removed, freed by `adaptory gc`)"
        table.add_row("catalog", summary)
    else:
        found = list(catalog["problems"])
        if catalog["unreferenced_unknown"]:
            found.append(
                f"{catalog['unreferenced_unknown']} stored adapters are not in the catalog "
                "(`adaptory verify` lists them)"
            )
        table.add_row("catalog", styled(("DAMAGED: ", "bold red"), "; ".join(found)))
    app.out.print(table)
    if not catalog["ok"]:
        raise SystemExit(1)
