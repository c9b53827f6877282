"""A static, self-contained HTML page of the registry: a table, loss curves, lineage, confusion.

Everything is drawn here as inline SVG and CSS: no JavaScript, no fonts or scripts fetched, so the
file opens from disk with no server and no network. Every piece of user text (names, tags,
descriptions, labels, config values) goes through `esc`, and metadata of unexpected shape is
shown as far as it makes sense, never raised on: a report must render any registry.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from adaptory.cli.report.plots import (
    BASE_COLOR,
    EVAL_COLOR,
    TRAIN_COLOR,
    LossSeries,
    loss_series,
    number,
)
from adaptory.registry.entry import Entry
from adaptory.registry.errors import BadInput

# The metric shown in the table: the first of these an entry has, else its first numeric one.
KEY_METRICS = ("accuracy", "macro_f1", "f1", "eval_accuracy", "eval_loss", "perplexity", "loss")
NOT_SCALAR_METRICS = ("base", "evals", "confusion_matrix")
MAX_CURVE_POINTS = 600
MAX_CONFUSION_LABELS = 40


def esc(value: object) -> str:
    """Text made safe for HTML and SVG element content and double-quoted attributes."""
    return html.escape(str(value), quote=True)


def render_report(
    entries: Sequence[Entry],
    *,
    title: str = "Adaptory registry",
    home: str | Path | None = None,
    generated_at: datetime | None = None,
) -> str:
    """The whole report page for `entries` (as `Registry.list()` returns them) as one string."""
    generated_at = generated_at or datetime.now(UTC)
    entries = list(entries)
    names = {e.name for e in entries}
    summary = [
        f"{len(entries)} adapter{'s' if len(entries) != 1 else ''}",
        f"{len(names)} name{'s' if len(names) != 1 else ''}",
        human_size(sum(e.size_bytes or 0 for e in entries)),
        f"generated {generated_at.strftime('%Y-%m-%d %H:%M %Z').strip()}",
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing on this page may load from anywhere: no scripts at all, images only inline.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        f"<header><h1>{esc(title)}</h1>",
        f'<p class="muted">{" · ".join(esc(s) for s in summary)}</p>',
    ]
    if home is not None:
        parts.append(f'<p class="muted">home <code>{esc(home)}</code></p>')
    parts.append("</header>")
    if not entries:
        parts.append(
            '<section class="empty"><p>The registry is empty. Train an adapter or import one '
            "with <code>adaptory import PATH --name NAME</code>.</p></section>"
        )
    else:
        parts += [
            '<section><h2 id="adapters">Adapters</h2>',
            adapters_table(entries),
            "</section>",
            '<section><h2 id="lineage">Lineage</h2>',
            lineage_section(entries),
            "</section>",
            '<section><h2 id="details">Details</h2>',
            *(entry_card(e) for e in entries),
            "</section>",
        ]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


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


def anchor(entry: Entry) -> str:
    return f"entry-{entry.id}"


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


def delta_html(metric: str, value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return ""
    delta = value - base
    if delta == 0:
        return '<span class="muted">±0</span>'
    better = (delta < 0) == lower_is_better(metric)
    return f'<span class="{"good" if better else "bad"}">{delta:+.3g}</span>'


# the adapters table ----------------------------------------------------------------------------


def adapters_table(entries: Sequence[Entry]) -> str:
    head = (
        "<tr><th>Adapter</th><th>Ver</th><th>Method</th><th>Task</th><th>Base</th>"
        '<th>Tags</th><th>Metric</th><th class="num">Adapter</th><th class="num">Base only</th>'
        '<th class="num">Δ</th><th class="num">Size</th><th>Created</th></tr>'
    )
    rows = []
    for entry in entries:
        metrics = entry.metrics if isinstance(entry.metrics, dict) else {}
        name = key_metric(metrics)
        value = scalar_metrics(metrics).get(name) if name else None
        base = scalar_metrics(metrics.get("base")).get(name) if name else None
        description = (entry.description or "").strip()
        if len(description) > 90:
            description = description[:89] + "…"
        rows.append(
            f'<tr class="adapter-row" data-ref="{esc(entry.ref)}">'
            f'<td><a href="#{anchor(entry)}"><strong>{esc(entry.name)}</strong></a>'
            + (f'<div class="desc">{esc(description)}</div>' if description else "")
            + "</td>"
            f'<td class="num">{entry.version}</td>'
            f'<td class="nowrap">{esc(entry.method or "–")}</td>'
            f'<td class="nowrap">{esc(entry.task or "–")}</td>'
            f"<td>{base_cell(entry)}</td>"
            f"<td>{tag_chips(entry.tags)}</td>"
            f"<td>{esc(name or '–')}</td>"
            f'<td class="num">{fmt(value) if value is not None else ""}</td>'
            f'<td class="num">{fmt(base) if base is not None else ""}</td>'
            f'<td class="num">{delta_html(name or "", value, base)}</td>'
            f'<td class="num">{esc(human_size(entry.size_bytes or 0))}</td>'
            f'<td class="nowrap" title="{esc(entry.created_at)}">'
            f"{esc(short_date(entry.created_at))}</td>"
            "</tr>"
        )
    return f'<table class="adapters"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def base_cell(entry: Entry) -> str:
    model = esc(entry.base_model or "–")
    fingerprint = short_fingerprint(entry.base_fingerprint)
    if not fingerprint:
        return model
    full = json.dumps(entry.base_fingerprint, sort_keys=True, default=str)
    return f'{model}<div class="fp" title="{esc(full)}">{esc(fingerprint)}</div>'


def tag_chips(tags: Sequence[str]) -> str:
    return "".join(f'<span class="tag">{esc(tag)}</span>' for tag in tags or ())


# per-adapter cards -----------------------------------------------------------------------------


def entry_card(entry: Entry) -> str:
    metrics = entry.metrics if isinstance(entry.metrics, dict) else {}
    series = loss_series(entry)
    left = [facts_list(entry), metrics_table(metrics)]
    for title, value in (
        ("training config", entry.training_config),
        ("dataset", entry.dataset),
        ("other metrics", {k: v for k, v in metrics.items() if k == "evals"}),
    ):
        if value:
            pretty = json.dumps(value, indent=2, sort_keys=True, default=str)
            left.append(
                f"<details><summary>{esc(title)}</summary><pre>{esc(pretty)}</pre></details>"
            )
    right = []
    if series:
        right.append(loss_chart(series, entry.ref))
    else:
        right.append(
            '<p class="muted nocurve">No loss history (merged or imported adapters have none).</p>'
        )
    base = metrics.get("base") if isinstance(metrics.get("base"), dict) else {}
    matrices = confusion_table(metrics.get("confusion_matrix"), "adapter") + confusion_table(
        base.get("confusion_matrix"), "base only"
    )
    if matrices:
        right.append(f'<div class="matrices">{matrices}</div>')
    description = (
        f'<p class="description">{esc(entry.description)}</p>' if entry.description else ""
    )
    return (
        f'<article class="card" id="{anchor(entry)}">'
        f"<h3>{esc(entry.ref)} {tag_chips(entry.tags)}</h3>{description}"
        f'<div class="card-grid"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>'
        "</article>"
    )


def facts_list(entry: Entry) -> str:
    facts: list[tuple[str, str]] = [
        ("method", esc(entry.method or "–")),
        ("task", esc(entry.task or "–")),
        ("base", base_cell(entry)),
        ("digest", f'<code title="sha256:{esc(entry.digest)}">{esc(entry.digest[:12])}</code>'),
        ("size", esc(human_size(entry.size_bytes or 0))),
        ("created", esc(short_date(entry.created_at))),
    ]
    peft = peft_summary(entry.peft_config)
    if peft:
        facts.insert(2, ("config", esc(peft)))
    if entry.parents:
        facts.append(("parents", ", ".join(parent_label(p) for p in entry.parents)))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<dl class="facts">{items}</dl>'


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


def parent_label(parent: object) -> str:
    if not isinstance(parent, dict):
        return esc(parent)
    label = parent.get("ref") or parent.get("imported_from") or parent.get("name") or "?"
    weight = number(parent.get("weight"))
    return esc(label) + (
        f' <span class="muted">×{fmt(weight)}</span>' if weight is not None else ""
    )


def metrics_table(metrics: dict) -> str:
    own = scalar_metrics(metrics)
    base = scalar_metrics(metrics.get("base"))
    names = list(own) + [k for k in base if k not in own]
    if not names:
        return '<p class="muted">No metrics recorded.</p>'
    rows = []
    for name in names:
        value, base_value = own.get(name), base.get(name)
        rows.append(
            f"<tr><td>{esc(name)}</td>"
            f'<td class="num">{fmt(value) if value is not None else ""}</td>'
            f'<td class="num">{fmt(base_value) if base_value is not None else ""}</td>'
            f'<td class="num">{delta_html(name, value, base_value)}</td></tr>'
        )
    return (
        '<table class="metrics"><thead><tr><th>Metric</th><th class="num">Adapter</th>'
        '<th class="num">Base only</th><th class="num">Δ</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# loss chart (SVG) ------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def thin(points: list[tuple[float, float]], limit: int = MAX_CURVE_POINTS) -> list:
    """At most `limit` evenly spaced points, always keeping the last one."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def loss_chart(series: LossSeries, ref: str) -> str:
    width, height = 560, 250
    left, right, top, bottom = 56, 16, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    points = series.train + series.eval
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if series.base_eval_loss is not None:
        ys.append(series.base_eval_loss)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.06 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    def path_data(pts: list[tuple[float, float]]) -> str:
        return " ".join(
            f"{'M' if i == 0 else 'L'}{sx(x):.1f} {sy(y):.1f}" for i, (x, y) in enumerate(pts)
        )

    out = [
        f'<svg class="chart loss-chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="loss curve of {esc(ref)}" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    for tick in nice_ticks(y0, y1, 5):
        y = sy(tick)
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(tick)}</text>'
        )
    for tick in nice_ticks(x0, x1, 6):
        x = sx(tick)
        out.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}"/>'
            f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="middle">'
            f"{fmt(tick)}</text>"
        )
    out.append(
        f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>'
        f'<text class="label" x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">step</text>'
        f'<text class="label" x="12" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2:.0f})">loss</text>'
    )
    if series.base_eval_loss is not None:
        y = sy(series.base_eval_loss)
        out.append(
            f'<line class="loss-base" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}">'
            f"<title>base eval loss {fmt(series.base_eval_loss)}</title></line>"
        )
    if series.train:
        out.append(f'<path class="loss-train" d="{path_data(thin(series.train))}"/>')
    if series.eval:
        evals = thin(series.eval)
        out.append(f'<path class="loss-eval" d="{path_data(evals)}"/>')
        out += [
            f'<circle class="loss-eval-point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5">'
            f"<title>step {fmt(x)}: eval loss {fmt(y)}</title></circle>"
            for x, y in evals
        ]
    out.append("</svg>")
    legend = []
    if series.train:
        last = series.train[-1][1]
        legend.append(f'<span><i class="sw train"></i>training loss (last {fmt(last)})</span>')
    if series.eval:
        best = min(v for _, v in series.eval)
        legend.append(f'<span><i class="sw eval"></i>eval loss (best {fmt(best)})</span>')
    if series.base_eval_loss is not None:
        legend.append(
            f'<span><i class="sw base"></i>base eval loss {fmt(series.base_eval_loss)}</span>'
        )
    return f'<figure class="chart-box">{"".join(out)}<figcaption>{"".join(legend)}</figcaption></figure>'


