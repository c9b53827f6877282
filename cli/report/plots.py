"""Loss curves of registry entries: the series read from `loss_history`, drawn by matplotlib.

One drawing (`draw_loss`) serves both pictures: the inline SVG charts of the HTML report
(`loss_chart_svg`) and the file `adaptory show REF --plot` writes (`plot_loss`). Figures are bare
`Figure`s on an Agg canvas (no pyplot state, nothing global switched), and SVG output is made
deterministic: fixed id salt, no date. matplotlib is imported only when something is drawn.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adaptory.registry.entry import Entry
from adaptory.registry.errors import BadInput, ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRAIN_COLOR = "#2563eb"
EVAL_COLOR = "#ea580c"
BASE_COLOR = "#6b7280"
GRID_COLOR = "#e5e7eb"
MAX_CURVE_POINTS = 600  # per series in the page's charts; more only adds bytes
CHART_SIZE = (560, 250)  # the page's charts, in SVG user units (matplotlib's 72 per inch)
# matplotlib salts the ids of clip paths and markers with a random uuid unless this is set.
SVG_HASH_SALT = "adaptory-report"
SVG_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


@dataclass(frozen=True)
class LossSeries:
    """Training loss and eval loss as (step, value) points, plus the plain base's eval loss."""

    train: list[tuple[float, float]] = field(default_factory=list)
    eval: list[tuple[float, float]] = field(default_factory=list)
    base_eval_loss: float | None = None

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def number(value: object) -> float | None:
    """`value` as a finite float, or None for anything else (bools, strings, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def loss_series(entry: Entry) -> LossSeries:
    """The entry's loss points; history items are numbers or dicts with loss/eval_loss and step."""
    train, evals = [], []
    for index, item in enumerate(entry.loss_history or []):
        if isinstance(item, dict):
            step = number(item.get("step"))
            step = float(index) if step is None else step
            loss = number(item.get("loss", item.get("train_loss")))
            if loss is not None:
                train.append((step, loss))
            eval_loss = number(item.get("eval_loss"))
            if eval_loss is not None:
                evals.append((step, eval_loss))
        elif (loss := number(item)) is not None:
            train.append((float(index), loss))
    base = entry.metrics.get("base") if isinstance(entry.metrics, dict) else None
    base_eval_loss = number(base.get("eval_loss")) if isinstance(base, dict) else None
    return LossSeries(train=train, eval=evals, base_eval_loss=base_eval_loss)


def thin(points: list[tuple[float, float]], limit: int = MAX_CURVE_POINTS) -> list:
    """At most `limit` evenly spaced points, always keeping the last one."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


# drawing ---------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A bare figure of `width` x `height` points on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 72, height / 72), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw_loss(ax: Axes, series: LossSeries) -> None:
    """Training loss as a line, eval loss as dotted markers, the base's eval loss dashed.

    Each series' artist carries a gid (`loss-train`, `loss-eval`, `loss-base`), which names its
    group in SVG output.
    """
    if series.train:
        steps, values = zip(*series.train, strict=True)
        ax.plot(steps, values, color=TRAIN_COLOR, linewidth=1.6, gid="loss-train",
                label="training loss")  # fmt: skip
    if series.eval:
        steps, values = zip(*series.eval, strict=True)
        ax.plot(steps, values, color=EVAL_COLOR, linewidth=1.2, linestyle=":", marker="o",
                markersize=6, markeredgecolor="white", markeredgewidth=0.8, gid="loss-eval",
                label="eval loss")  # fmt: skip
    if series.base_eval_loss is not None:
        ax.axhline(series.base_eval_loss, color=BASE_COLOR, linewidth=1.2, linestyle="--",
                   gid="loss-base", label=f"base eval loss ({series.base_eval_loss:.4g})")  # fmt: skip
    ax.set_xlabel("step", color="#475569")
    ax.set_ylabel("loss", color="#475569")
    ax.tick_params(colors="#64748b", labelsize=9)
    ax.grid(True, color=GRID_COLOR, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.spines[["left", "bottom"]].set_color("#94a3b8")


def svg_text(fig: Figure, *, fonttype: str = "path") -> str:
    """The figure as an SVG document string; the same figure gives the same bytes every time."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT, "svg.fonttype": fonttype}):
        fig.savefig(buffer, format="svg", metadata=SVG_NO_METADATA)
    return buffer.getvalue()


def loss_chart_svg(series: LossSeries, id_prefix: str) -> str:
    """The page's chart of `series`: an `<svg>` element to inline in HTML.

    Every id in it (and every reference to one) starts with `id_prefix`: matplotlib numbers its
    groups from 1 in each figure, so two charts on one page would otherwise share ids. Text stays
    text (`svg.fonttype` none), drawn in the page's fonts. No user text goes into the chart.
    """
    fig = new_figure(*CHART_SIZE)
    draw_loss(fig.add_subplot(), LossSeries(thin(series.train), thin(series.eval),
                                            series.base_eval_loss))  # fmt: skip
    svg = svg_text(fig, fonttype="none")
    svg = svg[svg.index("<svg") :]  # no XML declaration or DOCTYPE inside HTML
    return re.sub(r'(\bid="|url\(#|xlink:href="#)', rf"\g<1>{id_prefix}", svg).strip()


def plot_loss(entry: Entry, path: Path) -> Path:
    """Write a PNG (or .svg/.pdf by suffix) of the entry's loss against step; return the path.

    The drawing is the report's (`draw_loss`) with a title and a legend. Entries made by merging
    or importing have no loss history: ConfigError. SVG and PDF files carry no date, so the same
    entry gives the same file.
    """
    series = loss_series(entry)
    if not series:
        raise ConfigError(
            f"{entry.ref} has no loss history to plot",
            hint="merged and imported adapters have none; `adaptory show` lists their metrics",
        )
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = suffix.lstrip(".") if suffix in (".svg", ".pdf") else "png"
    fig = new_figure(576, 324)
    ax = fig.add_subplot()
    draw_loss(ax, series)
    # parse_math off: a `$` in a ref or a base model's name is text, not TeX.
    ax.set_title(f"{entry.ref} — loss", loc="left", fontsize=12, parse_math=False)
    subtitle = " · ".join(str(v) for v in (entry.method, entry.task, entry.base_model) if v)
    if subtitle:
        ax.set_title(subtitle, loc="right", fontsize=9, color=BASE_COLOR, parse_math=False)
    ax.legend(frameon=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "svg":
            path.write_text(svg_text(fig), encoding="utf-8")
        else:
            metadata = {"CreationDate": None} if fmt == "pdf" else None
            fig.savefig(path, format=fmt, metadata=metadata)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
