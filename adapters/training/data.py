"""Training data: read JSONL / CSV / Parquet, validate every row, tokenize with loss masks.

Every problem is found before training starts and raised as one DataError naming the file, the
1-based line (the row number for Parquet) and the field. Formats:

- `text`               {"text"}                      causal LM, loss on every token (+ eos)
- `prompt-completion`  {"prompt", "completion"}      causal LM, loss on the completion only
- `chat`               {"messages": [{role, content}]} causal LM via the tokenizer's chat
                       template, loss on the assistant turns only
- `classification`     {"text", "label"}             sequence classification (str or int labels)

Kept as one module (~520 lines): reading, validating and tokenizing share one row-numbered error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptory.registry.errors import ConfigError, DataError

FORMATS = ("text", "prompt-completion", "chat", "classification", "alpaca", "sharegpt")
FORMAT_ALIASES = {
    "messages": "chat",
    "prompt_completion": "prompt-completion",
    "cls": "classification",
}
FORMAT_TASK = {
    "text": "causal-lm",
    "prompt-completion": "causal-lm",
    "chat": "causal-lm",
    "classification": "seq-cls",
    "alpaca": "causal-lm",  # instruction (+ input) -> output, trained as a two-turn chat
    "sharegpt": "causal-lm",  # conversations of {from, value}, trained as a chat
}
# The columns each format reads; --columns maps them to a file's own names.
COLUMNS = ("text", "label", "prompt", "completion", "messages", "instruction", "input", "output",
           "conversations")  # fmt: skip
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}  # fmt: skip
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100

# Chat templates by name (`--chat-template NAME`), for data in chat layouts on a base whose own
# template is missing or not the one wanted. Each renders a conversation prefix by prefix (what
# loss masking needs) and ends a turn with a marker the model learns to emit.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}


def chat_template_text(value: str) -> str:
    """The Jinja text of `--chat-template VALUE`: a name in CHAT_TEMPLATES or a file."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"chat template '{value}' is neither a known name nor a file",
            hint=f"names: {', '.join(CHAT_TEMPLATES)}; or a path to a Jinja file",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"chat template file {path} cannot be read: {exc}") from None
    if "messages" not in text:
        raise ConfigError(
            f"{path} does not look like a chat template (it never reads `messages`)",
            hint="a Jinja template looping over messages, as in a tokenizer's chat_template",
        )
    return text


# Bumped when tokenization or masking changes, so dataset fingerprints never silently collide.
PROMPT_FORMAT_VERSION = 1


@dataclass
class Example:
    """One tokenized row. `label` is the class index (seq-cls); `labels` the per-token targets."""

    line: int
    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    prompt: str | None = None  # prompt-completion: for exact-match generation
    completion: str | None = None


@dataclass
class Dataset:
    """A validated, tokenized data file (or part of one after a split)."""

    file: Path
    format: str
    task: str
    examples: list[Example]
    fingerprint: str
    labels: list[str] | None = None  # seq-cls label names, index = class id
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# --- reading ----------------------------------------------------------------------------------


DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


def is_hub_source(source: str | Path) -> bool:
    """A data source that is no local path but reads as NAME or ORG/NAME[:SPLIT] (a hub dataset)."""
    path = Path(source)
    if path.exists() or path.suffix.lower() in DATA_SUFFIXES:  # a mistyped file stays a file
        return False
    return bool(_HUB_NAME.match(str(source)))


def source_label(source: str | Path) -> str:
    """How a data source is recorded with an entry: the absolute path, or the hub name."""
    return str(source) if is_hub_source(source) else str(Path(source).resolve())


