"""Merging LoRA adapters into a new adapter with PEFT's `add_weighted_adapter`, with lineage.

The parents are loaded onto one base (quantized as they were trained; only the adapter weights
take part), combined, saved as a PEFT folder and added to the registry as a new entry whose
`parents` name each parent with its weight. Configurations for which PEFT's weighted merge is
silently wrong (DoRA, rsLoRA, rank patterns, trained biases, negative weights except with `cat`)
are refused before anything is loaded.

What the methods compute (PEFT 0.21), with ΔW_i = s_i·B_i·A_i and weights w_i:
- `cat`: A and B stacked, rank Σr_i: exactly Σ w_i·ΔW_i (checked after every merge).
- `svd` and the `*_svd` methods: Σ w_i·ΔW_i (after TIES/DARE/magnitude pruning for those
  variants), truncated by SVD to rank max(r_i) or `svd_rank`.
- `linear`, `ties`, `dare_*`, `magnitude_prune`: A and B are combined separately, each factor
  with weight w_i: ΔW = (Σ w_i·√s_i·B_i)(Σ w_j·√s_j·A_j), with cross terms B_i·A_j. PEFT scales
  each factor by √(weight·s_i), so Adaptory hands it w_i²: weights then mean what users expect
  (an adapter merged with itself at 0.5/0.5 is that adapter, not PEFT's doubled one). Every
  merge records how far it lands from Σ w_i·ΔW_i (`weighted_sum_rel_error`) so the cross
  terms are visible.

Kept as one module (~570 lines): the refusals, the merge and its fidelity check follow the notes
above and read best together.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaptory.registry.errors import AdaptoryError, BaseMismatch, ConfigError

COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Combine lora_A and lora_B tensors separately: they need equal ranks and the same modules.
SEPARATE_AB = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = tuple(m for m in COMBINATIONS if m.endswith("svd"))
DENSITY_METHODS = tuple(m for m in COMBINATIONS if m.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
MAJORITY_SIGNS = ("total", "frequency")
DEFAULT_DENSITY = 0.5
EXACT_TOLERANCE = 1e-4  # relative Frobenius error allowed for `cat`, which should be exact
_FLEXIBLE = "use --method cat (rank = sum of ranks) or an svd method (svd, ties_svd, …)"


@dataclass(frozen=True)
class MergeSpec:
    """A checked merge request: PEFT's combination type and its arguments."""

    method: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign: str | None = None
    svd_rank: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weights"] = list(self.weights)
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class MergeResult:
    """The new registry entry and what was measured about it."""

    entry: object  # adaptory.registry.Entry
    spec: MergeSpec
    fidelity: dict
    metrics: dict = field(default_factory=dict)


# --- checks ------------------------------------------------------------------------------------


def check_merge(
    parents: Sequence,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    svd_rank: int | None = None,
) -> MergeSpec:
    """Refuse a merge PEFT cannot do, or would do silently wrong; return the checked spec."""
    if method not in COMBINATIONS:
        raise ConfigError(f"unknown merge method '{method}'", hint=f"choose one of {COMBINATIONS}")
    if len(parents) < 2:
        raise ConfigError(
            "merging needs at least two adapters",
            hint="pass two or more references (the same one twice is allowed)",
        )
    for parent in parents:
        _check_mergeable(parent)
    _check_same_base(parents)
    _check_same_task(parents)
    _check_layouts(parents, method)
    weights = _check_weights(parents, method, weights)
    return MergeSpec(
        method=method,
        weights=weights,
        density=_check_density(method, density),
        majority_sign=_check_sign(method, majority_sign),
        svd_rank=_check_svd_rank(method, svd_rank),
    )


