"""kiln-train's Prometheus metrics: sample counts read from Redis at scrape time, rounds as they end."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Buffer(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def adapter(self) -> str: ...
    @property
    def pending(self) -> int: ...


class DaemonStatus(Protocol):
    """What the metrics read of the daemon's status (kiln_train.daemon.DaemonStatus; no import: no cycle)."""

    @property
    def state(self) -> enum.Enum: ...
    @property
    def buffers(self) -> Sequence[_Buffer]: ...
    @property
    def dropped(self) -> Mapping[str, int]: ...
    @property
    def consumed(self) -> int: ...
    @property
    def dead_lettered(self) -> int: ...


_ROUND_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
STATES = ("idle", "training", "paused", "waiting_for_base")


class _StatusCollector(Collector):
    """Counters kept in Redis by the consumer (so they survive restarts), read from the daemon's status."""

    def __init__(self, status: Callable[[], DaemonStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """One snapshot of the daemon per scrape."""
        s = self._status()
        yield CounterMetricFamily(
            "kiln:train_samples_consumed", "Samples read from kiln:samples.", value=s.consumed
        )
        dropped = CounterMetricFamily(
            "kiln:train_samples_dropped", "Samples dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(s.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily(
            "kiln:train_samples_dead_lettered", "Samples moved to kiln:samples:dead.", value=s.dead_lettered
        )
        state = GaugeMetricFamily("kiln:train_state", "The daemon's state (1 = current).", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if s.state.value == name else 0.0)
        yield state
        pending = GaugeMetricFamily(
            "kiln:train_buffered_samples",
            "Samples buffered for the next round.",
            labels=["tenant", "adapter"],
        )
        for b in s.buffers:
            pending.add_metric([b.tenant, b.adapter], b.pending)
        yield pending


class TrainMetrics:
    """kiln-train's metrics in one registry: rounds as they finish, and the daemon's status when watched."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rounds = Counter(
            "kiln:train_rounds", "Training rounds, by outcome.", ["outcome"], registry=self.registry
        )
        self.round_duration = Histogram(
            "kiln:train_round_duration_seconds", "Duration of a training round.", ["outcome"],
            buckets=_ROUND_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def watch(self, status: Callable[[], DaemonStatus]) -> None:
        """Export the daemon's status (samples consumed, dropped, dead-lettered, state) at each scrape."""
        self.registry.register(_StatusCollector(status))

    def round_finished(self, outcome: str, duration_s: float) -> None:
        """Count one finished round (published, rejected, failed)."""
        self.rounds.labels(outcome or "failed").inc()
        self.round_duration.labels(outcome or "failed").observe(max(duration_s, 0.0))
