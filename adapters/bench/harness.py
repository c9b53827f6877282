"""The benchmarks' shared harness: settings, the base to measure on (a saved small base, or a
real-size one built in place on the device), interleaved timing, random LoRA adapters, the
reference greedy decode loop, transformers' own `generate`, targets and JSON output.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
RANK = 16


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
    build: str = "auto"  # folder | in-place | auto (in place for sizes that are never saved)
    rank: int = RANK
    mlp: bool = False  # adapters on the MLP projections too
    log: Callable[[str], None] | None = None  # progress lines (each timing as it is taken)

    def __post_init__(self) -> None:
        from adaptory.adapters.bases.shapes import SIZES
        from adaptory.registry.errors import ConfigError

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.quick:
            self.repeats = min(self.repeats, 2)
        if self.build not in ("auto", "folder", "in-place"):
            raise ConfigError(f"unknown build '{self.build}'", hint="auto, folder or in-place")
        if self.base_dir is None and self.size not in SIZES:
            raise ConfigError(
                f"unknown size '{self.size}'", hint=f"choose one of {', '.join(SIZES)}"
            )
        if self.base_dir is None and self.build == "folder" and not SIZES[self.size].saved:
            raise ConfigError(
                f"the {self.size} base is only built in place on the device",
                hint="drop --build folder (or use --size tiny|small|base)",
            )

    @property
    def in_place(self) -> bool:
        """Whether the base is built in place on the device rather than loaded from a folder."""
        from adaptory.adapters.bases.shapes import SIZES

        if self.base_dir is not None:
            return False
        return self.build == "in-place" or (self.build == "auto" and not SIZES[self.size].saved)

    @property
    def targets(self) -> tuple[str, ...]:
        return TARGETS + MLP_TARGETS if self.mlp else TARGETS

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


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
    under the work folder (weights are random: speed and memory do not depend on training).
    A size that is only built in place (1b, 8b) is built on the device and saved unquantized,
    for what needs a folder (`adaptory train`)."""
    if settings.base_dir is not None:
        return Path(settings.base_dir)
    suffix = "-in-place-saved" if settings.in_place else ""
    out = settings.workdir / "bases" / f"{settings.size}{suffix}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    if settings.in_place:
        return save_in_place_base(settings, out)
    from adaptory.adapters.bases.tiny import DEFAULT_CORPUS, init_base

    init_base(out, size=settings.size, corpus=[DEFAULT_CORPUS], seed=settings.seed)
    return out


def save_in_place_base(settings: BenchSettings, out: Path) -> Path:
    """Build the size in place (unquantized, the device's compute dtype) and save it to `out`."""
    import shutil

    from adaptory.adapters.bases.shapes import build_random_base

    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    loaded = build_random_base(
        settings.size, staging, device=settings.device, quant="none", seed=settings.seed
    )
    loaded.model.save_pretrained(str(staging))
    del loaded
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def bench_loaded(settings: BenchSettings, quant: str = "nf4"):
    """The base to measure on, loaded (a LoadedBase): built in place on the device, or loaded
    from its folder in the dtype the runtime serves in (bf16 on a GPU, fp32 on the CPU)."""
    if settings.in_place:
        import torch

        from adaptory.adapters.bases.shapes import build_random_base

        start = time.perf_counter()
        loaded = build_random_base(
            settings.size,
            settings.workdir / "bases" / f"{settings.size}-in-place",
            device=settings.device,
            quant=quant,
            seed=settings.seed,
            dtype=getattr(torch, serving_dtype(settings.device)),
        )
        sync(settings.device)
        settings.say(
            f"built {settings.size} in place on {settings.device} ({quant}) in "
            f"{time.perf_counter() - start:.1f}s"
        )
        return loaded
    return load_bench_base(bench_base(settings), settings, quant=quant)


def load_bench_base(base_dir: Path, settings: BenchSettings, quant: str = "nf4", dtype=None):
    """A saved base, loaded in `dtype` (default: the one the runtime serves in)."""
    import inspect

    from adaptory.adapters.bases.loading import load_base

    kwargs = {}
    if "dtype" in inspect.signature(load_base).parameters:
        kwargs["dtype"] = dtype or serving_dtype(settings.device)
    return load_base(str(base_dir), task="causal-lm", quant=quant, device=settings.device, **kwargs)


