"""Loss curves of registry entries: the series read from `loss_history`, and a PNG of them.

`loss_series` is shared with the HTML report (which draws its own SVG); `plot_loss` draws with
matplotlib's Agg backend, imported only when called so the registry stays light to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from adaptory.registry.entry import Entry
from adaptory.registry.errors import BadInput, ConfigError

TRAIN_COLOR = "#2563eb"
EVAL_COLOR = "#ea580c"
BASE_COLOR = "#6b7280"


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


def plot_loss(entry: Entry, path: Path) -> Path:
    """Write a PNG (or .svg/.pdf by suffix) of the entry's loss against step; return the path.

    Training loss is a line, eval loss points are markers, and the plain base's eval loss (when
    `metrics["base"]["eval_loss"]` is known) is a dashed line to beat. Entries made by merging or
    importing have no loss history: ConfigError.
    """
    series = loss_series(entry)
    if not series:
        raise ConfigError(
            f"{entry.ref} has no loss history to plot",
            hint="merged and imported adapters have none; `adaptory show` lists their metrics",
        )
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, safe in threads

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") if path.suffix.lower() in (".svg", ".pdf") else "png"
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if series.train:
        steps, values = zip(*series.train, strict=True)
        ax.plot(steps, values, color=TRAIN_COLOR, linewidth=1.6, label="training loss")
    if series.eval:
        steps, values = zip(*series.eval, strict=True)
        ax.plot(steps, values, color=EVAL_COLOR, linewidth=1.2, linestyle=":", marker="o",
                markersize=5, label="eval loss")  # fmt: skip
    if series.base_eval_loss is not None:
        ax.axhline(series.base_eval_loss, color=BASE_COLOR, linewidth=1.2, linestyle="--",
                   label=f"base eval loss ({series.base_eval_loss:.4g})")  # fmt: skip
    ax.set_title(f"{entry.ref} — loss", loc="left", fontsize=12)
    subtitle = " · ".join(str(v) for v in (entry.method, entry.task, entry.base_model) if v)
    if subtitle:
        ax.set_title(subtitle, loc="right", fontsize=9, color=BASE_COLOR)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
