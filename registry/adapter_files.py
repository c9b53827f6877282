"""Validating a PEFT adapter folder before anything is stored.

A folder is accepted only if PEFT and Adaptory's runtime could load it and nothing in it could
run code or reach outside it: `adapter_config.json` whose every field has the type the installed
PEFT's config class declares (and which that class accepts), `adapter_model.safetensors` whose
header is consistent with the file, within size limits, holding finite floating-point tensors
whose shapes fit the config (LoRA ranks, prefix and prompt sizes, IA3 vectors), no pickle files,
no symlinks, no subfolders, UTF-8 names. The safetensors header is parsed here by hand so that a
lying file is refused without handing it to a loader. The runtime runs the same checks on what it
loads (adapters stored before a check existed), then its own checks against the base.
Kept as one module (~780 lines): the validation rules of one folder format read best together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from adaptory.registry.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The chat template an adapter was trained with (`train --chat-template`), named as transformers
# names a tokenizer's; serving and evaluation render that adapter's chats with it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Limits, generous for real adapters (docs/REGISTRY.md, "What `import` accepts"): a LoRA on every
# linear layer of a 70B model has ~1,100 tensors and a ~150 KB header; LoRA on every expert of a
# large MoE model tens of thousands. Each is checked before the JSON is parsed.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_JSON_DEPTH = 32  # PEFT configs nest 3 deep (rank_pattern, loftq_config, ...)
MAX_TENSOR_DIMS = 8
MAX_LORA_RANK = 4096
MAX_VIRTUAL_TOKENS = 65_536
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_TOKEN_DIM = 1 << 20

# bits per element; sub-byte float formats are packed
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# The dtypes adapter weights may have, with the bits of their exponent field: a value is NaN or
# infinite exactly when all of them are set. Integers and bools would be cast to garbage weights.
FLOAT_EXPONENT_MASK = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}
_CHUNK = 4 * 1024 * 1024  # a multiple of every element size

_PICKLE_HINT = (
    "pickle files are never loaded; convert to safetensors, e.g. "
    "PeftModel.from_pretrained(base, folder).save_pretrained(new_folder, safe_serialization=True)"
)
_LORA_PAIR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_LORA_EMBEDDING_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$"
)
_IA3_KEY = re.compile(r"\.ia3_l(?:\.[^.]+)?$")
# LoRA options whose tensors are not one (r, in) x (out, r) pair per module with the config's rank
_LORA_OTHER_SHAPES = ("target_parameters", "use_bdlora")


@dataclass(frozen=True)
class AdapterFolder:
    """What validation learned: the parsed config and the relative names of the files to keep."""

    config: dict
    files: list[str]
    tensors: dict = dataclasses.field(default_factory=dict)  # name -> TensorInfo


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape and its byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _shown(path: Path | str) -> str:
    """A path as it can be printed: bytes that are not UTF-8 appear as escapes."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the folder ------------------------------------------------------------------------------


