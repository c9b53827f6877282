"""The benchmarks' shared harness: settings, interleaved timing, random LoRA adapters, the
reference greedy decode loop, JSON output.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8


# --- settings ------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What every benchmark needs: where to build things, which base and device, how many runs."""

    workdir: Path
    size: str = "small"
    device: str = "cpu"
    repeats: int = 5
    quick: bool = False
    base_dir: Path | None = None  # an existing base folder instead of building `size`
    seed: int = 0
    threads: int | None = None  # torch CPU threads (1 is steadiest on a shared machine)

    def __post_init__(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.quick:
            self.repeats = min(self.repeats, 2)


def machine_info(device: str = "cpu") -> dict:
    """The figures' context: CPU model and count, library versions, GPU name when used."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "nproc": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_base(settings: BenchSettings) -> Path:
    """The base folder to benchmark on: `base_dir`, or a random-init base of `size` built once
    under the work folder (weights are random: speed and memory do not depend on training)."""
    if settings.base_dir is not None:
        return Path(settings.base_dir)
    from adaptory.adapters.bases.tiny import DEFAULT_CORPUS, init_base

    out = settings.workdir / "bases" / settings.size
    if not (out / "config.json").is_file():
        init_base(out, size=settings.size, corpus=[DEFAULT_CORPUS], seed=settings.seed)
    return out


def load_bench_base(base_dir: Path, settings: BenchSettings, quant: str = "nf4"):
    from adaptory.adapters.bases.loading import load_base

    return load_base(str(base_dir), task="causal-lm", quant=quant, device=settings.device)


# --- timing --------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds `fn` takes, with the GPU queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(
    variants: dict[str, Callable[[], float]], repeats: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each variant (a callable returning the seconds it measured) `repeats` times,
    rotating the order every round, after `warmup` untimed rounds."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(variants[name]())
    return times


def summary(samples: Sequence[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "runs": len(samples),
    }


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples RSS in a thread while a block runs; `.peak` is the highest value seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cuda_allocated(device: str) -> int:
    import torch

    return torch.cuda.memory_allocated() if str(device).startswith("cuda") else 0


# --- adapters ------------------------------------------------------------------------------


def lora_shapes(model, targets: Sequence[str] = TARGETS) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of the base's Linear layers named in targets."""
    shapes = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            shapes[path] = (int(module.in_features), int(module.out_features))
    return shapes


def random_lora(
    shapes: dict[str, tuple[int, int]], *, r: int = RANK, seed: int = 0, scale: float = 0.5
) -> dict:
    """A random LoRA state dict in PEFT's saved layout (B nonzero, so it changes outputs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, (d_in, d_out) in shapes.items():
        a = torch.randn(r, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen) * scale / r**0.5
        state[f"base_model.model.{path}.lora_A.weight"] = a
        state[f"base_model.model.{path}.lora_B.weight"] = b
    return state


def lora_config(base_name: str, *, r: int = RANK, targets: Sequence[str] = TARGETS) -> dict:
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    return json.loads(json.dumps(config.to_dict(), default=_jsonable))


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def write_lora(folder: Path, state: dict, config: dict) -> Path:
    """Save an adapter exactly as PEFT's save_pretrained lays it out."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors")
    )
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def make_adapters(base_dir: Path, shapes, n: int, out: Path, *, seed: int = 0) -> list[Path]:
    """n random LoRA folders (r=RANK on TARGETS) for the base, cached under `out`."""
    config = lora_config(str(base_dir))
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            write_lora(folder, random_lora(shapes, seed=seed + i), config)
        folders.append(folder)
    return folders


def register_adapters(registry, base_dir: Path, folders: Sequence[Path], quant: str = "nf4"):
    """Add the folders to `registry` as bench-BASE-a0, … (reusing entries made for this very
    base, by fingerprint)."""
    from adaptory.adapters.bases.loading import fingerprint_base, resolve_base
    from adaptory.registry.errors import AdapterNotFound

    fingerprint = fingerprint_base(resolve_base(str(base_dir)), quant).to_dict()
    entries = []
    for folder in folders:
        name = f"bench-{base_dir.name}-{folder.name}"
        try:
            entry = registry.resolve(name)
            if (entry.base_fingerprint or {}).get("digest") == fingerprint["digest"]:
                entries.append(entry)
                continue
        except AdapterNotFound:
            pass
        entries.append(
            registry.add(
                folder,
                name=name,
                method="lora",
                task="causal-lm",
                base_model=str(base_dir),
                base_fingerprint=fingerprint,
            )
        )
    return entries


def read_adapter(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return state, json.loads((folder / "adapter_config.json").read_text())


def peft_with_adapters(model, folders: Sequence[Path]):
    """The base wrapped by PEFT with every folder loaded under its folder name."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=folders[0].name)
    for folder in folders[1:]:
        peft_model.load_adapter(str(folder), adapter_name=folder.name)
    peft_model.eval()
    return peft_model


# --- the decode loop -----------------------------------------------------------------------


def prompts(tokenizer, batch: int, length: int, device: str, seed: int = 0):
    """`batch` left-padded prompts of 60-100% of `length` tokens from the base's vocabulary."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = max(1, int(length * 0.6))
    lengths = torch.randint(low, length + 1, (batch,), generator=gen)
    vocab = len(tokenizer)
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    special = max(tokenizer.all_special_ids or [0]) + 1
    for i, n in enumerate(lengths.tolist()):
        ids[i, length - n :] = torch.randint(special, vocab, (n,), generator=gen)
        mask[i, length - n :] = 1
    return ids.to(device), mask.to(device)


def greedy_decode(model, input_ids, attention_mask, new_tokens: int, **forward_kwargs):
    """Greedy tokens (B, new_tokens) with a KV cache; `forward_kwargs` go to every forward
    (PEFT's `adapter_names`). Runs all `new_tokens` steps (no eos stop: equal work per path)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    cache_kwarg = _cache_kwarg(model)
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens = []
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
            **forward_kwargs,
        )
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        ones = mask.new_ones((mask.shape[0], 1))
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, ones], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_kwarg: cache},
                **forward_kwargs,
            )
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1)


def _cache_kwarg(model) -> str:
    """transformers 5.x renames past_key_values to cache; PEFT passes either through."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def spread(names: Sequence[str], batch: int, k: int) -> list[str]:
    """Row i uses adapter i mod k (k adapters spread evenly over the batch)."""
    return [names[i % k] for i in range(batch)]


def write_json(result: dict, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    tmp.replace(out)
    return out


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "adaptory-bench"


def _settings_dict(settings: BenchSettings, base_dir: Path, **extra) -> dict:
    info = {}
    try:
        info = json.loads((Path(base_dir) / "adaptory_base.json").read_text())
    except (OSError, ValueError):
        pass
    return {
        "size": info.get("size", settings.size),
        "params": info.get("params"),
        "base": str(base_dir),
        "quant": "nf4",
        "device": settings.device,
        "repeats": settings.repeats,
        "quick": settings.quick,
        **extra,
    }


def _runtime_or_none(base_dir, registry, settings: BenchSettings, *, max_adapters: int):
    try:
        from adaptory.adapters.serving.runtime import Runtime
    except ImportError:
        return None
    return Runtime(
        str(base_dir),
        registry=registry,
        task="causal-lm",
        quant="nf4",
        device=settings.device,
        max_adapters=max_adapters,
    )
