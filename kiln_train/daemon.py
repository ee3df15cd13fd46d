"""kiln-train's heart: a consumer thread fills buffers; a scheduler thread fires triggers and runs rounds."""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from kiln_train.base_model import SharedBase
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.governor import Governor
from kiln_train.metrics import TrainMetrics
from kiln_train.parent_client import ParentUnavailableError
from kiln_train.round_record import RoundRecord, new_round
from kiln_train.settings import TrainSettings
from kiln_train.tenant_pauses import TenantPauses
from kiln_train.training_round import RoundRunner

log = logging.getLogger(__name__)


class DaemonState(enum.Enum):
    """What the daemon is doing (mirrors the proto's TrainerState)."""

    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    WAITING_FOR_BASE = "waiting_for_base"


@dataclass(frozen=True)
class BufferStatus:
    """One adapter's buffer."""

    tenant: str
    adapter: str
    pending: int
    trained: int


@dataclass(frozen=True)
class DaemonStatus:
    """A snapshot for GetTrainingStatus."""

    state: DaemonState
    buffers: list[BufferStatus]
    dropped: dict[str, int]
    rounds: list[RoundRecord]
    consumed: int
    dead_lettered: int
    base_generation: str = ""
    current: RoundRecord | None = None
    extra: dict[str, int] = field(default_factory=dict)
    governor: dict[str, Any] = field(default_factory=dict)  # mode, pace, micro-batch, the load it last saw


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