def scan_folder(folder: Path) -> list[str]:
    """Check the folder's shape (regular readable files with UTF-8 names, no pickle) and return
    its sorted file names."""
    if not _is_utf8(str(folder)):
        raise InvalidAdapter(
            f"the path {_shown(folder)} is not UTF-8", hint="rename it with UTF-8 characters"
        )
    if not folder.exists():
        raise InvalidAdapter(f"{folder} does not exist")
    if folder.is_symlink() or not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a directory", hint="pass the folder PEFT saved")
    names = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        raise InvalidAdapter(f"cannot list {folder}: {exc.strerror or exc}") from None
    for item in entries:
        if not _is_utf8(item.name):
            raise InvalidAdapter(
                f"{folder}: the file name {os.fsencode(item.name)!r} is not UTF-8",
                hint="rename or remove it; the registry stores names as UTF-8 text",
            )
        try:
            mode = item.stat(follow_symlinks=False).st_mode
        except OSError as exc:  # removed while being listed
            raise InvalidAdapter(f"{folder / item.name}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(mode):
            raise InvalidAdapter(
                f"{folder / item.name} is a symlink; symlinks are refused",
                hint="copy the real file into the folder; the registry never reads outside it",
            )
        if stat.S_ISDIR(mode):
            raise InvalidAdapter(
                f"{folder / item.name} is a subfolder; an adapter folder holds only files",
                hint="remove or move the subfolder (e.g. checkpoints) out of the adapter folder",
            )
        if not stat.S_ISREG(mode):
            raise InvalidAdapter(f"{folder / item.name} is not a regular file")
        names.append(item.name)
    if CONFIG_FILE not in names:
        raise InvalidAdapter(
            f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing",
            hint="pass the folder written by PeftModel.save_pretrained",
        )
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InvalidAdapter(
            f"{folder / pickles[0]} is a pickle file; refusing {', '.join(pickles)}",
            hint=_PICKLE_HINT,
        )
    if WEIGHTS_FILE not in names:
        raise InvalidAdapter(
            f"{folder} has no {WEIGHTS_FILE}",
            hint="save the adapter with safe_serialization=True (the PEFT default)",
        )
    for name in names:  # every file is copied: find an unreadable one before anything is written
        try:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            os.close(os.open(folder / name, flags))
        except OSError as exc:
            raise InvalidAdapter(f"{folder / name} cannot be read: {exc.strerror or exc}") from None
    return sorted(names)


def validate_adapter_folder(folder: Path) -> AdapterFolder:
    """Fully validate a PEFT adapter folder; raise InvalidAdapter naming the file and problem."""
    folder = Path(folder)
    files = scan_folder(folder)
    config = read_config(folder / CONFIG_FILE)
    tensors = check_weights(folder / WEIGHTS_FILE, config)
    return AdapterFolder(config=config, files=files, tensors=tensors)


# LoRA options PEFT saves that the serving runtime (and merging) do not implement
UNSERVABLE_LORA_OPTIONS = (
    "use_dora", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "fan_in_fan_out",
)  # fmt: skip
SERVABLE_TYPES = ("LORA", "PREFIX_TUNING")
_LINEAR_LORA = re.compile(r"\.lora_[AB](?:\.[^.]+)?\.weight$")


def serving_refusal(folder: AdapterFolder) -> str | None:
    """Why no base could serve this (valid) adapter, or None: what Adaptory's runtime refuses
    whatever the base (a PEFT method or option it does not implement, full module weights on a
    generation adapter). Whether it fits a given base is checked when it loads."""
    config = folder.config
    peft_type = config["peft_type"]
    if peft_type not in SERVABLE_TYPES:
        return f"peft_type {peft_type} is stored by PEFT but not served or merged by Adaptory"
    if peft_type == "PREFIX_TUNING":
        if (config.get("num_transformer_submodules") or 1) != 1:
            return "encoder-decoder prefix tuning is not servable"
        return None
    for option in UNSERVABLE_LORA_OPTIONS:
        if config.get(option):
            return f"LoRA option '{option}' is not servable"
    if config.get("bias", "none") != "none":
        return f"LoRA bias='{config['bias']}' is not servable"
    for key in folder.tensors:
        if _LINEAR_LORA.search(key):
            continue
        if ".lora_" in key:
            return f"tensor {_short(key, 200)} is not a linear LoRA weight"
        if config.get("task_type") != "SEQ_CLS":  # a classifier's head is a saved module
            return f"saves full module weights ({_short(key, 200)}); only LoRA weights are servable"
    return None


# --- adapter_config.json ---------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """Parse adapter_config.json and check it against the installed PEFT's config class."""
    raw = _read_limited(path, MAX_CONFIG_BYTES, "adapter configs")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{path}: not UTF-8 text ({exc.reason})") from None
    config = parse_json(text, path)
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path}: expected a JSON object, found {_describe(config)}")
    check_config(config, path)
    return config


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise InvalidAdapter(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise InvalidAdapter(f"{path} is larger than {limit // 2**20} MiB, the limit for {what}")
    return raw


def parse_json(text: str, path: Path) -> object:
    """json.loads that refuses, as InvalidAdapter, what Python parses but nothing should: NaN and
    Infinity, nesting deeper than MAX_JSON_DEPTH, integers too long to convert, non-finite
    numbers such as 1e999, strings with a lone surrogate escape ("\\ud800": not UTF-8, so
    SQLite cannot store it and the safetensors loader refuses it)."""

    def refuse_constant(name: str):
        raise InvalidAdapter(f"{path}: {name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise InvalidAdapter(f"{path}: JSON nested too deeply") from None
    except ValueError:  # an integer over sys.get_int_max_str_digits() digits
        raise InvalidAdapter(f"{path}: invalid JSON: a number has too many digits") from None
    _check_json_values(value, path, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_json_values(value: object, path: Path, *, strings: bool) -> None:
    """Depth and numbers everywhere; with `strings`, every string and key is UTF-8 too."""
    kinds = dict | list | float | str if strings else dict | list | float
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise InvalidAdapter(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
            children = list(item.values()) if isinstance(item, dict) else item
            if strings and isinstance(item, dict):
                children += list(item)
            stack.extend((child, depth + 1) for child in children if isinstance(child, kinds))
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidAdapter(f"{path}: a number is out of range ({item})")
        elif isinstance(item, str) and not _is_utf8(item):
            raise InvalidAdapter(
                f"{path}: the string {_short(item)} holds a lone surrogate escape; not UTF-8"
            )


def check_config(config: dict, path: Path) -> None:
    """Raise InvalidAdapter if PEFT would not understand `config` or the runtime could not use
    it: its type, unknown fields, each field's type, what the config class itself refuses, and
    the values the runtime reads (LoRA ranks and alphas, prefix and prompt sizes)."""
    peft_type = config.get("peft_type")
    if peft_type is None or peft_type == "":
        raise InvalidAdapter(f"{path}: peft_type is missing", hint="is this a PEFT adapter config?")
    if not isinstance(peft_type, str):
        raise InvalidAdapter(f"{path}: peft_type is {_describe(peft_type)}; expected a string")
    known_types, config_class = _peft_config_class(peft_type)
    if config_class is None:
        raise InvalidAdapter(
            f"{path}: unknown peft_type {_short(peft_type)}",
            hint=f"the installed PEFT knows {', '.join(sorted(known_types))}; upgrade peft if it is newer",
        )
    unknown = sorted(set(config) - _config_fields(config_class))
    if unknown:
        listed = ", ".join(
            name if name.isprintable() and len(name) <= 60 else _short(name) for name in unknown[:5]
        ) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InvalidAdapter(
            f"{path}: fields unknown to {config_class.__name__} of the installed PEFT: {listed}",
            hint="the adapter was saved by a newer PEFT; upgrade peft (pip install -U peft)",
        )
    _check_field_types(config, config_class, path)
    task_type = config.get("task_type")
    task_types = _peft_task_types()
    if task_type is not None and task_type not in task_types:
        raise InvalidAdapter(
            f"{path}: task_type {_short(task_type)} is unknown to PEFT",
            hint=f"PEFT's task types: {', '.join(sorted(task_types))}",
        )
    check_method_config, _ = _METHOD_RULES.get(peft_type, (None, None))
    if check_method_config:
        check_method_config(config, path)
    _construct_peft_config(config, config_class, path)


def _check_field_types(config: dict, config_class: type, path: Path) -> None:
    hints = _field_types(config_class)
    for field in dataclasses.fields(config_class):
        if field.name not in config or field.name not in hints:
            continue
        value = config[field.name]
        if value is None and field.default is None:  # PEFT's own default
            continue
        hint = _FIELD_TYPE_OVERRIDES.get(field.name, hints[field.name])
        if not _matches(value, hint):
            raise InvalidAdapter(
                f"{path}: field {field.name!r} is {_describe(value)}; "
                f"{config_class.__name__} expects {_hint_text(hint)}"
            )


# PEFT annotates lora_alpha as int, yet saves floats it was given (lora_alpha=16.0) and uses them.
_FIELD_TYPE_OVERRIDES: dict[str, object] = {"lora_alpha": float}


def _matches(value: object, hint: object) -> bool:
    """Whether a JSON value has the type a PEFT config field declares (nested sub-configs are
    objects; Literal strings may end in a "[...]" placeholder, e.g. 'pissa_niter_[number of
    iters]'); an annotation this does not know is left to PEFT's own checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(_literal_matches(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return not args or all(_matches(item, args[0]) for item in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_matches(item, args[1]) for item in value.values())
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, str) and value in {member.value for member in hint}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def _literal_matches(value: object, literal: object) -> bool:
    if isinstance(literal, str) and "[" in literal and isinstance(value, str):
        return value.startswith(literal.split("[", 1)[0])
    return type(value) is type(literal) and value == literal


def _hint_text(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if str in args:  # "a string" already covers the enum and literal alternatives
            args = [a for a in args if typing.get_origin(a) is not typing.Literal]
            args = [a for a in args if not (isinstance(a, type) and issubclass(a, Enum))]
        return " or ".join(dict.fromkeys(_hint_text(arg) for arg in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a list of {_hint_text(args[0])}" if args and args[0] is not Ellipsis else "a list"
    if origin is dict or hint is dict:
        return "an object"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(json.dumps(member.value) for member in hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "an object"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return "null" if hint is type(None) else names.get(hint, str(hint))


def _describe(value: object) -> str:
    """A short description of a JSON value for an error message (never a huge repr)."""
    if isinstance(value, dict):
        return f"an object ({len(value)} keys)"
    if isinstance(value, list):
        return f"a list ({len(value)} items)"
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} {_short(value)}"


def _short(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters (a list or object is described, a huge integer not
    printed): names and values from a hostile file can be megabytes long."""
    if isinstance(value, dict | list):
        return _describe(value)
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "(huge)"
    return f"{text[:limit]}{'…' if len(text) > limit else ''}"


def _construct_peft_config(config: dict, config_class: type, path: Path) -> None:
    """Build the config as PEFT's from_pretrained does; whatever its class refuses is refused."""
    import warnings

    kwargs = {k: v for k, v in config.items() if k != "runtime_config"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_kwargs = getattr(config_class, "check_kwargs", None)  # PEFT >= 0.14
            config_class(**(check_kwargs(**kwargs) if check_kwargs else kwargs))
    except Exception as exc:  # PEFT's checks raise ValueError, TypeError, ImportError, ...
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InvalidAdapter(
            f"{path}: PEFT's {config_class.__name__} refuses it: {reason}"
        ) from None


def _peft_config_class(peft_type: str):
    """The installed PEFT's config class for `peft_type` (None if unknown) and all known types."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    known = {member.value for member in PeftType}
    if peft_type not in known:
        return known, None
    return known, PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType(peft_type))


def _peft_task_types() -> set[str]:
    from peft import TaskType

    return {member.value for member in TaskType}


def _config_fields(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


@functools.cache
def _field_types(config_class: type) -> dict[str, object]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation that does not resolve: leave those fields to PEFT
        return {}


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the value of the first key (a regex) matching
    the end of the module path, else `default`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# --- per method: the config values the runtime reads, and the tensors they imply --------------


def _need_int(config: dict, field: str, low: int, high: int, path: Path, *, default=None) -> int:
    value = config.get(field)
    value = default if value is None else value
    if value is None:
        raise InvalidAdapter(
            f"{path}: {field} is missing",
            hint="PEFT's save_pretrained writes it; was the config edited by hand?",
        )
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidAdapter(
            f"{path}: {field} is {_describe(value)}; expected an integer {low}…{high}"
        )
    return value


def _check_rank(rank: object, field: str, path: Path) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidAdapter(
            f"{path}: LoRA rank {field}={_short(rank)} is absurd (expected an integer 1..{MAX_LORA_RANK})"
        )


def _check_patterns(config: dict, field: str, path: Path) -> dict:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapter(f"{path}: {field} is {_describe(patterns)}; expected an object")
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise InvalidAdapter(
                f"{path}: {field} key {_short(key, 200)} is not a valid regex ({exc})"
            ) from None
    return patterns


def _check_rank_config(config: dict, path: Path) -> None:
    """LoRA, AdaLoRA, LoHa, LoKr: the rank and any rank_pattern ranks."""
    if "r" in config:
        _check_rank(config["r"], "r", path)
    for module, rank in _check_patterns(config, "rank_pattern", path).items():
        _check_rank(rank, f"rank_pattern[{_short(module, 200)}]", path)


def _check_lora_config(config: dict, path: Path) -> None:
    _check_rank_config(config, path)
    for module, alpha in _check_patterns(config, "alpha_pattern", path).items():
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise InvalidAdapter(
                f"{path}: alpha_pattern[{_short(module, 200)}] is {_describe(alpha)}; expected a number"
            )


def _check_prompt_learning_config(config: dict, path: Path) -> None:
    """Prefix and prompt tuning: the sizes that give the saved prompt_embeddings their shape."""
    _need_int(config, "num_virtual_tokens", 1, MAX_VIRTUAL_TOKENS, path)
    _need_int(config, "token_dim", 1, MAX_TOKEN_DIM, path)
    _need_int(config, "num_transformer_submodules", 1, 2, path, default=1)
    if config.get("peft_type") == "PREFIX_TUNING":
        _need_int(config, "num_layers", 1, MAX_LAYERS, path)
        heads = _need_int(config, "num_attention_heads", 1, MAX_HEADS, path)
        if config["token_dim"] % heads:
            raise InvalidAdapter(
                f"{path}: token_dim {config['token_dim']} is not a multiple of "
                f"num_attention_heads {heads}"
            )


def _check_lora_tensors(config: dict, tensors: dict[str, TensorInfo], path: Path) -> None:
    """Every LoRA module has an A and a B of one rank: the config's (or its rank_pattern's)."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        match = _LORA_PAIR_KEY.match(key) or _LORA_EMBEDDING_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"]] = info
    if not pairs and not config.get("trainable_token_indices"):
        raise InvalidAdapter(f"{path}: holds no LoRA weights (no lora_A/lora_B tensors)")
    own_shapes = not any(config.get(option) for option in _LORA_OTHER_SHAPES)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise InvalidAdapter(
                f"{path}: {_short(module, 200)} has lora_{have} but no lora_{lack}"
            )
        a, b = ab["A"].shape, ab["B"].shape
        if not (2 <= len(a) <= 5 and len(a) == len(b) and a[0] == b[1]):
            raise InvalidAdapter(
                f"{path}: {_short(module, 200)} has lora_A {list(a)} and lora_B {list(b)}, which do not "
                "form a low-rank pair"
            )
        if own_shapes:
            rank = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
            if a[0] != rank:
                raise InvalidAdapter(
                    f"{path}: {_short(module, 200)} has rank {a[0]} but the config says r={rank}"
                )


def _check_prompt_tensors(config: dict, tensors: dict[str, TensorInfo], path: Path) -> None:
    """PEFT saves prefix tuning as (virtual tokens, layers x 2 x token_dim) and prompt tuning as
    (virtual tokens x transformer submodules, token_dim)."""
    info = tensors.get("prompt_embeddings")
    if info is None:
        raise InvalidAdapter(f"{path}: no prompt_embeddings tensor")
    nvt, dim = config["num_virtual_tokens"], config["token_dim"]
    if config["peft_type"] == "PREFIX_TUNING":
        expected = (nvt, config["num_layers"] * 2 * dim)
    else:
        expected = (nvt * (config.get("num_transformer_submodules") or 1), dim)
    if info.shape != expected:
        raise InvalidAdapter(
            f"{path}: prompt_embeddings has shape {list(info.shape)}; the config "
            f"implies {list(expected)}"
        )


def _check_ia3_tensors(config: dict, tensors: dict[str, TensorInfo], path: Path) -> None:
    found = False
    for key, info in tensors.items():
        if _IA3_KEY.search(key):
            found = True
            if math.prod(info.shape) != max(info.shape, default=1):
                raise InvalidAdapter(
                    f"{path}: tensor {_short(key, 200)} has shape {list(info.shape)}; IA3 scales a vector"
                )
    if not found:
        raise InvalidAdapter(f"{path}: holds no IA3 weights (no ia3_l tensors)")


# peft_type -> (config check, tensor check); other PEFT types get the generic checks only
_METHOD_RULES = {
    "LORA": (_check_lora_config, _check_lora_tensors),
    "ADALORA": (_check_rank_config, None),
    "LOHA": (_check_rank_config, None),
    "LOKR": (_check_rank_config, None),
    "PREFIX_TUNING": (_check_prompt_learning_config, _check_prompt_tensors),
    "PROMPT_TUNING": (_check_prompt_learning_config, _check_prompt_tensors),
    "IA3": (None, _check_ia3_tensors),
}


# --- adapter_model.safetensors ---------------------------------------------------------------


def check_weights(path: Path, config: dict) -> dict[str, TensorInfo]:
    """Check a weights file for a (checked) config: header and layout, tensor shapes against
    the config, and every value finite. Returns the tensor table."""
    tensors = check_safetensors(path)
    _, check_method_tensors = _METHOD_RULES.get(config.get("peft_type"), (None, None))
    if check_method_tensors:
        check_method_tensors(config, tensors, path)
    check_finite(path, tensors)
    return tensors


def check_safetensors(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it against the file; return the tensor table.

    Every tensor's byte range must lie inside the data section and match dtype x shape, the
    ranges must tile the data section without holes or overlaps, and the file must be exactly
    8 + header + data bytes long. Tensors are floating point and non-empty; the header is at
    most MAX_HEADER_BYTES with at most MAX_TENSORS entries, checked before it is parsed.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InvalidAdapter(f"{path}: too short to be safetensors ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len == 0 or header_len > size - 8:
                raise InvalidAdapter(
                    f"{path}: safetensors header claims {header_len} bytes but the file has {size}"
                )
            if header_len > MAX_HEADER_BYTES:
                raise InvalidAdapter(
                    f"{path}: safetensors header of {header_len} bytes is over the "
                    f"{MAX_HEADER_BYTES // 2**20} MiB limit for adapters"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise InvalidAdapter(f"{path} cannot be read: {exc.strerror or exc}") from None
    too_many = InvalidAdapter(
        f"{path}: safetensors header lists more than {MAX_TENSORS:,} tensors, the limit for adapters"
    )
    if raw.count(b"{") - 2 > MAX_TENSORS:  # each tensor is an object; so are the root, metadata
        raise too_many
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{path}: safetensors header is not UTF-8 ({exc.reason})") from None
    header = parse_json(text, path)
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path}: safetensors header is not a JSON object")
    _check_metadata(header.pop("__metadata__", None), path)
    if not header:
        raise InvalidAdapter(f"{path}: holds no tensors")
    if len(header) > MAX_TENSORS:
        raise too_many
    data_start = 8 + header_len
    data_len = size - data_start
    tensors = {name: _tensor_info(name, info, path, data_len) for name, info in header.items()}
    _check_tiling(sorted((t.start, t.end, name) for name, t in tensors.items()), data_len, path)
    return {
        name: dataclasses.replace(t, start=t.start + data_start, end=t.end + data_start)
        for name, t in tensors.items()
    }


def _check_metadata(metadata: object, path: Path) -> None:
    """safetensors' loader reads __metadata__ as a map of strings (or null), and fails otherwise."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidAdapter(
            f"{path}: safetensors __metadata__ is {_describe(metadata)}; expected an object"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidAdapter(
                f"{path}: safetensors __metadata__[{_short(key, 200)}] is {_describe(value)}; values must be strings"
            )


def _tensor_info(name: str, info: object, path: Path, data_len: int) -> TensorInfo:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} has a malformed header entry "
            "(expected exactly dtype, shape and data_offsets)"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown_dtype = repr(dtype[:40]) if isinstance(dtype, str) else _describe(dtype)
        raise InvalidAdapter(f"{path}: tensor {_short(name, 200)} has unknown dtype {shown_dtype}")
    if dtype not in FLOAT_EXPONENT_MASK:
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} is {dtype}; adapter weights must be floating point "
            f"({', '.join(FLOAT_EXPONENT_MASK)})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(_is_count(d) and d < 2**63 for d in shape)
    ):
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} has an invalid shape {_describe(shape)}"
        )
    if 0 in shape:
        raise InvalidAdapter(f"{path}: tensor {_short(name, 200)} is empty (shape {shape})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} has invalid data_offsets {_describe(offsets)}"
        )
    begin, end = offsets
    if not begin <= end <= data_len:
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} lies outside the file (bytes {begin}..{end} of {data_len})"
        )
    expected = math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)
    if end - begin != expected:
        raise InvalidAdapter(
            f"{path}: tensor {_short(name, 200)} ({dtype} {shape}) needs {expected} bytes, header says {end - begin}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=begin, end=end)


def _check_tiling(ranges: list[tuple[int, int, str]], data_len: int, path: Path) -> None:
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            problem = "overlaps another" if begin < position else "leaves a gap before it"
            raise InvalidAdapter(
                f"{path}: tensor {_short(name, 200)} {problem} in the data section"
            )
        position = end
    if position != data_len:
        raise InvalidAdapter(
            f"{path}: {data_len - position} bytes after the last tensor; the file size must be "
            "exactly 8 + header + tensor data"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_finite(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Refuse a tensor holding NaN or an infinity (read in chunks: the exponent bits all set)."""
    import numpy as np

    try:
        with open(path, "rb") as fh:
            for name, info in sorted(tensors.items(), key=lambda item: item[1].start):
                dtype, mask = FLOAT_EXPONENT_MASK[info.dtype]
                fh.seek(info.start)
                remaining = info.end - info.start
                while remaining:
                    chunk = fh.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise InvalidAdapter(f"{path}: ends inside tensor {_short(name, 200)}")
                    bits = np.frombuffer(chunk, dtype=dtype)
                    if np.any((bits & mask) == mask):
                        raise InvalidAdapter(
                            f"{path}: tensor {_short(name, 200)} holds NaN or infinite values",
                            hint="the training run diverged; retrain or import an earlier checkpoint",
                        )
                    remaining -= len(chunk)
    except OSError as exc:
        raise InvalidAdapter(f"{path} cannot be read: {exc.strerror or exc}") from None