def _check_mergeable(parent) -> None:
    if parent.method != "lora":
        raise ConfigError(
            f"{parent.ref} is a {parent.method or 'non-LoRA'} adapter; only LoRA adapters merge",
            hint="merging combines LoRA weight updates (ΔW = B·A); prefix or prompt adapters "
            "add virtual tokens instead: serve them side by side with `adaptory serve`",
        )
    config = parent.peft_config or {}
    wrong = {
        "use_dora": "uses DoRA: PEFT's weighted merge ignores the magnitude vector",
        "use_rslora": "uses rsLoRA: PEFT's merged adapter keeps use_rslora with lora_alpha=r, "
        "so it comes out scaled by √r",
        "rank_pattern": "has per-module ranks (rank_pattern): PEFT's merge allocates one rank "
        "for all modules",
        "lora_bias": "trains LoRA biases, which PEFT's weighted merge drops",
        "target_parameters": "targets nn.Parameters, which PEFT's weighted merge cannot combine",
        "trainable_token_indices": "trains token embeddings, which PEFT's merge drops",
    }
    for key, reason in wrong.items():
        if config.get(key):
            raise ConfigError(
                f"{parent.ref} {reason}; the merge would be silently wrong",
                hint="bake it into a base instead (`adaptory export REF --merged`), "
                "or retrain it as a plain LoRA",
            )
    if config.get("bias", "none") != "none":
        raise ConfigError(
            f"{parent.ref} trains biases (bias={config['bias']!r}), which PEFT's merge drops",
            hint="bake it into a base instead (`adaptory export REF --merged`)",
        )
    if config.get("modules_to_save") and parent.task != "seq-cls":
        raise ConfigError(
            f"{parent.ref} also trains whole modules ({config['modules_to_save']}), which "
            "PEFT cannot merge",
            hint="only LoRA weights (and classification heads) can be merged",
        )


def _check_same_base(parents: Sequence) -> None:
    first = parents[0]
    for other in parents[1:]:
        a, b = first.base_fingerprint or {}, other.base_fingerprint or {}
        if not a or not b:
            if first.base_model != other.base_model:
                raise BaseMismatch(
                    f"{first.ref} and {other.ref} were made for different bases "
                    f"({first.base_model} vs {other.base_model})",
                    hint="merge adapters of one base; `adaptory list --base B` shows them",
                )
            continue
        for part in ("weights", "tokenizer", "quant"):
            if a.get(part) != b.get(part):
                raise BaseMismatch(
                    f"{first.ref} and {other.ref} were trained on different bases: their {part} "
                    f"fingerprints differ ({str(a.get(part))[:12]} vs {str(b.get(part))[:12]})",
                    hint="merge adapters of one base; `adaptory list --base B` shows them",
                )


def _check_same_task(parents: Sequence) -> None:
    first = parents[0]
    for other in parents[1:]:
        if other.task != first.task:
            raise ConfigError(
                f"{first.ref} is a {first.task} adapter but {other.ref} is {other.task}",
                hint="merge adapters of one task",
            )
    if first.task == "seq-cls":
        labels = [list((p.extra or {}).get("labels") or []) for p in parents]
        if not labels[0]:
            raise ConfigError(
                f"{first.ref} is a classification adapter without recorded label names",
                hint="re-import it with its labels (extra['labels'])",
            )
        for parent, found in zip(parents[1:], labels[1:], strict=True):
            if found != labels[0]:
                raise ConfigError(
                    f"{parent.ref} classifies into {found} but {first.ref} into {labels[0]}",
                    hint="only classifiers with the same label set (same names, same order) merge",
                )


def _targets(config: dict):
    targets = config.get("target_modules")
    return frozenset(targets) if isinstance(targets, list | tuple | set) else targets


def _check_layouts(parents: Sequence, method: str) -> None:
    first, config = parents[0], parents[0].peft_config
    for other in parents[1:]:
        theirs = other.peft_config
        for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out"):
            if config.get(key) != theirs.get(key):
                raise ConfigError(
                    f"{first.ref} and {other.ref} differ in {key} ({config.get(key)!r} vs "
                    f"{theirs.get(key)!r}); PEFT would apply the first one's to the merge",
                    hint="merge adapters trained with the same layer selection",
                )
        a, b = _targets(config), _targets(theirs)
        if isinstance(a, str) != isinstance(b, str):
            raise ConfigError(  # the pattern's owner first, whichever parent it is
                f"{(first, other)[isinstance(b, str)].ref} names its target modules by a pattern "
                f"and {(other, first)[isinstance(b, str)].ref} by a list; PEFT cannot combine them",
                hint="merge adapters whose target_modules are both lists",
            )
        if method in SEPARATE_AB:
            if config.get("r") != theirs.get("r"):
                raise ConfigError(
                    f"{method} needs equal ranks: {first.ref} has r={config.get('r')}, "
                    f"{other.ref} has r={theirs.get('r')}",
                    hint=_FLEXIBLE + ", which accept different ranks",
                )
            if a != b:
                raise ConfigError(
                    f"{method} combines A and B matrices module by module and needs the same "
                    f"target modules: {first.ref} targets {_show(a)}, {other.ref} {_show(b)}",
                    hint=_FLEXIBLE + ", which combine each module's ΔW",
                )


