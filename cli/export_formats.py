"""The non-PEFT forms of `adaptory export`: a merged standalone model, and vLLM LoRA folders."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from adaptory.cli.main import App, styled
from adaptory.registry.errors import BadInput


def refuse_mixed(ref, merged: bool, fmt: str, all_of_base: bool, base) -> None:
    """Usage errors between the export options, before anything is loaded."""
    if merged and fmt == "vllm":
        raise BadInput("--merged and --format vllm exclude each other", hint="choose one")
    if (all_of_base or base) and fmt != "vllm":
        raise BadInput("--all and --base go with --format vllm")
    if base and not all_of_base:
        raise BadInput("--base goes with --all", hint="--format vllm --all --base B")
    if ref is None and not (all_of_base and base):
        raise BadInput("give an adapter REF", hint="or --format vllm --all --base B")


def export_merged_cmd(app: App, ref, out: Path, force, dtype, from_weights, as_json) -> None:
    from adaptory.adapters.merging.export import export_merged

    entry = app.registry.resolve(ref)
    with app.err.status(f"merging {entry.ref} into its base ({from_weights})"):
        result = export_merged(
            app.registry, entry, out, dtype=dtype, from_weights=from_weights, force=force
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
        return
    app.out.print(
        styled(
            ("exported", "green"),
            f" {entry.ref} merged into its base ({result.from_weights}, {dtype}) to {result.path}",
        ),
        highlight=False,
    )
    if result.note:
        app.err.print(styled(("note:", "yellow"), f" {result.note}"), highlight=False)
    table = Table(title=f"merged model vs the adapter ({result.verification['prompts']} prompts)")
    table.add_column("reference")
    table.add_column("max |Δlogit|", justify="right")
    table.add_column("mean KL", justify="right")
    quantized = result.verification["vs_adapter_on_quantized_base"]
    original = result.verification["vs_adapter_on_original_base"]
    table.add_row(
        f"adapter on {quantized['quant']} base",
        f"{quantized['max_abs_dlogit']:.3g}",
        f"{quantized['mean_kl']:.3g}",
    )
    table.add_row(
        "adapter on original base",
        f"{original['max_abs_dlogit']:.3g}",
        f"{original['mean_kl']:.3g}",
    )
    app.out.print(table)
    if result.metrics:
        before = result.metrics["adapter_on_quantized_base"]
        after = result.metrics["merged"]
        shown = ", ".join(f"{k} {before[k]:.4g} → {after[k]:.4g}" for k in before if k in after)
        app.out.print(f"eval ({result.metrics['data']}): adapter on 4-bit base → merged: {shown}")
    auto = (
        "AutoModelForSequenceClassification" if entry.task == "seq-cls" else "AutoModelForCausalLM"
    )
    app.out.print(f"load it with: {auto}.from_pretrained(path)", highlight=False)


def export_vllm_cmd(app: App, ref, out: Path, force, all_of_base, base, as_json) -> None:
    from adaptory.adapters.merging.export import adapters_of_base, check_vllm, export_vllm

    if all_of_base:
        entries = adapters_of_base(app.registry, base if base else app.registry.resolve(ref))
    else:
        entry = app.registry.resolve(ref)
        check_vllm(entry)
        entries = [entry]
    result = export_vllm(app.registry, entries, out, force=force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
        return
    for adapter in result.adapters:
        app.out.print(f"exported {adapter['ref']} to {adapter['path']}", highlight=False)
    app.out.print("serve them with:", highlight=False)
    click.echo(result.command)
