"""The engine-core process: owns the base weights, runs the step loop, and serves one API process at a time.

It loads the model once, shares the weights with kiln-train, builds the engine, then listens on a Unix socket.
An API process connects, submits requests and aborts, and receives one message per engine step carrying every
sequence's new tokens and text. If the API process goes away, its requests are aborted and the next one that
connects finds the weights still loaded. The process exits when its parent does, or on SIGTERM.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import queue
import secrets
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from kiln_common.config import InferConfig
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.types import EngineRequest, RequestOutput
from kiln_infer.engine_link import EngineInfo, WireOutput, to_wire

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_SOCKET_PATH = 100
CLOSE_TIMEOUT_S = 20.0  # a shutdown that takes longer (a stuck thread, a dead Redis) ends with os._exit


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no orphans); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def parent_gone() -> bool:
    """True once the process that spawned this one has exited.

    Watches the parent's sentinel pipe, so it holds when the orphan is re-parented to a subreaper rather than
    to pid 1 (where a getppid() check misses it) and when PDEATHSIG fired on a thread rather than the process.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        return not parent.is_alive()
    return os.getppid() == 1


def _exit_if_stuck(timeout_s: float) -> None:
    """From now on the process ends within `timeout_s`, whatever the shutdown waits on."""

    def force() -> None:
        log.error("engine core shutdown took over %.0fs; exiting now", timeout_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(timeout_s, force)
    timer.daemon = True
    timer.start()


class _Sink:
    """Where one sequence's outputs go: the step's outbox, as wire tuples (the end marker is implied)."""

    __slots__ = ("outbox",)

    def __init__(self, outbox: list[WireOutput]) -> None:
        self.outbox = outbox

    def put(self, out: RequestOutput | None) -> None:
        if out is not None:
            self.outbox.append(to_wire(out))


class EngineHost:
    """Bridges API processes to the engine: requests in; per step, one output message per connection out."""

    def __init__(self, engine: AsyncEngine, info: EngineInfo) -> None:
        self.engine = engine
        self.info = info
        self._outbox: list[WireOutput] = []
        self._sink = _Sink(self._outbox)
        self._send_queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._owner: dict[str, Connection] = {}  # unfinished request id -> the connection that sent it
        engine.on_step_end = self._flush
        threading.Thread(target=self._send_loop, name="kiln-engine-send", daemon=True).start()

    def _flush(self) -> None:
        """On the engine thread, after every step: hand the step's outputs to the sender as one batch."""
        if self._outbox:
            batch = self._outbox[:]
            self._outbox.clear()
            self._send_queue.put(("out", batch))

    def _send_loop(self) -> None:
        """Coalesce what is queued (several steps if an API process is slow): one message a connection."""
        while True:
            first = self._send_queue.get()
            if first is None:
                return
            pending = [first]
            while True:
                try:
                    more = self._send_queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                pending.append(more)
            self._send_many(pending)

    def _send_many(self, messages: list[tuple[Any, ...]]) -> None:
        """Route outputs to the connections that own them; replies and failures carry their connection."""
        owner = self._owner
        by_conn: dict[Connection, list[WireOutput]] = {}
        for m in messages:
            if m[0] != "out":
                self._send(m[-1], m[:-1])
                continue
            for w in m[1]:
                conn = owner.get(w[0])
                if conn is not None:
                    by_conn.setdefault(conn, []).append(w)
                    if w[3]:
                        owner.pop(w[0], None)
        for conn, outputs in by_conn.items():
            self._send(conn, ("out", outputs))

    @staticmethod
    def _send(conn: Connection, message: tuple[Any, ...]) -> None:
        try:
            conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError):
            pass  # that API process went away; its serve() cleans up

    def serve(self, conn: Connection) -> None:
        """Serve one API process until it disconnects, then abort what it left running."""
        conn.send_bytes(pickle.dumps(("ready", self.info)))
        try:
            while True:
                self._handle(pickle.loads(conn.recv_bytes()), conn)
        except (EOFError, OSError):
            pass
        finally:
            mine = [rid for rid, c in list(self._owner.items()) if c is conn]
            log.info("an API process disconnected; aborting its %d requests", len(mine))
            for request_id in mine:
                self._owner.pop(request_id, None)
                self.engine.abort(request_id)
            conn.close()

    def _handle(self, message: tuple[Any, ...], conn: Connection) -> None:
        kind = message[0]
        if kind == "add":
            request: EngineRequest = message[1]
            self._owner[request.request_id] = conn  # before submit: its first output may come at once
            try:
                self.engine.submit(request, sink=self._sink)
            except Exception as exc:  # noqa: BLE001 - the error travels to the client's stream
                self._owner.pop(request.request_id, None)
                self._send_queue.put(("fail", request.request_id, exc, conn))
        elif kind == "abort":
            self.engine.abort(message[1])
        elif kind == "call":
            threading.Thread(target=self._call, args=(*message[1:], conn), daemon=True).start()

    def _call(self, call_id: int, method: str, args: tuple[Any, ...], conn: Connection) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            if method == "preload":
                self.engine.preload_adapter(*args)
            elif method == "stats":
                result = self.engine.stats()
            else:
                raise ValueError(f"unknown engine call {method!r}")
        except Exception as exc:  # noqa: BLE001 - the error travels to the caller
            error = exc
        self._send_queue.put(("reply", call_id, result, error, conn))