def _show(targets) -> str:
    return ",".join(sorted(targets)) if isinstance(targets, frozenset) else str(targets)


def _check_weights(parents: Sequence, method: str, weights) -> tuple[float, ...]:
    if weights is None:
        return tuple(1.0 / len(parents) for _ in parents)
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(parents):
        raise ConfigError(
            f"{len(weights)} weight(s) for {len(parents)} adapters",
            hint="give one weight per adapter, in order, e.g. --weights "
            + ",".join(["0.5"] * len(parents)),
        )
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError("weights must be finite numbers")
    if not any(weights):
        raise ConfigError("all weights are zero", hint="give at least one non-zero weight")
    negative = [(p.ref, w) for p, w in zip(parents, weights, strict=True) if w < 0]
    if negative and method != "cat":
        ref, w = negative[0]
        raise ConfigError(
            f"negative weight {w} for {ref}: PEFT's {method} merge is silently wrong with "
            "negative weights (the sign lands on A only, or is lost in pruning and SVD)",
            hint="use --method cat, which subtracts exactly (checked after the merge)",
        )
    if parents[0].task == "seq-cls" and math.isclose(math.fsum(weights), 0.0, abs_tol=1e-9):
        raise ConfigError(
            f"the weights {', '.join(f'{w:g}' for w in weights)} sum to 0: a classifier merge "
            "takes the weighted mean of the parents' heads, which is then undefined",
            hint="give classifier weights with a non-zero sum, e.g. --weights 1,-0.5",
        )
    return weights


def _check_density(method: str, density: float | None) -> float | None:
    if density is not None and not (0.0 < density <= 1.0):
        raise ConfigError(
            f"density {density} is outside (0, 1]",
            hint="density is the fraction of values kept, e.g. --density 0.5",
        )
    if method not in DENSITY_METHODS:
        if density is not None:
            raise ConfigError(
                f"--density has no effect with {method}",
                hint=f"it applies to {', '.join(DENSITY_METHODS)}",
            )
        return None
    return DEFAULT_DENSITY if density is None else float(density)


def _check_sign(method: str, majority_sign: str | None) -> str | None:
    if majority_sign is not None and majority_sign not in MAJORITY_SIGNS:
        raise ConfigError(
            f"unknown majority sign method '{majority_sign}'", hint=f"choose {MAJORITY_SIGNS}"
        )
    if method not in SIGN_METHODS:
        if majority_sign is not None:
            raise ConfigError(
                f"--majority-sign has no effect with {method}",
                hint=f"it applies to {', '.join(SIGN_METHODS)}",
            )
        return None
    return majority_sign or "total"


def _check_svd_rank(method: str, svd_rank: int | None) -> int | None:
    if svd_rank is None:
        return None
    if method not in SVD_METHODS:
        raise ConfigError(
            f"--svd-rank has no effect with {method}", hint=f"it applies to {SVD_METHODS}"
        )
    if svd_rank < 1:
        raise ConfigError(f"svd rank {svd_rank} must be at least 1")
    return int(svd_rank)


# --- merging -----------------------------------------------------------------------------------


