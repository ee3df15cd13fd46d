"""The train-while-serving load's client processes: streams spread over them, failures counted, clean stop."""

from __future__ import annotations

import socket
import time

from benchmarks.tws_load import LoadGroup, StreamRecord, start_load


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_streams_are_spread_over_processes_and_count_their_failures() -> None:
    runners, records = start_load(f"127.0.0.1:{_closed_port()}", 4, 5, 2)
    try:
        assert [len(r.streams) for r in runners if isinstance(r, LoadGroup)] == [3, 2]
        assert len(records) == 5 and all(isinstance(r, StreamRecord) for r in records)
        deadline = time.monotonic() + 60
        while not all(r.failures for r in records) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(r.failures > 0 and r.starts and not r.samples for r in records)
    finally:
        for runner in runners:
            runner.halt()
        for runner in runners:
            runner.join(30)
    assert not any(r.is_alive() for r in runners if isinstance(r, LoadGroup))
