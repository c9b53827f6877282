"""benchmarks/cpu_kernel.py runs for real at the tiny size: three variants measured, ratios to
fp32, and `--numerics fp32` decodes the same greedy tokens whether or not bitsandbytes' CPU
kernel is let back in (the greedy tokens of the tiny base are far from ties)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "cpu_kernel.py"


def test_cpu_kernel_benchmark_reports_three_variants():
    args = ["--size", "tiny", "--rounds", "1", "--rows", "2", "--tokens", "4", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    names = {"fp32", "fp32 + bnb kernel", "bf16"}
    assert set(report["tokens_per_s"]) == set(report["ratio_to_fp32"]) == names
    assert all(rate > 0 for rate in report["tokens_per_s"].values())
    assert report["ratio_to_fp32"]["fp32"] == 1.0
    assert report["same_greedy_tokens_as_fp32"]["fp32 + bnb kernel"] is True
    assert report["threads"] == 1 and isinstance(report["bnb_cpu_kernel"], bool)
    assert all(len(r) == 1 for r in report["all_rounds"].values())
