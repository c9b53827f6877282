"""How two adapters differ: their configurations, and per module how far apart their weight
updates are (for LoRA ΔW = scaling·B·A; ‖ΔW‖_F of each, ‖ΔW_a − ΔW_b‖_F, cosine similarity).

Norms and inner products are computed through the rank-r factors (tr((BᵀB)(AAᵀ))) rather than by
forming d_out×d_in matrices, so a 7B adapter diffs in seconds. Non-LoRA adapters (prefix, …) are
compared tensor by tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_FIELDS = (
    "method",
    "task",
    "base_model",
    "base",
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "use_dora",
    "lora_dropout",
    "modules_to_save",
    "num_virtual_tokens",
    "dataset",
    "labels",
)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.[^.]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class ModuleDistance:
    """One module (or tensor): the size of each adapter's update and of their difference."""

    module: str
    norm_a: float
    norm_b: float
    distance: float
    cosine: float | None


@dataclass
class AdapterDiff:
    a: str
    b: str
    config: list[dict]  # [{"field", "a", "b"}] for fields that differ
    modules: list[ModuleDistance]  # sorted by distance, largest first
    kind: str  # "lora ΔW" or "tensor"

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "kind": self.kind,
            "config": self.config,
            "modules": [asdict(m) for m in self.modules],
        }


def config_view(entry) -> dict:
    """The fields `diff` compares, flattened from the entry and its PEFT config."""
    config = entry.peft_config or {}
    targets = config.get("target_modules")
    dataset = entry.dataset or {}
    return {
        "method": entry.method,
        "task": entry.task,
        "base_model": entry.base_model,
        "base": (entry.base_fingerprint or {}).get("digest", "")[:12] or None,
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": config.get("use_rslora"),
        "use_dora": config.get("use_dora"),
        "lora_dropout": config.get("lora_dropout"),
        "modules_to_save": config.get("modules_to_save"),
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "dataset": dataset.get("digest") or dataset.get("fingerprint") or dataset.get("path")
        or dataset.get("train_file"),
        "labels": (entry.extra or {}).get("labels"),
    }  # fmt: skip


def config_differences(a, b) -> list[dict]:
    va, vb = config_view(a), config_view(b)
    return [{"field": k, "a": va[k], "b": vb[k]} for k in CONFIG_FIELDS if va[k] != vb[k]]


def lora_factors(folder: Path, config: dict) -> dict[str, tuple]:
    """{module: (A, B, scaling)} from a PEFT LoRA folder, in float64 on CPU."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    found: dict[str, dict] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match:
            found.setdefault(match["module"], {})[match["ab"]] = value.double()
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    out = {}
    for module, parts in found.items():
        if "A" not in parts or "B" not in parts:
            continue
        a, b = parts["A"], parts["B"]  # A: r×in (conv: r×in×k×k), B: out×r
        rank = _pattern(config.get("rank_pattern"), module, r)
        scale_alpha = _pattern(config.get("alpha_pattern"), module, alpha)
        root = math.sqrt(rank) if config.get("use_rslora") else rank
        out[module] = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), scale_alpha / root)
    return out


def _pattern(pattern: dict | None, module: str, default):
    for key, value in (pattern or {}).items():
        if re.search(rf"(^|\.){re.escape(key)}$", module) or re.fullmatch(key, module):
            return value
    return default


def _inner(x: tuple, y: tuple) -> float:
    """⟨s_x·B_x·A_x, s_y·B_y·A_y⟩_F = s_x·s_y·tr((B_xᵀB_y)(A_y A_xᵀ))."""
    a_x, b_x, s_x = x
    a_y, b_y, s_y = y
    return float(s_x * s_y * ((b_x.T @ b_y) * (a_x @ a_y.T)).sum())


def lora_distances(fa: dict, fb: dict) -> list[ModuleDistance]:
    rows = []
    for module in sorted(set(fa) | set(fb)):
        x, y = fa.get(module), fb.get(module)
        nx2 = _inner(x, x) if x else 0.0
        ny2 = _inner(y, y) if y else 0.0
        xy = _inner(x, y) if x and y else 0.0
        cosine = xy / math.sqrt(nx2 * ny2) if x and y and nx2 > 0 and ny2 > 0 else None
        rows.append(
            ModuleDistance(
                module=module,
                norm_a=math.sqrt(max(nx2, 0.0)),
                norm_b=math.sqrt(max(ny2, 0.0)),
                distance=math.sqrt(max(nx2 + ny2 - 2 * xy, 0.0)),
                cosine=cosine,
            )
        )
    return rows


def tensor_distances(folder_a: Path, folder_b: Path) -> list[ModuleDistance]:
    from safetensors.torch import load_file

    ta = load_file(str(folder_a / "adapter_model.safetensors"))
    tb = load_file(str(folder_b / "adapter_model.safetensors"))
    rows = []
    for key in sorted(set(ta) | set(tb)):
        x = ta[key].double().flatten() if key in ta else None
        y = tb[key].double().flatten() if key in tb else None
        same_shape = x is not None and y is not None and x.shape == y.shape
        nx = float(x.norm()) if x is not None else 0.0
        ny = float(y.norm()) if y is not None else 0.0
        if same_shape:
            distance = float((x - y).norm())
            cosine = float(x @ y) / (nx * ny) if nx and ny else None
        else:
            distance, cosine = math.hypot(nx, ny), None
        rows.append(ModuleDistance(key, nx, ny, distance, cosine))
    return rows


def diff_adapters(registry, ref_a, ref_b) -> AdapterDiff:
    """Compare two registry adapters; module rows sorted by distance, largest first."""
    a, b = registry.resolve(ref_a), registry.resolve(ref_b)
    folder_a, folder_b = registry.files(a), registry.files(b)
    if a.method == "lora" and b.method == "lora" and not _dora(a) and not _dora(b):
        rows = lora_distances(
            lora_factors(folder_a, a.peft_config), lora_factors(folder_b, b.peft_config)
        )
        kind = "lora ΔW"
    else:
        rows = tensor_distances(folder_a, folder_b)
        kind = "tensor"
    rows.sort(key=lambda m: (-m.distance, m.module))
    return AdapterDiff(a=a.ref, b=b.ref, config=config_differences(a, b), modules=rows, kind=kind)


def _dora(entry) -> bool:
    return bool((entry.peft_config or {}).get("use_dora"))
