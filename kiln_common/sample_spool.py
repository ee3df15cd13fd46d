"""A bounded on-disk spool of stream entries, kept while Redis is unreachable and replayed in order after.

Layout: `<dir>/seg-<n>.jsonl`, append-only, one JSON object (a sample's stream fields) per line; segments are
replayed oldest first and deleted once every line reached Redis. Durability: each appended batch is written
and fsync'd before `append` returns, so what the spool accepted survives a crash of the process or the
machine. Replay is at-least-once: a crash between XADD and the segment's deletion replays that segment
again, and kiln-train drops repeated sample ids. One process owns a spool directory (an flock on `.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

Fields = dict[str, str]
_SEGMENT_BYTES = 4 * 1024 * 1024  # roll to a new segment past this size


class SpoolBusyError(RuntimeError):
    """Another live process owns this spool directory."""


class SampleSpool:
    """Append batches while Redis is down; `replay` them in order through a writer when it is back."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock_file = open(directory / ".lock", "a+b")  # noqa: SIM115 - held for the spool's life
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolBusyError(f"{directory} is used by another running process") from None
        self._segments = sorted(directory.glob("seg-*.jsonl"), key=_segment_number)
        self._bytes = sum(p.stat().st_size for p in self._segments)
        self._next = _segment_number(self._segments[-1]) + 1 if self._segments else 0
        self._active: IO[bytes] | None = None
        self.corrupt_lines = 0
        if self._segments:
            log.info("sample spool: %d byte(s) left by an earlier run will be replayed", self._bytes)

    @property
    def size_bytes(self) -> int:
        """Bytes spooled and not yet replayed."""
        return self._bytes

    @property
    def empty(self) -> bool:
        """True when nothing waits for replay."""
        return self._bytes == 0

    def append(self, batch: Sequence[Fields]) -> bool:
        """Write and fsync a batch at the end of the spool; False (nothing written) when it would overflow."""
        data = b"".join(json.dumps(f, separators=(",", ":")).encode() + b"\n" for f in batch)
        if self._bytes + len(data) > self.max_bytes:
            return False
        active = self._active_segment()
        active.write(data)
        active.flush()
        os.fsync(active.fileno())
        self._bytes += len(data)
        if active.tell() >= _SEGMENT_BYTES:
            self._close_active()
        return True

    def replay(self, write: Callable[[list[Fields]], None], batch_size: int = 64) -> int:
        """Hand every spooled entry, oldest first, to `write`; stop at its first exception (re-raised).

        A segment is deleted once all its entries were written; returns how many entries were written.
        """
        self._close_active()  # new appends go to a fresh segment, after the ones replayed here
        done = 0
        while self._segments:
            path = self._segments[0]
            entries = self._read(path)
            for start in range(0, len(entries), batch_size):
                write(entries[start : start + batch_size])
                done += len(entries[start : start + batch_size])
            self._bytes -= path.stat().st_size
            path.unlink()
            self._segments.pop(0)
        self._bytes = 0
        return done

    def close(self) -> None:
        """Close the files and release the directory (what is spooled stays for the next run)."""
        self._close_active()
        self._lock_file.close()

    def _read(self, path: Path) -> list[Fields]:
        entries: list[Fields] = []
        for line in path.read_bytes().splitlines():
            try:
                fields = json.loads(line)
                if not isinstance(fields, dict):
                    raise ValueError("not an object")
                entries.append({str(k): str(v) for k, v in fields.items()})
            except ValueError:  # a line torn by a crash mid-append
                self.corrupt_lines += 1
                log.warning("sample spool: skipped a torn line in %s", path.name)
        return entries

    def _active_segment(self) -> IO[bytes]:
        if self._active is None:
            path = self.directory / f"seg-{self._next:012d}.jsonl"
            self._next += 1
            self._active = open(path, "ab")  # noqa: SIM115 - closed by _close_active
            self._segments.append(path)
        return self._active

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])