class TrainingDaemon:
    """Owns the consumer and scheduler threads; all shared state lives in Redis or behind one lock."""

    def __init__(
        self,
        consumer: SampleConsumer,
        buffer: TrainingBuffer,
        base: SharedBase,
        runner: RoundRunner,
        settings: TrainSettings,
        tick_s: float = 0.5,
        metrics: TrainMetrics | None = None,
        governor: Governor | None = None,
    ) -> None:
        self.governor = governor
        if governor is not None:  # evaluation passes (the gate's measures, vetting) are paced like steps
            runner.workspace.before_pass = governor.before_pass
        self.consumer = consumer
        self.buffer = buffer
        self.base = base
        self.runner = runner
        self.settings = settings
        self._tick_s = tick_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = False
        self._waiting_for_base = True
        self._current: RoundRecord | None = None
        self._triggered: set[tuple[str, str]] = set()
        self._rejected_digest: dict[tuple[str, str], str] = {}
        self._retry_after: dict[tuple[str, str], float] = {}  # rounds waiting for kiln-infer to answer
        self._threads: list[threading.Thread] = []

    # --- control ---
    def start(self) -> None:
        """Reconcile rounds a crash left behind, then start the consumer and scheduler threads."""
        self.reconcile()
        self._threads = [
            threading.Thread(target=self.consumer.run, args=(self._stop,), name="kiln-consumer", daemon=True),
            threading.Thread(target=self._schedule, name="kiln-scheduler", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop both threads (a running round stops at its next step; its samples stay buffered)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)

    def pause(self) -> None:
        """No new rounds; a running one stops at its next step."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Rounds may start again."""
        with self._lock:
            self._paused = False

    def trigger(self, tenant: str, adapter: str) -> tuple[bool, str]:
        """Queue a round for an adapter now; (False, reason) when there is nothing to train."""
        if self.buffer.size(tenant, adapter) == 0:
            return False, f"no buffered samples for adapter {adapter!r}"
        with self._lock:
            self._triggered.add((tenant, adapter))
            paused = self._paused
        return True, "queued (training is paused: it starts on ResumeTraining)" if paused else "queued"

    # --- status ---
    def status(self, tenant: str | None = None, adapter: str = "") -> DaemonStatus:
        """What GetTrainingStatus reports, filtered to a tenant (and adapter)."""
        with self._lock:
            current = replace(self._current) if self._current else None
            paused, waiting = self._paused, self._waiting_for_base
        if current is not None:
            state = DaemonState.TRAINING
        elif paused:
            state = DaemonState.PAUSED
        elif waiting:
            state = DaemonState.WAITING_FOR_BASE
        else:
            state = DaemonState.IDLE

        def mine(t: str, a: str) -> bool:
            return (tenant is None or t == tenant) and (not adapter or a == adapter)

        buffers = [
            BufferStatus(t, a, self.buffer.size(t, a), self.buffer.trained_count(t, a))
            for t, a in self.buffer.adapters()
            if mine(t, a)
        ]
        rounds = [RoundRecord(**r) for r in self.buffer.rounds() if mine(r["tenant"], r["adapter"])]
        if current is not None and mine(current.tenant, current.adapter):
            rounds.insert(0, current)
        stats = self.buffer.stats()
        return DaemonStatus(
            state=state,
            buffers=buffers,
            dropped=self.buffer.drops(),
            rounds=rounds,
            consumed=stats.get("consumed", 0),
            dead_lettered=stats.get("dead_lettered", 0),
            base_generation=self.base.generation or "",
            current=current,
            extra=stats,
            governor=self.governor.state() if self.governor is not None else {},
        )

    # --- scheduling ---
    def reconcile(self) -> None:
        """Finish or forget rounds a killed daemon left: published ones are cleaned up, others retrained.

        A round writes its candidate (with its round id) before the gate, so a version of the round is
        published only if its history says the gate passed; a candidate the gate never judged is marked
        abandoned and stays unpromoted.
        """
        registry = self.runner.registry
        for tenant, adapter in self.buffer.adapters():
            rec = self.buffer.round_in_progress(tenant, adapter)
            if rec is None:
                continue
            try:
                metas = registry.versions(tenant, adapter)
            except LookupError:
                metas = []
            done = [m for m in metas if m.hyperparameters.get("round_id") == rec["round_id"]]
            record = RoundRecord(**rec)
            outcome, reason = "failed", "interrupted (daemon restarted)"
            if done:
                record.version, parent = done[0].version, record.parent_version
                outcome = self.runner.publisher.recover(tenant, adapter, record.version, parent)
            if outcome == "published":
                record.outcome, record.finished = "published", time.time()
                self.buffer.finish_round(
                    tenant, adapter, record.sample_ids + record.heldout_ids, record.to_dict()
                )
                log.info(
                    "round %s had published v%d before a crash; cleaned up", record.round_id, record.version
                )
            else:
                if outcome == "rejected":
                    reason = f"the gate rejected v{record.version} (see its history); daemon restarted"
                record.outcome, record.reason, record.finished = outcome, reason, time.time()
                self.buffer.abandon_round(tenant, adapter, record.to_dict())
                log.info("round %s was interrupted; its samples stay buffered", record.round_id)

    def _due(self, tenant: str, adapter: str) -> bool:
        key = (tenant, adapter)
        if TenantPauses(self.buffer.redis).is_paused(tenant):  # the tenant paused its own training
            return False
        with self._lock:
            forced = key in self._triggered
        size = self.buffer.size(tenant, adapter)
        if size == 0:
            with self._lock:
                self._triggered.discard(key)
            return False
        if time.monotonic() < self._retry_after.get(key, 0.0):
            return False
        if forced:
            return True
        if (
            size < self.settings.trigger_samples
            and self.buffer.oldest_age_s(tenant, adapter) < self.settings.trigger_interval_s
        ):
            return False
        ids = [e.sample_id for e in self.buffer.load(tenant, adapter)]
        return self._rejected_digest.get(key) != _ids_digest(ids)  # a rejected set waits for new samples

    def _schedule(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad round
                log.exception("scheduler error")
                self._stop.wait(2.0)

    def _tick(self) -> None:
        model = self.base.model()
        with self._lock:
            self._waiting_for_base = model is None
            paused = self._paused
        if model is None or paused:
            return
        for tenant, adapter in self.buffer.adapters():
            if self._stop.is_set() or not self._due(tenant, adapter):
                continue
            self.run_round(tenant, adapter)
            return
        self.runner.prepare(model)  # nothing due: capture ahead what the first round replays (once)

    def _interrupted(self) -> bool:
        with self._lock:
            paused, current = self._paused, self._current
        tenant_paused = current is not None and TenantPauses(self.buffer.redis).is_paused(current.tenant)
        return paused or tenant_paused or self._stop.is_set() or not self.base.alive()

    def run_round(
        self, tenant: str, adapter: str, on_progress: Callable[[RoundRecord], None] | None = None
    ) -> RoundRecord:
        """Train the adapter on everything buffered now; the scheduler thread calls this."""
        model = self.base.model()
        examples = self.buffer.load(tenant, adapter)
        registry = self.runner.registry
        registry.create(tenant, adapter)
        parent = registry.get(tenant, adapter).current
        record = new_round(tenant, adapter, parent)
        record.sample_ids = [e.sample_id for e in examples]
        with self._lock:
            self._triggered.discard((tenant, adapter))
            self._current = record
        self.buffer.begin_round(tenant, adapter, record.to_dict())
        log.info(
            "round %s: %s/%s from v%d on %d samples", record.round_id, tenant, adapter, parent, len(examples)
        )

        def progress(r: RoundRecord) -> None:
            with self._lock:
                self._current = replace(r)
            if on_progress is not None:
                on_progress(r)

        try:
            if model is None:
                raise InterruptedError("base weights unavailable (waiting for kiln-infer)")
            paced = self.governor.gate(self._interrupted) if self.governor is not None else None
            self.runner.run(model, record, examples, progress, self._interrupted, paced)
        except InterruptedError as exc:
            record.outcome, record.reason = "failed", f"interrupted: {exc}"
        except ParentUnavailableError as exc:  # no parent answers, no honest round: wait and retry
            record.outcome, record.reason = "failed", f"waiting for kiln-infer (retry): {exc}"
            self._retry_after[(tenant, adapter)] = time.monotonic() + self.settings.parent_retry_s
            with self._lock:
                self._triggered.add((tenant, adapter))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed round; samples stay buffered
            log.exception("round %s failed", record.round_id)
            record.outcome, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        if self.governor is not None:
            self.governor.finished()
        record.finished = time.time()
        if self.metrics is not None:
            self.metrics.round_finished(record.outcome, record.finished - record.started)
        if record.outcome == "published":
            self.buffer.finish_round(
                tenant, adapter, record.sample_ids + record.heldout_ids, record.to_dict()
            )
            self._rejected_digest.pop((tenant, adapter), None)
        else:
            self.buffer.abandon_round(tenant, adapter, record.to_dict())
            if record.outcome == "rejected":
                self._rejected_digest[(tenant, adapter)] = _ids_digest([e.sample_id for e in examples])
        with self._lock:
            self._current = None
        return record
