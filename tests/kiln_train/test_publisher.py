"""A round's candidate in a real registry: staged unpromoted, then promoted, rejected or abandoned; and what a
restarted daemon makes of a candidate it left behind."""

from __future__ import annotations

from pathlib import Path

import redis

from kiln_common.adapter_store import AdapterStore
from kiln_common.registry import Registry
from kiln_train.publisher import Publisher


def _stage(publisher: Publisher, adapter: Path, round_id: str) -> int:
    return publisher.stage(
        "default",
        "facts",
        adapter,
        parent=0,
        round_id=round_id,
        sample_ids=["s1", "s2"],
        hyperparameters={"lr": 1e-3},
        eval_scores={"vetting_loss_after": 0.5},
    )


def _actions(registry: Registry, version: int) -> list[str]:
    return [h["action"] for h in registry.history("default", "facts", version)]


def test_a_staged_candidate_is_registered_but_not_served(
    rds: redis.Redis, tmp_path: Path, peft_adapter: Path
) -> None:
    registry = Registry(rds, AdapterStore(tmp_path))
    publisher = Publisher(registry)
    v1 = _stage(publisher, peft_adapter, "r1")
    state = registry.get("default", "facts")
    assert (v1, state.current, state.latest) == (1, 0, 1)
    assert registry.versions("default", "facts")[0].hyperparameters["round_id"] == "r1"
    assert _actions(registry, 1) == ["gating"]

    publisher.reject("default", "facts", v1, "gate set 'general': 3 broken", {"gate_general_broken": 3.0})
    (meta,) = registry.versions("default", "facts")
    assert meta.eval == {"vetting_loss_after": 0.5, "gate_general_broken": 3.0}  # what ListVersions shows
    assert _actions(registry, 1) == ["gating", "rejected"]
    assert registry.get("default", "facts").current == 0

    v2 = _stage(publisher, peft_adapter, "r2")
    publisher.promote("default", "facts", v2, "r2", {"gate_general_broken": 0.0})
    state = registry.get("default", "facts")
    assert (v2, state.current, state.previous) == (2, 2, 0)
    assert _actions(registry, 2) == ["gating", "promoted"]


def test_a_restart_finishes_or_abandons_what_a_round_left(
    rds: redis.Redis, tmp_path: Path, peft_adapter: Path
) -> None:
    registry = Registry(rds, AdapterStore(tmp_path))
    publisher = Publisher(registry)
    # Killed during the gate: the candidate stays unpromoted and is marked abandoned (once).
    v1 = _stage(publisher, peft_adapter, "r1")
    assert publisher.recover("default", "facts", v1, parent=0) == "failed"
    assert publisher.recover("default", "facts", v1, parent=0) == "failed"
    assert _actions(registry, v1) == ["gating", "abandoned"]
    assert registry.get("default", "facts").current == 0
    # Killed between the "promoted" note and the flip: the restart finishes the promotion.
    v2 = _stage(publisher, peft_adapter, "r2")
    registry.note("default", "facts", v2, "promoted", "every gate set passed")
    assert publisher.recover("default", "facts", v2, parent=0) == "published"
    assert registry.get("default", "facts").current == v2
    # Rolled back by hand afterwards: a later recovery does not promote it again.
    registry.rollback("default", "facts")
    assert publisher.recover("default", "facts", v2, parent=0) == "published"
    assert registry.get("default", "facts").current == 0
    # Rejected before the kill: still rejected.
    v3 = _stage(publisher, peft_adapter, "r3")
    publisher.reject("default", "facts", v3, "gate set 'kl'", {})
    assert publisher.recover("default", "facts", v3, parent=0) == "rejected"
    assert registry.get("default", "facts").current == 0
