"""Benchmarks: adapter swap cost, mixed-adapter serving throughput, memory per adapter, training.

Each `bench_*` function returns a JSON-able dict. Every compared variant is measured in the same
process, interleaved (variant order rotates each repeat), after one untimed warm-up run of each,
and reported as median seconds over the repeats plus ratios of medians: on a shared machine
absolute timings drift, but variants measured side by side drift together.

The model-level serving paths share one decode loop (`greedy_decode`: left-padded prefill, then
one token per step with a KV cache), so they differ only in how adapters are applied:
the plain base, Adaptory's `LoraBank` (one gathered bmm per adapted layer), PEFT's mixed batch
(`adapter_names=` on every forward) and PEFT swap-per-group (`set_adapter`, one sub-batch each).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
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
    from adaptory.adapters.tinybase import DEFAULT_CORPUS, init_base

    out = settings.workdir / "bases" / settings.size
    if not (out / "config.json").is_file():
        init_base(out, size=settings.size, corpus=[DEFAULT_CORPUS], seed=settings.seed)
    return out


def load_bench_base(base_dir: Path, settings: BenchSettings, quant: str = "nf4"):
    from adaptory.adapters.base import load_base

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
    from adaptory.adapters.base import fingerprint_base, resolve_base
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


# --- swap ----------------------------------------------------------------------------------


def bench_swap(settings: BenchSettings, *, batch: int = 8) -> dict:
    """Switching to a resident adapter, loading a cold one from the registry, and reloading a
    base with the adapter merged (the one-model-per-task alternative)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.base import CAUSAL_SKIP_MODULES, quantization_config
    from adaptory.adapters.lora_bank import LoraBank
    from adaptory.registry import Registry

    device, repeats = settings.device, settings.repeats
    base_dir = bench_base(settings)
    loaded = load_bench_base(base_dir, settings)
    shapes = lora_shapes(loaded.model)
    folders = make_adapters(base_dir, shapes, 4, settings.workdir / "adapters" / base_dir.name)
    registry = Registry(settings.workdir / "home")
    entries = register_adapters(registry, base_dir, folders)
    names = [f.name for f in folders]

    merged_dir = merged_model_dir(settings, base_dir, folders[0])
    qconfig = quantization_config("nf4", device, CAUSAL_SKIP_MODULES)

    bank = LoraBank(loaded.model)
    for folder in folders[:-1]:
        bank.add(folder.name, *read_adapter(folder))
    peft_model = peft_with_adapters(load_bench_base(base_dir, settings).model, folders[:-1])
    cold, cold_entry = folders[-1], entries[-1]

    inner = 20 if settings.quick else 200  # warm swaps are microseconds: time a loop of them
    turn = {"i": 0}

    def next_name() -> str:
        turn["i"] += 1
        return names[turn["i"] % (len(names) - 1)]

    def warm_bank() -> float:
        def run():
            for _ in range(inner):
                with bank.rows([next_name()] * batch):
                    pass

        return timed(run, device) / inner

    def warm_peft() -> float:
        def run():
            for _ in range(inner):
                peft_model.set_adapter(next_name())

        return timed(run, device) / inner

    def cold_bank() -> float:
        def run():
            folder = registry.files(cold_entry, verify=True)
            bank.add(cold.name, *read_adapter(folder))

        seconds = timed(run, device)
        bank.remove(cold.name)
        return seconds

    def cold_peft() -> float:
        def run():
            peft_model.load_adapter(str(registry.files(cold_entry, verify=True)), cold.name)

        seconds = timed(run, device)
        peft_model.delete_adapter(cold.name)
        return seconds

    def merged_reload() -> float:
        holder = {}

        def run():
            holder["m"] = AutoModelForCausalLM.from_pretrained(
                str(merged_dir),
                quantization_config=qconfig,
                device_map={"": 0 if device == "cuda" else device},
            )

        seconds = timed(run, device)
        del holder["m"]
        gc.collect()
        return seconds

    variants = {
        "warm_bank_rows": warm_bank,
        "warm_peft_set_adapter": warm_peft,
        "cold_registry_to_bank": cold_bank,
        "cold_registry_to_peft": cold_peft,
        "merged_model_reload": merged_reload,
    }
    runtime = _runtime_or_none(base_dir, registry, settings, max_adapters=8)
    if runtime is not None:
        refs = [e.ref for e in entries]
        for ref in refs[:-1]:
            runtime.load(ref)

        def warm_runtime() -> float:
            def run():
                for _ in range(inner):
                    runtime.load(refs[turn["i"] % (len(refs) - 1)])
                    turn["i"] += 1

            return timed(run, device) / inner

        def cold_runtime() -> float:
            seconds = timed(lambda: runtime.load(refs[-1]), device)
            runtime.unload(refs[-1])
            return seconds

        variants["warm_runtime_load_hit"] = warm_runtime
        variants["cold_registry_to_runtime"] = cold_runtime
    with torch.inference_mode():
        times = interleave(variants, repeats)
    results = {name: summary(t) for name, t in times.items()}
    med = {name: r["median_s"] for name, r in results.items()}
    reload = med["merged_model_reload"]
    ratios = {
        f"merged_reload/{name}": reload / med[name] for name in med if name != "merged_model_reload"
    }
    bank.close()
    return {
        "bench": "swap",
        "settings": _settings_dict(settings, base_dir, batch=batch, adapters=len(folders)),
        "results": results,
        "ratios": ratios,
        "targets": {
            "warm swap >= 100x faster than merged reload": ratios["merged_reload/warm_bank_rows"]
            >= 100,
            "cold load from registry >= 5x faster than merged reload": ratios[
                "merged_reload/cold_registry_to_bank"
            ]
            >= 5,
        },
        "notes": [
            "warm: per switch, timed over a loop of "
            f"{inner}; cold: registry verify (re-hash) + safetensors read + install; merged: "
            "from_pretrained of a merged model folder, quantized to NF4 on load",
        ],
    }


