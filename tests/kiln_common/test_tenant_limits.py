"""Per-tenant limits refuse only the tenant over them, say when to retry, and recover with time."""

from __future__ import annotations

import grpc
import pytest

from kiln_common.grpc_status import StatusMapper
from kiln_common.tenant_limits import LimitSettings, TenantLimitError, TenantLimits


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_streams_per_tenant() -> None:
    limits = TenantLimits(LimitSettings(max_streams=2))
    with limits.stream("a"), limits.stream("a"):
        with pytest.raises(TenantLimitError, match="already has 2 streams"):
            with limits.stream("a"):
                pass
        with limits.stream("b"):  # another tenant is unaffected
            assert limits.open_streams("b") == 1
        assert limits.open_streams("a") == 2
    assert limits.open_streams("a") == 0
    with limits.stream("a"):  # released, even after the refusal
        pass


def test_requests_per_second_bucket() -> None:
    clock = Clock()
    limits = TenantLimits(LimitSettings(requests_per_s=5), clock)
    for _ in range(5):
        limits.admit_request("a")
    with pytest.raises(TenantLimitError) as info:
        limits.admit_request("a")
    assert info.value.retry_after_s == pytest.approx(0.2)
    limits.admit_request("b")
    clock.now += 0.2
    limits.admit_request("a")
    with pytest.raises(TenantLimitError):
        with limits.stream("a"):  # a stream counts as a request, and its slot is given back
            pass
    assert limits.open_streams("a") == 0


def test_samples_per_minute() -> None:
    clock = Clock()
    limits = TenantLimits(LimitSettings(samples_per_min=60), clock)
    limits.admit_samples("a", 50)
    with pytest.raises(TenantLimitError, match="60 samples per minute") as info:
        limits.admit_samples("a", 20)
    assert info.value.retry_after_s == pytest.approx(10.0)
    with pytest.raises(TenantLimitError, match="exceed"):
        limits.admit_samples("b", 61)
    limits.admit_samples("b", 60)
    clock.now += 10
    limits.admit_samples("a", 20)


def test_limits_map_to_resource_exhausted_and_are_validated() -> None:
    code, _ = StatusMapper({}).status_for(TenantLimitError("over", 1.0))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    TenantLimits(LimitSettings()).admit_samples("a", 10**6)  # 0 = off
    with pytest.raises(ValueError, match="requests_per_s"):
        LimitSettings(requests_per_s=float("inf"))
