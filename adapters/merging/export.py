"""Exports beyond the plain PEFT folder: a standalone merged model, and vLLM multi-LoRA folders.

Merged export (the QLoRA caveat): an adapter trained on a 4-bit base learned its update against
the NF4-dequantized weights, not the original ones. By default the update is merged into the
base after an NF4 quantize→dequantize round trip of every weight the 4-bit base quantized, with
the same block size, quant type and double quantization (what training saw); `original` merges
into the unquantized weights instead. Every export is verified: the saved folder is reloaded
with plain transformers and its logits compared on held-out prompts with the adapter on the
4-bit base and on the original base (max |Δlogit|, mean KL); the numbers are printed and kept
with the registry entry (extra["merged_exports"]).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from adaptory.adapters.bases.quantize import (
    keep_4bit_trainable,
    quantized_weights,
    round_trip_base,
)
from adaptory.registry.errors import ConfigError, StorageError

DTYPES = ("float32", "float16", "bfloat16")
FROM_WEIGHTS = ("nf4-roundtrip", "original")
ROUND_TRIP_QUANTS = ("nf4", "fp4")
# vLLM's LoRAConfig.max_lora_rank accepts only these values.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EXPORT_INFO = "adaptory_export.json"


@dataclass
class MergedExport:
    """Where a merged model went, how it was made and how closely it reproduces the adapter."""

    path: Path
    ref: str
    dtype: str
    from_weights: str  # what was used: nf4-roundtrip (fp4-roundtrip) or original
    trained_quant: str
    verification: dict
    metrics: dict = field(default_factory=dict)
    note: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _check_out(out: Path, force: bool) -> None:
    from adaptory.registry.export import _check_target

    _check_target(out, force)


def _check_lora(entry, what: str) -> None:
    if entry.method != "lora":
        raise ConfigError(
            f"{entry.ref} is a {entry.method or 'non-LoRA'} adapter; {what}",
            hint="export it as a PEFT folder (`adaptory export REF --out DIR`) and serve it "
            "with `adaptory serve`",
        )


# --- merged export -----------------------------------------------------------------------------


def export_merged(
    registry,
    ref,
    out: Path,
    *,
    dtype: str = "float32",
    from_weights: str = "nf4-roundtrip",
    force: bool = False,
    eval_limit: int | None = 64,
    record: bool = True,
    device: str = "cpu",
) -> MergedExport:
    """Merge `ref`'s LoRA into its base and save a standalone transformers model in `out`."""
    import gc

    from adaptory.adapters.merging import compare

    _check_export_options(dtype, from_weights)
    entry = ref if hasattr(ref, "digest") else registry.resolve(ref)
    _check_lora(
        entry,
        "only LoRA updates can be merged into base weights (prefix tuning adds virtual tokens)",
    )
    out = Path(out)
    _check_out(out, force)
    quant = compare.entry_quant(entry)

    # 1. the reference: the adapter on the base it was trained on (4-bit by default)
    adapted, loaded = compare.load_entry_model(registry, entry, quant=quant, device=device)
    specs = quantized_weights(adapted)
    keep_4bit_trainable(adapted)  # the exact dequantize path, as in training
    tokenizer = loaded.tokenizer
    prompts = compare.held_out_prompts(entry, tokenizer)
    on_quantized = compare.prompt_logits(adapted, tokenizer, prompts)
    data = compare.eval_file(entry)
    metrics: dict = {}
    if data:
        score = compare.score_on_file(adapted, tokenizer, entry, data, limit=eval_limit)
        metrics = {"data": str(data), "adapter_on_quantized_base": score}
    del adapted, loaded
    gc.collect()

    # 2. the unquantized base with the adapter, then the round trip and the merge
    plain, _ = compare.load_entry_model(registry, entry, quant="none", device=device)
    on_original = compare.prompt_logits(plain, tokenizer, prompts)
    used, note = _round_trip(plain, specs, quant, from_weights, entry)
    _save_merged(plain.merge_and_unload(), tokenizer, out, dtype)
    del plain
    gc.collect()

    # 3. verify what was written, loaded the way a user would (transformers only)
    standalone = load_standalone(out, entry.task, device=device)
    on_merged = compare.prompt_logits(standalone, tokenizer, prompts)
    if data:
        metrics["merged"] = compare.score_on_file(
            standalone, tokenizer, entry, data, limit=eval_limit
        )
    verification = {
        "prompts": len(prompts),
        "vs_adapter_on_quantized_base": {
            "quant": quant,
            **compare.compare_logits(on_quantized, on_merged),
        },
        "vs_adapter_on_original_base": compare.compare_logits(on_original, on_merged),
    }
    result = MergedExport(
        path=out.resolve(),
        ref=entry.ref,
        dtype=dtype,
        from_weights=used,
        trained_quant=quant,
        verification=verification,
        metrics=metrics,
        note=note,
    )
    _note_export(registry, entry, result, record=record)
    return result