# confusion matrices ----------------------------------------------------------------------------


def confusion_table(confusion: object, who: str) -> str:
    """A heat-map table (rows: true label, columns: predicted), shaded by share of the row."""
    if not isinstance(confusion, dict):
        return ""
    matrix = confusion.get("matrix")
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        return ""
    size = len(matrix)
    if any(len(row) != size for row in matrix) or size > MAX_CONFUSION_LABELS:
        return f'<p class="muted">confusion matrix ({esc(who)}): {size} rows, not drawn.</p>'
    labels = confusion.get("labels")
    if not isinstance(labels, list) or len(labels) != size:
        labels = list(range(size))
    cells = [[number(v) or 0.0 for v in row] for row in matrix]
    total = sum(map(sum, cells)) or 1.0
    correct = sum(cells[i][i] for i in range(size))
    head = "".join(f'<th scope="col">{esc(label)}</th>' for label in labels)
    rows = []
    for i, row in enumerate(cells):
        row_total = sum(row) or 1.0
        tds = []
        for j, value in enumerate(row):
            share = value / row_total
            ink = "light" if share > 0.55 else ""
            tds.append(
                f'<td class="{"diag " if i == j else ""}{ink}" '
                f'style="background:rgba(37,99,235,{share * 0.9:.2f})" '
                f'title="true {esc(labels[i])}, predicted {esc(labels[j])}: {fmt(value)}">'
                f"{fmt(value)}</td>"
            )
        rows.append(f'<tr><th scope="row">{esc(labels[i])}</th>{"".join(tds)}</tr>')
    return (
        f'<table class="confusion"><caption>Confusion matrix, {esc(who)} '
        f'<span class="muted">accuracy {fmt(correct / total)} · rows true, columns predicted'
        f"</span></caption>"
        f'<thead><tr><th class="corner">true \\ pred</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# lineage graph (SVG) ---------------------------------------------------------------------------


@dataclass
class GraphNode:
    key: str
    label: str
    detail: str
    entry: Entry | None = None
    title: str = ""
    generation: int = 0
    x: float = 0.0
    y: float = 0.0


@dataclass(frozen=True)
class GraphEdge:
    parent: str
    child: str
    weight: float | None
    kind: str  # "merge" (parent in the registry) or "source" (an import path, a removed entry)


def find_parent(parent: dict, entries: Sequence[Entry]) -> Entry | None:
    """The listed entry a parent record names: by exact ref, digest, name+version, tag or name."""
    by_ref = {e.ref: e for e in entries}
    ref = parent.get("ref")
    if isinstance(ref, str) and ref in by_ref:
        return by_ref[ref]
    digest = parent.get("digest")
    if digest:
        found = [e for e in entries if e.digest == digest]
        if found:
            return found[-1]
    name, version = parent.get("name"), parent.get("version")
    if name is not None and version is not None and f"{name}:{version}" in by_ref:
        return by_ref[f"{name}:{version}"]
    if isinstance(ref, str) and ref:
        name, _, rest = ref.partition(":")
        same = [e for e in entries if e.name == name]
        if rest:
            same = [e for e in same if rest in (e.tags or [])]
        return same[-1] if same else None
    return None


def lineage_graph(entries: Sequence[Entry]) -> tuple[dict[str, GraphNode], list[GraphEdge]]:
    """Nodes (every entry, plus parents that are not entries) and parent → child edges."""
    nodes: dict[str, GraphNode] = {}
    for entry in entries:
        detail = " · ".join(str(v) for v in (entry.method, entry.task) if v)
        nodes[f"e{entry.id}"] = GraphNode(f"e{entry.id}", entry.ref, detail, entry)
    edges: list[GraphEdge] = []
    for entry in entries:
        child = f"e{entry.id}"
        for parent in entry.parents or []:
            if not isinstance(parent, dict):
                parent = {"ref": str(parent)}
            found = find_parent(parent, entries)
            weight = number(parent.get("weight"))
            if found is not None:
                if found.id != entry.id:
                    edges.append(GraphEdge(f"e{found.id}", child, weight, "merge"))
                continue
            source = parent.get("ref") or parent.get("imported_from") or parent.get("name")
            if not source:
                continue
            key = f"x{source}"
            if key not in nodes:
                is_path = parent.get("ref") is None and parent.get("imported_from") is not None
                label = Path(str(source)).name or str(source) if is_path else str(source)
                detail = "imported from" if is_path else "not in the registry"
                nodes[key] = GraphNode(key, label, detail, title=str(source))
            edges.append(GraphEdge(key, child, weight, "source"))
    # Entries are placed by their generation among entries; a parent outside the registry sits
    # one column left of its first child (an import path is not an ancestor of everything).
    parents_of: dict[str, list[str]] = {}
    for edge in edges:
        if edge.kind == "merge":
            parents_of.setdefault(edge.child, []).append(edge.parent)
    generations: dict[str, int] = {}

    def generation(key: str, visiting: frozenset = frozenset()) -> int:
        if key not in generations:
            ups = [p for p in parents_of.get(key, []) if p not in visiting]  # cycles end here
            generations[key] = 1 + max(generation(p, visiting | {key}) for p in ups) if ups else 0
        return generations[key]

    for key, node in nodes.items():
        if node.entry is not None:
            node.generation = generation(key)
    for key, node in nodes.items():
        if node.entry is None:
            node.generation = min(nodes[e.child].generation for e in edges if e.parent == key) - 1
    first = min((node.generation for node in nodes.values()), default=0)
    for node in nodes.values():
        node.generation -= first
    return nodes, edges


NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 200, 44, 70, 14, 12
MAX_LONE_NODES = 12


def lineage_section(entries: Sequence[Entry]) -> str:
    nodes, edges = lineage_graph(entries)
    parents_of: dict[str, list[str]] = {}
    children_of: dict[str, list[str]] = {}
    for edge in edges:
        parents_of.setdefault(edge.child, []).append(edge.parent)
        children_of.setdefault(edge.parent, []).append(edge.child)
    linked = set(parents_of) | set(children_of)
    lone = [key for key in nodes if key not in linked]
    left_out = ""
    if len(lone) > MAX_LONE_NODES:  # a tall column of unconnected boxes says nothing
        for key in lone:
            del nodes[key]
        left_out = (
            f'<p class="muted">{len(lone)} adapters without parents or children are left out '
            "of the graph; the table lists them.</p>"
        )
    if not nodes:
        return left_out
    columns: dict[int, list[GraphNode]] = {}
    for node in nodes.values():
        columns.setdefault(node.generation, []).append(node)
    rows = max(len(c) for c in columns.values())
    order: dict[str, float] = {}  # node key -> row, columns centred on the tallest

    def place(column: list[GraphNode]) -> None:
        order.update({n.key: (rows - len(column)) / 2 + i for i, n in enumerate(column)})

    for column in columns.values():
        column.sort(key=lambda n: (n.key not in linked, n.entry is None,
                                   n.entry.name if n.entry else n.label,
                                   n.entry.version if n.entry else 0))  # fmt: skip
        place(column)
    # Barycentre sweeps (Sugiyama's heuristic): sort each column by the mean row of its
    # neighbours in the column before it, downwards, upwards, downwards; fewer edges cross.
    gens = sorted(columns)
    down, up = (gens[1:], parents_of), (gens[-2::-1], children_of)
    for sweep, links in (down, up, down):
        for gen in sweep:
            column = columns[gen]
            for node in column:
                near = [order[k] for k in links.get(node.key, [])]
                node.y = sum(near) / len(near) if near else order[node.key]
            column.sort(key=lambda n: (n.key not in linked, n.y))  # lone entries go last
            place(column)
    pitch = NODE_H + GAP_Y
    for gen, column in columns.items():
        offset = (rows - len(column)) * pitch / 2
        for i, node in enumerate(column):
            node.x = MARGIN + gen * (NODE_W + GAP_X)
            node.y = MARGIN + offset + i * pitch
    width = MARGIN * 2 + (max(columns) + 1) * NODE_W + max(columns) * GAP_X
    height = MARGIN * 2 + rows * pitch - GAP_Y
    out = [
        f'<svg class="lineage" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'height="{height:.0f}" role="img" aria-label="lineage graph" '
        'xmlns="http://www.w3.org/2000/svg">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path class="arrowhead" '
        'd="M0 0 L10 5 L0 10 z"/></marker></defs>',
    ]
    outgoing: dict[str, list[GraphEdge]] = {}
    incoming: dict[str, list[GraphEdge]] = {}
    for edge in edges:
        outgoing.setdefault(edge.parent, []).append(edge)
        incoming.setdefault(edge.child, []).append(edge)
    for group in (*outgoing.values(), *incoming.values()):  # top to bottom, as the nodes are
        group.sort(key=lambda e: (nodes[e.parent].y, nodes[e.child].y))

    def spread(group: list[GraphEdge], edge: GraphEdge) -> float:
        return NODE_H * (group.index(edge) + 1) / (len(group) + 1)

    for edge in edges:
        a, b = nodes[edge.parent], nodes[edge.child]
        x1, y1 = a.x + NODE_W, a.y + spread(outgoing[edge.parent], edge)
        x2, y2 = b.x, b.y + spread(incoming[edge.child], edge)
        if b.generation <= a.generation:  # only within a cycle: draw a loop under the nodes
            x1, x2 = a.x + NODE_W / 2, b.x + NODE_W / 2
            y1, y2 = a.y + NODE_H, b.y + NODE_H
            d = f"M{x1:.1f} {y1:.1f} C{x1:.1f} {y1 + 30:.1f} {x2:.1f} {y2 + 30:.1f} {x2:.1f} {y2:.1f}"
        else:
            bend = (x2 - x1) / 2
            d = (
                f"M{x1:.1f} {y1:.1f} C{x1 + bend:.1f} {y1:.1f} {x2 - bend:.1f} {y2:.1f} "
                f"{x2:.1f} {y2:.1f}"
            )
        tip = f"{a.label} → {b.label}" + (f" (weight {fmt(edge.weight)})" if edge.weight else "")
        out.append(
            f'<path class="edge {edge.kind}" d="{d}" marker-end="url(#arrow)">'
            f"<title>{esc(tip)}</title></path>"
        )
        if edge.weight is not None:
            mid_x, mid_y = (x1 + x2) / 2, (y1 + y2) / 2  # the curve's midpoint, by symmetry
            out.append(
                f'<text class="weight" x="{mid_x:.1f}" y="{mid_y + 4:.1f}" text-anchor="middle">'
                f"×{fmt(edge.weight)}</text>"
            )
    for node in nodes.values():
        label = node.label if len(node.label) <= 26 else node.label[:25] + "…"
        full = node.title or node.label
        kind = "entry " + (node.entry.task or "other") if node.entry else "external"
        box = (
            f'<rect x="{node.x:.1f}" y="{node.y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text class="node-label" x="{node.x + 10:.1f}" y="{node.y + 18:.1f}">{esc(label)}</text>'
            f'<text class="node-detail" x="{node.x + 10:.1f}" y="{node.y + 34:.1f}">'
            f"{esc(node.detail)}</text><title>{esc(full)}</title>"
        )
        if node.entry is not None:
            box = f'<a href="#{anchor(node.entry)}">{box}</a>'
        out.append(f'<g class="node {esc(kind)}" data-key="{esc(node.key)}">{box}</g>')
    out.append("</svg>")
    note = (
        ""
        if edges
        else '<p class="muted">No merges or imports with recorded parents yet: '
        "every adapter is a root.</p>"
    )
    legend = (
        '<p class="legend muted"><span><i class="sw node-causal"></i>causal-lm</span>'
        '<span><i class="sw node-cls"></i>seq-cls</span>'
        '<span><i class="sw node-ext"></i>source outside the registry</span>'
        "<span>arrows run parent → child; columns are generations</span></p>"
    )
    return f'{note}<div class="scroll">{"".join(out)}</div>{legend}{left_out}'


CSS = f"""
:root {{ --ink:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --card:#fff;
  --accent:#2563eb; --good:#15803d; --bad:#b91c1c; }}
* {{ box-sizing:border-box; }}
body {{ margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }}
main {{ max-width:1240px; margin:0 auto; padding:24px 24px 48px; }}
header h1 {{ margin:0 0 4px; font-size:24px; }}
header p {{ margin:2px 0; }}
h2 {{ font-size:18px; margin:32px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }}
h3 {{ font-size:16px; margin:0 0 6px; }}
a {{ color:var(--accent); text-decoration:none; }}
a:hover {{ text-decoration:underline; }}
code, .fp, pre {{ font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace; font-size:12px; }}
.muted {{ color:var(--muted); }}
.good {{ color:var(--good); font-weight:600; }}
.bad {{ color:var(--bad); font-weight:600; }}
table {{ border-collapse:collapse; }}
table.adapters {{ width:100%; background:var(--card); border:1px solid var(--line);
  border-radius:8px; overflow:hidden; }}
.adapters th, .adapters td {{ padding:7px 10px; text-align:left; vertical-align:top;
  border-bottom:1px solid var(--line); }}
.adapters thead th {{ background:#f1f5f9; font-size:12px; text-transform:uppercase;
  letter-spacing:.03em; color:#475569; }}
.adapters tbody tr:nth-child(even) {{ background:#fbfdff; }}
.adapters tbody tr:hover {{ background:#eff6ff; }}
th.num, td.num {{ text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }}
.desc {{ color:var(--muted); font-size:12px; max-width:280px; }}
.fp {{ color:var(--muted); font-size:11px; white-space:nowrap; }}
.adapters td.nowrap {{ white-space:nowrap; }}
.tag {{ display:inline-block; padding:0 7px; margin:1px 3px 1px 0; border-radius:10px;
  background:#e0e7ff; color:#3730a3; font-size:12px; font-weight:500; }}
.card {{ background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:16px 18px; margin:0 0 16px; }}
.card .description {{ margin:0 0 10px; color:#334155; white-space:pre-wrap; }}
.card-grid {{ display:grid; grid-template-columns:minmax(0,1fr) minmax(0,580px); gap:20px; }}
@media (max-width:960px) {{ .card-grid {{ grid-template-columns:1fr; }} }}
dl.facts {{ display:grid; grid-template-columns:max-content 1fr; gap:3px 14px; margin:0 0 12px; }}
dl.facts dt {{ color:var(--muted); }}
dl.facts dd {{ margin:0; overflow-wrap:anywhere; }}
table.metrics {{ min-width:320px; margin:4px 0 10px; }}
.metrics th, .metrics td {{ padding:3px 10px 3px 0; border-bottom:1px solid var(--line);
  text-align:left; }}
.metrics th {{ font-size:12px; color:var(--muted); font-weight:500; }}
details {{ margin:4px 0; }}
summary {{ cursor:pointer; color:#475569; }}
pre {{ background:#f1f5f9; padding:8px 10px; border-radius:6px; overflow:auto; max-height:260px; }}
figure {{ margin:0; }}
figcaption {{ font-size:12px; color:#475569; }}
figcaption span, .legend span {{ margin-right:14px; white-space:nowrap; }}
.sw {{ display:inline-block; width:14px; height:3px; margin-right:5px; vertical-align:middle; }}
.sw.train {{ background:{TRAIN_COLOR}; }}
.sw.eval {{ background:{EVAL_COLOR}; }}
.sw.base {{ background:repeating-linear-gradient(90deg,{BASE_COLOR} 0 4px,transparent 4px 7px); }}
.sw.node-causal, .sw.node-cls, .sw.node-ext {{ height:12px; border-radius:3px; }}
.sw.node-causal {{ background:#dbeafe; border:1px solid #60a5fa; }}
.sw.node-cls {{ background:#dcfce7; border:1px solid #4ade80; }}
.sw.node-ext {{ background:#fff; border:1px dashed #94a3b8; }}
svg text {{ font-family:system-ui,"DejaVu Sans",sans-serif; }}
.chart {{ max-width:100%; height:auto; background:#fff; }}
.chart .grid {{ stroke:#eef2f7; }}
.chart .axis {{ stroke:#94a3b8; }}
.chart .tick {{ font-size:10px; fill:var(--muted); }}
.chart .label {{ font-size:11px; fill:#475569; }}
.loss-train {{ fill:none; stroke:{TRAIN_COLOR}; stroke-width:1.8; stroke-linejoin:round; }}
.loss-eval {{ fill:none; stroke:{EVAL_COLOR}; stroke-width:1.2; stroke-dasharray:2 3; }}
.loss-eval-point {{ fill:{EVAL_COLOR}; stroke:#fff; stroke-width:1; }}
.loss-base {{ stroke:{BASE_COLOR}; stroke-width:1.3; stroke-dasharray:6 4; }}
.nocurve {{ padding:18px; border:1px dashed var(--line); border-radius:6px; text-align:center; }}
table.confusion {{ margin:12px 0 4px; font-size:12px; }}
.matrices {{ display:flex; flex-wrap:wrap; gap:8px 28px; align-items:flex-start; }}
.confusion caption {{ text-align:left; padding-bottom:4px; font-weight:600; }}
.confusion caption span {{ display:block; font-weight:400; font-size:11px; }}
.confusion th {{ padding:3px 8px; color:#475569; font-weight:500; max-width:120px;
  overflow-wrap:anywhere; }}
.confusion .corner {{ color:var(--muted); font-size:11px; }}
.confusion td {{ min-width:44px; padding:5px 8px; text-align:center;
  font-variant-numeric:tabular-nums; border:1px solid #fff; }}
.confusion td.diag {{ font-weight:700; }}
.confusion td.light {{ color:#fff; }}
.scroll {{ overflow-x:auto; background:var(--card); border:1px solid var(--line);
  border-radius:8px; padding:8px; }}
.lineage .node rect {{ fill:#f1f5f9; stroke:#94a3b8; stroke-width:1; }}
.lineage .node.causal-lm rect {{ fill:#dbeafe; stroke:#60a5fa; }}
.lineage .node.seq-cls rect {{ fill:#dcfce7; stroke:#4ade80; }}
.lineage .node.external rect {{ fill:#fff; stroke-dasharray:4 3; }}
.lineage .node a:hover rect {{ stroke:var(--accent); stroke-width:2; }}
.lineage .node-label {{ font-size:12.5px; font-weight:600; fill:var(--ink); }}
.lineage .node-detail {{ font-size:11px; fill:var(--muted); }}
.lineage .edge {{ fill:none; stroke:#64748b; stroke-width:1.4; }}
.lineage .edge.source {{ stroke:#94a3b8; stroke-dasharray:4 3; }}
.lineage .arrowhead {{ fill:#64748b; }}
.lineage .weight {{ font-size:10.5px; fill:#334155; font-weight:600; paint-order:stroke;
  stroke:#fff; stroke-width:3px; stroke-linejoin:round; }}
.legend {{ font-size:12px; margin:6px 0 0; }}
.empty {{ padding:40px; text-align:center; background:var(--card); border:1px dashed var(--line);
  border-radius:8px; }}
"""
