"""Exporting an entry as a plain PEFT folder (what PEFT, vLLM and LoRAX load) with a model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from adaptory.registry.entry import Entry
from adaptory.registry.errors import BadInput, StorageError
from adaptory.registry.registry import Registry

CARD_FILE = "README.md"


LABELS_FILE = "labels.json"


def export_peft(
    registry: Registry,
    entry: Entry,
    out: Path,
    *,
    force: bool = False,
    base_hub_id: str | None = None,
) -> Path:
    """Write the entry's verified files plus a README.md model card into `out`; return `out`.
    A classifier also gets labels.json (id2label and label2id, in the head's order).

    `base_hub_id` is the Hub id of the base when the entry names it by a local name (the
    built-in `minilm`): the card's `base_model` must be an id others can load. An existing
    non-empty `out` is refused unless `force`; with `force` the adapter's files are overwritten
    and other files in `out` are left alone.
    """
    out = Path(out)
    _check_target(out, force)
    blob = registry.files(entry, verify=True)
    original_card = (
        (blob / CARD_FILE).read_text(encoding="utf-8") if (blob / CARD_FILE).is_file() else None
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(entry.files):
            if name != CARD_FILE:
                _copy_writable(blob / name, out / name)
        (out / CARD_FILE).write_text(
            model_card(entry, original_card, base_hub_id=base_hub_id), encoding="utf-8"
        )
        labels = entry_labels(entry)
        if labels:
            label_map = {
                "id2label": {str(i): label for i, label in enumerate(labels)},
                "label2id": {label: i for i, label in enumerate(labels)},
            }
            (out / LABELS_FILE).write_text(json.dumps(label_map, indent=2) + "\n", encoding="utf-8")
            os.chmod(out / LABELS_FILE, 0o644)
    except OSError as exc:
        raise StorageError(f"writing {out} failed: {exc.strerror or exc}") from exc
    return out


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(
            f"{out} exists and is not empty",
            hint="pass --force to overwrite, or choose another --out",
        )


def _copy_writable(src: Path, dst: Path) -> None:
    """Copy a (read-only) stored file into the export as an ordinary 0644 file."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def card_tags(entry: Entry) -> list[str]:
    """The model card's tags: adaptory, the method, the task, then the entry's own tags."""
    tags = ["adaptory", entry.method, entry.task, *entry.tags]
    return list(dict.fromkeys(t for t in tags if t))


def entry_labels(entry: Entry) -> list[str] | None:
    """A classifier's class names in the order of its head's outputs, if it records them."""
    labels = (entry.extra or {}).get("labels")
    if entry.task == "seq-cls" and isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    return None


def model_card(entry: Entry, original: str | None = None, *, base_hub_id: str | None = None) -> str:
    """A Hugging Face style README.md: YAML front matter, then what the entry records."""
    front = ["---"]
    base_id = base_hub_id or entry.base_model
    if base_id:
        front.append(f"base_model: {json.dumps(base_id)}")
    front.append("library_name: peft")
    front.append("tags:")
    front += [f"- {json.dumps(tag)}" for tag in card_tags(entry)]
    front.append("---")
    body = [
        "",
        f"# {entry.name} (version {entry.version})",
        "",
        entry.description
        or f"A {entry.method or 'PEFT'} adapter exported from the Adaptory registry.",
        "",
        f"- reference: `{entry.ref}`",
        f"- digest: `sha256:{entry.digest}`",
        f"- method: {entry.method or 'unknown'}; task: {entry.task or 'unknown'}",
        f"- base model: {entry.base_model or 'unknown'}"
        + (f" (`{base_hub_id}`)" if base_hub_id and base_hub_id != entry.base_model else ""),
        f"- created: {entry.created_at}",
    ]
    body += _section("Metrics", _metric_lines(entry.metrics))
    body += _section(
        "Training", [f"- {k}: {_short(v)}" for k, v in sorted(entry.training_config.items())]
    )
    body += _section("Loss", loss_summary_lines(entry.loss_history))
    body += _section("Dataset", [f"- {k}: {_short(v)}" for k, v in sorted(entry.dataset.items())])
    body += _section("Lineage", [f"- {_short(parent)}" for parent in entry.parents])
    labels = entry_labels(entry)
    if labels:
        body += _section("Labels", [f"- {i}: {label}" for i, label in enumerate(labels)])
    body += _section("Usage", _usage(entry, base_id, labels))
    if original:
        body += _section("Original README", [_strip_front_matter(original).strip()])
    return "\n".join(front + body) + "\n"


def _usage(entry: Entry, base_id: str | None, labels: list[str] | None) -> list[str]:
    base = json.dumps(base_id or "BASE_MODEL")
    if entry.task == "seq-cls":
        lines = [
            "```python",
            "import json",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification",
            "",
            f'labels = json.load(open("{LABELS_FILE}"))' if labels else "labels = None",
            "base_model = AutoModelForSequenceClassification.from_pretrained(",
            f"    {base},",
        ]
        if labels:
            lines += [
                f"    num_labels={len(labels)},",
                '    id2label={int(i): l for i, l in labels["id2label"].items()},',
                '    label2id=labels["label2id"],',
            ]
        return lines + [
            ")",
            "model = PeftModel.from_pretrained(base_model, path_to_this_folder)",
            "```",
        ]
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base_model = AutoModelForCausalLM.from_pretrained({base})",
        "model = PeftModel.from_pretrained(base_model, path_to_this_folder)",
        "```",
    ]


def loss_summary(loss_history: list) -> dict | None:
    """First, last and minimum loss of a history of numbers or {"loss": ...} records."""
    values = [v for v in (_loss_value(item) for item in loss_history) if v is not None]
    if not values:
        return None
    return {"points": len(values), "first": values[0], "last": values[-1], "min": min(values)}


def loss_summary_lines(loss_history: list) -> list[str]:
    summary = loss_summary(loss_history)
    if not summary:
        return []
    return [
        f"- {summary['points']} points: first {summary['first']:.4g}, "
        f"last {summary['last']:.4g}, min {summary['min']:.4g}"
    ]


def _loss_value(item: object) -> float | None:
    if isinstance(item, dict):
        item = item.get("loss", item.get("train_loss"))
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    return None


def _metric_lines(metrics: dict) -> list[str]:
    return [f"- {k}: {_short(v)}" for k, v in sorted(metrics.items()) if k != "confusion_matrix"]


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", f"## {title}", "", *lines] if lines else []


def _short(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _strip_front_matter(text: str) -> str:
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4 :]
    return text
