"""kiln-infer's process tree under faults: an API process dies and comes back without reloading weights; the
engine core dies and every stream ends UNAVAILABLE while kiln-infer exits non-zero (nothing hangs)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.weight_share import SHM_PREFIX
from kiln_infer.engine_build import shm_dir_for
from kiln_infer.engine_process import parent_gone
from tests.reliability.conftest import Stack, alive, serving, wait_for


def _pid(log: str, pattern: str) -> int:
    found = re.findall(pattern, log)
    assert found, f"no {pattern!r} in the log"
    return int(found[-1])


def _long_stream(address: str, out: list[str]) -> threading.Thread:
    def run() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            sampling = inference_pb2.SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
            request = inference_pb2.GenerateRequest(prompt="a long answer", sampling=sampling)
            try:
                for _ in stub.Generate(request, timeout=60):
                    pass
                out.append("OK")
            except grpc.RpcError as exc:
                out.append(exc.code().name)  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_killed_api_process_is_restarted_and_the_weights_stay_loaded(stack: Stack) -> None:
    """Promise: kill -9 of the API process → the supervisor starts another on the same port, serving again,
    with the same engine-core process (the model is not loaded a second time)."""
    infer = stack.start("kiln_infer", KILN_MAX_MODEL_LEN="1024")
    infer.wait_serving()
    engine_pid = _pid(infer.log(), r"engine core process started \(pid (\d+)\)")
    api_pid = _pid(infer.log(), r"API process 0 started \(pid (\d+)\)")
    os.kill(api_pid, signal.SIGKILL)
    assert wait_for(lambda: "restarting it (weights stay loaded)" in infer.log(), 15)
    started = time.monotonic()
    infer.wait_serving()
    print(f"API process back to SERVING {time.monotonic() - started:.1f}s after kill -9")
    assert alive(engine_pid) and _pid(infer.log(), r"API process 0 started \(pid (\d+)\)") != api_pid
    assert infer.log().count("engine core ready") == 1
    assert infer.stop() == 0


def test_a_dead_engine_core_ends_streams_unavailable_and_kiln_infer_exits_non_zero(stack: Stack) -> None:
    """Promise: kill -9 of the engine core → open streams end UNAVAILABLE within seconds, health stops saying
    SERVING, and kiln-infer exits with a non-zero status instead of hanging."""
    infer = stack.start("kiln_infer", KILN_MAX_MODEL_LEN="1024")
    infer.wait_serving()
    engine_pid = _pid(infer.log(), r"engine core process started \(pid (\d+)\)")
    results: list[str] = []
    threads = [_long_stream(infer.address, results) for _ in range(3)]
    time.sleep(1.0)
    os.kill(engine_pid, signal.SIGKILL)
    for thread in threads:
        thread.join(20)
    assert results == ["UNAVAILABLE"] * 3, results
    assert wait_for(lambda: infer.proc.poll() is not None, 40), "kiln-infer did not exit"
    assert infer.proc.returncode != 0
    assert not serving(infer.address)


def test_a_sigkilled_kiln_infer_takes_its_engine_core_and_shared_weights_with_it(stack: Stack) -> None:
    """Promise: kill -9 of kiln-infer's supervisor → its engine core and API process exit within 30 s, and the
    engine core removes its shared-weight files on the way out (none is left holding the model's memory)."""
    infer = stack.start("kiln_infer", KILN_MAX_MODEL_LEN="1024")
    infer.wait_serving()
    engine_pid = _pid(infer.log(), r"engine core process started \(pid (\d+)\)")
    api_pid = _pid(infer.log(), r"API process 0 started \(pid (\d+)\)")
    shm_files = list(shm_dir_for(stack.home).glob(f"{SHM_PREFIX}{engine_pid}-*"))
    assert shm_files, "the engine core shares no weights"
    infer.proc.kill()
    assert wait_for(lambda: not alive(engine_pid) and not alive(api_pid), 30), "an orphan outlived kiln-infer"
    assert not [p for p in shm_files if p.exists()]


def _wait_for_orphaning(marker: str) -> None:  # runs in a grandchild, with no PDEATHSIG set
    Path(marker + ".up").write_text("waiting")
    while not parent_gone():
        time.sleep(0.1)
    Path(marker).write_text("parent gone")


def _start_grandchild(marker: str) -> None:  # runs in the child that is killed
    ctx = multiprocessing.get_context("spawn")
    ctx.Process(target=_wait_for_orphaning, args=(marker,), daemon=False).start()
    time.sleep(600)


def test_an_orphaned_process_sees_its_parent_gone_without_any_signal(tmp_path: Path) -> None:
    """parent_gone() (the engine core's last line of defence) notices a dead parent by its sentinel, wherever
    the orphan was re-parented, when no PDEATHSIG reached it."""
    marker = tmp_path / "seen"
    child = multiprocessing.get_context("spawn").Process(target=_start_grandchild, args=(str(marker),))
    child.start()
    assert wait_for(Path(f"{marker}.up").exists, 60), "the grandchild did not start"
    child.kill()
    child.join(10)
    assert wait_for(marker.exists, 30), "the orphan never noticed its parent had died"
