"""Registry events fanned out to any number of asyncio watchers from the one Redis reader that exists."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator

from kiln_common.registry import AdapterEvent

# Event batches a watcher may fall behind by before it is ended (its client reconnects and rebuilds its view).
MAX_BACKLOG = 1000


class EventHub:
    """An idle watcher is a queue, not a thread and not a Redis connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: set[asyncio.Queue[list[AdapterEvent] | None]] = set()
        self.closed = False

    def publish(self, events: Iterable[AdapterEvent]) -> None:
        """From any thread: hand a batch of events to every watcher."""
        batch = list(events)
        if batch and not self.closed:
            self._loop.call_soon_threadsafe(self._fan_out, batch)

    def _fan_out(self, batch: list[AdapterEvent]) -> None:
        for queue in list(self._queues):
            if queue.qsize() >= MAX_BACKLOG:
                self._queues.discard(queue)
                queue.put_nowait(None)  # too far behind: end this watch
            else:
                queue.put_nowait(batch)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[list[AdapterEvent] | None]]:
        """On the loop: a queue of event batches (None = the watch is over) for the life of the block."""
        queue: asyncio.Queue[list[AdapterEvent] | None] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """On the loop: end every watch (the server is draining)."""
        self.closed = True
        for queue in self._queues:
            queue.put_nowait(None)
        self._queues.clear()