def merge_adapters(
    registry,
    refs: Sequence[str],
    *,
    name: str,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    svd_rank: int | None = None,
    evaluate: bool = True,
    eval_limit: int | None = None,
    description: str | None = None,
    tags: Iterable[str] = (),
    device: str | None = None,
) -> MergeResult:
    """Merge registry adapters `refs` into a new entry `name`; evaluate it on the parents' data."""
    from adaptory.registry.refs import validate_name

    validate_name(name)
    parents = [registry.resolve(ref) for ref in refs]
    spec = check_merge(
        parents,
        method=method,
        weights=weights,
        density=density,
        majority_sign=majority_sign,
        svd_rank=svd_rank,
    )
    with tempfile.TemporaryDirectory(prefix="adaptory-merge-") as tmp:
        folder, fidelity = merged_folder(registry, parents, spec, Path(tmp), device=device)
        first = parents[0]
        record = {**spec.to_dict(), "fidelity": fidelity}
        extra: dict = {"merge": record}
        if first.task == "seq-cls":
            extra["labels"] = list(first.extra["labels"])
        entry = registry.add(
            folder,
            name=name,
            method="lora",
            task=first.task,
            base_model=first.base_model,
            base_fingerprint=first.base_fingerprint,
            training_config={"merge": spec.to_dict()},
            dataset=_merged_dataset(parents),
            parents=[
                {"ref": p.ref, "digest": p.digest, "weight": w}
                for p, w in zip(parents, spec.weights, strict=True)
            ],
            tags=tags,
            description=description
            or f"{spec.method} merge of " + ", ".join(p.ref for p in parents),
            extra=extra,
        )
    metrics: dict = {}
    if evaluate:
        metrics = evaluate_merge(registry, entry, parents, limit=eval_limit)
        if metrics:
            entry = registry.update(entry, metrics=metrics)
    return MergeResult(entry=entry, spec=spec, fidelity=fidelity, metrics=metrics)


def merged_folder(
    registry, parents: Sequence, spec: MergeSpec, workdir: Path, *, device: str | None = None
) -> tuple[Path, dict]:
    """Load the parents on their base, run add_weighted_adapter, save the result under workdir.

    Returns the PEFT folder and the fidelity numbers (distance from Σ w_i·ΔW_i).
    """
    import warnings

    import torch
    from peft import PeftModel

    from adaptory.adapters.bases.loading import check_fingerprint, load_base
    from adaptory.adapters.merging.compare import entry_labels, entry_quant

    first = parents[0]
    loaded = load_base(
        first.base_model,
        task=first.task,
        quant=entry_quant(first),
        device=device,
        labels=entry_labels(first),
        home=registry.home,
    )
    check_fingerprint(first.base_fingerprint, loaded.fingerprint, what=first.ref)
    names = [f"parent{i}" for i in range(len(parents))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            loaded.model, str(registry.files(first)), adapter_name=names[0]
        )
        for parent, adapter in zip(parents[1:], names[1:], strict=True):
            model.load_adapter(str(registry.files(parent)), adapter_name=adapter)
    _keep_one_head(model, names)
    torch.manual_seed(spec.seed)  # DARE drops values at random
    try:
        model.add_weighted_adapter(
            names,
            peft_weights(spec.method, spec.weights),
            "merged",
            combination_type=spec.method,
            svd_rank=spec.svd_rank,
            density=spec.density,
            majority_sign_method=spec.majority_sign or "total",
        )
    except (ValueError, TypeError) as exc:  # a PEFT check this module does not know about
        raise ConfigError(f"PEFT refused the merge: {exc}", hint=_FLEXIBLE) from None
    fidelity = measure_fidelity(model, names, spec.weights, "merged")
    if not math.isfinite(fidelity["weighted_sum_rel_error"]):
        raise AdaptoryError("the merged adapter has non-finite weights; nothing was stored")
    if spec.method == "cat" and fidelity["weighted_sum_rel_error"] > EXACT_TOLERANCE:
        raise AdaptoryError(
            f"cat merge is {fidelity['weighted_sum_rel_error']:.2e} away from the exact weighted "
            "sum of the parents' ΔW; nothing was stored",
            hint="please report this with the parents' configs (PEFT version changes?)",
        )
    model.save_pretrained(str(workdir), selected_adapters=["merged"])
    folder = workdir / "merged"
    _finish_folder(registry, folder, parents, spec.weights)
    return folder, fidelity


def peft_weights(method: str, weights: Sequence[float]) -> list[float]:
    """The weights to hand PEFT so that each A and B factor is combined with weight w_i."""
    return [w * w for w in weights] if method in SEPARATE_AB else list(weights)


def _keep_one_head(model, names: list[str]) -> None:
    """PEFT refuses to merge when several adapters train the same whole module (a
    classification head). Keep the first parent's copy; the saved head is replaced by the
    weighted average of all parents' heads (_finish_folder)."""
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for name in names[1:]:
                if name in module.modules_to_save:
                    del module.modules_to_save[name]


