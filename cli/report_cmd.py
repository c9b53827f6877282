"""`adaptory report`: one static HTML page of the whole registry (thin over report.page)."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import click

from adaptory.cli.main import App, pass_app, styled


@click.command("report")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default="adaptory-report.html",
    show_default=True,
    help="HTML file to write (replaced if it exists).",
)
@click.option("--open", "open_it", is_flag=True, help="Open the report in the default browser.")
@pass_app
def report_cmd(app: App, out: Path, open_it: bool) -> None:
    """Write one self-contained HTML page of the registry.

    \b
    It holds the adapters table (key metric against the plain base), loss curves, the lineage
    graph of merges and imports, and confusion matrices of classifiers. It has no scripts and
    loads nothing: open it from disk, attach it, or archive it.
    """
    from adaptory.cli.report.page import write_report

    entries = app.registry.list()
    path = write_report(entries, out, home=app.home)
    count = f"{len(entries)} adapter{'s' if len(entries) != 1 else ''}"
    app.out.print(f"wrote {path} ({count})", highlight=False)
    if open_it and not webbrowser.open(path.resolve().as_uri()):
        app.err.print(
            styled(("could not open a browser;", "yellow"), f" open {path} yourself"),
            highlight=False,
        )
