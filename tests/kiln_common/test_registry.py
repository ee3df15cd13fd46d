"""Adapter store and registry against a real valkey-server and adapters saved by PEFT."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from pathlib import Path

import pytest
import redis

from kiln_common.adapter_store import AdapterStore, InvalidAdapterError, validate_peft_dir
from kiln_common.registry import AdapterNotFoundError, EventType, NoPreviousVersionError, Registry, parse_spec


@pytest.fixture
def registry(redis_client: redis.Redis, tmp_path: Path) -> Registry:
    return Registry(redis_client, AdapterStore(tmp_path))


def _tenant() -> str:
    return "t" + uuid.uuid4().hex[:8]


def test_parse_spec() -> None:
    assert parse_spec("support") == ("support", None)
    assert parse_spec("support@v3") == ("support", 3)
    for bad in ("a/b", "x@v", "@v1", "a b", "x" * 65, ".."):
        with pytest.raises(InvalidAdapterError):
            parse_spec(bad)


def test_publish_writes_immutable_version_with_meta(registry: Registry, peft_adapter: Path) -> None:
    tenant = _tenant()
    meta = registry.publish(
        tenant, "support", peft_adapter, hyperparameters={"lr": 1e-3}, sample_ids=["a", "b"]
    )
    assert meta.version == 1 and meta.parent == 0 and meta.rank == 8 and meta.num_samples == 2
    vdir = registry.store.version_dir(tenant, "support", 1)
    on_disk = json.loads((vdir / "meta.json").read_text())
    assert on_disk["sha256"] == meta.sha256 and on_disk["sample_ids"] == ["a", "b"]
    assert sorted(p.name for p in vdir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "meta.json",
    ]
    assert not [p for p in vdir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    meta2 = registry.publish(tenant, "support", peft_adapter, promote=True)
    assert meta2.version == 2
    state = registry.get(tenant, "support")
    assert (state.current, state.latest, state.previous) == (2, 2, 0)
    assert [v.version for v in registry.versions(tenant, "support")] == [1, 2]


def test_created_adapter_serves_base_as_v0(registry: Registry) -> None:
    tenant = _tenant()
    assert registry.create(tenant, "fresh") and not registry.create(tenant, "fresh")
    resolved = registry.resolve(tenant, "fresh", random.Random(0))
    assert resolved is not None and resolved.version == 0 and resolved.path is None
    assert resolved.label == "fresh@v0"


def test_resolution_not_found_is_identical_for_missing_and_other_tenant(
    registry: Registry, peft_adapter: Path
) -> None:
    owner, other = _tenant(), _tenant()
    registry.publish(owner, "secret", peft_adapter)
    rng = random.Random(0)
    assert registry.resolve(owner, "secret@v1", rng) is not None
    with pytest.raises(AdapterNotFoundError) as a:
        registry.resolve(other, "secret", rng)
    with pytest.raises(AdapterNotFoundError) as b:
        registry.resolve(other, "secret", rng)
    with pytest.raises(AdapterNotFoundError) as c:
        registry.resolve(owner, "nothing", rng)
    assert (
        str(a.value).replace("secret", "X")
        == str(c.value).replace("nothing", "X")
        == str(b.value).replace("secret", "X")
    )
    with pytest.raises(AdapterNotFoundError):
        registry.resolve(owner, "secret@v9", rng)


def test_promote_rollback_split_and_events(registry: Registry, peft_adapter: Path) -> None:
    tenant = _tenant()
    start = registry.last_event_id()
    for _ in range(3):
        registry.publish(tenant, "a", peft_adapter)
    assert registry.promote(tenant, "a", 2) == (0, 2)
    assert registry.promote(tenant, "a", 3) == (2, 3)
    assert registry.rollback(tenant, "a") == (3, 2)
    assert registry.rollback(tenant, "a") == (2, 3)  # rollback of a rollback goes forward again
    split = registry.set_split(tenant, "a", [(1, 1.0), (3, 3.0)])
    assert split == ((1, 0.25), (3, 0.75))
    state = registry.get(tenant, "a")
    rng = random.Random(1)
    picks = [state.pick_version(rng) for _ in range(2000)]
    assert 0.2 < picks.count(1) / len(picks) < 0.3
    assert registry.rollback(tenant, "a") == (3, 3)
    assert registry.get(tenant, "a").split == ()
    with pytest.raises(AdapterNotFoundError):
        registry.promote(tenant, "a", 7)
    with pytest.raises(InvalidAdapterError):
        registry.set_split(tenant, "a", [(1, 0.0)])
    events, _ = registry.read_events(start, block_ms=0, count=1000)
    # a live kiln-infer in the same session answers alias changes with LOADED events: not ours to count
    mine = [(e.type, e.version) for e in events if e.tenant == tenant and e.type != EventType.LOADED]
    assert mine[:4] == [
        (EventType.PUBLISHED, 0),
        (EventType.PUBLISHED, 1),
        (EventType.PUBLISHED, 2),
        (EventType.PUBLISHED, 3),
    ]
    assert [t for t, _ in mine[4:]] == [
        EventType.PROMOTED,
        EventType.PROMOTED,
        EventType.ROLLED_BACK,
        EventType.ROLLED_BACK,
        EventType.SPLIT,
        EventType.ROLLED_BACK,
    ]


def test_rollback_without_previous(registry: Registry) -> None:
    tenant = _tenant()
    registry.create(tenant, "new")
    with pytest.raises(NoPreviousVersionError):
        registry.rollback(tenant, "new")
    with pytest.raises(AdapterNotFoundError):
        registry.rollback(tenant, "missing")


def test_peft_dir_validation(peft_adapter: Path, tmp_path: Path) -> None:
    info = validate_peft_dir(peft_adapter, max_rank=64)
    assert info.rank == 8 and "q_proj" in info.target_modules
    with pytest.raises(InvalidAdapterError, match="rank"):
        validate_peft_dir(peft_adapter, max_rank=4)
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(peft_adapter / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidAdapterError, match="pickle"):
        validate_peft_dir(bad, max_rank=64)
    wrong = tmp_path / "wrong"
    shutil.copytree(peft_adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "lm_head"]
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapterError, match="lm_head"):
        validate_peft_dir(wrong, max_rank=64)
    with pytest.raises(InvalidAdapterError, match="not a directory"):
        validate_peft_dir(tmp_path / "nope", max_rank=64)