def _read_hub(name: str) -> list[tuple[int, dict]]:
    """Rows of a `datasets` hub dataset (row numbers stand in for lines); needs a network."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{name}' is not a file here, and hub datasets need the `datasets` package",
            hint="pip install datasets (where a network exists), or pass a local data file",
        ) from None
    repo, _, split = name.partition(":")
    try:
        table = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # offline, unknown name, no such split
        raise DataError(
            f"hub dataset '{repo}' (split {split or 'train'}) is not available here: "
            f"{type(exc).__name__}",
            hint="offline: save it where a network exists as .jsonl or .parquet and pass that",
        ) from None
    return [(i, dict(row)) for i, row in enumerate(table, start=1)]


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line, row) pairs of a .jsonl/.json/.csv/.tsv/.parquet file, or of a hub dataset
    (NAME or ORG/NAME[:SPLIT], when no such file exists); DataError on anything bad."""
    if is_hub_source(path):
        return _read_hub(str(path))
    path = Path(path)
    if not path.is_file():
        raise DataError("data file does not exist", file=path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(
                "not valid UTF-8 text", file=path, line=line, hint="save the file as UTF-8"
            ) from None
        if suffix in (".csv", ".tsv"):
            rows = _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".json", ".ndjson"):
            rows = _read_jsonl(path, text)
        else:
            raise DataError(
                f"unknown data file type '{suffix or path.name}'",
                file=path,
                hint="use .jsonl, .csv, .tsv or .parquet",
            )
    if not rows:
        raise DataError("the data file has no rows", file=path)
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", file=path, line=number) from None
        if not isinstance(row, dict):
            raise DataError("each line must be a JSON object", file=path, line=number)
        rows.append((number, row))
    return rows


def _read_csv(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    rows = []
    try:
        start = 2
        for row in reader:
            if None in row:
                raise DataError("more values than header columns", file=path, line=start)
            rows.append((start, {k: v for k, v in row.items() if k is not None}))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"invalid CSV ({exc})", file=path, line=reader.line_num) from None
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"unreadable Parquet file ({exc})", file=path) from None
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


# --- format detection & validation --------------------------------------------------------------


def normalize_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ConfigError(
            f"unknown data format '{fmt}'", hint=f"choose one of {', '.join(FORMATS)}"
        )
    return fmt


