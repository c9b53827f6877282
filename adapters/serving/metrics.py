"""The server's Prometheus metrics (docs/SERVER.md lists them): requests by endpoint and status,
latency histograms, tokens, and per-base gauges read from the runtimes and schedulers."""

from __future__ import annotations

import threading
from collections import defaultdict

from adaptory.adapters.serving.runtime import Runtime
from adaptory.adapters.serving.scheduler import Scheduler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# the endpoint label of the request metrics; a request to any other path counts as "other"
ENDPOINTS = (
    "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
    "/v1/adapters/load", "/v1/adapters/unload", "/health", "/metrics",
)  # fmt: skip

# (metric, kind, help, key of Runtime.stats())
PER_BASE = (
    ("adaptory_resident_adapters", "gauge", "Adapters resident per base.", "resident"),
    ("adaptory_adapter_loads_total", "counter", "Adapter loads per base.", "loads"),
    ("adaptory_adapter_evictions_total", "counter", "Adapter evictions per base.", "evictions"),
    ("adaptory_adapter_hits_total", "counter", "Requests that found their adapter resident.", "hits"),
    ("adaptory_adapter_load_failures_total", "counter", "Adapters that failed to load.", "load_failures"),
    ("adaptory_base_loads_total", "counter", "Base model loads (one per base, ever).", "base_loads"),
)  # fmt: skip
# (metric, kind, help, attribute of Scheduler)
PER_SCHEDULER = (
    ("adaptory_active_rows", "gauge", "Rows decoding right now.", "active"),
    ("adaptory_queued_classify_texts", "gauge", "Texts of classify requests waiting for their chunk.", "classify_backlog"),
    ("adaptory_cancelled_requests_total", "counter", "Requests dropped because their client went away.", "cancelled"),
)  # fmt: skip


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            buckets = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self, bases: dict[str, Runtime], schedulers: dict[str, Scheduler]) -> str:
        with self.lock:
            out = self._counted()
        stats = {ref: rt.stats() for ref, rt in bases.items()}
        for name, kind, help_text, key in PER_BASE:
            out += _family(name, kind, help_text)
            for ref, values in stats.items():
                out.append(f'{name}{{base="{_escape(ref)}"}} {values[key]}')
        for name, kind, help_text, attribute in PER_SCHEDULER:
            out += _family(name, kind, help_text)
            for ref, scheduler in schedulers.items():
                value = getattr(scheduler, attribute)
                out.append(f'{name}{{base="{_escape(ref)}"}} {value}')
        return "\n".join(out) + "\n"

    def _counted(self) -> list[str]:
        """The lines of what this object counts itself (the caller holds the lock)."""
        out = _family("adaptory_requests_total", "counter", "HTTP requests by endpoint and status.")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f'adaptory_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        out += _family("adaptory_prompt_tokens_total", "counter", "Prompt tokens processed.")
        out.append(f"adaptory_prompt_tokens_total {self.prompt_tokens}")
        out += _family("adaptory_generated_tokens_total", "counter", "Tokens generated.")
        out.append(f"adaptory_generated_tokens_total {self.generated_tokens}")
        name = "adaptory_request_latency_seconds"
        out += _family(name, "histogram", "Request latency.")
        for endpoint, buckets in sorted(self.latency.items()):
            for bound, n in zip(LATENCY_BUCKETS, buckets, strict=True):
                out.append(f'{name}_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}')
            count = self.latency_count[endpoint]
            out.append(f'{name}_bucket{{endpoint="{endpoint}",le="+Inf"}} {count}')
            out.append(f'{name}_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
            out.append(f'{name}_count{{endpoint="{endpoint}"}} {count}')
        return out


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
