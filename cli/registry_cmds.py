"""Registry commands: import, list, show, tag, untag, rm, verify, gc (thin over adaptory.registry)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.tree import Tree

from adaptory.cli.main import App, pass_app, styled
from adaptory.cli.report.page import human_size
from adaptory.registry import Entry, Registry
from adaptory.registry.errors import AdaptoryError, BadInput

KEY_METRICS = ("accuracy", "f1", "eval_accuracy", "exact_match", "eval_loss", "perplexity", "loss")
LIST_JSON_FIELDS = (
    "ref", "name", "version", "digest", "method", "task", "base_model", "tags", "metrics",
    "description", "created_at", "size_bytes",
)  # fmt: skip
MAX_LINEAGE_DEPTH = 8


def echo_json(value: object) -> None:
    """Plain JSON on stdout (never rich-highlighted or wrapped), so scripts can parse it."""
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def key_metric(metrics: dict) -> str:
    """The metric shown in `list`: a well-known one if present, else the first numeric one."""
    names = [k for k in KEY_METRICS if k in metrics] + sorted(metrics)
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name}={value:.4g}"
    return ""


# import ----------------------------------------------------------------------------------------


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Registry name; each import adds the next version.")
@click.option(
    "--base",
    "base",
    metavar="REF",
    help="Base model reference (default: the config's base_model_name_or_path).",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Tag the new version (repeatable); moves the tag from older versions.",
)
@click.option("--description", help="A one-line description stored with the entry.")
@click.option(
    "--store-only",
    is_flag=True,
    help="Keep an adapter Adaptory cannot serve or merge (IA3, prompt tuning, DoRA, ...); "
    "serve and merge refuse it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
@pass_app
def import_cmd(
    app: App,
    path: Path,
    name: str,
    base: str | None,
    tags: tuple[str, ...],
    description: str | None,
    store_only: bool,
    as_json: bool,
) -> None:
    """Import a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    The folder is validated (no pickle files, symlinks or subfolders; a config the installed PEFT
    understands; a consistent safetensors header; a method and options the server implements,
    unless --store-only), copied and hashed; nothing is written if any check fails.
    """
    entry = app.registry.add(
        path,
        name=name,
        base_model=base,
        tags=tags,
        description=description,
        parents=[{"imported_from": str(path.resolve())}],
        servable=not store_only,
    )
    if as_json:
        echo_json(entry.to_dict())
        return
    tags_text = f" [{', '.join(entry.tags)}]" if entry.tags else ""
    app.out.print(
        styled(
            "imported ",
            (entry.ref, "bold"),
            f"{tags_text}  {entry.method or '?'} · {entry.task or '?'} · "
            f"{human_size(entry.size_bytes)} · sha256:{entry.digest[:12]}",
        ),  # fmt: skip
        highlight=False,
    )


# list ------------------------------------------------------------------------------------------


@click.command("list")
@click.option("--base", help="Only entries for this base model.")
@click.option("--task", help="Only entries for this task (causal-lm, seq-cls, ...).")
@click.option("--tag", help="Only entries carrying this tag.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of entries.")
@pass_app
def list_cmd(app: App, base: str | None, task: str | None, tag: str | None, as_json: bool) -> None:
    """List stored adapters, ordered by name and version."""
    entries = app.registry.list(base=base, task=task, tag=tag)
    if as_json:
        echo_json([{k: entry.to_dict()[k] for k in LIST_JSON_FIELDS} for entry in entries])
        return
    if not entries:
        filtered = any(v is not None for v in (base, task, tag))
        message = (
            "no adapters match"
            if filtered
            else "no adapters yet — add one with `adaptory import PATH --name NAME`"
        )
        app.out.print(message, highlight=False)
        return
    table = entries_table(entries)
    app.out.print(table)


def entries_table(entries: list[Entry]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "name",
        "version",
        "method",
        "task",
        "base",
        "tags",
        "metric",
        "size",
        "created",
    ):
        table.add_column(column, no_wrap=column in ("name", "version", "metric", "size"))
    for entry in entries:
        table.add_row(
            entry.name,
            str(entry.version),
            entry.method or "",
            entry.task or "",
            entry.base_model or "",
            ", ".join(entry.tags),
            key_metric(entry.metrics),
            human_size(entry.size_bytes),
            entry.created_at[:19].replace("T", " "),
        )
    return table


# show ------------------------------------------------------------------------------------------


@click.command("show")
@click.argument("ref")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the entry (with resolved lineage) as JSON."
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also save the loss curves (train, eval, base-only eval) as PNG (or .svg, .pdf).",
)
@pass_app
def show_cmd(app: App, ref: str, as_json: bool, plot: Path | None) -> None:
    """Show everything about one entry: REF is NAME, NAME:VERSION or NAME:TAG."""
    from adaptory.registry.export import loss_summary

    entry = app.registry.resolve(ref)
    if plot is not None:
        from adaptory.cli.report.plots import plot_loss

        written = plot_loss(entry, plot)
        if not as_json:
            app.err.print(f"wrote {written}", highlight=False)
    if as_json:
        data = entry.to_dict()
        data["loss_summary"] = loss_summary(entry.loss_history)
        data["lineage"] = lineage(app.registry, entry)
        echo_json(data)
        return
    out = app.out
    out.print(styled((entry.ref, "bold"), f"  {entry.description or ''}"), highlight=False)
    out.print(fields_table(entry))
    out.print(dict_table("PEFT config", peft_summary(entry.peft_config)))
    for title, values in (("training config", entry.training_config), ("dataset", entry.dataset)):
        if values:
            out.print(dict_table(title, values))
    metrics = {k: v for k, v in entry.metrics.items() if k != "confusion_matrix"}
    if metrics:
        out.print(dict_table("metrics", metrics))
    matrix = confusion_table(entry.metrics.get("confusion_matrix"))
    if matrix is not None:
        out.print(matrix)
    summary = loss_summary(entry.loss_history)
    if summary:
        out.print(
            f"loss: {summary['points']} points, first {summary['first']:.4g}, "
            f"last {summary['last']:.4g}, min {summary['min']:.4g}",
            highlight=False,
        )
    if entry.parents:
        out.print(lineage_tree(entry, lineage(app.registry, entry)))


def fields_table(entry: Entry) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="dim")
    table.add_column()
    rows = {
        "name": entry.name,
        "version": str(entry.version),
        "tags": ", ".join(entry.tags) or "-",
        "method": entry.method or "-",
        "task": entry.task or "-",
        "base model": entry.base_model or "-",
        "base fingerprint": json.dumps(entry.base_fingerprint) if entry.base_fingerprint else "-",
        "digest": f"sha256:{entry.digest}",
        "size": human_size(entry.size_bytes),
        "files": ", ".join(f"{n} ({human_size(r.size)})" for n, r in sorted(entry.files.items())),
        "created": entry.created_at,
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def peft_summary(config: dict) -> dict:
    """The PEFT config fields worth reading; PEFT's many defaults are left to --json."""
    keys = (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "num_virtual_tokens",
        "use_dora",
        "use_rslora",
        "modules_to_save",
        "base_model_name_or_path",
    )
    return {k: config[k] for k in keys if config.get(k) not in (None, False, [], {})}


