"""The load test (benchmarks/soak.py) on loopback: quick in the fast set, full under `soak`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/status")


def _check(report: dict, *, rss: bool) -> None:
    print(f"\nLOAD: {report}")
    assert report["errors"] == 0, report["first_errors"]
    assert report["base_loads"] == 1 and report["load_failures"] == 0
    assert report["evictions"] > 0, "the LRU (3) never evicted with 8 adapters in use"
    assert report["distinct_outputs_across_models"] > 1
    if rss:
        assert report["rss_slope_bytes_per_request"] < soak.RSS_SLOPE_LIMIT, report
    assert report["mismatches"] == 0, (
        f"{report['mismatches']} greedy outputs differ from the same request sent alone "
        f"({report['mismatches_by_model']}; {report['mismatches_equal_to_base_output']} equal "
        "the plain base's output)"
    )


def test_quick_load_eight_clients_eighty_requests(tiny_llama_dir):
    _check(soak.soak(8, 80, 3, tiny_llama_dir, seed=0), rss=False)


@pytest.mark.soak
def test_full_load_sixty_four_clients_two_thousand_requests(tiny_llama_dir):
    _check(soak.soak(64, 2000, 3, tiny_llama_dir, seed=0), rss=True)
