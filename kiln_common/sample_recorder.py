"""The one writer of `kiln:samples`: served generations in the background, explicit samples durably."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln_common.sample_spool import Fields, SampleSpool, SpoolBusyError
from kiln_common.samples import SAMPLES_STREAM, Sample

log = logging.getLogger(__name__)

_BATCH = 64  # entries per pipelined XADD round trip
_MAX_BACKOFF_S = 5.0
DEFAULT_SPOOL_BYTES = 256 * 1024 * 1024
# What `counters()` reports. A sample handed to `record` ends as recorded, dropped_* (one reason), or spooled;
# a spooled one later counts as replayed too (or stays on disk for the next run).
COUNTER_NAMES = (
    "recorded",  # written to the stream directly
    "replayed",  # written to the stream from the spool after an outage
    "dropped_buffer_full",  # the in-memory buffer was full
    "dropped_spool_full",  # Redis was down and the spool had no room
    "dropped_no_spool",  # Redis was down and there is no spool (retries exhausted)
    "dropped_closed",  # recorded after close
    "spooled",  # accepted by the spool (then replayed, or still waiting)
    "spool_corrupt_lines",  # torn lines skipped on replay (a crash mid-append)
)


class SampleRecorder:
    """Appends samples to the stream: `record` (best effort, background) or `write` (durable, now).

    `record` buffers samples in memory and XADDs them from a background thread; it never blocks or raises.
    While Redis is unreachable, batches go to the on-disk spool (when one is given) and are replayed in order,
    with backoff, once Redis answers; new batches queue behind the spool so the stream keeps recording order.
    Every sample that is not written is counted by reason (`counters()`), never dropped silently.
    """

    def __init__(
        self,
        redis: Any,
        maxlen: int = 1_000_000,
        buffer_size: int = 10_000,
        stream: str = SAMPLES_STREAM,
        max_retries: int = 5,
        retry_delay_s: float = 0.5,
        spool_dir: Path | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_BYTES,
    ) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._stream = stream
        self._max_retries = max_retries
        self._retry_delay_s = retry_delay_s
        self._spool = _open_spool(spool_dir, spool_max_bytes)
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=buffer_size)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._closed = False
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._backoff_s = retry_delay_s
        self._retry_at = 0.0  # monotonic time before which Redis is not tried again
        self._thread = threading.Thread(target=self._run, name="kiln-sample-recorder", daemon=True)
        self._thread.start()

    def counters(self) -> dict[str, int]:
        """Counts by outcome (COUNTER_NAMES), plus `pending` (in memory) and `spool_bytes` (on disk)."""
        with self._lock:
            out = {name: self._counts[name] for name in COUNTER_NAMES}
        out["pending"] = self._queue.qsize()
        out["spool_bytes"] = self._spool.size_bytes if self._spool is not None else 0
        if self._spool is not None:
            out["spool_corrupt_lines"] = self._spool.corrupt_lines
        return out

    @property
    def dropped(self) -> int:
        """Samples lost, all reasons together."""
        counts = self.counters()
        return sum(v for k, v in counts.items() if k.startswith("dropped_"))

    @property
    def recorded(self) -> int:
        """Samples written to the stream (directly or replayed from the spool)."""
        with self._lock:
            return self._counts["recorded"] + self._counts["replayed"]

    @property
    def pending(self) -> int:
        """Samples waiting in the in-memory buffer."""
        return self._queue.qsize()

    def record(self, sample: Sample) -> bool:
        """Queue a sample; returns False (and counts a drop) when it could not be queued. Never raises."""
        try:
            with self._lock:
                if self._closed:
                    self._counts["dropped_closed"] += 1
                    return False
                self._in_flight += 1
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                self._settle(1, "dropped_buffer_full")
                return False
            return True
        except Exception:  # noqa: BLE001 - recording must never fail Generate
            log.exception("sample recorder: record failed")
            return False

    def write(self, samples: Sequence[Sample]) -> list[str]:
        """XADD explicit samples (feedback, examples) in one round trip; Redis errors reach the caller."""
        self._xadd([s.to_fields() for s in samples])
        return [s.sample_id for s in samples]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued sample is written, spooled or dropped; True if that happened in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, try one last replay, stop the thread; what stays spooled waits on disk."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("sample recorder: buffer still full at close")
        self._thread.join(timeout)
        if self._spool is not None and not self._thread.is_alive():
            self._spool.close()

    # --- the background thread ---
    def _run(self) -> None:
        """Drain the buffer in batches (and the spool when Redis is back) until the close sentinel."""
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            if batch:
                self._deliver(batch)
            elif self._spool is not None and not self._spool.empty:
                self._replay(force=False)
        if self._spool is not None and not self._spool.empty:
            self._replay(force=True)  # a last try before closing; what fails stays on disk

    def _next_batch(self) -> tuple[list[Sample], bool]:
        """Up to _BATCH queued samples (waiting at most until the next replay try) and whether to stop."""
        spooling = self._spool is not None and not self._spool.empty
        wait = max(0.05, self._retry_at - time.monotonic()) if spooling else None
        batch: list[Sample] = []
        try:
            item = self._queue.get(timeout=wait)
        except queue.Empty:
            return batch, False
        while item is not None:
            batch.append(item)
            if len(batch) >= _BATCH:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _deliver(self, batch: list[Sample]) -> None:
        """Write a batch behind whatever is spooled: to the stream, else to the spool, else count it lost."""
        fields = [s.to_fields() for s in batch]
        if self._spool is None:
            self._settle(len(batch), "recorded" if self._write_retrying(fields) else "dropped_no_spool")
            return
        if not self._spool.empty:
            self._replay(force=False)
        if self._spool.empty and time.monotonic() >= self._retry_at and self._try_xadd(fields):
            self._settle(len(batch), "recorded")
            return
        if self._spool.append(fields):
            self._settle(len(batch), "spooled")
        else:
            log.warning(
                "sample recorder: spool full (%d bytes); %d sample(s) lost", self._spool.max_bytes, len(batch)
            )
            self._settle(len(batch), "dropped_spool_full")

    def _replay(self, force: bool) -> None:
        """Write the spool to the stream, oldest first, unless Redis failed too recently."""
        assert self._spool is not None
        if not force and time.monotonic() < self._retry_at:
            return

        def write(entries: list[Fields]) -> None:
            self._xadd(entries)
            with self._lock:
                self._counts["replayed"] += len(entries)

        try:
            done = self._spool.replay(write, _BATCH)
        except Exception as exc:  # noqa: BLE001 - Redis still down: try again after the backoff
            self._failed(exc)
            return
        self._backoff_s, self._retry_at = self._retry_delay_s, 0.0
        log.info("sample recorder: Redis is back; replayed %d spooled sample(s)", done)

    def _try_xadd(self, fields: list[Fields]) -> bool:
        try:
            self._xadd(fields)
        except Exception as exc:  # noqa: BLE001 - Redis down must not kill the recorder
            self._failed(exc)
            return False
        self._backoff_s = self._retry_delay_s
        return True

    def _failed(self, exc: BaseException) -> None:
        """Note a Redis failure: wait longer (up to _MAX_BACKOFF_S) before the next try."""
        log.warning("sample recorder: Redis unavailable (%s); spooling, retry in %.1fs", exc, self._backoff_s)
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)

    def _write_retrying(self, fields: list[Fields]) -> bool:
        """Without a spool: XADD with `max_retries` tries."""
        for attempt in range(self._max_retries):
            try:
                self._xadd(fields)
                return True
            except Exception as exc:  # noqa: BLE001 - Redis down must not kill the recorder
                log.warning("sample recorder: XADD failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(self._retry_delay_s)
        return False

    def _xadd(self, entries: Sequence[Fields]) -> None:
        """XADD entries in one pipelined round trip, trimming the stream to about `maxlen`."""
        pipe = self._redis.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
        pipe.execute()

    def _settle(self, n: int, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += n
            self._in_flight -= n
            self._idle.notify_all()


def _open_spool(directory: Path | None, max_bytes: int) -> SampleSpool | None:
    """The spool under `directory`, or None (drops counted) when there is none or another process owns it."""
    if directory is None:
        return None
    try:
        return SampleSpool(directory, max_bytes)
    except SpoolBusyError as exc:
        log.warning("sample recorder: no spool (%s); samples are lost while Redis is down", exc)
        return None
