"""Canaries on a real valkey-server: a worse candidate is rolled back with its reason, a good one promoted."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import redis

from kiln_common.adapter_store import AdapterStore
from kiln_common.canary import Canaries
from kiln_common.registry import EventType, Registry


def _setup(redis_client: redis.Redis, tmp_path: Path, peft_adapter: Path) -> tuple[Registry, str]:
    registry = Registry(redis_client, AdapterStore(tmp_path))
    tenant = "t" + uuid.uuid4().hex[:8]
    registry.publish(tenant, "support", peft_adapter, promote=True)
    registry.publish(tenant, "support", peft_adapter)
    return registry, tenant


def test_worse_canary_is_rolled_back_with_its_reason(
    redis_client: redis.Redis, tmp_path: Path, peft_adapter: Path
) -> None:
    registry, tenant = _setup(redis_client, tmp_path, peft_adapter)
    canaries = Canaries(registry)
    last = registry.last_event_id()
    canaries.start(tenant, "support", 2, share=0.2, min_requests=5)
    state = registry.get(tenant, "support")
    assert dict(state.split) == {1: 0.8, 2: 0.2}
    picks = [state.pick_version(random.Random(), f"user-{i}") for i in range(2000)]
    assert 0.17 < picks.count(2) / len(picks) < 0.23  # sticky keys spread like the weights
    for _ in range(10):
        assert canaries.record(tenant, "support", 1, 1.0) is None  # the baseline is rated well
    for i in range(5):
        judged = canaries.record(tenant, "support", 2, -0.5)
        assert (judged is None) == (i < 4)
    assert judged is not None and judged.candidate_rated == 5 and judged.baseline_rated == 10
    state = registry.get(tenant, "support")
    assert state.current == 1 and not state.split
    history = registry.history(tenant, "support", 2)
    assert [h["action"] for h in history] == ["canary", "rolled_back"]
    assert (
        "worse than the current version" in history[-1]["reason"] and "-0.500 over 5" in history[-1]["reason"]
    )
    events, _ = registry.read_events(last, block_ms=0)
    rolled = [e for e in events if e.tenant == tenant and e.type == EventType.ROLLED_BACK]
    assert rolled and "worse" in rolled[-1].detail
    assert canaries.get(tenant, "support") is None
    assert canaries.record(tenant, "support", 2, 1.0) is None  # judged once


def test_good_canary_is_promoted(redis_client: redis.Redis, tmp_path: Path, peft_adapter: Path) -> None:
    registry, tenant = _setup(redis_client, tmp_path, peft_adapter)
    canaries = Canaries(registry, default_share=0.1, default_min_requests=3)
    canaries.start(tenant, "support", 2)
    canaries.record(tenant, "support", 1, 0.0)
    for _ in range(3):
        canaries.record(tenant, "support", 2, 0.5)
    assert registry.get(tenant, "support").current == 2
    assert registry.history(tenant, "support", 2)[-1]["action"] == "promoted"


def test_a_change_by_hand_cancels_the_canary(
    redis_client: redis.Redis, tmp_path: Path, peft_adapter: Path
) -> None:
    registry, tenant = _setup(redis_client, tmp_path, peft_adapter)
    canaries = Canaries(registry, default_min_requests=2)
    canaries.start(tenant, "support", 2)
    registry.promote(tenant, "support", 1)
    assert canaries.cancel(tenant, "support", "promoted v1 by hand") is not None
    for _ in range(3):
        assert canaries.record(tenant, "support", 2, 1.0) is None  # nothing left to judge
    assert registry.get(tenant, "support").current == 1
    assert registry.history(tenant, "support", 2)[-1]["action"] == "canary_cancelled"
