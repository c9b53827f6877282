"""The benchmarks' shared harness: settings, the base to measure on (a saved small base, or a
real-size one built in place on the device), interleaved timing, memory probes, targets and
JSON output. What is measured (adapters, prompts, the decode paths) lives in workload.py.
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


def rated(samples: Sequence[float], tokens: int, **extra) -> dict:
    """A variant's summary, then `extra`, then the tokens it made and its tokens/s (of the
    median)."""
    entry = summary(samples)
    entry.update(extra)
    entry["tokens"] = tokens
    entry["tokens_per_s"] = tokens / entry["median_s"]
    return entry


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


def _jsonable(value):
    if isinstance(value, set):
        return sorted(value)
    return str(value)


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


# --- targets -------------------------------------------------------------------------------


def target(
    value: float | None, op: str, threshold: float, *, missing: str = "", ratio: bool = True
) -> dict:
    """A target's outcome: the measured value against `op threshold` (">=" or "<="), met or
    missed by `margin` (a fraction of the threshold; negative when missed). A value of None
    (not measured in this run) is neither met nor missed. `ratio=False` marks a score (an
    accuracy, an exact match), printed without the × of a ratio."""
    if value is None:
        return {"value": None, "op": op, "threshold": threshold, "met": None, "note": missing}
    met = value >= threshold if op == ">=" else value <= threshold
    margin = (value - threshold) / threshold if op == ">=" else (threshold - value) / threshold
    outcome = {"value": value, "op": op, "threshold": threshold, "met": bool(met), "margin": margin}
    if not ratio:
        outcome["ratio"] = False
    return outcome


def ratio(tps: dict[str, float], numerator: str, denominator: str) -> float | None:
    if numerator in tps and denominator in tps and tps[denominator] > 0:
        return tps[numerator] / tps[denominator]
    return None