def _check_export_options(dtype: str, from_weights: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'", hint=f"choose one of {DTYPES}")
    if from_weights not in FROM_WEIGHTS:
        raise ConfigError(
            f"unknown --from-weights '{from_weights}'", hint=f"choose one of {FROM_WEIGHTS}"
        )


def _round_trip(plain, specs, quant: str, from_weights: str, entry) -> tuple[str, str | None]:
    """Give the unquantized base the 4-bit round trip training saw, when asked and possible.
    Returns the weights the merge goes into, and a note when the round trip does not apply."""
    if from_weights != "nf4-roundtrip":
        return "original", None
    if quant in ROUND_TRIP_QUANTS and specs:
        round_trip_base(plain, specs)
        return f"{quant}-roundtrip", None
    return "original", (
        f"{entry.ref} was trained on a {quant} base: no 4-bit round trip applies, "
        "merged into the original weights"
    )


def _save_merged(merged, tokenizer, out: Path, dtype: str) -> None:
    """The merged model in `dtype` and its tokenizer, as safetensors readable by everyone."""
    import torch

    merged.to(getattr(torch, dtype))
    try:
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        readable_by_all(out)
    except OSError as exc:
        raise StorageError(f"writing {out} failed: {exc.strerror or exc}") from exc


def _note_export(registry, entry, result: MergedExport, *, record: bool) -> None:
    """Describe the export in its folder (EXPORT_INFO) and, with `record`, in the entry's
    extra["merged_exports"]."""
    info = {"adapter": entry.ref, "digest": entry.digest, "base_model": entry.base_model}
    (result.path / EXPORT_INFO).write_text(
        json.dumps({**info, **result.to_dict()}, indent=2) + "\n"
    )
    if record:
        done = {**result.to_dict(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
        history = list((entry.extra or {}).get("merged_exports") or [])
        registry.update(entry, extra={"merged_exports": [*history, done]})


def readable_by_all(folder: Path) -> None:
    """safetensors writes model.safetensors 0600; an export is meant to be shared (vLLM, other
    users): files 0644, folders 0755, as `cp` would leave them under the usual umask."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def load_standalone(path: Path, task: str, *, device: str = "cpu"):
    """The exported model loaded by plain transformers (no PEFT), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.eval()
    return model


# --- vLLM multi-LoRA export --------------------------------------------------------------------


@dataclass
class VllmExport:
    """The folders written (module name, path, rank) and the `vllm serve` command for them."""

    base: str
    adapters: list[dict]
    max_lora_rank: int
    command: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_vllm(entry) -> None:
    """Refuse what vLLM's LoRA serving cannot load or would apply wrongly."""
    _check_lora(entry, "vLLM serves LoRA adapters only")
    if entry.task != "causal-lm":
        raise ConfigError(
            f"{entry.ref} is a {entry.task} adapter; vLLM's multi-LoRA serving is for "
            "generation (causal-lm) only",
            hint="serve classifiers with `adaptory serve`, or bake one into a model with "
            "`adaptory export REF --merged`",
        )
    config = entry.peft_config or {}
    reasons = {
        "use_dora": "DoRA (vLLM does not support it)",
        "modules_to_save": "whole trained modules (vLLM needs modules_to_save to be empty)",
        "rank_pattern": "per-module ranks (vLLM scales every module by lora_alpha/r)",
        "alpha_pattern": "per-module alphas (vLLM scales every module by lora_alpha/r)",
        "lora_bias": "LoRA biases",
    }
    for key, reason in reasons.items():
        if config.get(key):
            raise ConfigError(
                f"{entry.ref} uses {reason}; vLLM would refuse it or serve it wrong",
                hint="bake it into a model instead: `adaptory export REF --merged`",
            )
    if config.get("bias", "none") != "none":
        raise ConfigError(
            f"{entry.ref} trains biases (bias={config['bias']!r}), which vLLM does not load",
            hint="bake it into a model instead: `adaptory export REF --merged`",
        )
    if int(config.get("r") or 0) > VLLM_MAX_LORA_RANKS[-1]:
        raise ConfigError(
            f"{entry.ref} has rank {config['r']}; vLLM serves ranks up to "
            f"{VLLM_MAX_LORA_RANKS[-1]}",
            hint="merge it into a model instead: `adaptory export REF --merged`",
        )


def vllm_base(entry, home=None) -> str:
    """What `vllm serve` takes as the model: the base's hub id, else its local folder."""
    from adaptory.adapters.bases.loading import resolve_base
    from adaptory.registry.errors import AdaptoryError

    try:
        return resolve_base(entry.base_model, home).model_name
    except AdaptoryError:
        return entry.base_model


def adapters_of_base(registry, entry_or_base) -> list:
    """The latest version of every LoRA causal-lm adapter made for the same base (fingerprint)."""
    if hasattr(entry_or_base, "digest"):
        like = entry_or_base
        same = [
            e for e in registry.list(task="causal-lm") if _same_base(e, like) and e.method == "lora"
        ]
    else:
        same = [
            e
            for e in registry.list(task="causal-lm", base=str(entry_or_base))
            if e.method == "lora"
        ]
    latest: dict[str, object] = {}
    for e in same:  # list() is ordered by name and version
        latest[e.name] = e
    return list(latest.values())


def _same_base(a, b) -> bool:
    fa, fb = a.base_fingerprint or {}, b.base_fingerprint or {}
    if fa.get("weights") and fb.get("weights"):
        return fa.get("weights") == fb.get("weights") and fa.get("tokenizer") == fb.get("tokenizer")
    return a.base_model == b.base_model


def export_vllm(registry, entries: list, out: Path, *, force: bool = False) -> VllmExport:
    """Write OUT/<name>/{adapter_config.json, adapter_model.safetensors} per adapter (the layout
    `vllm serve --enable-lora --lora-modules name=path` loads) and build that command."""
    import shutil

    from adaptory.registry.errors import BaseMismatch

    if not entries:
        raise ConfigError(
            "no LoRA causal-lm adapters to export", hint="`adaptory list` shows what is stored"
        )
    for entry in entries:
        check_vllm(entry)
    for other in entries[1:]:
        if not _same_base(entries[0], other):
            raise BaseMismatch(
                f"{entries[0].ref} and {other.ref} were made for different bases; one "
                "`vllm serve` serves one base",
                hint="export the adapters of each base separately",
            )
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(
            "two versions of one name in one export; vLLM module names must be unique",
            hint="export one version per name",
        )
    out = Path(out)
    _check_out(out, force)
    base = vllm_base(entries[0], registry.home)
    written = []
    try:
        for entry in entries:
            blob = registry.files(entry, verify=True)
            folder = out / entry.name
            folder.mkdir(parents=True, exist_ok=True)
            config = dict(entry.peft_config)
            config["base_model_name_or_path"] = base
            (folder / "adapter_config.json").write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n"
            )
            target = folder / "adapter_model.safetensors"
            target.unlink(missing_ok=True)
            shutil.copyfile(blob / "adapter_model.safetensors", target)
            target.chmod(0o644)
            written.append(
                {
                    "name": entry.name,
                    "ref": entry.ref,
                    "path": str(folder.resolve()),
                    "rank": int(config["r"]),
                }  # fmt: skip
            )
    except OSError as exc:
        raise StorageError(f"writing {out} failed: {exc.strerror or exc}") from exc
    rank = max(a["rank"] for a in written)
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    modules = " ".join(shlex.quote(f"{a['name']}={a['path']}") for a in written)
    command = (
        f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {modules} "
        f"--max-lora-rank {max_rank} --max-loras {len(written)}"
    )
    return VllmExport(base=base, adapters=written, max_lora_rank=max_rank, command=command)
