"""Serving's turn on a shared device: the flag kiln-infer raises around a launch, seen by another process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from kiln_common.gpu_turn import ServingTurn, TrainingTurn, read_turn

CPU = torch.device("cpu")
# a second process, as kiln-train is: prints whether serving is busy each time it reads a line
PEEK = """
import sys
from pathlib import Path
from kiln_common.gpu_turn import TrainingTurn
turn = TrainingTurn(Path(sys.argv[1]), None)
for _ in sys.stdin:
    print(int(turn.serving_busy()), flush=True)
"""


def test_another_process_sees_the_flag_only_while_serving_launches(tmp_path: Path) -> None:
    serving = ServingTurn(tmp_path, CPU)
    peek = subprocess.Popen(
        [sys.executable, "-c", PEEK, str(serving.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peek.stdin is not None and peek.stdout is not None

    def busy() -> str:
        peek.stdin.write("?\n")  # type: ignore[union-attr]
        peek.stdin.flush()  # type: ignore[union-attr]
        return peek.stdout.readline().strip()  # type: ignore[union-attr]

    try:
        assert busy() == "0"
        with serving.launching():
            assert busy() == "1"
        assert busy() == "0"
        try:
            with serving.launching():
                raise RuntimeError("a launch that fails")
        except RuntimeError:
            pass
        assert busy() == "0"  # the flag comes down whatever happened inside
    finally:
        peek.stdin.close()
        peek.wait(10)
        serving.close()
    assert not serving.path.exists()


def test_training_waits_for_the_turn_and_gives_up_after_its_timeout(tmp_path: Path) -> None:
    serving = ServingTurn(tmp_path, CPU)
    training = TrainingTurn(serving.path, None)
    assert training.wait() == 0.0 and training.waits == 0
    with serving.launching():
        started = time.monotonic()
        waited = training.wait(timeout_s=0.2)  # serving "launches" for longer: training proceeds anyway
        assert 0.2 <= waited and time.monotonic() - started < 2.0
    assert training.waits == 1 and training.waited_s == waited
    training.close()
    serving.close()


def test_the_handle_names_its_generation(tmp_path: Path) -> None:
    class Store(dict[str, str]):
        def set(self, key: str, value: str) -> None:
            self[key] = value

    store = Store()
    serving = ServingTurn(tmp_path, CPU)
    serving.announce(store, "gen-1")
    handle = read_turn(store, "gen-1")
    assert handle is not None and handle["path"] == str(serving.path) and handle["event"] == ""
    assert read_turn(store, "gen-2") is None  # a turn of another base generation (a restarted server's)
    opened = TrainingTurn.open(handle, CPU)
    assert not opened.serving_busy()
    opened.close()
    serving.close()
