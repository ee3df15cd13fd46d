"""`kiln up` supervises for real: ready means all SERVING, signals stop all, nothing is orphaned."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    MODEL,
    REPO,
    alive,
    children_of,
    free_port,
    home_with_models,
    serving,
    wait_for,
)


@dataclass
class Up:
    """A running `kiln up` and the lines it has said."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str]
    infer_port: int
    train_port: int
    said: list[str]

    def wait_line(self, prefix: str, timeout_s: float) -> str:
        """The first line starting with `prefix` (failing with everything said when it never comes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.said.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line; kiln up said:\n" + "\n".join(self.said))


def start_up(home: Path, infer_port: int, train_port: int) -> Up:
    """`kiln up --model dummy:tiny` on `home`, its stdout read line by line in a thread."""
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "KILN_REDIS_URL": "",
        "KILN_TRAIN_PORT": str(train_port),
        "KILN_DEVICE": "cpu",
        "KILN_DRAIN_TIMEOUT": "20",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_infer.cli", "up", "--model", MODEL, "--port", str(infer_port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return Up(proc, lines, infer_port, train_port, [])


@pytest.fixture
def up(tmp_path: Path, model_cache_home: Path, smollm2: object) -> Iterator[Up]:
    """A `kiln up` that has said ready; killed (with whatever it left) after the test."""
    stack = start_up(home_with_models(tmp_path / "home", model_cache_home), free_port(), free_port())
    stack.wait_line("ready", 180)
    pids = children_of(stack.proc.pid)
    yield stack
    if stack.proc.poll() is None:
        stack.proc.kill()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_ready_only_when_every_child_serves_and_signal_storm_stops_everything(up: Up) -> None:
    """ "ready" implies kiln-infer and kiln-train both answer SERVING; five SIGTERM/SIGINT in a burst give one
    stop ("stopping" said once), every child exits, and kiln up exits 0 within the drain time."""
    assert serving(f"127.0.0.1:{up.infer_port}") and serving(f"127.0.0.1:{up.train_port}")
    pids = children_of(up.proc.pid)
    assert len(pids) == 3, pids  # valkey-server, kiln-infer, kiln-train
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        up.proc.send_signal(sig)
        time.sleep(0.05)
    assert up.proc.wait(60) == 0
    elapsed = time.monotonic() - started
    up.wait_line("stopped in", 5)
    assert sum(1 for line in up.said if line.startswith("stopping")) == 1
    assert not [p for p in pids if alive(p)]
    assert elapsed < 30, f"stop took {elapsed:.1f}s"


def test_children_die_with_a_sigkilled_kiln_up(up: Up) -> None:
    """SIGKILL of kiln up (no chance to clean up): its children still exit within 30 s, none is orphaned."""
    pids = children_of(up.proc.pid)
    assert len(pids) == 3
    up.proc.kill()
    up.proc.wait(10)
    assert wait_for(lambda: not [p for p in pids if alive(p)], 30), [p for p in pids if alive(p)]
    assert not serving(f"127.0.0.1:{up.infer_port}", 0.5)


def test_a_second_stack_on_the_same_home_or_ports_is_refused(
    up: Up, tmp_path: Path, model_cache_home: Path
) -> None:
    """A second kiln up on a held KILN_HOME, or on held ports, exits 1 at once with a line saying why, and
    leaves the first stack serving."""
    same_home = start_up(tmp_path / "home", free_port(), free_port())
    line = same_home.wait_line("kiln up:", 30)
    assert "KILN_HOME" in line and "another running" in line
    assert same_home.proc.wait(30) == 1
    other_home = home_with_models(tmp_path / "other", model_cache_home)
    same_ports = start_up(other_home, up.infer_port, up.train_port)
    line = same_ports.wait_line("kiln up:", 30)
    assert f"port {up.infer_port}" in line
    assert same_ports.proc.wait(30) == 1
    assert serving(f"127.0.0.1:{up.infer_port}")
