"""Per-tenant limits: concurrent streams, requests per second, samples per minute (RESOURCE_EXHAUSTED).

One tenant at its limit is refused alone; other tenants are unaffected. Rates are token buckets (a burst of
one second's requests or one minute's samples), held in this process: each replica enforces its own share.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kiln_common.errors import ResourceExhaustedError


class TenantLimitError(ResourceExhaustedError):
    """A tenant is over one of its limits; `retry_after_s`: when a retry can succeed (HTTP Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class LimitSettings:
    """Limits applied to each tenant; 0 turns one off."""

    max_streams: int = 0  # concurrent Generate streams
    requests_per_s: float = 0.0  # Generate calls per second (burst: one second's worth, at least 1)
    samples_per_min: float = (
        0.0  # recorded samples per minute (feedback, examples; burst: one minute's worth)
    )

    def __post_init__(self) -> None:
        for name in ("max_streams", "requests_per_s", "samples_per_min"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


class _Bucket:
    """A token bucket: `rate` tokens a second up to `capacity`."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = capacity, now

    def take(self, n: float, now: float) -> float:
        """Take n tokens; 0.0 when taken, else the seconds until they would be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class TenantLimits:
    """Admission per tenant: `stream(tenant)` around a Generate, `admit_samples` before recording."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, int] = {}
        self._requests: dict[str, _Bucket] = {}
        self._samples: dict[str, _Bucket] = {}

    def _take(
        self, buckets: dict[str, _Bucket], tenant: str, rate: float, capacity: float, n: float
    ) -> float:
        now = self._clock()
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(rate, capacity, now)
        return bucket.take(n, now)

    def admit_request(self, tenant: str) -> None:
        """Count one request against the tenant's requests/s; TenantLimitError when over."""
        rate = self.settings.requests_per_s
        if not rate:
            return
        with self._lock:
            wait = self._take(self._requests, tenant, rate, max(1.0, rate), 1.0)
        if wait:
            raise TenantLimitError(f"tenant {tenant!r} is over its {rate:g} requests per second", wait)

    @contextmanager
    def stream(self, tenant: str) -> Iterator[None]:
        """Hold one of the tenant's concurrent streams (and count the request) for the body's duration."""
        limit = self.settings.max_streams
        with self._lock:
            if limit and self._streams.get(tenant, 0) >= limit:
                raise TenantLimitError(f"tenant {tenant!r} already has {limit} streams open", 1.0)
            self._streams[tenant] = self._streams.get(tenant, 0) + 1
        try:
            self.admit_request(tenant)
            yield
        finally:
            with self._lock:
                self._streams[tenant] -= 1
                if not self._streams[tenant]:
                    del self._streams[tenant]

    def admit_samples(self, tenant: str, n: int = 1) -> None:
        """Count n samples against the tenant's samples/min; TenantLimitError when over (none are counted)."""
        per_min = self.settings.samples_per_min
        if not per_min or n <= 0:
            return
        with self._lock:
            if n > per_min:
                raise TenantLimitError(f"{n} samples exceed tenant {tenant!r}'s {per_min:g} per minute", 60.0)
            wait = self._take(self._samples, tenant, per_min / 60.0, per_min, float(n))
        if wait:
            raise TenantLimitError(f"tenant {tenant!r} is over its {per_min:g} samples per minute", wait)

    def open_streams(self, tenant: str) -> int:
        """Streams the tenant holds now."""
        with self._lock:
            return self._streams.get(tenant, 0)
