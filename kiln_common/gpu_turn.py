"""Serving's turn on a shared GPU: kiln-infer says when its work is done, kiln-train fills only those gaps.

Under plain time-slicing a serving step that finds training's kernels on the GPU waits for a time slice, and a
launch-bound step meets that wait at many of its launches. Pacing training by duty cycle only makes those
meetings rarer. The hand-off avoids them: training puts work on the GPU only while serving has none there and
is not launching any, in chunks short enough (a layer's forward or backward, under a millisecond or two) that
a serving step arriving meanwhile waits at most one chunk.

Two signals, both cheap on serving's side:
- a one-byte flag in a shared-memory file, 1 while serving's engine launches a step's work (`launching()`);
- on CUDA, an interprocess event recorded after every launch: kiln-train's `query()` says whether all of
  serving's launched work has finished.

kiln-infer announces both in Redis (`TURN_KEY`, tied to the base weights' generation); kiln-train opens them
with `TrainingTurn.open`. On a CPU there is no event and the flag alone says when serving is stepping.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TURN_KEY = "kiln:gpu_turn"
TURN_PREFIX = "kiln-base-"  # with weight_share's prefix, so its stale-file sweep removes a dead server's flag
_LAUNCHING, _IDLE = b"\x01", b"\x00"


class ServingTurn:
    """kiln-infer's side: the flag file and (on CUDA) the interprocess event, marked around each launch."""

    def __init__(self, shm_dir: Path, device: torch.device) -> None:
        self.path = shm_dir / f"{TURN_PREFIX}{os.getpid()}-turn"
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _IDLE)
            self._map = mmap.mmap(fd, 1)
        finally:
            os.close(fd)
        self.event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(interprocess=True)
            self.event.record()
        self.device = device

    def handle(self, generation: str) -> dict[str, Any]:
        """What kiln-train needs to open this turn (JSON-safe)."""
        event = base64.b64encode(self.event.ipc_handle()).decode() if self.event is not None else ""
        return {"generation": generation, "path": str(self.path), "event": event, "pid": os.getpid()}

    def announce(self, redis: Any, generation: str) -> None:
        """Publish the handle for kiln-train (read with `read_turn`)."""
        redis.set(TURN_KEY, json.dumps(self.handle(generation)))

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        """Around one step's launches: the flag is up while they are issued, the event recorded after them."""
        self._map[0:1] = _LAUNCHING
        try:
            yield
        finally:
            if self.event is not None:
                self.event.record()
            self._map[0:1] = _IDLE

    def close(self) -> None:
        """Withdraw the flag file."""
        with contextlib.suppress(ValueError):
            self._map.close()
        self.path.unlink(missing_ok=True)


class TrainingTurn:
    """kiln-train's side: whether serving has GPU work in flight or is launching some."""

    def __init__(self, path: Path, event: torch.cuda.Event | None) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 1, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.event = event
        self.waited_s = 0.0  # total time spent waiting for serving's turn to end
        self.waits = 0  # how many chunks had to wait

    @classmethod
    def open(cls, handle: dict[str, Any], device: torch.device) -> TrainingTurn:
        """Open serving's announced turn (`ServingTurn.handle`) on `device`."""
        event = None
        if handle.get("event") and device.type == "cuda":
            event = torch.cuda.Event.from_ipc_handle(device, base64.b64decode(handle["event"]))
        return cls(Path(handle["path"]), event)

    def serving_busy(self) -> bool:
        """Serving is launching a step, or work it launched has not finished on the GPU."""
        if self._map[0:1] == _LAUNCHING:
            return True
        return self.event is not None and not self.event.query()

    def wait(self, poll_s: float = 0.0002, timeout_s: float = 1.0) -> float:
        """Until serving's turn is over (or `timeout_s`: training never starves for good); seconds waited."""
        if not self.serving_busy():
            return 0.0
        start = time.monotonic()
        deadline = start + timeout_s
        while self.serving_busy() and time.monotonic() < deadline:
            time.sleep(poll_s)
        waited = time.monotonic() - start
        self.waited_s += waited
        self.waits += 1
        return waited

    def close(self) -> None:
        """Unmap the flag."""
        with contextlib.suppress(ValueError):
            self._map.close()


def read_turn(redis: Any, generation: str | None = None) -> dict[str, Any] | None:
    """The announced turn's handle (None when none, or when it belongs to another base generation)."""
    raw = redis.get(TURN_KEY)
    if raw is None:
        return None
    handle: dict[str, Any] = json.loads(raw)
    if generation is not None and handle.get("generation") != generation:
        return None
    return handle