@dataclass(frozen=True)
class EngineProcessSpec:
    """How to start the engine-core process: the server's config, its socket and the shared secret."""

    config: InferConfig
    redis_url: str
    address: str
    authkey: bytes


def engine_main(spec: EngineProcessSpec, ready: Connection) -> None:
    """Entry point of the engine-core process (spawned): load, share, build, then serve connections."""
    from kiln_common.logging_setup import setup_logging
    from kiln_infer.engine_build import build_engine

    die_with_parent()
    setup_logging("INFO", "kiln-engine", spec.config.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    try:
        built = build_engine(spec.config, spec.redis_url)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which exits with a clear message
        log.exception("engine core failed to start")
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    host = EngineHost(built.engine, built.info)
    listener = Listener(spec.address, family="AF_UNIX", authkey=spec.authkey)
    os.chmod(spec.address, 0o600)
    try:
        ready.send(("ready", built.info))
    except OSError:  # the parent died while the model loaded: nobody to serve
        stop.set()
    threading.Thread(target=_accept_loop, args=(listener, host), daemon=True).start()
    while not stop.wait(0.5):
        if parent_gone():  # orphaned despite PDEATHSIG: stop
            log.warning("the process that started the engine core is gone; stopping")
            break
    _exit_if_stuck(CLOSE_TIMEOUT_S)
    listener.close()
    built.close()


def _accept_loop(listener: Listener, host: EngineHost) -> None:
    while True:
        try:
            conn = listener.accept()
        except OSError:
            return
        except Exception as exc:  # noqa: BLE001 - a bad handshake (wrong key) must not kill the listener
            log.warning("refused a connection to the engine core: %s", exc)
            continue
        threading.Thread(target=host.serve, args=(conn,), name="kiln-engine-conn", daemon=True).start()


class EngineProcess:
    """The parent's handle on the engine-core process: start it, wait until ready, stop it."""

    def __init__(self, config: InferConfig, redis_url: str) -> None:
        run_dir = config.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        address = run_dir / f"engine-{os.getpid()}-{secrets.token_hex(4)}.sock"
        if len(str(address)) > MAX_SOCKET_PATH:  # sun_path holds 108 bytes: deep homes get a /tmp socket
            address = Path(tempfile.gettempdir()) / address.name
        self.address = str(address)
        self.authkey = secrets.token_bytes(32)
        self._spec = EngineProcessSpec(config, redis_url, self.address, self.authkey)
        self._process: BaseProcess | None = None
        self.info: EngineInfo | None = None

    def start(self, timeout_s: float = 900.0) -> EngineInfo:
        """Spawn the process and wait until its engine is built; raises RuntimeError with its reason."""
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=engine_main, args=(self._spec, child_end), name="kiln-engine", daemon=False
        )
        self._process.start()
        log.info("engine core process started (pid %s)", self._process.pid)
        child_end.close()
        deadline = time.monotonic() + timeout_s
        while not parent_end.poll(0.5):
            if not self._process.is_alive():
                raise RuntimeError(f"engine core exited with status {self._process.exitcode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"engine core not ready after {timeout_s:.0f}s")
        try:
            kind, payload = parent_end.recv()
        except EOFError:
            kind, payload = "error", f"it exited with status {self._process.exitcode} while starting"
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"engine core failed to start: {payload}")
        self.info = payload
        return payload

    def is_alive(self) -> bool:
        """True while the process runs."""
        return self._process is not None and self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once it ended."""
        return self._process.exitcode if self._process is not None else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL; removes the socket."""
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(5)
        Path(self.address).unlink(missing_ok=True)