def serving_dtype(device: str) -> str:
    """The dtype the runtime computes in on `device` by default (its `auto` numerics: bf16 on a
    GPU, fp32 on the CPU, unless ADAPTORY_NUMERICS says otherwise)."""
    try:
        from adaptory.adapters.bases.numerics import resolve_numerics
    except ImportError:
        from adaptory.adapters.bases.loading import compute_dtype

        return str(compute_dtype(device)).removeprefix("torch.")
    return resolve_numerics("auto", device).dtype_name


def base_name(loaded) -> str:
    """A short name for a loaded base (its folder's name)."""
    return Path(loaded.source.path).name


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
    variants: dict[str, Callable[[], float]],
    repeats: int,
    *,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
    optional: Sequence[str] = (),
    errors: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Run each variant (a callable returning the seconds it measured) `repeats` times,
    rotating the order every round, after `warmup` untimed rounds.

    With one repeat there is nothing to rotate: each variant is warmed up and measured in turn,
    so a run cut short still logged every figure taken. A variant named in `optional` that fails
    is dropped, its error recorded in `errors`; any other failure propagates.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}

    def attempt(name: str, label: str) -> bool:
        try:
            seconds = variants[name]()
        except Exception as exc:
            if name not in optional:
                raise
            if errors is not None:
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            if log:
                log(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:200]}); dropped")
            del times[name]
            return False
        if label == "run":
            times[name].append(seconds)
        if log:
            log(f"  {label:<7} {name}: {seconds:.3f}s")
        return True

    if repeats == 1:
        for name in names:
            if all(attempt(name, "warm-up") for _ in range(warmup)):
                attempt(name, "run")
        return times
    for _ in range(warmup):
        for name in names:
            if name in times:
                attempt(name, "warm-up")
    for i in range(repeats):
        live = [name for name in names if name in times]
        shift = i % max(1, len(live))
        for name in live[shift:] + live[:shift]:
            if name in times:
                attempt(name, "run")
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
    shapes: dict[str, tuple[int, int]],
    *,
    r: int = RANK,
    seed: int = 0,
    scale: float = 0.5,
    device: str = "cpu",
    dtype: Any = None,
) -> dict:
    """A random LoRA state dict in PEFT's saved layout (B nonzero, so it changes outputs),
    generated on `device` (seeded per device) in `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for path, (d_in, d_out) in shapes.items():
        a = torch.randn(r, d_in, generator=gen, device=device) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen, device=device) * scale / r**0.5
        state[f"base_model.model.{path}.lora_A.weight"] = a.to(dtype)
        state[f"base_model.model.{path}.lora_B.weight"] = b.to(dtype)
    return state


def raw_lora_bytes(shapes: dict[str, tuple[int, int]], r: int, element_size: int) -> int:
    """An adapter's own bytes: r·(d_in + d_out) elements per adapted matrix."""
    return sum(r * (d_in + d_out) * element_size for d_in, d_out in shapes.values())


def lora_config(base_model: str, *, r: int = RANK, targets: Sequence[str] = TARGETS) -> dict:
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_model),
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
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def adapter_kind(settings: BenchSettings) -> str:
    """The folder (and registry name) part that tells adapters of other ranks/targets apart."""
    return f"r{settings.rank}-{'all' if settings.mlp else 'qkvo'}"


def make_adapters(
    base_dir: Path,
    shapes,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    r: int = RANK,
    targets: Sequence[str] = TARGETS,
    device: str = "cpu",
    dtype: Any = None,
) -> list[Path]:
    """n random LoRA folders (rank r on `targets`) for the base, cached under `out` (which
    should name the base, rank and targets: a cached folder is reused as it is)."""
    config = lora_config(str(base_dir), r=r, targets=targets)
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            state = random_lora(shapes, r=r, seed=seed + i, device=device, dtype=dtype)
            write_lora(folder, state, config)
        folders.append(folder)
    return folders


def bench_adapters(loaded, settings: BenchSettings, n: int, *, seed: int = 0) -> list[Path]:
    """n random adapters (the settings' rank and targets) for a loaded base, generated on its
    device in its compute dtype, cached under the work folder."""
    shapes = lora_shapes(loaded.model, settings.targets)
    out = settings.workdir / "adapters" / base_name(loaded) / adapter_kind(settings)
    return make_adapters(
        loaded.source.path,
        shapes,
        n,
        out,
        seed=seed,
        r=settings.rank,
        targets=settings.targets,
        device=settings.device,
        dtype=lora_dtype(loaded.model, shapes),
    )


