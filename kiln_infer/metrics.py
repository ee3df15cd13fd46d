"""Prometheus metrics of kiln-infer, with vLLM's names under the `kiln:` prefix (one registry per server)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kiln_common.metrics_server import start_metrics_server

log = logging.getLogger(__name__)

__all__ = ["EngineMetrics", "InferMetrics", "RequestMetrics", "split_adapter_version", "start_metrics_server"]

_LABELS = ("adapter", "version")
# vLLM's buckets, cut to what a CPU or one GPU sees.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def split_adapter_version(adapter_version: str) -> tuple[str, str]:
    """Metric labels of a served version: "name@v3" -> ("name", "v3"); "" (the base model) -> ("base", "")."""
    if not adapter_version:
        return "base", ""
    name, _, version = adapter_version.partition("@")
    return name, version


class RequestMetrics:
    """Per-request histograms and counters, labelled by adapter and version."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "kiln:time_to_first_token_seconds", "Time to the first token.", _LABELS,
            buckets=_TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "kiln:inter_token_latency_seconds", "Time between consecutive streamed tokens.", _LABELS,
            buckets=_ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "kiln:e2e_request_latency_seconds", "Time from arrival to the last token.", _LABELS,
            buckets=_E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue = Histogram(
            "kiln:request_queue_time_seconds", "Time a request waited before its first schedule.", _LABELS,
            buckets=_TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "kiln:prompt_tokens", "Prompt tokens of finished requests.", _LABELS, registry=registry
        )
        self.generation_tokens = Counter(
            "kiln:generation_tokens", "Generated tokens of finished requests.", _LABELS, registry=registry
        )
        self.success = Counter(
            "kiln:request_success",
            "Finished requests, by finish reason (stop, length, abort).",
            (*_LABELS, "finished_reason"),
            registry=registry,
        )

    def finished(
        self,
        adapter_version: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        e2e_s: float,
        queue_s: float | None,
        itl_s: Sequence[float],
        reason: str,
    ) -> None:
        """Record one finished request ("name@vN" or "" for the base model); None skips unknown timings."""
        labels = split_adapter_version(adapter_version)
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        if queue_s is not None:
            self.queue.labels(*labels).observe(queue_s)
        itl = self.itl.labels(*labels)
        for gap in itl_s:
            itl.observe(gap)
        self.e2e.labels(*labels).observe(e2e_s)
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(completion_tokens)
        self.success.labels(*labels, reason).inc()


class EngineMetrics:
    """Gauges of the engine's state, set from its stats dict."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge("kiln:num_requests_running", "Requests in the running batch.", registry=registry)
        self.waiting = Gauge("kiln:num_requests_waiting", "Requests waiting to be run.", registry=registry)
        self.kv_usage = Gauge(
            "kiln:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", registry=registry
        )

    def set_stats(self, stats: Mapping[str, float]) -> None:
        """Set the gauges from `{"running": n, "waiting": n, "kv_usage": 0..1}` (missing keys are left)."""
        for key, gauge in (("running", self.running), ("waiting", self.waiting), ("kv_usage", self.kv_usage)):
            if key in stats:
                gauge.set(float(stats[key]))


class RecorderMetrics:
    """What became of the samples this server recorded: written, spooled in an outage, replayed, dropped."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Gauge(
            "kiln:sample_recorder_samples",
            "Samples by outcome since start (recorded, spooled, replayed, dropped_*), and pending.",
            ["outcome"],
            registry=registry,
        )

    def set_counters(self, counters: Mapping[str, int]) -> None:
        """Copy the recorder's counters into the gauge."""
        for outcome, value in counters.items():
            self.events.labels(outcome=outcome).set(float(value))


class InferMetrics:
    """All of kiln-infer's metrics in one registry (served on /metrics and --metrics-port)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.engine = EngineMetrics(self.registry)
        self.recorder = RecorderMetrics(self.registry)