def merged_model_dir(settings: BenchSettings, base_dir: Path, adapter: Path) -> Path:
    """The base with `adapter` merged in, saved once (unquantized, as a merge step writes it)."""
    from peft import PeftModel

    from adaptory.adapters.base import load_base

    out = settings.workdir / "merged" / f"{base_dir.name}-{adapter.name}"
    if not (out / "config.json").is_file():
        full = load_base(str(base_dir), task="causal-lm", quant="none", device="cpu")
        merged = PeftModel.from_pretrained(full.model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out))
        full.tokenizer.save_pretrained(str(out))
    return out


def _runtime_or_none(base_dir, registry, settings: BenchSettings, *, max_adapters: int):
    try:
        from adaptory.adapters.runtime import Runtime
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


# --- serve ---------------------------------------------------------------------------------


def bench_serve(
    settings: BenchSettings,
    *,
    batch: int | None = None,
    new_tokens: int | None = None,
    prompt_len: int = 24,
    ks: Sequence[int] | None = None,
    runtime: bool = True,
) -> dict:
    """Generated tokens/s for one batch: all on the base, all on one adapter, or spread over K
    adapters, through the bank, PEFT's mixed batch, PEFT swap-per-group and the Runtime."""
    import torch

    from adaptory.adapters.lora_bank import LoraBank
    from adaptory.registry import Registry

    quick = settings.quick
    batch = batch or (4 if quick else 32)
    new_tokens = new_tokens or (4 if quick else 32)
    ks = [k for k in (ks or ((2,) if quick else (2, 8, 32))) if k <= batch]
    device, repeats = settings.device, settings.repeats
    base_dir = bench_base(settings)

    bank_base = load_bench_base(base_dir, settings)
    shapes = lora_shapes(bank_base.model)
    n_adapters = max([*ks, 1])
    folders = make_adapters(
        base_dir, shapes, n_adapters, settings.workdir / "adapters" / base_dir.name
    )
    names = [f.name for f in folders]
    bank = LoraBank(bank_base.model)
    for folder in folders:
        bank.add(folder.name, *read_adapter(folder))
    peft_model = peft_with_adapters(load_bench_base(base_dir, settings).model, folders)
    input_ids, mask = prompts(bank_base.tokenizer, batch, prompt_len, device, seed=settings.seed)
    model = bank_base.model
    tokens = batch * new_tokens

    def bank_run(rows):
        def run():
            with bank.rows(rows):
                greedy_decode(model, input_ids, mask, new_tokens)

        return lambda: timed(run, device)

    def peft_mixed(rows):
        return lambda: timed(
            lambda: greedy_decode(peft_model, input_ids, mask, new_tokens, adapter_names=rows),
            device,
        )

    def peft_single(name):
        def run():
            peft_model.set_adapter(name)
            greedy_decode(peft_model, input_ids, mask, new_tokens)

        return lambda: timed(run, device)

    def peft_groups(rows):
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).append(i)
        index = {n: torch.tensor(r, device=device) for n, r in groups.items()}

        def run():
            for name, rows_of in index.items():
                peft_model.set_adapter(name)
                greedy_decode(peft_model, input_ids[rows_of], mask[rows_of], new_tokens)

        return lambda: timed(run, device)

    variants: dict[str, Callable[[], float]] = {
        "base": bank_run([None] * batch),
        "bank/K=1": bank_run([names[0]] * batch),
        "peft_single/K=1": peft_single(names[0]),
    }
    for k in ks:
        rows = spread(names, batch, k)
        variants[f"bank/K={k}"] = bank_run(rows)
        variants[f"peft_mixed/K={k}"] = peft_mixed(rows)
        variants[f"peft_groups/K={k}"] = peft_groups(rows)

    rt = None
    if runtime:
        registry = Registry(settings.workdir / "home")
        entries = register_adapters(registry, base_dir, folders)
        rt = _runtime_or_none(base_dir, registry, settings, max_adapters=n_adapters + 1)
    if rt is not None:
        from adaptory.adapters.runtime import GenerationRequest

        refs = [e.ref for e in entries]
        ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]

        def runtime_run(rows):
            requests = [
                GenerationRequest(prompt_ids=ids[i], adapter=r, max_new_tokens=new_tokens)
                for i, r in enumerate(rows)
            ]
            count = {"tokens": tokens}

            def run():
                results = rt.generate(requests)
                count["tokens"] = sum(r.completion_tokens for r in results)

            return lambda: timed(run, device) * tokens / max(1, count["tokens"])

        variants["runtime/K=1"] = runtime_run([refs[0]] * batch)
        for k in ks:
            variants[f"runtime/K={k}"] = runtime_run(spread(refs, batch, k))

    times = interleave(variants, repeats)
    results = {}
    for name, samples in times.items():
        entry = summary(samples)
        entry["tokens_per_s"] = tokens / entry["median_s"]
        results[name] = entry
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {}
    for k in ks:
        ratios[f"bank K={k} / bank K=1"] = tps[f"bank/K={k}"] / tps["bank/K=1"]
        ratios[f"bank K={k} / peft_mixed K={k}"] = tps[f"bank/K={k}"] / tps[f"peft_mixed/K={k}"]
        ratios[f"bank K={k} / peft_groups K={k}"] = tps[f"bank/K={k}"] / tps[f"peft_groups/K={k}"]
        if rt is not None:
            ratios[f"runtime K={k} / runtime K=1"] = tps[f"runtime/K={k}"] / tps["runtime/K=1"]
            ratios[f"bank K={k} / runtime K={k}"] = tps[f"bank/K={k}"] / tps[f"runtime/K={k}"]
    ratios["bank K=1 / base"] = tps["bank/K=1"] / tps["base"]
    ratios["bank K=1 / peft_single K=1"] = tps["bank/K=1"] / tps["peft_single/K=1"]
    targets = {}
    if 8 in ks:
        targets["bank K=8 >= 0.9x bank K=1"] = ratios["bank K=8 / bank K=1"] >= 0.9
    for k in (8, 32):
        if k in ks:
            targets[f"bank K={k} >= 1.5x peft_mixed K={k}"] = (
                ratios[f"bank K={k} / peft_mixed K={k}"] >= 1.5
            )
    bank.close()
    return {
        "bench": "serve",
        "settings": _settings_dict(
            settings,
            base_dir,
            batch=batch,
            new_tokens=new_tokens,
            prompt_len=prompt_len,
            ks=list(ks),
            rank=RANK,
            targets=list(TARGETS),
        ),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            "tokens/s = batch x new_tokens / wall time of the whole request batch "
            "(prefill included), greedy, KV cache, no eos stop",
            "runtime: Runtime.generate (per-request prefill, text decoding each step); its "
            "time is scaled to the same token count when rows stop early at eos",
        ],
    }


