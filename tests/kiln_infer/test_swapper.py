"""The registry view: rebuilt from durable state at start (events only notify), read through on a miss."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from kiln_common.adapter_store import AdapterStore
from kiln_common.registry import AdapterNotFoundError, Registry
from kiln_infer.swapper import AdapterView, engine_ref


def test_view_rebuilds_from_the_registry_and_pins_versions(
    redis_client: redis.Redis, tmp_path: Path, peft_adapter: Path
) -> None:
    registry = Registry(redis_client, AdapterStore(tmp_path))
    tenant = "v" + uuid.uuid4().hex[:8]
    registry.publish(tenant, "a", peft_adapter, promote=True)
    registry.create(tenant, "b")
    view = AdapterView(registry, seed=0)  # a replica that saw none of the events above
    assert view.rebuild() >= 2
    assert {(s.tenant, s.name, s.current) for s in view.states() if s.tenant == tenant} == {
        (tenant, "a", 1),
        (tenant, "b", 0),
    }
    resolved, state = view.resolve(tenant, "a")
    assert resolved is not None and state is not None and resolved.label == "a@v1"
    ref = engine_ref(resolved)
    assert (
        ref is not None and ref.key == f"{tenant}/a@v1" and (ref.path / "adapter_model.safetensors").is_file()
    )
    assert engine_ref(view.resolve(tenant, "b")[0]) is None  # v0 is the base model: no adapter to load
    assert view.resolve(tenant, "") == (None, None)
    registry.create(tenant, "c")  # created after the rebuild: found by reading through
    assert view.resolve(tenant, "c")[0] is not None
    with pytest.raises(AdapterNotFoundError):
        view.resolve("someone-else", "a")
