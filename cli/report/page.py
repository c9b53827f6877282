"""The static, self-contained HTML page of the registry: a table, loss curves, lineage, confusion.

This module turns entries into plain values for the Jinja templates in `templates/` (autoescaped:
user text is only ever inserted as text); the loss charts are matplotlib SVG from `plots`, the
lineage graph's layout comes from `lineage`. The page has no JavaScript and loads nothing, so it
opens from disk with no server and no network. Metadata of unexpected shape is shown as far as
it makes sense, never raised on: a report must render any registry.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from adaptory.cli.report.lineage import NODE_H, NODE_W, lineage_layout
from adaptory.cli.report.plots import (
    BASE_COLOR,
    EVAL_COLOR,
    TRAIN_COLOR,
    loss_chart_svg,
    loss_series,
    number,
)
from adaptory.registry.entry import Entry
from adaptory.registry.errors import BadInput

if TYPE_CHECKING:
    from jinja2 import Environment

# The metric shown in the table: the first of these an entry has, else its first numeric one.
KEY_METRICS = (
    "accuracy",
    "macro_f1",
    "f1",
    "eval_accuracy",
    "exact_match",
    "eval_loss",
    "perplexity",
    "loss",
)
NOT_SCALAR_METRICS = ("base", "evals", "confusion_matrix")
MAX_CONFUSION_LABELS = 40
MAX_DESCRIPTION = 90  # characters in the table; the card shows all of it


@cache
def environment() -> Environment:
    """The templates, read from the installed package (they ship as package data).

    Jinja is imported here, not at the top: `adaptory list` imports this module for
    `human_size` and should not pay for it.
    """
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("adaptory.cli.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt name in a template fails, never renders as ""
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=fmt, human_size=human_size, short_date=short_date)
    env.globals.update(
        colors={"train": TRAIN_COLOR, "eval": EVAL_COLOR, "base": BASE_COLOR},
        node_w=NODE_W,
        node_h=NODE_H,
        short_fingerprint=short_fingerprint,
        full_fingerprint=lambda fp: json.dumps(fp, sort_keys=True, default=str),
    )
    return env


def render_report(
    entries: Sequence[Entry],
    *,
    title: str = "Adaptory registry",
    home: str | Path | None = None,
    generated_at: datetime | None = None,
) -> str:
    """The whole report page for `entries` (as `Registry.list()` returns them) as one string.

    The same entries and `generated_at` give the same bytes.
    """
    generated_at = generated_at or datetime.now(UTC)
    entries = list(entries)
    names = {e.name for e in entries}
    summary = [
        f"{len(entries)} adapter{'s' if len(entries) != 1 else ''}",
        f"{len(names)} name{'s' if len(names) != 1 else ''}",
        human_size(sum(e.size_bytes or 0 for e in entries)),
        f"generated {generated_at.strftime('%Y-%m-%d %H:%M %Z').strip()}",
    ]
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            summary=summary,
            home=home,
            rows=[adapter_row(e) for e in entries],
            lineage=lineage_layout(entries) if entries else None,
            cards=[entry_card(e) for e in entries],
        )
    )


def lineage_section(entries: Sequence[Entry]) -> str:
    """The lineage part of the page alone: the graph, its legend, and what was left out."""
    return environment().get_template("lineage.html.j2").render(lineage=lineage_layout(entries))


def write_report(entries: Sequence[Entry], path: Path, **options: object) -> Path:
    """Render the report and write it to `path` atomically (a temp file renamed over it)."""
    path = Path(path)
    text = render_report(entries, **options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# small formatting helpers ----------------------------------------------------------------------


def human_size(size: int) -> str:
    """Bytes as a short human string: 5.3 kB, 12.0 MB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def fmt(value: float) -> str:
    return f"{value:.4g}"


def short_date(created_at: str) -> str:
    try:
        return datetime.fromisoformat(created_at).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(created_at or "")


def short_fingerprint(fingerprint: object) -> str:
    """A 12-hex-digit fingerprint (its digest, else its weights hash) with the quantization."""
    if not isinstance(fingerprint, dict) or not fingerprint:
        return ""
    digest = fingerprint.get("digest") or fingerprint.get("weights") or ""
    quant = fingerprint.get("quant")
    text = str(digest)[:12]
    return f"{text} · {quant}" if quant else text


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric or metric.endswith("error")


def scalar_metrics(metrics: object) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    found = {}
    for key, value in metrics.items():
        if key not in NOT_SCALAR_METRICS and (n := number(value)) is not None:
            found[str(key)] = n
    return found


def key_metric(metrics: dict) -> str | None:
    values = scalar_metrics(metrics)
    for name in (*KEY_METRICS, *values):
        if name in values:
            return name
    return None


