"""Validating a PEFT adapter folder before anything is stored.

A folder is accepted only if PEFT could load it and nothing in it could run code or reach outside
it: `adapter_config.json` understood by the installed PEFT, `adapter_model.safetensors` whose
header is consistent with the file, no pickle files, no symlinks, no subfolders. The safetensors
header is parsed here by hand so that a lying file is refused without handing it to a loader.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from adaptory.registry.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_LORA_RANK = 4096
MAX_HEADER_BYTES = 100 * 1024 * 1024

# bits per element; sub-byte float formats are packed
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

_PICKLE_HINT = (
    "pickle files are never loaded; convert to safetensors, e.g. "
    "PeftModel.from_pretrained(base, folder).save_pretrained(new_folder, safe_serialization=True)"
)


@dataclass(frozen=True)
class AdapterFolder:
    """What validation learned: the parsed config and the relative names of the files to keep."""

    config: dict
    files: list[str]


def scan_folder(folder: Path) -> list[str]:
    """Check the folder's shape (regular files only, no pickle) and return its sorted file names."""
    if not folder.exists():
        raise InvalidAdapter(f"{folder} does not exist")
    if folder.is_symlink() or not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a directory", hint="pass the folder PEFT saved")
    names = []
    with os.scandir(folder) as it:
        for item in it:
            mode = item.stat(follow_symlinks=False).st_mode
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
    return sorted(names)


def read_config(path: Path) -> dict:
    """Parse adapter_config.json and check it against the installed PEFT's config class."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path}: expected a JSON object, found {type(config).__name__}")
    check_config(config, path)
    return config


def check_config(config: dict, path: Path) -> None:
    """Raise InvalidAdapter if PEFT would not understand `config` (type, fields, rank)."""
    peft_type = config.get("peft_type")
    if not peft_type:
        raise InvalidAdapter(f"{path}: peft_type is missing", hint="is this a PEFT adapter config?")
    known_types, config_class = _peft_config_class(peft_type)
    if config_class is None:
        raise InvalidAdapter(
            f"{path}: unknown peft_type {peft_type!r}",
            hint=f"the installed PEFT knows {', '.join(sorted(known_types))}; upgrade peft if it is newer",
        )
    unknown = sorted(set(config) - _config_fields(config_class))
    if unknown:
        raise InvalidAdapter(
            f"{path}: fields unknown to {config_class.__name__} of the installed PEFT: {', '.join(unknown)}",
            hint="the adapter was saved by a newer PEFT; upgrade peft (pip install -U peft)",
        )
    if peft_type in ("LORA", "ADALORA", "LOHA", "LOKR") and "r" in config:
        _check_rank(config["r"], "r", path)
        for module, rank in (config.get("rank_pattern") or {}).items():
            _check_rank(rank, f"rank_pattern[{module!r}]", path)


def _check_rank(rank: object, field: str, path: Path) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidAdapter(
            f"{path}: LoRA rank {field}={rank!r} is absurd (expected an integer 1..{MAX_LORA_RANK})"
        )


def _peft_config_class(peft_type: str):
    """The installed PEFT's config class for `peft_type` (None if unknown) and all known types."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    known = {member.value for member in PeftType}
    if peft_type not in known:
        return known, None
    return known, PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType(peft_type))


def _config_fields(config_class: type) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(config_class)}


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors header and check it against the file; return the tensor table.

    Every tensor's byte range must lie inside the data section and match dtype x shape, the
    ranges must tile the data section without holes or overlaps, and the file must be exactly
    8 + header + data bytes long.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise InvalidAdapter(f"{path}: too short to be safetensors ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len == 0 or header_len > min(size - 8, MAX_HEADER_BYTES):
            raise InvalidAdapter(
                f"{path}: safetensors header claims {header_len} bytes but the file has {size}"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise InvalidAdapter(f"{path}: holds no tensors")
    data_len = size - 8 - header_len
    ranges = sorted(_tensor_range(name, info, path, data_len) for name, info in header.items())
    _check_tiling(ranges, data_len, path)
    return header


def _tensor_range(name: str, info: object, path: Path, data_len: int) -> tuple[int, int, str]:
    if not isinstance(info, dict):
        raise InvalidAdapter(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise InvalidAdapter(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidAdapter(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InvalidAdapter(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise InvalidAdapter(
            f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len})"
        )
    expected = math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)
    if end - begin != expected:
        raise InvalidAdapter(
            f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes, header says {end - begin}"
        )
    return begin, end, name


def _check_tiling(ranges: list[tuple[int, int, str]], data_len: int, path: Path) -> None:
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            problem = "overlaps another" if begin < position else "leaves a gap before it"
            raise InvalidAdapter(f"{path}: tensor {name!r} {problem} in the data section")
        position = end
    if position != data_len:
        raise InvalidAdapter(
            f"{path}: {data_len - position} bytes after the last tensor; the file size must be "
            "exactly 8 + header + tensor data"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_adapter_folder(folder: Path) -> AdapterFolder:
    """Fully validate a PEFT adapter folder; raise InvalidAdapter naming the file and problem."""
    folder = Path(folder)
    files = scan_folder(folder)
    config = read_config(folder / CONFIG_FILE)
    check_safetensors(folder / WEIGHTS_FILE)
    return AdapterFolder(config=config, files=files)