def lora_dtype(model, shapes):
    """The dtype the runtime's LoRA bank holds adapters in for this base (its compute dtype)."""
    import torch

    module = model.get_submodule(next(iter(shapes)))
    dtype = getattr(module, "compute_dtype", None)  # bitsandbytes Linear4bit
    if dtype is None:
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else None
    return dtype or torch.float32


def register_adapters(registry, base, folders: Sequence[Path], quant: str = "nf4"):
    """Add the folders to `registry` as bench-BASE-KIND-a0, … (reusing entries made for this
    very base, by fingerprint). `base` is a base folder or a LoadedBase."""
    from adaptory.adapters.bases.loading import fingerprint_base, resolve_base
    from adaptory.registry.errors import AdapterNotFound

    if hasattr(base, "fingerprint"):
        fingerprint, base_dir = base.fingerprint.to_dict(), Path(base.source.path)
    else:
        base_dir = Path(base)
        fingerprint = fingerprint_base(resolve_base(str(base_dir)), quant).to_dict()
    entries = []
    for folder in folders:
        name = f"bench-{base_dir.name}-{folder.parent.name}-{folder.name}"[:64]
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
        "built": "in place" if settings.in_place else "folder",
        "quant": "nf4",
        "device": settings.device,
        "repeats": settings.repeats,
        "quick": settings.quick,
        "rank": settings.rank,
        "targets": list(settings.targets),
        **extra,
    }


def runtime_for(loaded, registry, settings: BenchSettings, *, max_adapters: int, **options):
    """A Runtime serving the already loaded base (nothing loaded twice); `options` the Runtime
    does not take (an older or newer runtime) are left out."""
    import inspect

    from adaptory.adapters.serving.runtime import Runtime

    accepted = inspect.signature(Runtime).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    if "loaded_base" in accepted:
        kwargs["loaded_base"] = loaded
    return Runtime(
        str(loaded.source.path),
        registry=registry,
        task="causal-lm",
        quant=loaded.quant,
        device=settings.device,
        max_adapters=max_adapters,
        **kwargs,
    )


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


# --- targets -------------------------------------------------------------------------------


def target(value: float | None, op: str, threshold: float, *, missing: str = "") -> dict:
    """A target's outcome: the measured value against `op threshold` (">=" or "<="), met or
    missed by `margin` (a fraction of the threshold; negative when missed). A value of None
    (not measured in this run) is neither met nor missed."""
    if value is None:
        return {"value": None, "op": op, "threshold": threshold, "met": None, "note": missing}
    met = value >= threshold if op == ">=" else value <= threshold
    margin = (value - threshold) / threshold if op == ">=" else (threshold - value) / threshold
    return {"value": value, "op": op, "threshold": threshold, "met": bool(met), "margin": margin}


def ratio(tps: dict[str, float], numerator: str, denominator: str) -> float | None:
    if numerator in tps and denominator in tps and tps[denominator] > 0:
        return tps[numerator] / tps[denominator]
    return None


# --- transformers' own generate ------------------------------------------------------------


def hf_generate(model, input_ids, attention_mask, new_tokens: int, *, static: bool = False,
                compile: bool = False, compile_config: Any = None):  # fmt: skip
    """transformers' `generate`, greedy, no adapter: the dynamic KV cache (its default), or a
    static cache, with its decode step compiled by transformers itself when `compile`. Returns
    the generated ids (rows, steps run)."""
    import torch

    pad = model.generation_config.pad_token_id
    pad = model.config.pad_token_id if pad is None else pad
    options: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": model.config.eos_token_id if pad is None else pad,
    }
    if static:
        options["cache_implementation"] = "static"
    if compile and compile_config is not None:
        options["compile_config"] = compile_config
    if not compile:
        options["disable_compile"] = True
    with torch.inference_mode(), _compile_allowed(model, compile):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    return out[:, input_ids.shape[1] :]


def hf_compiled(model) -> bool:
    """Whether transformers compiled this model's decode step (in a `generate` call so far)."""
    return getattr(model, "_compiled_call", None) is not None


@contextmanager
def _compile_allowed(model, compile: bool):
    """transformers never auto-compiles a model it quantized with bitsandbytes (its quantizer
    says not compileable), though bitsandbytes' 4-bit layers are written to trace under
    torch.compile (custom ops with fake kernels): for the `compile` variant the quantizer is
    hidden for the call."""
    quantizer = getattr(model, "hf_quantizer", None)
    hide = compile and quantizer is not None and not getattr(quantizer, "is_compileable", False)
    if hide:
        model.hf_quantizer = None
    try:
        yield
    finally:
        if hide:
            model.hf_quantizer = quantizer
