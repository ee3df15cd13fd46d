"""kiln-infer's load, published often and cheaply in Redis for kiln-train's governor to read.

Each kiln-infer API process writes one hash `kiln:load:<host>:<pid>` every ~0.5 s with a short TTL: the
engine's running and waiting requests and KV-cache usage, its `--kv-memory-fraction`, and TTFT / TPOT p50 and
p99 over a sliding window of recent requests (`LoadWindow`). TPOT is per request, as benchmarks and SLOs
count it: one request's mean time between its tokens, added when it finishes (single token gaps are too
spiky to steer by: coalesced outputs make many of them zero and a context switch makes one of them long).
A reporter that dies simply expires. `read_load` aggregates every live reporter: the worst percentile and the
largest queue (the API processes of one engine all read the same engine, so queues are not summed).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

LOAD_KEY_PREFIX = "kiln:load:"
DEFAULT_TTL_S = 3.0  # a reporter silent this long is gone
# latency percentiles cover the requests of the last seconds only (the governor reacts to them)
DEFAULT_WINDOW_S = 2.0
DEFAULT_WINDOW_SIZE = 4096  # at most this many TTFTs and this many request TPOTs are kept


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 1]); 0.0 for an empty list."""
    if not sorted_values:
        return 0.0
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


class LoadWindow:
    """Recent TTFTs and request TPOTs in two ring buffers, bounded by age and by count (thread-safe)."""

    def __init__(
        self,
        horizon_s: float = DEFAULT_WINDOW_S,
        size: int = DEFAULT_WINDOW_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._ttft: deque[tuple[float, float]] = deque(maxlen=size)  # (observed at, seconds)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add_ttft(self, seconds: float) -> None:
        """One request's time to first token."""
        with self._lock:
            self._ttft.append((self._clock(), seconds))

    def add_tpots(self, tpots: Iterable[float]) -> None:
        """Finished requests' TPOTs (each one request's mean seconds between its tokens)."""
        now = self._clock()
        with self._lock:
            self._tpot.extend((now, g) for g in tpots)

    def _recent(self, ring: deque[tuple[float, float]], since: float) -> list[float]:
        while ring and ring[0][0] < since:
            ring.popleft()
        return sorted(v for _, v in ring)

    def percentiles(self) -> dict[str, float]:
        """TTFT and TPOT p50 / p99 in ms over the window, and how many samples each covers."""
        since = self._clock() - self.horizon_s
        with self._lock:
            ttft, gaps = self._recent(self._ttft, since), self._recent(self._tpot, since)
        return {
            "ttft_p50_ms": _percentile(ttft, 0.5) * 1000,
            "ttft_p99_ms": _percentile(ttft, 0.99) * 1000,
            "tpot_p50_ms": _percentile(gaps, 0.5) * 1000,
            "tpot_p99_ms": _percentile(gaps, 0.99) * 1000,
            "ttft_samples": float(len(ttft)),
            "tpot_samples": float(len(gaps)),
        }


@dataclass(frozen=True)
class LoadReport:
    """Serving load as the governor sees it (one reporter, or all of them aggregated)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of the KV cache's blocks in use
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    tpot_p50_ms: float = 0.0
    tpot_p99_ms: float = 0.0
    tpot_samples: int = 0  # requests behind the TPOT percentiles (0 = none finished recently)
    ttft_samples: int = 0  # requests behind the TTFT percentiles
    kv_memory_fraction: float = 0.0  # kiln-infer's --kv-memory-fraction (0 = not published)
    reporters: int = 1
    at: float = 0.0  # wall-clock time of the newest report

    @property
    def idle(self) -> bool:
        """No request running or waiting."""
        return self.running == 0 and self.waiting == 0

    def to_dict(self) -> dict[str, float]:
        """Plain numbers, for status and logs."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> LoadReport:
        """Parse one reporter's hash (unknown fields ignored, missing ones 0)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in raw:
                kind = int if f.type in ("int", int) else float
                values[f.name] = kind(float(raw[f.name]))
        return cls(**values)


def aggregate(reports: list[LoadReport]) -> LoadReport | None:
    """All live reporters as one: the worst of each number (they share one engine), None when none."""
    if not reports:
        return None
    return LoadReport(
        running=max(r.running for r in reports),
        waiting=max(r.waiting for r in reports),
        kv_usage=max(r.kv_usage for r in reports),
        ttft_p50_ms=max(r.ttft_p50_ms for r in reports),
        ttft_p99_ms=max(r.ttft_p99_ms for r in reports),
        tpot_p50_ms=max(r.tpot_p50_ms for r in reports),
        tpot_p99_ms=max(r.tpot_p99_ms for r in reports),
        tpot_samples=sum(r.tpot_samples for r in reports),
        ttft_samples=sum(r.ttft_samples for r in reports),
        kv_memory_fraction=max(r.kv_memory_fraction for r in reports),
        reporters=len(reports),
        at=max(r.at for r in reports),
    )


class LoadPublisher:
    """Writes one API process's load hash with a TTL; call `publish` every `period` (< TTL)."""

    def __init__(self, redis: Any, reporter: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.key = f"{LOAD_KEY_PREFIX}{reporter}"
        self._redis = redis
        self._ttl_ms = int(ttl_s * 1000)

    def publish(self, stats: dict[str, float], window: LoadWindow, kv_memory_fraction: float) -> None:
        """One report: the engine's stats ({"running", "waiting", "kv_usage"}) and the window's latencies."""
        latency = window.percentiles()
        mapping = {
            "running": int(stats.get("running", 0)),
            "waiting": int(stats.get("waiting", 0)),
            "kv_usage": float(stats.get("kv_usage", 0.0)),
            **{k: round(v, 3) for k, v in latency.items()},
            "kv_memory_fraction": kv_memory_fraction,
            "at": time.time(),
        }
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.key, mapping=mapping)
        pipe.pexpire(self.key, self._ttl_ms)
        pipe.execute()

    def withdraw(self) -> None:
        """Remove the report now (on drain), rather than waiting for the TTL."""
        self._redis.delete(self.key)


def read_load(redis: Any) -> LoadReport | None:
    """Every live reporter aggregated, or None when kiln-infer publishes no load."""
    reports = []
    for key in redis.scan_iter(match=f"{LOAD_KEY_PREFIX}*", count=100):
        raw = redis.hgetall(key)
        if raw:
            decoded = {_text(k): _text(v) for k, v in raw.items()}
            reports.append(LoadReport.from_hash(decoded))
    return aggregate(reports)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