def plot_serve(result: dict, out: Path) -> Path:
    """tokens/s against K for the batched bank, PEFT's mixed batch and PEFT swap-per-group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["results"]
    ks = [1, *result["settings"]["ks"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    series = [
        ("bank", "Adaptory LoraBank (batched)", "bank/K=1"),
        ("peft_mixed", "PEFT adapter_names=", "peft_single/K=1"),
        ("peft_groups", "PEFT set_adapter per group", "peft_single/K=1"),
        ("runtime", "Adaptory Runtime.generate", "runtime/K=1"),
    ]
    for key, label, k1 in series:
        points = [(1, results[k1]["tokens_per_s"])] if k1 in results else []
        points += [
            (k, results[f"{key}/K={k}"]["tokens_per_s"])
            for k in ks[1:]
            if f"{key}/K={k}" in results
        ]
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.axhline(results["base"]["tokens_per_s"], color="grey", ls="--", lw=1, label="base only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("distinct adapters in the batch (K)")
    ax.set_ylabel("generated tokens / s")
    s = result["settings"]
    ax.set_title(
        f"{s['size']} base, NF4, {s['device']}: batch {s['batch']}, {s['new_tokens']} new tokens",
        fontsize=10,
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# --- serve over HTTP -----------------------------------------------------------------------


def wait_healthy(url: str, server, log: Path, *, timeout: float = 120) -> None:
    """Wait for a started `adaptory serve` to answer /health; RuntimeError if it exits or not."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"adaptory serve exited ({server.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"adaptory serve did not become healthy in {timeout:.0f}s; see {log}")


def bench_http(
    settings: BenchSettings,
    *,
    clients: int | None = None,
    requests: int | None = None,
    new_tokens: int | None = None,
    k: int = 8,
    timeout: float = 300.0,
) -> dict:
    """The server end to end: `adaptory serve` in a subprocess on a free 127.0.0.1 port,
    `clients` concurrent httpx clients sending `requests` completions over `k` adapters."""
    import socket
    import subprocess
    import sys

    import httpx

    from adaptory.registry import Registry

    quick = settings.quick
    clients = clients or (2 if quick else 16)
    requests = requests or (4 if quick else 64)
    new_tokens = new_tokens or (4 if quick else 32)
    base_dir = bench_base(settings)
    loaded = load_bench_base(base_dir, settings)
    shapes = lora_shapes(loaded.model)
    del loaded
    folders = make_adapters(base_dir, shapes, k, settings.workdir / "adapters" / base_dir.name)
    home = settings.workdir / "home"
    entries = register_adapters(Registry(home), base_dir, folders)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "adaptory.cli.main", "--home", str(home), "serve",
        "--base", str(base_dir), "--host", "127.0.0.1", "--port", str(port),
        "--device", settings.device, "--max-adapters", str(k + 1), "--max-batch", str(clients),
    ]  # fmt: skip
    log = settings.workdir / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log, timeout=120)
        prompt = "the cat sat on the mat and the dog ran to the park"
        for entry in entries:  # load every adapter once, untimed
            httpx.post(
                f"{url}/v1/completions",
                json={"model": entry.ref, "prompt": prompt, "max_tokens": 1},
                timeout=timeout,
            ).raise_for_status()
        latencies: list[float] = []
        produced = [0]
        lock = threading.Lock()
        jobs = iter(range(requests))

        def client() -> None:
            with httpx.Client(timeout=timeout) as http:
                while True:
                    with lock:
                        i = next(jobs, None)
                    if i is None:
                        return
                    start = time.perf_counter()
                    reply = http.post(
                        f"{url}/v1/completions",
                        json={
                            "model": entries[i % k].ref,
                            "prompt": prompt,
                            "max_tokens": new_tokens,
                            "temperature": 0,
                        },
                    )
                    reply.raise_for_status()
                    seconds = time.perf_counter() - start
                    usage = reply.json().get("usage", {})
                    with lock:
                        latencies.append(seconds)
                        produced[0] += int(usage.get("completion_tokens", new_tokens))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    if len(latencies) != requests:
        raise RuntimeError(f"only {len(latencies)} of {requests} requests succeeded; see {log}")
    ordered = sorted(latencies)
    return {
        "bench": "http",
        "settings": _settings_dict(
            settings, base_dir, clients=clients, requests=requests, new_tokens=new_tokens, k=k
        ),
        "results": {
            "latency_p50_s": ordered[len(ordered) // 2],
            "latency_p99_s": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "wall_s": wall,
            "completion_tokens": produced[0],
            "tokens_per_s": produced[0] / wall,
            "requests_per_s": requests / wall,
        },
    }


def serve_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("adaptory.cli.serve_cmds") is not None


# --- memory --------------------------------------------------------------------------------


def bench_memory(settings: BenchSettings, *, counts: Sequence[int] | None = None) -> dict:
    """Resident memory with N adapters on one 4-bit base (the bank, and the Runtime when there
    is one) against N merged models, and bytes per adapter against r·(d_in+d_out)·dtype."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from adaptory.adapters.base import CAUSAL_SKIP_MODULES, quantization_config
    from adaptory.adapters.lora_bank import LoraBank

    counts = list(counts or ((1, 4) if settings.quick else (1, 10, 100)))
    device = settings.device
    base_dir = bench_base(settings)
    gc.collect()
    rss0, cuda0 = rss_bytes(), cuda_allocated(device)
    loaded = load_bench_base(base_dir, settings)
    gc.collect()
    base_rss = rss_bytes() - rss0
    base_cuda = cuda_allocated(device) - cuda0
    base_footprint = loaded.model.get_memory_footprint()
    shapes = lora_shapes(loaded.model)
    bank = LoraBank(loaded.model)
    config = lora_config(str(base_dir))
    elem = torch.empty((), dtype=bank.dtype or _bank_dtype(loaded.model, shapes)).element_size()
    theory = sum(RANK * (d_in + d_out) * elem for d_in, d_out in shapes.values())

    rows = []
    added = 0
    gc.collect()
    rss_start, cuda_start = rss_bytes(), cuda_allocated(device)
    for n in counts:
        while added < n:
            state = {k: v.to(device) for k, v in random_lora(shapes, seed=added).items()}
            bank.add(f"a{added}", state, config)
            del state
            added += 1
        gc.collect()
        nbytes = bank.nbytes()
        rows.append(
            {
                "adapters": n,
                "bank_nbytes": nbytes,
                "bank_bytes_per_adapter": nbytes / n,
                "rss_delta": rss_bytes() - rss_start,
                "cuda_allocated_delta": cuda_allocated(device) - cuda_start,
                "merged_models_bytes_extrapolated": None,  # filled below
            }
        )
    bank.close()
    del bank
    # one merged model's size, measured; N merged models are extrapolated as N x that
    folder = make_adapters(base_dir, shapes, 1, settings.workdir / "adapters" / base_dir.name)[0]
    merged_dir = merged_model_dir(settings, base_dir, folder)
    qconfig = quantization_config("nf4", device, CAUSAL_SKIP_MODULES)
    gc.collect()
    rss1, cuda1 = rss_bytes(), cuda_allocated(device)
    merged = AutoModelForCausalLM.from_pretrained(
        str(merged_dir),
        quantization_config=qconfig,
        device_map={"": 0 if device == "cuda" else device},
    )
    gc.collect()
    merged_rss = rss_bytes() - rss1
    merged_cuda = cuda_allocated(device) - cuda1
    merged_footprint = merged.get_memory_footprint()
    del merged
    gc.collect()
    one_model = merged_cuda if device.startswith("cuda") else merged_footprint
    for row in rows:
        row["merged_models_bytes_extrapolated"] = row["adapters"] * one_model
        row["one_base_plus_bank_bytes"] = (
            base_cuda if device.startswith("cuda") else base_footprint
        ) + row["bank_nbytes"]
        row["merged_over_shared"] = (
            row["merged_models_bytes_extrapolated"] / row["one_base_plus_bank_bytes"]
        )
    marginal = None
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        marginal = (last["bank_nbytes"] - first["bank_nbytes"]) / (
            last["adapters"] - first["adapters"]
        )

    runtime_rows = _runtime_memory(settings, base_dir, shapes, counts)
    results = {
        "base": {
            "footprint_bytes": base_footprint,
            "rss_delta": base_rss,
            "cuda_allocated_delta": base_cuda,
        },
        "merged_model": {
            "footprint_bytes": merged_footprint,
            "rss_delta": merged_rss,
            "cuda_allocated_delta": merged_cuda,
        },
        "adapter_theoretical_bytes": theory,
        "adapted_matrices": len(shapes),
        "bank": rows,
        "bank_marginal_bytes_per_adapter": marginal,
        "bank_marginal_over_theory": marginal / theory if marginal else None,
        "runtime": runtime_rows,
    }
    growth = [r["bank_nbytes"] for r in rows]
    linear = marginal is not None and all(
        abs(growth[i] - (growth[0] + marginal * (rows[i]["adapters"] - rows[0]["adapters"])))
        <= 0.01 * growth[i]
        for i in range(len(rows))
    )
    return {
        "bench": "memory",
        "settings": _settings_dict(
            settings, base_dir, counts=counts, rank=RANK, targets=list(TARGETS)
        ),
        "results": results,
        "targets": {
            "marginal bytes per adapter <= 1.2x theory": marginal is not None
            and marginal / theory <= 1.2,
            "linear growth": linear,
        },
        "notes": [
            f"theory: sum over {len(shapes)} adapted matrices of r*(d_in+d_out)*{elem} bytes, r={RANK}",
            "bank_nbytes includes slot 0, the zero adapter that plain-base rows gather "
            "(a fixed overhead of one adapter)",
            "merged models: N x one merged NF4 model's measured size, extrapolated, not loaded",
            "rss deltas are noisy on CPU (allocator caching); bank_nbytes is exact",
        ],
    }


def _bank_dtype(model, shapes):
    from adaptory.adapters.lora_bank import _compute_dtype

    path = next(iter(shapes))
    return _compute_dtype(model.get_submodule(path))


def _runtime_memory(settings: BenchSettings, base_dir: Path, shapes, counts) -> dict | None:
    """Bytes the Runtime holds for N resident adapters (it has one tier: its device)."""
    import gc
    import tempfile as _tempfile

    from adaptory.registry import Registry

    try:
        from adaptory.adapters.runtime import Runtime  # noqa: F401
    except ImportError:
        return None
    registry = Registry(settings.workdir / "home-memory")
    config = lora_config(str(base_dir))
    needed = max(counts)
    folders = []
    with _tempfile.TemporaryDirectory() as tmp:
        for i in range(needed):
            folders.append(
                write_lora(Path(tmp) / f"m{i}", random_lora(shapes, seed=1000 + i), config)
            )
        entries = register_adapters(registry, base_dir, folders)
    rt = _runtime_or_none(base_dir, registry, settings, max_adapters=needed)
    tier = "cuda" if settings.device.startswith("cuda") else "cpu"
    rows = []
    loaded = 0
    gc.collect()
    rss_start, cuda_start = rss_bytes(), cuda_allocated(settings.device)
    for n in counts:
        while loaded < n:
            rt.load(entries[loaded].ref)
            loaded += 1
        gc.collect()
        held = rt._bank.nbytes()  # the runtime keeps LoRA weights in its LoraBank only
        rows.append(
            {
                "adapters": n,
                "tiers": {tier: held},
                "bytes_per_adapter": held / n,
                "rss_delta": rss_bytes() - rss_start,
                "cuda_allocated_delta": cuda_allocated(settings.device) - cuda_start,
            }
        )
    return {
        "tiers": [tier],
        "rows": rows,
        "note": "the Runtime has one tier (its device); no CPU/GPU LRU tiers",
    }


# --- train ---------------------------------------------------------------------------------


def bench_train(
    settings: BenchSettings,
    *,
    batch: int | None = None,
    max_length: int | None = None,
    steps: int | None = None,
) -> dict:
    """Training tokens/s and peak memory of `adaptory train` (adapters/train.py) against a plain
    transformers+PEFT loop on the same base, batches and settings, on the 4-bit and the
    unquantized base. Every run loads its own model; only the optimizer steps are timed."""
    import importlib.util

    from adaptory.adapters.base import load_tokenizer
    from adaptory.adapters.data import load_dataset
    from adaptory.registry import Registry

    quick = settings.quick
    batch = batch or (2 if quick else 8)
    max_length = max_length or (32 if quick else 128)
    steps = steps or (2 if quick else 6)
    base_dir = bench_base(settings)
    data_file = _train_data(settings.workdir, rows=max(64, steps * batch * 2))
    tokenizer = load_tokenizer(base_dir, "causal-lm")
    dataset = load_dataset(data_file, tokenizer=tokenizer, task="causal-lm", max_length=max_length)
    has_train = importlib.util.find_spec("adaptory.adapters.train") is not None
    registry = Registry(settings.workdir / "home-train")
    plan = {"batch": batch, "max_length": max_length, "steps": steps}
    memory: dict[str, list[int]] = {}
    tokens: dict[str, int] = {}

    def variant(kind: str, quant: str):
        name = f"{kind}/{quant}"
        memory[name] = []

        def run() -> float:
            fn = _adaptory_train_run if kind == "adaptory_train" else _plain_train_run
            seconds, n_tokens, peak = fn(
                settings, base_dir, data_file, dataset, quant, plan, registry
            )
            memory[name].append(peak)
            tokens[name] = n_tokens
            return seconds

        return run

    variants = {}
    for quant in ("nf4", "none"):
        variants[f"plain_peft/{quant}"] = variant("plain_peft", quant)
        if has_train:
            variants[f"adaptory_train/{quant}"] = variant("adaptory_train", quant)
    times = interleave(variants, settings.repeats, warmup=0 if quick else 1)
    results = {}
    for name, samples in times.items():
        entry = summary(samples)
        entry["tokens"] = tokens[name]
        entry["tokens_per_s"] = tokens[name] / entry["median_s"]
        entry["peak_bytes"] = int(statistics.median(memory[name]))
        results[name] = entry
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {
        "plain nf4 / none tokens/s": tps["plain_peft/nf4"] / tps["plain_peft/none"],
        "plain nf4 / none peak": results["plain_peft/nf4"]["peak_bytes"]
        / results["plain_peft/none"]["peak_bytes"],
    }
    targets = {}
    if has_train:
        for quant in ("nf4", "none"):
            overhead = tps[f"plain_peft/{quant}"] / tps[f"adaptory_train/{quant}"] - 1
            ratios[f"adaptory_train overhead ({quant})"] = 1 + overhead
            targets[f"adaptory train overhead <= 5% ({quant})"] = overhead <= 0.05
    notes = [
        f"{steps} optimizer steps of {batch} rows (<= {max_length} tokens, right-padded) from "
        f"{data_file.name}; LoRA r={RANK}, alpha={2 * RANK}, dropout 0.05 on {', '.join(TARGETS)}; "
        "AdamW lr 2e-3, grad-norm clip 1.0; tokens = non-pad tokens",
        "timed: the optimizer steps only (adaptory train: its own train_time_s, which excludes "
        "loading, data validation, evaluation and saving)",
        "peak_bytes (median over runs): max_memory_allocated (CUDA) or the sampled peak RSS above "
        "the RSS before the run loaded its model (CPU; coarse: allocator caching, load transients)",
    ]
    if not has_train:
        notes.append("adapters/train.py does not exist: `adaptory train` was not measured")
    return {
        "bench": "train",
        "settings": _settings_dict(settings, base_dir, **plan, rank=RANK),
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "notes": notes,
    }


def _train_data(workdir: Path, rows: int) -> Path:
    """A JSONL `text` dataset cut from the bundled corpus (or a stock sentence)."""
    from adaptory.adapters.tinybase import DEFAULT_CORPUS

    out = workdir / "train-data.jsonl"
    if not out.is_file():
        lines = []
        if DEFAULT_CORPUS.is_file():
            lines = [ln.strip() for ln in DEFAULT_CORPUS.read_text().splitlines() if ln.strip()]
        lines = lines or ["the cat sat on the mat and the dog ran to the park"]
        texts = [" ".join(lines[i % len(lines) : i % len(lines) + 4]) for i in range(rows)]
        out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def _peak_start(device: str) -> int:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return rss_bytes()


def _peak_end(device: str, start: int, sampler: PeakRSS) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return sampler.peak - start


def _plain_train_run(settings, base_dir, data_file, dataset, quant, plan, registry):
    """The textbook loop: load, prepare_model_for_kbit_training, get_peft_model, step."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from adaptory.adapters.data import collate
    from adaptory.adapters.train import BatchPlan, keep_4bit_trainable, seed_everything

    device = settings.device
    start = _peak_start(device)
    with PeakRSS() as sampler:
        loaded = load_bench_base(base_dir, settings, quant=quant)
        model = loaded.model
        keep_4bit_trainable(model)
        if quant != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        seed_everything(settings.seed)
        config = LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            lora_dropout=0.05,
            target_modules=list(TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        order = BatchPlan(len(dataset), batch_size=plan["batch"], grad_accum=1, seed=settings.seed)
        pad = loaded.tokenizer.pad_token_id
        model.train()
        n_tokens = 0

        def loop() -> None:
            nonlocal n_tokens
            for step in range(plan["steps"]):
                rows = order.step(step)[0]
                batch = collate([dataset.examples[i] for i in rows], pad_id=pad, task="causal-lm")
                batch = {k: v.to(device) for k, v in batch.items()}
                n_tokens += int(batch["attention_mask"].sum())
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], 1.0
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        seconds = timed(loop, device)
    return seconds, n_tokens, _peak_end(device, start, sampler)


def _adaptory_train_run(settings, base_dir, data_file, dataset, quant, plan, registry):
    """`adaptory train`'s recipe (train_adapter) with the same data and settings, no eval."""
    from adaptory.adapters.train import TrainConfig, train_adapter

    device = settings.device
    config = TrainConfig(
        base=str(base_dir),
        data=str(data_file),
        name=f"bench-train-{quant}",
        task="causal-lm",
        method="lora",
        eval_split=0.0,
        quant=quant,
        rank=RANK,
        alpha=float(2 * RANK),
        dropout=0.05,
        target_modules=list(TARGETS),
        lr=2e-3,
        max_steps=plan["steps"],
        batch_size=plan["batch"],
        max_length=plan["max_length"],
        warmup=0,
        schedule="constant",
        max_grad_norm=1.0,
        seed=settings.seed,
        device=device,
        output_dir=str(settings.workdir / "train-runs" / f"{quant}-{time.time_ns()}"),
    )
    start = _peak_start(device)
    with PeakRSS() as sampler:
        result = train_adapter(config, registry=registry, show_progress=False)
    extra = result.entry.extra or {}
    seconds = float(extra.get("train_time_s") or result.wall_time_s)
    n_tokens = int(round(float(extra.get("tokens_per_s") or 0) * seconds))
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return seconds, n_tokens, _peak_end(device, start, sampler)


# --- all -----------------------------------------------------------------------------------


BENCHES: dict[str, Callable[..., dict]] = {
    "swap": bench_swap,
    "serve": bench_serve,
    "memory": bench_memory,
    "train": bench_train,
    "http": bench_http,
}


def run_bench(name: str, settings: BenchSettings, **kwargs) -> dict:
    """Run one benchmark and stamp it with the machine and the time."""
    result = BENCHES[name](settings, **kwargs)
    result["machine"] = machine_info(settings.device)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def write_json(result: dict, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    tmp.replace(out)
    return out


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "adaptory-bench"