def dict_table(title: str, values: dict) -> Table:
    table = Table(title=title, title_justify="left", box=None, show_header=False)
    table.add_column(style="dim")
    table.add_column()
    for key, value in sorted(values.items()):
        table.add_row(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    return table


def confusion_table(matrix: object) -> Table | None:
    """Render {"labels": [...], "matrix": [[...]]} as a table (rows: true label, columns: predicted)."""
    if not isinstance(matrix, dict):
        return None
    labels, rows = matrix.get("labels"), matrix.get("matrix")
    if not isinstance(labels, list) or not isinstance(rows, list) or len(rows) != len(labels):
        return None
    table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for label in labels:
        table.add_column(str(label), justify="right")
    for label, row in zip(labels, rows, strict=True):
        table.add_row(str(label), *(str(v) for v in row))
    return table


def lineage(
    registry: Registry, entry: Entry, depth: int = 0, seen: frozenset = frozenset()
) -> list[dict]:
    """The entry's parents, each with its own parents when it is still in the registry."""
    resolved = []
    for parent in entry.parents:
        node = {"parent": parent, "present": False, "parents": []}
        ref = parent.get("ref") if isinstance(parent, dict) else None
        if ref and depth < MAX_LINEAGE_DEPTH:
            try:
                found = registry.resolve(ref)
            except AdaptoryError:
                found = None
            if found is not None and found.id not in seen:
                node.update(present=True, ref=found.ref)
                node["parents"] = lineage(registry, found, depth + 1, seen | {entry.id})
        resolved.append(node)
    return resolved


def lineage_tree(entry: Entry, nodes: list[dict]) -> Tree:
    tree = Tree(f"lineage of {entry.ref}")
    _add_nodes(tree, nodes)
    return tree


def _add_nodes(tree: Tree, nodes: list[dict]) -> None:
    for node in nodes:
        parent = node["parent"]
        label = (
            ", ".join(f"{k}={v}" for k, v in parent.items())
            if isinstance(parent, dict)
            else str(parent)
        )
        if parent.get("ref") if isinstance(parent, dict) else False:
            label += "" if node["present"] else " (no longer in the registry)"
        _add_nodes(tree.add(label, highlight=False), node["parents"])


# tag / untag / rm ------------------------------------------------------------------------------


@click.command("tag")
@click.argument("ref")
@click.argument("tag")
@pass_app
def tag_cmd(app: App, ref: str, tag: str) -> None:
    """Point TAG at REF (moving it from another version of the same name)."""
    entry = app.registry.tag(ref, tag)
    app.out.print(f"tagged {entry.ref} as {tag}", highlight=False)


@click.command("untag")
@click.argument("ref")
@click.argument("tag")
@pass_app
def untag_cmd(app: App, ref: str, tag: str) -> None:
    """Remove TAG from REF."""
    entry = app.registry.untag(ref, tag)
    app.out.print(f"removed tag {tag} from {entry.ref}", highlight=False)


def stdin_is_interactive() -> bool:
    return sys.stdin.isatty()


@click.command("rm")
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def rm_cmd(app: App, ref: str, yes: bool) -> None:
    """Remove an entry; its files stay in the store until `adaptory gc`."""
    entry = app.registry.resolve(ref)
    if not yes:
        if not stdin_is_interactive():
            raise BadInput(
                f"refusing to remove {entry.ref} without confirmation",
                hint="pass --yes to remove without asking",
            )
        click.confirm(f"remove {entry.ref}?", abort=True)
    removed = app.registry.remove(entry)
    app.out.print(f"removed {removed.ref} (files stay until `adaptory gc`)", highlight=False)


# verify / gc -----------------------------------------------------------------------------------


@click.command("verify")
@click.argument("ref", required=False)
@click.pass_context
@pass_app
def verify_cmd(app: App, ctx: click.Context, ref: str | None) -> None:
    """Check the catalog and re-hash stored files (all entries, or REF).

    Without REF it also runs SQLite's integrity check on catalog.db and lists stored adapters no
    entry references. Exits 1 listing every damaged entry, a damaged catalog, or stored adapters
    the catalog has no record of (a lost or replaced catalog)."""
    problems = app.registry.verify(ref)
    for problem in problems:
        app.err.print(styled(("damaged:", "bold red"), f" {problem}"), highlight=False)
    unknown: list[str] = []
    if ref is None and not any(p.entry_ref == "catalog.db" for p in problems):
        loose = app.registry.unreferenced()
        unknown = loose.unknown
        for digest in unknown:
            app.err.print(
                styled(
                    ("not in the catalog:", "bold red"), f" {app.registry.store.path_for(digest)}"
                ),
                highlight=False,
            )
        if unknown:
            app.err.print(
                styled(
                    ("hint:", "dim"),
                    " re-catalog one with `adaptory import <folder> --name NAME`; "
                    "`adaptory gc --orphans` deletes them",
                )
            )
        if loose.collectable:
            app.out.print(
                f"{len(loose.collectable)} removed adapter(s) still on disk; `adaptory gc` frees them",
                highlight=False,
            )
    if problems or unknown:
        ctx.exit(1)
    count = 1 if ref is not None else len(app.registry.list())
    app.out.print(f"{count} {'entry' if count == 1 else 'entries'} verified", highlight=False)


@click.command("gc")
@click.option(
    "--orphans",
    is_flag=True,
    help="Also delete stored adapters the catalog has no record of (see `adaptory verify`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def gc_cmd(app: App, orphans: bool, as_json: bool) -> None:
    """Delete the files of removed entries, and temp folders older than an hour.

    Refuses to run on a damaged catalog. Stored adapters the catalog has no record of are kept
    (and listed) unless --orphans is given."""
    result = app.registry.gc(orphans=orphans)
    if as_json:
        echo_json(
            {
                "removed_blobs": result.removed_blobs,
                "removed_temp": result.removed_temp,
                "freed_bytes": result.freed_bytes,
                "kept_unknown": result.kept_unknown,
            }
        )
        return
    app.out.print(
        f"removed {result.removed_blobs} unreferenced blob(s) and {result.removed_temp} stale temp folder(s), "
        f"freed {human_size(result.freed_bytes)}",
        highlight=False,
    )
    if result.kept_unknown:
        app.err.print(
            styled(
                ("kept:", "yellow"),
                f" {len(result.kept_unknown)} stored adapter(s) the catalog has no record of; "
                "`adaptory verify` lists them, `adaptory gc --orphans` deletes them",
            ),
            highlight=False,
        )


@click.command("recover")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def recover_cmd(app: App, yes: bool, as_json: bool) -> None:
    """Re-catalog stored adapters a lost or damaged catalog no longer lists.

    A damaged or missing catalog.db is moved aside (kept as catalog.db.damaged-<time>) and a new
    one started; every stored adapter the catalog does not list becomes an entry named
    recovered-<digest>. Names, tags and metrics lived only in the catalog and are not recovered."""
    if not yes and stdin_is_interactive():
        click.confirm("re-catalog the stored adapters of this home?", abort=True)
    result = app.registry.recover()
    if as_json:
        echo_json(
            {
                "moved_aside": str(result.moved_aside) if result.moved_aside else None,
                "recovered": [e.ref for e in result.recovered],
                "skipped": result.skipped,
            }
        )
        return
    if result.moved_aside:
        app.err.print(f"moved the damaged catalog to {result.moved_aside}", highlight=False)
    for entry in result.recovered:
        app.out.print(
            f"recovered {entry.ref}  {entry.method or '?'} · {entry.task or '?'}", highlight=False
        )
    for line in result.skipped:
        app.err.print(styled(("skipped:", "yellow"), f" {line}"), highlight=False)
    app.out.print(f"{len(result.recovered)} adapter(s) recovered", highlight=False)
