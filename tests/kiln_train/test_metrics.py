"""kiln-train's /metrics: the daemon's durable counts and finished rounds, parsed by the Prometheus parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kiln_common.metrics_server import start_metrics_server
from kiln_train.daemon import BufferStatus, DaemonState, DaemonStatus
from kiln_train.metrics import TrainMetrics


def _status() -> DaemonStatus:
    return DaemonStatus(
        state=DaemonState.TRAINING,
        buffers=[BufferStatus("alice", "support", pending=7, trained=3)],
        dropped={"duplicate_id": 2, "too_long": 1},
        rounds=[],
        consumed=12,
        dead_lettered=1,
    )


def test_train_metrics_scrape_over_http() -> None:
    metrics = TrainMetrics()
    metrics.watch(_status)
    metrics.round_finished("published", 42.0)
    metrics.round_finished("rejected", 10.0)
    server, _ = start_metrics_server(0, metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("kiln:train_samples_consumed_total", ())] == 12
    assert samples[("kiln:train_samples_dropped_total", (("reason", "duplicate_id"),))] == 2
    assert samples[("kiln:train_samples_dead_lettered_total", ())] == 1
    assert samples[("kiln:train_rounds_total", (("outcome", "published"),))] == 1
    assert samples[("kiln:train_round_duration_seconds_sum", (("outcome", "published"),))] == 42.0
    assert samples[("kiln:train_state", (("state", "training"),))] == 1
    assert samples[("kiln:train_state", (("state", "idle"),))] == 0
    assert samples[("kiln:train_buffered_samples", (("adapter", "support"), ("tenant", "alice")))] == 7
