"""`adaptory export`: write an entry as a plain PEFT folder with a model card."""

from __future__ import annotations

from pathlib import Path

import click

from adaptory.cli.main import App, pass_app


@click.command("export")
@click.argument("ref", required=False)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write (created if missing).",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty folder, overwriting the adapter's files."
)
@click.option(
    "--merged",
    is_flag=True,
    help="Write a standalone transformers model: the base with the LoRA merged in.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="With --merged: dtype of the saved weights.",
)
@click.option(
    "--from-weights",
    type=click.Choice(["nf4-roundtrip", "original"]),
    default="nf4-roundtrip",
    show_default=True,
    help="With --merged: merge into the 4-bit round-tripped base weights (what a QLoRA adapter "
    "was trained against) or into the original ones.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "vllm"]),
    default="peft",
    show_default=True,
    help="vllm: OUT/<name>/ per adapter for `vllm serve --enable-lora`, and the command.",
)
@click.option(
    "--all",
    "all_of_base",
    is_flag=True,
    help="With --format vllm: every LoRA causal-lm adapter of REF's base (or of --base).",
)
@click.option("--base", help="With --format vllm --all: the base model reference instead of REF.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@pass_app
def export_cmd(
    app: App,
    ref: str | None,
    out: Path,
    force: bool,
    merged: bool,
    dtype: str,
    from_weights: str,
    fmt: str,
    all_of_base: bool,
    base: str | None,
    as_json: bool,
) -> None:
    """Export REF as a PEFT folder that PeftModel.from_pretrained (and vLLM) load as is.

    The stored files are verified against their digest first; a README.md model card with the
    entry's metadata is written next to them. --merged writes a standalone model instead,
    verified against the adapter on its 4-bit base; --format vllm writes folders for vLLM's
    multi-LoRA serving.
    """
    from adaptory.cli.export_formats import export_merged_cmd, export_vllm_cmd, refuse_mixed

    refuse_mixed(ref, merged, fmt, all_of_base, base)
    if fmt == "vllm":
        return export_vllm_cmd(app, ref, out, force, all_of_base, base, as_json)
    if merged:
        return export_merged_cmd(app, ref, out, force, dtype, from_weights, as_json)
    from adaptory.registry.export import export_peft

    entry = app.registry.resolve(ref)
    path = export_peft(app.registry, entry, out, force=force, base_hub_id=_hub_id(entry))
    app.out.print(f"exported {entry.ref} to {path}", highlight=False)


def _hub_id(entry) -> str | None:
    """The Hub id of a built-in base (`minilm` → sentence-transformers/all-MiniLM-L6-v2)."""
    from adaptory.adapters.bases.loading import BUILTIN_BASES

    builtin = BUILTIN_BASES.get(entry.base_model or "")
    return builtin.hub_id if builtin else None
