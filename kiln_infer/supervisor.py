"""kiln-infer as a process tree: a small supervisor, the engine-core process, and its API processes.

The supervisor starts Redis (if embedded), then the engine core (which loads the weights once), then the API
process. If the API process dies it is restarted and finds the weights still loaded. If the engine core dies,
the API process reports NOT_SERVING and ends its streams UNAVAILABLE; the supervisor stops it and exits
non-zero so whatever runs kiln-infer (kiln up, systemd, Kubernetes) restarts the whole server. SIGTERM or
SIGINT, any number of times, drains the API process and then stops everything.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from kiln_common.config import InferConfig
from kiln_common.redis_server import RedisServer
from kiln_infer.engine_process import EngineProcess, die_with_parent

log = logging.getLogger(__name__)

ENGINE_LOST_EXIT = 3  # the API process's exit status when its engine core went away
MAX_API_RESTARTS = 5  # per RESTART_WINDOW_S; past that something is wrong beyond a restart's reach
RESTART_WINDOW_S = 60.0


@dataclass(frozen=True)
class ApiProcessSpec:
    """What the API process needs: the config and where the engine core listens."""

    config: InferConfig
    engine_address: str
    engine_authkey: bytes
    log_level: str
    index: int = 0  # which of `count` API processes sharing the gRPC port
    count: int = 1


def api_main(spec: ApiProcessSpec) -> None:
    """Entry point of the API process (spawned): serve until SIGTERM, drain; exit 3 if the engine died."""
    import sys

    from kiln_common.logging_setup import setup_logging
    from kiln_infer.server import EngineAddress, InferServer

    die_with_parent()
    setup_logging(spec.log_level, "kiln-infer", spec.config.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into one SIGTERM
    address = EngineAddress(spec.engine_address, spec.engine_authkey)
    server = InferServer(spec.config, address, spec.index, spec.count)
    try:
        server.start()
        server.start_warm_up()
    except Exception as exc:  # noqa: BLE001 - reported, then a clean non-zero exit
        log.exception("kiln-infer API process failed to start: %s", exc)
        sys.exit(1)
    while not stop.wait(0.2):
        if server.engine_lost.is_set():
            break
    server.drain()
    sys.exit(ENGINE_LOST_EXIT if server.engine_lost.is_set() else 0)


class Supervisor:
    """Runs Redis, the engine core and the API process; restarts the API process; stops all on a signal."""

    def __init__(self, config: InferConfig, log_level: str = "INFO") -> None:
        self.config = config
        self.log_level = log_level
        self._stop = threading.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._restarts: deque[float] = deque()

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: only sets a flag, so any number of signals in any order is safe."""
        if not self._stop.is_set():
            log.info("received %s: draining", signal.Signals(signum).name)
        self._stop.set()

    def run(self) -> int:
        """Start everything, supervise until stopped; the exit status of kiln-infer."""
        redis_server = RedisServer(self.config.redis)
        engine: EngineProcess | None = None
        try:
            url = redis_server.start()
            engine = EngineProcess(self.config, url)
            engine.start()
            return self._supervise(engine)
        except Exception as exc:  # noqa: BLE001 - a start-up failure is one clear line and a non-zero exit
            log.error("kiln-infer failed to start: %s", exc)
            return 1
        finally:
            if engine is not None:
                engine.stop()
            redis_server.stop()
            log.info("kiln-infer stopped")

    def api_count(self, engine: EngineProcess) -> int:
        """How many API processes share the port: as configured, else 4 on a GPU and 1 on a CPU."""
        if self.config.api_processes:
            return self.config.api_processes
        on_gpu = engine.info is not None and engine.info.device.startswith("cuda")
        return 4 if on_gpu and self.config.port != 0 else 1

    def _start_api(self, engine: EngineProcess, index: int, count: int) -> BaseProcess:
        spec = ApiProcessSpec(self.config, engine.address, engine.authkey, self.log_level, index, count)
        process = self._ctx.Process(
            target=api_main, args=(spec,), name=f"kiln-infer-api-{index}", daemon=False
        )
        process.start()
        log.info("API process %d started (pid %s)", index, process.pid)
        return process

    def _supervise(self, engine: EngineProcess) -> int:
        count = self.api_count(engine)
        if count > 1 and self.config.port == 0:
            raise ValueError("--api-processes > 1 needs a fixed --port (the processes share it)")
        apis = [self._start_api(engine, i, count) for i in range(count)]
        while not self._stop.wait(0.5):
            if not engine.is_alive():
                log.error("the engine core exited (status %s); stopping kiln-infer", engine.exitcode)
                self._stop_apis(apis, grace_s=10.0)
                return 1
            for i, api in enumerate(apis):
                if api.is_alive():
                    continue
                if api.exitcode == ENGINE_LOST_EXIT or not self._may_restart():
                    log.error("API process %d exited (status %s); stopping kiln-infer", i, api.exitcode)
                    self._stop_apis(apis, grace_s=10.0)
                    return 1
                log.warning(
                    "API process %d exited (status %s); restarting it (weights stay loaded)", i, api.exitcode
                )
                apis[i] = self._start_api(engine, i, count)
        statuses = self._stop_apis(apis, grace_s=self.config.drain_timeout_s + 15.0)
        return 0 if all(s == 0 for s in statuses) else 1

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        self._restarts.append(now)
        return len(self._restarts) <= MAX_API_RESTARTS

    @staticmethod
    def _stop_apis(apis: list[BaseProcess], grace_s: float) -> list[int | None]:
        """SIGTERM them all (each drains), wait, then SIGKILL what is left; their exit statuses."""
        for api in apis:
            if api.is_alive():
                api.terminate()
        deadline = time.monotonic() + grace_s
        for api in apis:
            api.join(max(0.0, deadline - time.monotonic()))
            if api.is_alive():
                log.error("an API process did not drain within %.0fs; killing it", grace_s)
                api.kill()
                api.join(5)
        return [api.exitcode for api in apis]