@dataclass(frozen=True)
class MetricRow:
    """One metric of an entry against the plain base; `delta_class` is good, bad or muted."""

    name: str
    value: float | None
    base: float | None

    @property
    def delta(self) -> float | None:
        return None if self.value is None or self.base is None else self.value - self.base

    @property
    def delta_class(self) -> str:
        if not self.delta:
            return "muted"
        return "good" if (self.delta < 0) == lower_is_better(self.name) else "bad"


# the adapters table and the cards --------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRow:
    entry: Entry
    description: str  # shortened to MAX_DESCRIPTION characters
    metric: MetricRow | None


def adapter_row(entry: Entry) -> AdapterRow:
    metrics = entry.metrics if isinstance(entry.metrics, dict) else {}
    name = key_metric(metrics)
    metric = None
    if name:
        base = scalar_metrics(metrics.get("base")).get(name)
        metric = MetricRow(name, scalar_metrics(metrics)[name], base)
    description = (entry.description or "").strip()
    if len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 1] + "…"
    return AdapterRow(entry, description, metric)


@dataclass(frozen=True)
class Card:
    """Everything one entry's card shows besides the entry's own fields."""

    entry: Entry
    peft: str
    parents: list[tuple[str, float | None]]  # (label, merge weight)
    metrics: list[MetricRow]
    details: list[tuple[str, str]]  # (title, pretty JSON)
    chart: str | None  # an <svg> element, inserted as markup (card.html.j2)
    legend: list[tuple[str, str]]  # (swatch class, text)
    matrices: list[Confusion] = field(default_factory=list)


def entry_card(entry: Entry) -> Card:
    metrics = entry.metrics if isinstance(entry.metrics, dict) else {}
    own, base = scalar_metrics(metrics), scalar_metrics(metrics.get("base"))
    rows = [
        MetricRow(n, own.get(n), base.get(n)) for n in [*own, *(k for k in base if k not in own)]
    ]
    details = []
    for title, value in (
        ("training config", entry.training_config),
        ("dataset", entry.dataset),
        ("other metrics", {k: v for k, v in metrics.items() if k == "evals"}),
    ):
        if value:
            details.append((title, json.dumps(value, indent=2, sort_keys=True, default=str)))
    series = loss_series(entry)
    chart = loss_chart_svg(series, f"chart{entry.id}-") if series else None
    legend = []
    if series.train:
        legend.append(("train", f"training loss (last {fmt(series.train[-1][1])})"))
    if series.eval:
        legend.append(("eval", f"eval loss (best {fmt(min(v for _, v in series.eval))})"))
    if series.base_eval_loss is not None:
        legend.append(("base", f"base eval loss {fmt(series.base_eval_loss)}"))
    base_metrics = metrics.get("base") if isinstance(metrics.get("base"), dict) else {}
    matrices = [confusion(metrics.get("confusion_matrix"), "adapter"),
                confusion(base_metrics.get("confusion_matrix"), "base only")]  # fmt: skip
    return Card(entry, peft_summary(entry.peft_config), parent_labels(entry.parents), rows,
                details, chart, legend, [m for m in matrices if m is not None])  # fmt: skip


def peft_summary(config: object) -> str:
    if not isinstance(config, dict):
        return ""
    parts = []
    for key, label in (("r", "r"), ("lora_alpha", "α"), ("num_virtual_tokens", "tokens")):
        if config.get(key) is not None:
            parts.append(f"{label}={config[key]}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        parts.append("targets " + ",".join(str(t) for t in targets))
    elif isinstance(targets, str):
        parts.append(f"targets {targets}")
    return " ".join(parts)


def parent_labels(parents: object) -> list[tuple[str, float | None]]:
    labels = []
    for parent in parents if isinstance(parents, list) else []:
        if not isinstance(parent, dict):
            labels.append((str(parent), None))
            continue
        label = parent.get("ref") or parent.get("imported_from") or parent.get("name") or "?"
        labels.append((str(label), number(parent.get("weight"))))
    return labels


# confusion matrices ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """A heat-map table (rows: true label, columns: predicted), shaded by share of the row;
    `note` instead when the matrix is too big or not square."""

    who: str
    labels: list = field(default_factory=list)
    rows: list[list[tuple[float, float]]] = field(default_factory=list)  # (count, row share)
    accuracy: float = 0.0
    note: str = ""


def confusion(value: object, who: str) -> Confusion | None:
    if not isinstance(value, dict):
        return None
    matrix = value.get("matrix")
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        return None
    size = len(matrix)
    if any(len(row) != size for row in matrix) or size > MAX_CONFUSION_LABELS:
        return Confusion(who, note=f"{size} rows, not drawn")
    labels = value.get("labels")
    if not isinstance(labels, list) or len(labels) != size:
        labels = list(range(size))
    cells = [[number(v) or 0.0 for v in row] for row in matrix]
    total = sum(map(sum, cells)) or 1.0
    rows = [[(v, v / (sum(row) or 1.0)) for v in row] for row in cells]
    accuracy = sum(cells[i][i] for i in range(size)) / total
    return Confusion(who, labels, rows, accuracy)
