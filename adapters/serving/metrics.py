"""The server's Prometheus metrics (docs/SERVER.md lists them), kept by prometheus_client: requests
by endpoint and status, latency, time to first token and per output token, tokens, and per-base
gauges read from the runtimes and schedulers at scrape time."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adaptory.adapters.serving.runtime import Runtime
from adaptory.adapters.serving.scheduler import Scheduler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# the first token waits for admission and a whole prefill, so finer low buckets than the latency's
FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
PER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
MODEL_TEMPLATE = "/v1/models/{model}"
# the endpoint label of the request metrics: these paths, the template above for any
# /v1/models/<id>, and "other" for any other path (a label never takes a client's path verbatim)
ENDPOINTS = (
    "/v1/models", MODEL_TEMPLATE, "/v1/completions", "/v1/chat/completions", "/v1/classify",
    "/tokenize", "/detokenize", "/tokenizer_info", "/v1/adapters/load", "/v1/adapters/unload",
    "/health", "/metrics",
)  # fmt: skip
_MODELS_PREFIX = "/v1/models/"

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
_FAMILIES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


def endpoint_label(path: str) -> str:
    """The `endpoint` label of a request to `path`: one of ENDPOINTS or "other"."""
    if path in ENDPOINTS and path != MODEL_TEMPLATE:
        return path
    if path.startswith(_MODELS_PREFIX) and len(path) > len(_MODELS_PREFIX):
        return MODEL_TEMPLATE
    return "other"


class Metrics:
    """What the server counts, in a registry of its own (apps in one process never share
    series), rendered in the Prometheus text format with the per-base families."""

    content_type = CONTENT_TYPE_LATEST  # what `render` writes, as prometheus_client names it

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus_client appends `_total` to a counter's name itself
        self.requests = Counter(
            "adaptory_requests", "HTTP requests by endpoint and status.",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "adaptory_request_latency_seconds", "Request latency, until the response ends.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "adaptory_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.generated_tokens = Counter(
            "adaptory_generated_tokens", "Tokens generated.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "adaptory_time_to_first_token_seconds",
            "From a generation request's jobs queued to its first token.",
            ["endpoint"], buckets=FIRST_TOKEN_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "adaptory_time_per_output_token_seconds",
            "Mean time between a choice's output tokens after its first.",
            ["endpoint"], buckets=PER_TOKEN_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """One finished request: its endpoint label, status and latency."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def first_token(self, endpoint: str, seconds: float) -> None:
        """A generation request's time from its jobs queued to its first token."""
        self.time_to_first_token.labels(endpoint).observe(seconds)

    def per_output_token(self, endpoint: str, seconds: float) -> None:
        """One choice's (last token time - first token time) / (tokens - 1); only for choices
        of two tokens or more."""
        self.time_per_output_token.labels(endpoint).observe(seconds)

    def render(self, bases: dict[str, Runtime], schedulers: dict[str, Scheduler]) -> str:
        return generate_latest(_Scrape(self.registry, bases, schedulers)).decode()


class _Scrape:
    """One scrape (a prometheus_client Collector): the registry's families without their
    `_created` samples, then the per-base families read from `bases` and `schedulers` now."""

    def __init__(self, registry: CollectorRegistry, bases, schedulers) -> None:
        self.registry, self.bases, self.schedulers = registry, bases, schedulers

    def collect(self):
        # `_created` samples would add a series per label set that the text format never uses;
        # prometheus_client.disable_created_metrics() would turn them off for the whole process
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        stats = {ref: rt.stats() for ref, rt in self.bases.items()}
        for name, kind, help_text, key in PER_BASE:
            family = _FAMILIES[kind](name, help_text, labels=["base"])
            for ref, values in stats.items():
                family.add_metric([ref], values[key])
            yield family
        for name, kind, help_text, attribute in PER_SCHEDULER:
            family = _FAMILIES[kind](name, help_text, labels=["base"])
            for ref, scheduler in self.schedulers.items():
                family.add_metric([ref], getattr(scheduler, attribute))
            yield family