def parse_columns(spec: str | dict | None) -> dict[str, str] | None:
    """`text=sentence,label=priority` (or a TOML table) -> {"text": "sentence", ...}: which of
    the file's columns holds each column a format reads."""
    if spec is None or spec == {}:
        return None
    if isinstance(spec, str):
        pairs = [part.split("=", 1) for part in spec.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError(
                f"--columns '{spec}' is not a list of NAME=COLUMN",
                hint="e.g. --columns text=sentence,label=priority",
            )
        spec = {name.strip(): column.strip() for name, column in pairs}
    if not isinstance(spec, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in spec.items()
    ):
        raise ConfigError('columns must map names to column names, e.g. {text = "sentence"}')
    unknown = sorted(set(spec) - set(COLUMNS))
    if unknown:
        raise ConfigError(
            f"--columns names {', '.join(unknown)}, which no format reads",
            hint=f"map any of: {', '.join(COLUMNS)}",
        )
    return dict(spec)


def map_columns(
    rows: list[tuple[int, dict]], columns: dict[str, str] | None, path: Path
) -> list[tuple[int, dict]]:
    """Rows with the file's columns renamed as `columns` says (name -> the file's column)."""
    if not columns:
        return rows
    line, first = rows[0]
    for name, column in columns.items():
        if column not in first:
            raise DataError(
                f"no column '{column}' (given for '{name}' by --columns); "
                f"the columns are {sorted(first)}",
                file=path,
                line=line,
                field=column,
            )
    replaced = set(columns) | set(columns.values())  # a mapped column wins over a namesake
    renamed = []
    for line, row in rows:
        new = {k: v for k, v in row.items() if k not in replaced}
        new.update({name: row[column] for name, column in columns.items() if column in row})
        renamed.append((line, new))
    return renamed


def detect_format(rows: list[tuple[int, dict]], path: Path, task: str | None = None) -> str:
    """The format the columns of the first row say (a `task` of causal-lm ignores labels)."""
    line, first = rows[0]
    columns = set(first)
    if "messages" in columns:
        return "chat"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns or "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        if "label" in columns and task != "causal-lm":
            return "classification"
        return "text"
    raise DataError(
        f"cannot tell the data format from the columns {sorted(columns)}",
        file=path,
        line=line,
        hint="rows need 'text', 'text'+'label', 'prompt'+'completion', 'messages', "
        "'instruction'+'output' (alpaca) or 'conversations' (sharegpt); name your columns "
        "with --columns, e.g. --columns text=sentence,label=priority",
    )


def peek_format(
    path: Path, fmt: str | None = None, task: str | None = None, columns: dict | None = None
) -> tuple[str, str]:
    """(format, task) of a data file, for choosing the task before the base is loaded."""
    fmt = normalize_format(fmt)
    if fmt is None:
        fmt = detect_format(map_columns(read_rows(path), columns, Path(path)), Path(path), task)
    return fmt, task or FORMAT_TASK[fmt]


def _text_field(row: dict, name: str, path: Path, line: int, *, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise DataError("missing field", file=path, line=line, field=name)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(
            f"expected a string, got {type(value).__name__}", file=path, line=line, field=name
        )
    if not allow_empty and not value.strip():
        raise DataError("empty text", file=path, line=line, field=name)
    return value


def _label_value(row: dict, path: Path, line: int, csv_like: bool) -> str | int:
    if "label" not in row or row["label"] is None:
        raise DataError("missing field", file=path, line=line, field="label")
    value = row["label"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            f"a label must be a string or an integer, got {type(value).__name__}",
            file=path,
            line=line,
            field="label",
        )
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError("empty label", file=path, line=line, field="label")
        if csv_like and value.lstrip("-").isdigit():
            return int(value)  # CSV has no types: "1" is the integer label 1
    return value


def _json_list(value, field: str, what: str, path: Path, line: int) -> list:
    """A row's non-empty list field; CSV and Parquet may carry the list as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"not a JSON list of {what}", file=path, line=line, field=field
            ) from None
    if not isinstance(value, list) or not value:
        raise DataError(f"expected a non-empty list of {what}", file=path, line=line, field=field)
    return value


def _messages(row: dict, path: Path, line: int) -> list[dict]:
    if "messages" not in row or row["messages"] is None:
        raise DataError("missing field", file=path, line=line, field="messages")
    messages = _json_list(row["messages"], "messages", "messages", path, line)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError("each message must be an object", file=path, line=line, field=where)
        if msg.get("role") not in ROLES:
            raise DataError(
                f"role must be one of {', '.join(ROLES)}",
                file=path,
                line=line,
                field=f"{where}.role",
            )
        _text_field(msg, "content", path, line, allow_empty=msg["role"] != "assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            "no assistant message to learn from", file=path, line=line, field="messages"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _alpaca_messages(row: dict, path: Path, line: int) -> list[dict]:
    """An alpaca row as a two-turn chat: the instruction (and its input, when not empty) from
    the user, the output from the assistant."""
    instruction = _text_field(row, "instruction", path, line)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(
            f"expected a string, got {type(extra).__name__}", file=path, line=line, field="input"
        )
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    output = _text_field(row, "output", path, line)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt_messages(row: dict, path: Path, line: int) -> list[dict]:
    """A sharegpt row (`conversations`: [{"from": "human"|"gpt"|"system", "value": ...}]) as
    chat messages, checked with the chat rules."""
    turns = _json_list(row.get("conversations"), "conversations", "turns", path, line)
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError("each turn must be an object", file=path, line=line, field=where)
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"'from' must be one of {', '.join(SHAREGPT_ROLES)}",
                file=path,
                line=line,
                field=f"{where}.from",
            )
        role = SHAREGPT_ROLES[speaker]
        try:
            value = _text_field(turn, "value", path, line, allow_empty=role != "assistant")
        except DataError as exc:
            raise DataError(exc.detail, file=path, line=line, field=f"{where}.value") from None
        messages.append({"role": role, "content": value})
    try:
        return _messages({"messages": messages}, path, line)
    except DataError as exc:  # in the file's terms: conversations[i], not messages[i]
        field = (exc.field or "").replace("messages", "conversations", 1) or None
        raise DataError(exc.detail, file=path, line=line, field=field, hint=exc.hint) from None


# --- tokenization -------------------------------------------------------------------------------


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_example(
    tokenizer, messages: list[dict], path: Path, line: int
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and labels that keep only assistant tokens.

    Assistant spans are found by rendering the conversation prefix by prefix (the text before a
    turn with the generation prompt, then through the turn) and mapping characters to tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "this base's tokenizer has no chat template, so 'messages' data cannot be rendered",
            hint="use prompt/completion rows, or a base with a chat template",
        )

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render(messages[:i], generation_prompt=True)) if i else 0
        end = len(render(messages[: i + 1]))
        if not full.startswith(render(messages[: i + 1])):
            raise DataError(
                "the chat template does not render conversations prefix by prefix",
                file=path,
                line=line,
                field="messages",
            )
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if any(a >= s and b <= e and b > a for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def tokenize_rows(
    rows: list[tuple[int, dict]],
    *,
    path: Path,
    fmt: str,
    tokenizer,
    max_length: int,
    label_names: list[str] | None = None,
) -> tuple[list[Example], list[str] | None]:
    """Validate and tokenize rows; for classification also return the sorted label names."""
    path = Path(path)
    csv_like = path.suffix.lower() in (".csv", ".tsv")
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    if fmt == "classification":
        values = [(line, row, _label_value(row, path, line, csv_like)) for line, row in rows]
        kinds = {type(v) for _, _, v in values}
        if len(kinds) > 1:
            line = next(ln for ln, _, v in values if type(v) is not type(values[0][2]))
            raise DataError("labels mix strings and integers", file=path, line=line, field="label")
        if label_names is None:
            label_names = [str(v) for v in sorted({v for _, _, v in values})]
            if len(label_names) < 2:
                raise DataError(
                    f"classification needs at least two labels, found {label_names}",
                    file=path,
                    field="label",
                )
        index = {name: i for i, name in enumerate(label_names)}
        for line, row, value in values:
            text = _text_field(row, "text", path, line)
            if str(value) not in index:
                raise DataError(
                    f"unknown label '{value}' (known: {', '.join(label_names)})",
                    file=path,
                    line=line,
                    field="label",
                )
            ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            examples.append(Example(line=line, input_ids=ids, label=index[str(value)]))
        return examples, label_names

    for line, row in rows:
        if fmt == "text":
            ids = _encode(tokenizer, _text_field(row, "text", path, line), special=True) + [eos]
            labels = list(ids)
            prompt = completion = None
        elif fmt == "prompt-completion":
            prompt = _text_field(row, "prompt", path, line)
            completion = _text_field(row, "completion", path, line)
            p = _encode(tokenizer, prompt, special=True)
            c = _encode(tokenizer, completion, special=False) + [eos]
            ids, labels = p + c, [IGNORE] * len(p) + c
        else:
            to_messages = {"alpaca": _alpaca_messages, "sharegpt": _sharegpt_messages}
            messages = to_messages.get(fmt, _messages)(row, path, line)
            ids, labels = _chat_example(tokenizer, messages, path, line)
            prompt = completion = None
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            raise DataError(
                f"no tokens to learn from within max_length {max_length}",
                file=path,
                line=line,
                field={
                    "text": "text",
                    "prompt-completion": "prompt",
                    "chat": "messages",
                    "alpaca": "output",
                    "sharegpt": "conversations",
                }[fmt],  # fmt: skip
                hint="raise --max-length or shorten the row",
            )
        examples.append(
            Example(line=line, input_ids=ids, labels=labels, prompt=prompt, completion=completion)
        )
    return examples, None


def dataset_fingerprint(
    path: Path, fmt: str, tokenizer_fingerprint: str, max_length: int, rows: list | None = None
) -> str:
    digest = hashlib.sha256()
    if is_hub_source(path):  # no file to hash: hash the rows as read
        digest.update(json.dumps([r for _, r in rows or []], sort_keys=True, default=str).encode())
    else:
        digest.update(Path(path).read_bytes())
    digest.update(
        f"\0format:{fmt}|prompt-format:{PROMPT_FORMAT_VERSION}|max_length:{max_length}"
        f"|tokenizer:{tokenizer_fingerprint}".encode()
    )
    return digest.hexdigest()


def load_dataset(
    path: Path,
    *,
    tokenizer,
    task: str | None = None,
    fmt: str | None = None,
    max_length: int = 128,
    labels: list[str] | None = None,
    tokenizer_fingerprint: str = "",
    limit: int | None = None,
    columns: dict[str, str] | None = None,
) -> Dataset:
    """Read, validate and tokenize a data file. `labels` fixes the label set (an eval file);
    `columns` renames the file's columns to the ones the format reads."""
    path = Path(path)
    rows = map_columns(read_rows(path), columns, path)
    fmt = normalize_format(fmt) or detect_format(rows, path, task)
    fmt_task = FORMAT_TASK[fmt]
    if task is not None and task != fmt_task:
        raise ConfigError(
            f"{path}: '{fmt}' data is for {fmt_task}, not {task}",
            hint="pass a matching --task or --format",
        )
    if limit is not None:
        rows = rows[:limit]
    try:
        examples, names = tokenize_rows(
            rows, path=path, fmt=fmt, tokenizer=tokenizer, max_length=max_length, label_names=labels
        )
    except DataError as exc:
        raise _in_file_terms(exc, columns) from None
    return Dataset(
        file=path,
        format=fmt,
        task=fmt_task,
        examples=examples,
        fingerprint=dataset_fingerprint(path, fmt, tokenizer_fingerprint, max_length, rows),
        labels=names,
    )


def _in_file_terms(exc: DataError, columns: dict[str, str] | None) -> DataError:
    """The error with its field named as the file names it (`priority`, not `label`)."""
    root = re.match(r"[A-Za-z_]+", exc.field or "")
    if not columns or root is None or root.group() not in columns:
        return exc
    field = columns[root.group()] + exc.field[root.end() :]
    return DataError(exc.detail, file=exc.file, line=exc.line, field=field, hint=exc.hint)


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded held-out split: (train, eval), each non-empty."""
    if not 0 < fraction < 1:
        raise ConfigError(f"eval split must be between 0 and 1, got {fraction}")
    n = len(dataset)
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise DataError(
            f"{n} rows are too few to hold out {fraction:.0%} for evaluation",
            file=dataset.file,
            hint="add rows, or pass --eval-data FILE",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(dataset.examples) if i not in held]
    evals = [e for i, e in enumerate(dataset.examples) if i in held]
    return replace(dataset, examples=train), replace(dataset, examples=evals)


# --- several files, mixed ------------------------------------------------------------------------


def parse_source(text: str) -> tuple[str, float]:
    """`FILE` or `FILE@WEIGHT` (weight > 0: how many times each row counts; 0.5 keeps a seeded
    half of the rows, 2 repeats every row) -> (file, weight)."""
    stem, at, weight = str(text).rpartition("@")
    if not at or "/" in weight or "\\" in weight:
        return str(text), 1.0
    try:
        value = float(weight)
    except ValueError:
        return str(text), 1.0  # an @ that is part of the name
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(
            f"data weight must be a positive number: '{text}'", hint="FILE@2, FILE@0.5"
        )
    return stem, value


def mix_datasets(parts: list[tuple[Dataset, float]], seed: int) -> Dataset:
    """One dataset from several, each row counted `weight` times: whole copies, then a seeded
    sample of the fractional part. Formats may differ; the task must not."""
    tasks = {d.task for d, _ in parts}
    if len(tasks) > 1:
        names = ", ".join(f"{d.file} ({d.task})" for d, _ in parts)
        raise ConfigError(f"mixed data files must share a task: {names}")
    rng = random.Random(seed)
    examples: list[Example] = []
    for dataset, weight in parts:
        whole, fraction = int(weight), weight - int(weight)
        examples += list(dataset.examples) * whole
        examples += rng.sample(list(dataset.examples), round(fraction * len(dataset)))
    digest = hashlib.sha256(
        "\n".join(f"{d.fingerprint}@{w!r}" for d, w in parts).encode()
    ).hexdigest()
    first = parts[0][0]
    formats = {d.format for d, _ in parts}
    return replace(
        first,
        examples=examples,
        fingerprint=digest,
        extra={**first.extra, "formats": sorted(formats)},
    )


# --- batching -----------------------------------------------------------------------------------


def collate(examples: list[Example], *, pad_id: int, task: str) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding for causal LM)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "seq-cls":
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    return batch


def batches(examples: list[Example], batch_size: int):
    for i in range(0, len(examples), batch_size):
        yield examples[i : i + batch_size]
