"""convert_once: one conversion under any interleaving, and a dead holder's lock never blocks.

The real GGUF conversion takes ~25 s on two cores, so the ten simultaneous rounds here run the real lock and
the real atomic-rename protocol with a small converter of the same shape (temp dir, then rename);
tests/reliability/test_cold_start.py starts kiln-infer and kiln-train on an empty home with the real one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path

from kiln_common.model_loader import convert_once

FORK = multiprocessing.get_context("fork")


def _slow_convert(cache_dir: Path) -> None:
    """Write a model directory the way the real converter does: a temp dir, slowly, then one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir.parent))
    with open(cache_dir.parent / "conversions.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    (tmp / "model.safetensors").write_bytes(b"x" * 1024)
    time.sleep(0.3)  # long enough that the other process arrives mid-conversion
    (tmp / "config.json").write_text("{}")
    os.replace(tmp, cache_dir)


def _racer(cache_dir: Path, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        convert_once(cache_dir, _slow_convert, poll_s=0.02)
        ok = (cache_dir / "config.json").is_file()
        results.put(("ok" if ok else "missing", os.getpid()))  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((f"{type(exc).__name__}: {exc}", os.getpid()))  # type: ignore[attr-defined]


def test_two_processes_at_the_same_instant_convert_once_ten_times(tmp_path: Path) -> None:
    """Ten rounds on empty homes: both processes end with the finished model, exactly one converted."""
    for round_no in range(10):
        cache_dir = tmp_path / f"home{round_no}" / "models" / "SmolLM2"
        barrier, results = FORK.Barrier(2), FORK.Queue()
        procs = [FORK.Process(target=_racer, args=(cache_dir, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = sorted(results.get(timeout=5)[0] for _ in procs)
        assert outcomes == ["ok", "ok"], f"round {round_no}: {outcomes}"
        conversions = (cache_dir.parent / "conversions.log").read_text().split()
        assert len(conversions) == 1, f"round {round_no}: converted {len(conversions)} times"
        assert not list(cache_dir.parent.glob(".convert-*"))


def _hold_and_hang(cache_dir: Path, ready: object) -> None:
    def convert(d: Path) -> None:
        Path(tempfile.mkdtemp(prefix=".convert-", dir=d.parent))
        ready.set()  # type: ignore[attr-defined]
        time.sleep(600)

    convert_once(cache_dir, convert)


def test_a_killed_holder_never_blocks_the_next_start(tmp_path: Path) -> None:
    """A converter SIGKILLed mid-conversion: the next process converts at once and removes its leftovers."""
    cache_dir = tmp_path / "models" / "SmolLM2"
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_and_hang, args=(cache_dir, ready))
    holder.start()
    assert ready.wait(20)
    assert list(cache_dir.parent.glob(".convert-*"))
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    started = time.monotonic()
    convert_once(cache_dir, _slow_convert)
    assert time.monotonic() - started < 5.0
    assert (cache_dir / "config.json").is_file()
    assert not list(cache_dir.parent.glob(".convert-*"))


def test_a_finished_conversion_is_used_without_converting(tmp_path: Path) -> None:
    """A home with the finished model never calls the converter."""
    cache_dir = tmp_path / "models" / "SmolLM2"
    cache_dir.mkdir(parents=True)
    (cache_dir / "config.json").write_text("{}")

    def refuse(_d: Path) -> None:
        raise AssertionError("converted again")

    convert_once(cache_dir, refuse)
