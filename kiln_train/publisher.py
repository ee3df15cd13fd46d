"""A round's candidate in the registry: staged unpromoted for the gate, then promoted, rejected or abandoned.

The candidate is written as the adapter's next version *before* the gate, without moving the alias, so that
kiln-infer (which preloads every published version) answers the gate pinned to `name@vN` and already holds the
weights when the gate passes: promotion is then one atomic alias flip, no load. A version that does not pass
stays registered and pinnable, never served by default, and its history says why (ListVersions shows it):

    gating     written; the gate asks it pinned
    promoted   the gate passed; the alias points at it (noted just before the flip)
    rejected   the gate failed; the reason names each failed set
    abandoned  the round stopped (paused, kiln-infer away, a crash) before the gate decided

Rejected versions are kept, not deleted: versions are numbered and immutable, so a deleted one would leave a
hole that reads like data loss, and the weights plus scores are what a user needs to see what the round did
(ask `name@vN`, or override the gate with an explicit Promote).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from kiln_common.registry import EventType, Registry

log = logging.getLogger(__name__)

GATING, PROMOTED, REJECTED, ABANDONED = "gating", "promoted", "rejected", "abandoned"


class Publisher:
    """Registry bookkeeping of round candidates (never imports kiln_infer: kiln-infer follows the events)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def stage(
        self,
        tenant: str,
        adapter: str,
        src: Path,
        *,
        parent: int,
        round_id: str,
        sample_ids: list[str],
        hyperparameters: Mapping[str, object],
        eval_scores: Mapping[str, float],
    ) -> int:
        """Register `src` as the next version, not promoted; returns its number."""
        meta = self.registry.publish(
            tenant,
            adapter,
            src,
            origin="trained",
            parent=parent,
            sample_ids=sample_ids,
            num_samples=len(sample_ids),
            hyperparameters={**hyperparameters, "round_id": round_id},
            eval_scores=eval_scores,
            promote=False,
        )
        why = (
            f"round {round_id}: trained from v{parent}; the gate asks it pinned; not served unless it passes"
        )
        self.registry.note(tenant, adapter, meta.version, GATING, why)
        log.info("round %s staged %s/%s@v%d for the gate", round_id, tenant, adapter, meta.version)
        return meta.version

    def promote(
        self, tenant: str, adapter: str, version: int, round_id: str, scores: Mapping[str, float]
    ) -> None:
        """The gate passed: record its scores, note it, then flip the alias (kiln-infer has the weights)."""
        self.registry.add_eval(tenant, adapter, version, scores)
        self.registry.note(tenant, adapter, version, PROMOTED, f"round {round_id}: every gate set passed")
        self.registry.promote(tenant, adapter, version, detail=f"gate passed (round {round_id})")
        log.info("round %s published %s/%s@v%d", round_id, tenant, adapter, version)

    def reject(
        self, tenant: str, adapter: str, version: int, reason: str, scores: Mapping[str, float]
    ) -> None:
        """The gate failed: the version stays unpromoted, marked rejected with the reason and its scores."""
        self.registry.add_eval(tenant, adapter, version, scores)
        self.registry.note(tenant, adapter, version, REJECTED, reason)
        self.registry.emit(EventType.REJECTED, tenant, adapter, version, reason[:500])
        log.warning("%s/%s@v%d rejected by the gate (stays unpromoted): %s", tenant, adapter, version, reason)

    def abandon(self, tenant: str, adapter: str, version: int, why: str) -> None:
        """The round stopped before the gate decided; the version stays unpromoted (never raises)."""
        try:
            self.registry.note(tenant, adapter, version, ABANDONED, why[:2000])
        except Exception:  # noqa: BLE001 - already on an error path; the version is unpromoted either way
            log.exception("could not mark %s/%s@v%d abandoned", tenant, adapter, version)

    def recover(self, tenant: str, adapter: str, version: int, parent: int) -> str:
        """After a crash, what became of a round that had staged `version`: "published", "rejected" or
        "failed" (abandoned now). A crash between the promoted note and the flip is finished here."""
        actions = [n["action"] for n in self.registry.history(tenant, adapter, version)]
        if PROMOTED in actions:
            state = self.registry.get(tenant, adapter)
            if state.current == parent and state.previous != version and not state.split:
                self.registry.promote(
                    tenant, adapter, version, detail="gate passed (finished after a restart)"
                )
            return "published"
        if REJECTED in actions:
            return "rejected"
        if ABANDONED not in actions:
            self.abandon(tenant, adapter, version, "kiln-train restarted before the gate decided")
        return "failed"
