"""Benchmarks: adapter swap cost, mixed-adapter serving throughput, memory per adapter, training,
the server end to end; and the quality of adapters trained with the defaults (quality.py).

Each `bench_*` function returns a JSON-able dict. Every compared variant is measured in the same
process, interleaved (variant order rotates each repeat), after one untimed warm-up run of each,
and reported as median seconds over the repeats plus ratios of medians: on a shared machine
absolute timings drift, but variants measured side by side drift together. Targets carry the
measured value, the threshold and the margin. One module per benchmark over a shared harness;
may import every other room.

Bases are random-init Llama-shaped models: the small sizes from a saved folder, `1b` and `8b`
built in place on the device, 4-bit from the start (adapters/bases/shapes.py). Serving is
compared with transformers' own `generate` on the same base with no adapter and with PEFT's
mixed batch (`adapter_names=` on every forward of one compact decode loop, `greedy_decode`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from adaptory.adapters.bench.harness import (
    BenchSettings,
    bench_loaded,
    default_workdir,
    load_bench_base,
    machine_info,
    target,
    write_json,
)
from adaptory.adapters.bench.http import bench_http, serve_available, wait_healthy
from adaptory.adapters.bench.memory import bench_memory
from adaptory.adapters.bench.quality import bench_quality
from adaptory.adapters.bench.scoring import bench_scoring
from adaptory.adapters.bench.serve import bench_serve, plot_serve
from adaptory.adapters.bench.swap import bench_swap
from adaptory.adapters.bench.train import bench_train
from adaptory.adapters.bench.workload import (
    greedy_decode,
    hf_generate,
    lora_shapes,
    make_adapters,
    peft_with_adapters,
    prompts,
    read_adapter,
)

__all__ = [
    "BENCHES",
    "BenchSettings",
    "bench_http",
    "bench_loaded",
    "bench_memory",
    "bench_quality",
    "bench_serve",
    "bench_swap",
    "bench_train",
    "default_workdir",
    "greedy_decode",
    "hf_generate",
    "load_bench_base",
    "lora_shapes",
    "machine_info",
    "make_adapters",
    "peft_with_adapters",
    "plot_serve",
    "prompts",
    "read_adapter",
    "run_bench",
    "serve_available",
    "target",
    "wait_healthy",
    "write_json",
]

BENCHES: dict[str, Callable[..., dict]] = {
    "swap": bench_swap,
    "serve": bench_serve,
    "memory": bench_memory,
    "train": bench_train,
    "http": bench_http,
    "scoring": bench_scoring,
    "quality": bench_quality,
}


def run_bench(name: str, settings: BenchSettings, **kwargs) -> dict:
    """Run one benchmark and stamp it with the machine and the time."""
    result = BENCHES[name](settings, **kwargs)
    result["machine"] = machine_info(settings.device)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result
