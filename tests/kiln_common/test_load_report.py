"""kiln-infer's load report: published into real Redis, aggregated over reporters, gone after its TTL."""

from __future__ import annotations

import time

import redis

from kiln_common.load_report import LoadPublisher, LoadWindow, read_load


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_percentiles_cover_only_recent_samples() -> None:
    clock = FakeClock()
    window = LoadWindow(horizon_s=5.0, clock=clock)
    window.add_tpots([0.050] * 10)  # slow requests, soon too old
    clock.now += 6.0
    window.add_tpots([0.010] * 99 + [0.030])
    window.add_ttft(0.2)
    p = window.percentiles()
    assert p["tpot_p50_ms"] == 10.0
    assert p["tpot_p99_ms"] == 10.0  # nearest rank: 99th of 100
    assert p["tpot_samples"] == 100
    assert p["ttft_p99_ms"] == 200.0
    clock.now += 6.0
    assert window.percentiles()["tpot_samples"] == 0


def test_window_is_a_bounded_ring() -> None:
    window = LoadWindow(size=8, clock=FakeClock())
    window.add_tpots(range(100))
    assert window.percentiles()["tpot_samples"] == 8


def test_report_round_trips_and_aggregates(redis_client: redis.Redis) -> None:
    redis_client.delete(*redis_client.keys("kiln:load:*") or ["-"])
    fast, slow = LoadWindow(), LoadWindow()
    fast.add_tpots([0.010] * 50)
    slow.add_tpots([0.030] * 50)
    slow.add_ttft(0.5)
    a, b = LoadPublisher(redis_client, "host:1"), LoadPublisher(redis_client, "host:2")
    a.publish({"running": 3, "waiting": 0, "kv_usage": 0.2}, fast, 0.5)
    b.publish({"running": 5, "waiting": 2, "kv_usage": 0.4}, slow, 0.5)
    load = read_load(redis_client)
    assert load is not None
    assert (load.reporters, load.running, load.waiting) == (2, 5, 2)
    assert load.kv_usage == 0.4 and load.kv_memory_fraction == 0.5
    assert load.tpot_p99_ms == 30.0 and load.tpot_p50_ms == 30.0 and load.ttft_p99_ms == 500.0
    assert load.tpot_samples == 100
    assert not load.idle
    a.withdraw()
    b.withdraw()
    assert read_load(redis_client) is None


def test_report_expires_when_its_process_stops_publishing(redis_client: redis.Redis) -> None:
    redis_client.delete(*redis_client.keys("kiln:load:*") or ["-"])
    LoadPublisher(redis_client, "host:3", ttl_s=0.2).publish({"running": 1}, LoadWindow(), 0.5)
    load = read_load(redis_client)
    assert load is not None and load.running == 1 and load.tpot_samples == 0
    time.sleep(0.35)
    assert read_load(redis_client) is None
