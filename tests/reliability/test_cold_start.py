"""First start on an empty KILN_HOME: kiln-infer and kiln-train at the same instant both come up.

This is the one full-process round (each start converts the embedded SmolLM2, ~25 s on two cores); the ten
simultaneous rounds of the conversion lock itself are tests/kiln_common/test_model_loader_lock.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import REPO, base_env, free_port, serving, wait_for


def test_infer_and_train_started_together_on_an_empty_home_both_serve(tmp_path: Path) -> None:
    """Promise: with nothing converted and no Redis running, both processes started at once reach SERVING;
    the model is converted once (one "converting" log line between them) and one valkey-server runs."""
    home = tmp_path / "home"
    home.mkdir()
    infer_port, train_port = free_port(), free_port()
    env = {**base_env(home, "", infer_port), "KILN_REDIS_URL": ""}
    procs, logs = [], []
    for module, port in (("kiln_infer", infer_port), ("kiln_train", train_port)):
        log_path = home / f"{module}.log"
        logs.append(log_path)
        with log_path.open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module],
                    cwd=REPO,
                    env={**env, "KILN_PORT": str(port)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for port, proc, log_path in zip((infer_port, train_port), procs, logs, strict=True):
            assert _comes_up(proc, f"127.0.0.1:{port}"), log_path.read_text(errors="replace")[-3000:]
        text = "".join(p.read_text(errors="replace") for p in logs)
        assert text.count("first start: converting") == 1, text[-3000:]
        valkeys = [p for p in os.listdir("/proc") if p.isdigit() and _is_valkey_of(int(p), home)]
        assert len(valkeys) == 1, valkeys
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(home / "models", ignore_errors=True)


def _comes_up(proc: subprocess.Popen[bytes], address: str) -> bool:
    up = wait_for(lambda: proc.poll() is not None or serving(address), 240, 0.5)
    return up and proc.poll() is None


def _is_valkey_of(pid: int, home: Path) -> bool:
    """valkey rewrites its command line; it runs in its --dir, $KILN_HOME/redis."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return comm.startswith("valkey-server") and Path(cwd) == (home / "redis").resolve()