def delta_weight_fp64(module, adapter: str):
    """scale · B·A of one LoRA layer in float64 on the CPU. PEFT's get_delta_weight multiplies in
    the layer's dtype on its device: TF32 on CUDA puts ~3e-3 of error into an exact `cat`."""
    import torch

    a = module.lora_A[adapter].weight.detach().to("cpu", torch.float64)
    b = module.lora_B[adapter].weight.detach().to("cpu", torch.float64)
    delta = (b @ a) * float(module.scaling[adapter])
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


def measure_fidelity(model, parents: list[str], weights: Sequence[float], merged: str) -> dict:
    """Relative Frobenius distance (over all adapted modules) of the merged ΔW from Σ w_i·ΔW_i,
    computed in float64 on the CPU whatever the model's device and dtype."""
    import torch
    from peft.tuners.lora import LoraLayer

    err = ref = 0.0
    modules = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or merged not in module.scaling:
            continue
        with torch.no_grad():
            expected = None
            for adapter, weight in zip(parents, weights, strict=True):
                if adapter in module.scaling:
                    delta = delta_weight_fp64(module, adapter) * weight
                    expected = delta if expected is None else expected + delta
            got = delta_weight_fp64(module, merged)
        if expected is None:
            continue
        err += float(((got - expected) ** 2).sum())
        ref += float((expected**2).sum())
        modules += 1
    rel = math.sqrt(err) / math.sqrt(ref) if ref > 0 else math.sqrt(err)
    return {"weighted_sum_rel_error": rel, "modules": modules}


def _finish_folder(registry, folder: Path, parents: Sequence, weights: Sequence[float]) -> None:
    """Tidy PEFT's saved config (canonical, as training writes it) and give a merged classifier
    the weighted mean of the heads."""
    from safetensors.torch import load_file, save_file

    from adaptory.adapters.training.loop import canonical_adapter_config

    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = parents[0].peft_config.get(
        "base_model_name_or_path", config.get("base_model_name_or_path")
    )
    config_path.write_text(canonical_adapter_config(config))
    (folder / "README.md").unlink(missing_ok=True)
    if parents[0].task != "seq-cls":
        return
    weights_file = folder / "adapter_model.safetensors"
    merged = load_file(str(weights_file))
    parent_tensors = [
        load_file(str(registry.files(p) / "adapter_model.safetensors")) for p in parents
    ]
    for key in [k for k in merged if ".lora_" not in k]:
        found = [
            (sd[key].double(), w)
            for sd, w in zip(parent_tensors, weights, strict=True)
            if key in sd
        ]
        total = sum(w for _, w in found)
        if found and total:
            mean = sum(t * w for t, w in found) / total
            merged[key] = mean.to(merged[key].dtype).contiguous()
    save_file(merged, str(weights_file), metadata={"format": "pt"})


def _merged_dataset(parents: Sequence) -> dict:
    files = {str(p.dataset.get("eval_file")) for p in parents if (p.dataset or {}).get("eval_file")}
    dataset: dict = {
        "merged_from": [
            {"ref": p.ref, **{k: v for k, v in (p.dataset or {}).items()}} for p in parents
        ]
    }
    if len(files) == 1:
        dataset["eval_file"] = files.pop()
    return dataset


def evaluate_merge(registry, entry, parents: Sequence, *, limit: int | None = None) -> dict:
    """The merged adapter's metrics on each parent's eval data, next to that parent's own.

    Returns {"parents": {parent_ref: metrics}, "on_parent_data": {parent_ref: merged metrics}},
    plus the merged metrics at the top level when all parents share one eval file.
    """
    from adaptory.adapters.merging.compare import eval_file, evaluate_entry_on

    merged_by_file: dict[Path, dict] = {}
    parent_metrics: dict[str, dict] = {}
    merged_metrics: dict[str, dict] = {}
    for parent in parents:
        data = eval_file(parent)
        if data is None or parent.ref in parent_metrics:
            continue
        if data not in merged_by_file:
            merged_by_file[data] = evaluate_entry_on(registry, entry, data, limit=limit)
        parent_metrics[parent.ref] = {
            "data": str(data),
            **evaluate_entry_on(registry, parent, data, limit=limit),
        }
        merged_metrics[parent.ref] = {"data": str(data), **merged_by_file[data]}
    if not parent_metrics:
        return {}
    metrics: dict = {"parents": parent_metrics, "on_parent_data": merged_metrics}
    if len(merged_by_file) == 1:
        metrics.update(next(iter(merged_by_file.values())))
    return metrics
