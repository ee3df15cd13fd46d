"""The one writer of `kiln:samples`: served generations in the background, explicit samples durably."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from kiln_common.samples import SAMPLES_STREAM, Sample

log = logging.getLogger(__name__)

_BATCH = 64  # entries per pipelined XADD round trip


class SampleRecorder:
    """Appends samples to the stream: `record` (best effort, background) or `write` (durable, now).

    `record` buffers samples in memory and XADDs them from a background thread; it never blocks or raises.
    When the buffer is full, or Redis stays unreachable past `max_retries` attempts for a batch, samples are
    dropped and counted (`dropped`). `recorded` counts samples that reached the stream.
    """

    def __init__(
        self,
        redis: Any,
        maxlen: int = 1_000_000,
        buffer_size: int = 10_000,
        stream: str = SAMPLES_STREAM,
        max_retries: int = 5,
        retry_delay_s: float = 0.5,
    ) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._stream = stream
        self._max_retries = max_retries
        self._retry_delay_s = retry_delay_s
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=buffer_size)
        self._lock = threading.Lock()
        self._dropped = 0
        self._recorded = 0
        self._closed = False
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="kiln-sample-recorder", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Samples lost because the buffer was full, Redis failed, or the recorder was closed."""
        with self._lock:
            return self._dropped

    @property
    def recorded(self) -> int:
        """Samples written to the stream."""
        with self._lock:
            return self._recorded

    @property
    def pending(self) -> int:
        """Samples waiting in the buffer."""
        return self._queue.qsize()

    def record(self, sample: Sample) -> bool:
        """Queue a sample; returns False (and counts a drop) when it could not be queued. Never raises."""
        try:
            with self._lock:
                if self._closed:
                    self._dropped += 1
                    return False
                self._in_flight += 1
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                with self._lock:
                    self._in_flight -= 1
                    self._dropped += 1
                    self._idle.notify_all()
                return False
            return True
        except Exception:  # noqa: BLE001 - recording must never fail Generate
            log.exception("sample recorder: record failed")
            return False

    def write(self, samples: Sequence[Sample]) -> list[str]:
        """XADD explicit samples (feedback, examples) in one round trip; Redis errors reach the caller."""
        self._xadd(samples)
        return [s.sample_id for s in samples]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued sample is written or dropped; True if that happened within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, then stop the background thread; later records are dropped."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("sample recorder: buffer still full at close")
        self._thread.join(timeout)

    def _run(self) -> None:
        """Drain the buffer in batches until the close sentinel arrives."""
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[Sample] = []
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < _BATCH and not stop:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                self._write(batch)

    def _xadd(self, samples: Sequence[Sample]) -> None:
        """XADD samples in one pipelined round trip, trimming the stream to about `maxlen`."""
        pipe = self._redis.pipeline(transaction=False)
        for sample in samples:
            pipe.xadd(self._stream, sample.to_fields(), maxlen=self._maxlen, approximate=True)
        pipe.execute()

    def _write(self, batch: list[Sample]) -> None:
        """XADD one batch with retries; count it as recorded or dropped."""
        ok = False
        for attempt in range(self._max_retries):
            try:
                self._xadd(batch)
                ok = True
                break
            except Exception as exc:  # noqa: BLE001 - Redis down must not kill the recorder
                log.warning("sample recorder: XADD failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(self._retry_delay_s)
        with self._lock:
            if ok:
                self._recorded += len(batch)
            else:
                self._dropped += len(batch)
            self._in_flight -= len(batch)
            self._idle.notify_all()
