"""What "the same output" means per compute dtype, in one place.

Serving runs in one of two numerics modes (`adaptory serve --numerics`):

- `fp32`: float32 compute everywhere (bitsandbytes' 4-bit matmuls included) and TF32 off on
  CUDA. A request's greedy output in a mixed batch equals the request sent alone; logits agree
  within `TOLERANCES["float32"]` (different batch shapes pick different kernels, whose sums
  round differently in the last bits).
- `bf16`: bfloat16 compute (the GPU default: about twice the matmul speed and half the
  activation memory). Logits differ from the request sent alone by up to
  `TOLERANCES["bfloat16"]`, so a greedy choice between two near-tied tokens can flip; the soak
  (benchmarks/soak.py) measures how often, and docs/SERVER.md reports it.

`auto` is fp32 on the CPU and bf16 on a GPU that supports it (ADAPTORY_NUMERICS overrides it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MODES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Tolerance:
    """How far two computations of the same logits may be apart in this dtype."""

    logits_atol: float  # max |Δlogit| between a batched row and the same request alone
    greedy_identical: bool  # whether greedy outputs are promised to be identical


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(logits_atol=1e-4, greedy_identical=True),
    # bf16 keeps 8 bits of mantissa: a logit near 10 is represented to within 0.03, and a
    # handful of roundings per layer add up; 0.5 bounds what the tests and the soak measure.
    "bfloat16": Tolerance(logits_atol=0.5, greedy_identical=False),
    "float16": Tolerance(logits_atol=0.25, greedy_identical=False),
}


@dataclass(frozen=True)
class Numerics:
    """A resolved numerics mode for one device."""

    name: str  # "fp32" | "bf16"
    dtype_name: str  # "float32" | "bfloat16" | "float16"
    device: str

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype_name]

    def apply(self) -> None:
        """In fp32 mode on CUDA, keep matmuls and convolutions in true float32 (no TF32)."""
        import torch

        if self.name == "fp32" and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def kv_budget_bytes(self, device: str) -> int:
        """Memory a KV cache may take by default: half the GPU memory free now, or a quarter of
        the RAM available now (ADAPTORY_KV_BUDGET_MB overrides either)."""
        override = os.environ.get("ADAPTORY_KV_BUDGET_MB")
        if override:
            return int(float(override) * 2**20)
        if str(device).startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info()
            return free // 2
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 4 * 2**30
        return available // 4


def resolve_numerics(mode: str, device: str | None) -> Numerics:
    """The numerics mode to run in on `device` (None: the default device)."""
    from adaptory.adapters.bases.loading import default_device
    from adaptory.registry.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"unknown numerics mode '{mode}'", hint=f"choose one of {MODES}")
    device = device or default_device()
    on_cuda = str(device).startswith("cuda")
    if mode == "auto":
        mode = os.environ.get("ADAPTORY_NUMERICS") or ("bf16" if on_cuda else "fp32")
        if mode not in MODES[1:]:
            raise ConfigError(f"ADAPTORY_NUMERICS={mode!r}: choose fp32 or bf16")
    if mode == "fp32":
        return Numerics("fp32", "float32", device)
    if not on_cuda:
        return Numerics("bf16", "bfloat16", device)
    import torch

    half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return Numerics("bf16", half, device)
