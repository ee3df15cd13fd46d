"""At-least-once consumer of `kiln:samples`: buffer durably, then ack — in one Redis transaction."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from kiln_common.samples import DEAD_LETTER_STREAM, SAMPLES_STREAM, Sample
from kiln_train.buffer import STATS_KEY, TrainingBuffer
from kiln_train.pipeline import Pipeline
from kiln_train.settings import TrainSettings

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 8.0


class SampleConsumer:
    """Consumer-group reader: own-pending recovery, XAUTOCLAIM, dead letters, idempotency."""

    def __init__(
        self,
        client: redis.Redis,
        buffer: TrainingBuffer,
        pipeline: Pipeline,
        settings: TrainSettings,
        stream: str = SAMPLES_STREAM,
        dead_stream: str = DEAD_LETTER_STREAM,
    ) -> None:
        self.redis = client  # decode_responses=True
        self.buffer = buffer
        self.pipeline = pipeline
        self.settings = settings
        self.stream = stream
        self.dead_stream = dead_stream
        self.group = settings.group
        self.name = settings.consumer
        self._claim_cursor = "0-0"

    def ensure_group(self) -> None:
        """Create the consumer group (from the start of the stream) unless it exists."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def recover(self) -> int:
        """Re-process entries this consumer read but never acked (a crash); returns how many."""
        done = 0
        while True:
            reply: Any = self.redis.xreadgroup(
                self.group, self.name, {self.stream: "0"}, count=self.settings.batch
            )
            entries = [e for _, es in reply or [] for e in es if e[1]]  # entries trimmed away have no fields
            if not entries:
                self._ack_vanished(reply)
                return done
            done += self._process_batch(entries, redelivered=True)
            if done and done % 10_000 == 0:
                log.info("recovered %d pending samples so far", done)

    def claim(self) -> int:
        """XAUTOCLAIM entries idle past claim_idle_ms (a dead consumer's, or our own failed ones)."""
        reply = self.redis.xautoclaim(
            self.stream,
            self.group,
            self.name,
            self.settings.claim_idle_ms,
            self._claim_cursor,
            count=self.settings.batch,
        )
        self._claim_cursor = str(reply[0])
        entries = [e for e in reply[1] if e[1]]
        if not entries:
            return 0
        log.info("claimed %d idle pending sample(s)", len(entries))
        return self._process_batch(entries, redelivered=True)

    def poll(self, block_ms: int | None = None) -> int:
        """Read new entries (blocking up to block_ms) and process them; returns how many."""
        reply: Any = self.redis.xreadgroup(
            self.group,
            self.name,
            {self.stream: ">"},
            count=self.settings.batch,
            block=self.settings.block_ms if block_ms is None else block_ms,
        )
        entries = [e for _, es in reply or [] for e in es]
        if not entries:
            return 0
        self.redis.hincrby(STATS_KEY, "delivered", len(entries))  # new deliveries, for trimmed_unread
        return self._process_batch(entries, redelivered=False)

    def trimmed_unread(self) -> int:
        """Entries the stream lost to trimming before this group read them: added − delivered − waiting."""
        try:
            stream: Any = self.redis.xinfo_stream(self.stream)
            groups: Any = self.redis.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0  # no stream yet
        group = next((g for g in groups if g["name"] == self.group), None)
        if group is None or "entries-added" not in stream:
            return 0  # a server without XINFO counters (Redis < 7): nothing to compare
        last = str(group["last-delivered-id"])
        first = stream.get("first-entry")
        if first is None or _id(str(first[0])) > _id(last):
            waiting = int(stream["length"])  # every entry still there is unread (and some were trimmed)
        elif group.get("lag") is not None:
            waiting = int(group["lag"])  # nothing unread was trimmed: the server's lag is exact
        else:
            waiting = len(self.redis.xrange(self.stream, f"({last}", "+") or [])
        delivered = int(self.redis.hget(STATS_KEY, "delivered") or 0)
        return max(0, int(stream["entries-added"]) - delivered - int(waiting))

    def housekeeping(self) -> None:
        """Count samples trimmed before anyone read them, and prune the retention windows."""
        lost = self.trimmed_unread()
        if lost > int(self.redis.hget(STATS_KEY, "trimmed_unread") or 0):
            log.warning("%d sample(s) were trimmed from %s before kiln-train read them", lost, self.stream)
        self.buffer.set_stat("trimmed_unread", lost)
        self.buffer.prune(self.settings.seen_ttl_s, self.settings.fingerprint_ttl_s)

    def run(self, stop: threading.Event, claim_every_s: float = 5.0) -> None:
        """Recover, then poll until stopped; claim idle entries periodically.

        While Redis is unreachable it retries with exponential backoff (0.5 s up to 8 s); after it returns,
        the group is ensured and this consumer's pending entries recovered again before polling resumes.
        """
        next_claim, backoff, ready = 0.0, _MIN_BACKOFF_S, False
        while not stop.is_set():
            try:
                if not ready:
                    self.ensure_group()
                    self.recover()
                    ready = True
                if time.monotonic() >= next_claim:
                    self.claim()
                    self.housekeeping()
                    next_claim = time.monotonic() + claim_every_s
                self.poll()
                backoff = _MIN_BACKOFF_S
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unavailable (%s); reconnecting in %.1fs", exc, backoff)
                ready = False
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:  # noqa: BLE001 - keep consuming; the failing entry stays pending
                log.exception("consumer loop error")
                stop.wait(0.5)

    # --- internals ---
    def _ack_vanished(self, reply: Any) -> None:
        """Ack pending ids whose entries were trimmed from the stream (nothing left to process)."""
        gone = [eid for _, es in reply or [] for eid, fields in es if not fields]
        if gone:
            self.redis.xack(self.stream, self.group, *gone)

    def _deliveries(self, entries: list[Entry]) -> dict[str, int]:
        ids = [e[0] for e in entries]
        pending = self.redis.xpending_range(
            self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2 + 10, consumername=self.name
        )
        return {str(p["message_id"]): int(p["times_delivered"]) for p in pending}

    def _process_batch(self, entries: list[Entry], redelivered: bool) -> int:
        counts = self._deliveries(entries) if redelivered else {}
        done = 0
        for entry_id, fields in entries:
            deliveries = counts.get(entry_id, 1)
            try:
                self.process(entry_id, fields, deliveries)
                done += 1
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception:  # noqa: BLE001 - left pending; redelivered later, dead-lettered after N
                log.exception("sample %s failed (delivery %d); it stays pending", entry_id, deliveries)
        return done

    def process(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        """Dead-letter one entry, skip a seen sample id, or pass it to the pipeline; ack in the same MULTI."""
        if deliveries > self.settings.max_deliveries:
            self._dead_letter(entry_id, fields, f"failed {deliveries - 1} deliveries", deliveries)
            return
        try:
            sample = Sample.from_fields(fields)
        except ValueError as exc:
            self._dead_letter(entry_id, fields, str(exc), deliveries)
            return
        pipe = self.redis.pipeline(transaction=True)
        if self.buffer.seen(sample.sample_id):
            self.buffer.count_drop(pipe, "duplicate_id")
        else:
            self.pipeline.admit(sample, pipe)
            self.buffer.mark_consumed(pipe, sample.sample_id)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()

    def _dead_letter(self, entry_id: str, fields: dict[str, str], reason: str, deliveries: int) -> None:
        log.warning("dead-lettering %s: %s", entry_id, reason)
        pipe = self.redis.pipeline(transaction=True)
        dead: Any = {
            **fields,
            "dead_reason": reason,
            "dead_entry_id": entry_id,
            "deliveries": str(deliveries),
        }
        pipe.xadd(self.dead_stream, dead)
        self.buffer.count_stat(pipe, "dead_lettered")
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()


def _id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
