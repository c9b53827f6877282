"""`adaptory export`: write an entry as a plain PEFT folder with a model card."""

from __future__ import annotations

from pathlib import Path

import click

from adaptory.cli.main import App, pass_app


@click.command("export")
@click.argument("ref")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write (created if missing).",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty folder, overwriting the adapter's files."
)
@pass_app
def export_cmd(app: App, ref: str, out: Path, force: bool) -> None:
    """Export REF as a PEFT folder that PeftModel.from_pretrained (and vLLM) load as is.

    The stored files are verified against their digest first; a README.md model card with the
    entry's metadata is written next to them.
    """
    from adaptory.registry.export import export_peft

    entry = app.registry.resolve(ref)
    path = export_peft(app.registry, entry, out, force=force)
    app.out.print(f"exported {entry.ref} to {path}", highlight=False)
