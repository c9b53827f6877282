"""What `--numerics fp32` costs on a CPU with AVX512-BF16, side by side in one process.

bitsandbytes has a CPU inference kernel for 4-bit layers that computes in bfloat16 (used on CPUs
with AVX512-BF16, after repacking a layer on its first inference forward). `--numerics fp32`
keeps 4-bit layers on the dequantize-then-matmul path instead, as training and `adaptory eval`
do, so that served logits are theirs. Three variants decode the same greedy batch on one
random-init base (`adaptory base init` shapes, loaded in NF4):

* `fp32`: the runtime as `--numerics fp32` builds it (the dequantize path);
* `fp32 + bnb kernel`: the same runtime with bitsandbytes' kernel let back in (what fp32 mode
  did before 2026-12-05);
* `bf16`: a second runtime, `--numerics bf16` (bitsandbytes' kernel, bfloat16 activations).

Rounds alternate the order; the report gives median tokens/s, the ratios to `fp32`, and whether
the greedy tokens agree. On a CPU without AVX512-BF16 the first two are the same path.

    python benchmarks/cpu_kernel.py                  # size base, 8 rows x 32 tokens, 4 rounds
    python benchmarks/cpu_kernel.py --size small --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

CORPUS = ["the cat sat on the mat. the dog ran to the park. a red ball and a blue box."] * 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="tiny, small or base (adaptory base init)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()

    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import has_avx512bf16

    from adaptory.adapters.bases.quantize import keep_4bit_trainable
    from adaptory.adapters.bases.tiny import init_base
    from adaptory.adapters.serving.runtime import GenerationRequest, Runtime
    from adaptory.registry import Registry

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cpu-kernel-"))  # removed at the end
    base = work / "base"
    init_base(base, size=args.size, texts=CORPUS, seed=0)
    registry = Registry(work / "home")
    fp32 = Runtime(str(base), registry=registry, device="cpu", numerics="fp32")
    bf16 = Runtime(str(base), registry=registry, device="cpu", numerics="bf16")

    has_kernel = bool(has_avx512bf16())  # what bitsandbytes sets on every Linear4bit it builds

    def kernel(allowed: bool) -> None:
        if not allowed:
            keep_4bit_trainable(fp32.model)  # unpacks what the kernel repacked
            return
        for module in fp32.model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = has_kernel

    variants = {
        "fp32": (fp32, lambda: kernel(False)),
        "fp32 + bnb kernel": (fp32, lambda: kernel(True)),
        "bf16": (bf16, lambda: None),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        order = list(variants)[round_ % len(variants) :] + list(variants)[: round_ % len(variants)]
        for name in order:
            runtime, prepare = variants[name]
            prepare()
            requests = [
                GenerationRequest(prompt="the cat sat on", max_new_tokens=args.tokens)
                for _ in range(args.rows)
            ]
            runtime.generate(requests)  # warm-up (and the kernel's repacking)
            started = time.perf_counter()
            results = runtime.generate(requests)
            elapsed = time.perf_counter() - started
            rates[name].append(sum(r.completion_tokens for r in results) / elapsed)
            tokens[name] = results[0].token_ids
    shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({
        "size": args.size, "rows": args.rows, "tokens": args.tokens, "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "bnb_cpu_kernel": has_kernel,
        "tokens_per_s": {name: round(m, 1) for name, m in medians.items()},
        "ratio_to_fp32": {name: round(m / medians["fp32"], 3) for name, m in medians.items()},
        "same_greedy_tokens_as_fp32": {name: t == tokens["fp32"] for name, t in tokens.items()},
        "all_rounds": {name: [round(x, 1) for x in r] for name, r in rates.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
