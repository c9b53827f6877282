"""`adaptory merge` (combine LoRA adapters into a new entry) and `adaptory diff` (compare two)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from adaptory.adapters.merging.merge import COMBINATIONS  # torch-free at import time
from adaptory.cli.main import App, pass_app, styled


def _weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter("give numbers separated by commas, e.g. 0.5,0.5") from None


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


@click.command("merge")
@click.argument("refs", nargs=-1, required=True)
@click.option("--name", required=True, help="Registry name of the merged adapter.")
@click.option(
    "--method",
    type=click.Choice(COMBINATIONS),
    required=True,
    help="PEFT combination type. cat and svd combine ΔW exactly (svd up to its rank); linear, "
    "ties, dare_* and magnitude_prune combine A and B separately (an approximation).",
)
@click.option(
    "--weights",
    callback=_weights,
    help="One weight per adapter, comma separated (default: 1/N each). Negative ones only with "
    "cat; a classifier's heads are averaged by weight, so its weights must not sum to 0.",
)
@click.option(
    "--density",
    type=float,
    help="Fraction of values kept by ties/dare/magnitude_prune methods, in (0, 1] (default 0.5).",
)
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    help="Sign election of the ties methods (default total).",
)
@click.option("--svd-rank", type=int, help="Rank of an svd method's result (default: max rank).")
@click.option("--tag", "tags", multiple=True, help="Tag the new entry (repeatable).")
@click.option("--description", help="Description of the new entry.")
@click.option("--no-eval", is_flag=True, help="Skip evaluating on the parents' eval data.")
@click.option("--eval-limit", type=int, help="Evaluate on at most this many rows per file.")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
@pass_app
def merge_cmd(
    app: App,
    refs,
    name,
    method,
    weights,
    density,
    majority_sign,
    svd_rank,
    tags,
    description,
    no_eval,
    eval_limit,
    as_json,
) -> None:
    """Merge LoRA adapters REFS into a new registry entry NAME (PEFT add_weighted_adapter).

    The parents must share a base (fingerprint), a task and, for classifiers, a label set. The
    new entry records each parent with its weight, the method and its arguments, how far the
    result is from the exact weighted sum of the parents' ΔW, and its metrics on the parents'
    eval data next to theirs.
    """
    from adaptory.adapters.merging.merge import SEPARATE_AB, merge_adapters

    with app.err.status(f"merging {', '.join(refs)} ({method})"):
        result = merge_adapters(
            app.registry,
            list(refs),
            name=name,
            method=method,
            weights=weights,
            density=density,
            majority_sign=majority_sign,
            svd_rank=svd_rank,
            evaluate=not no_eval,
            eval_limit=eval_limit,
            description=description,
            tags=tags,
        )
    entry = result.entry
    if as_json:
        _echo_json({**entry.to_dict(), "fidelity": result.fidelity})
        return
    weights_text = ", ".join(f"{p['ref']}×{p['weight']:g}" for p in entry.parents)
    app.out.print(
        styled(
            ("merged", "green"),
            f" {weights_text} with {result.spec.method} → ",
            (entry.ref, "bold"),
            f" (r={entry.peft_config.get('r')})",
        ),  # fmt: skip
        highlight=False,
    )
    error = result.fidelity["weighted_sum_rel_error"]
    app.out.print(f"distance from Σ wᵢ·ΔWᵢ: {error:.3g} (relative)", highlight=False)
    if result.spec.method in SEPARATE_AB:
        app.err.print(
            styled(
                ("note:", "yellow"),
                f" {result.spec.method} averages the A and B factors separately, so ΔW carries "
                "cross terms between adapters; use cat or svd for exact weighted sums",
            ),
            highlight=False,
        )
    if result.metrics:
        app.out.print(metrics_table(result.metrics))


def metrics_table(metrics: dict) -> Table:
    """Merged adapter vs each parent on that parent's eval data."""
    parents = metrics.get("parents", {})
    merged = metrics.get("on_parent_data", {})
    names = sorted({k for m in parents.values() for k in m if k != "data"})
    table = Table(title="on the parents' eval data")
    table.add_column("data of")
    for name in names:
        table.add_column(f"{name} parent", justify="right")
        table.add_column(f"{name} merged", justify="right")
    for ref, values in parents.items():
        row = [ref]
        for name in names:
            row += [_num(values.get(name)), _num(merged.get(ref, {}).get(name))]
        table.add_row(*row)
    return table


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"


@click.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--top", type=int, default=20, show_default=True, help="Rows of the module table.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@pass_app
def diff_cmd(app: App, ref_a: str, ref_b: str, top: int, as_json: bool) -> None:
    """Compare two adapters: config differences, and per module how far their updates differ.

    For LoRA the update is ΔW = scaling·B·A; the table shows ‖ΔW‖ of each adapter, the distance
    ‖ΔW_a − ΔW_b‖ and the cosine similarity, the modules that differ most first.
    """
    from adaptory.adapters.merging.diff import diff_adapters

    diff = diff_adapters(app.registry, ref_a, ref_b)
    if as_json:
        _echo_json(diff.to_dict())
        return
    if diff.config:
        table = Table(title="configuration")
        table.add_column("field")
        table.add_column(diff.a)
        table.add_column(diff.b)
        for row in diff.config:
            table.add_row(row["field"], _show(row["a"]), _show(row["b"]))
        app.out.print(table)
    else:
        app.out.print("same configuration", highlight=False)
    table = Table(title=f"{diff.kind} distance per module (largest first)")
    table.add_column("module")
    table.add_column(f"‖{diff.a}‖", justify="right")
    table.add_column(f"‖{diff.b}‖", justify="right")
    table.add_column("‖a − b‖", justify="right")
    table.add_column("cosine", justify="right")
    for row in diff.modules[:top]:
        table.add_row(
            row.module,
            f"{row.norm_a:.4g}",
            f"{row.norm_b:.4g}",
            f"{row.distance:.4g}",
            "-" if row.cosine is None else f"{row.cosine:.3f}",
        )
    app.out.print(table)
    if len(diff.modules) > top:
        app.out.print(f"… {len(diff.modules) - top} more (--top N)", highlight=False)


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "-" if value is None else str(value)
