"""`kiln up`: the embedded Redis, kiln-infer and kiln-train as child processes, supervised, stopped together.

Promises: the children die with `kiln up` (the kernel's parent-death signal, even when it is SIGKILLed); any
number of SIGTERM/SIGINT, in any order, start one stop that ends within STOP_TIMEOUT_S; "ready" is said only
when every started process answers health SERVING; a second stack on the same KILN_HOME or ports is refused.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln_common.child_process import start_child
from kiln_common.config import DEFAULT_INFER_PORT, DEFAULT_TRAIN_PORT, RedisConfig, default_home
from kiln_common.redis_server import RedisServer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 90.0  # a child's drain; then SIGKILL
READY_POLL_S = 0.25
LOCK_NAME = "stack.lock"


class StackBusyError(RuntimeError):
    """KILN_HOME or a port is held by another running stack."""


@dataclass
class Child:
    """One supervised service process and the health address that says it is ready."""

    name: str
    address: str
    proc: subprocess.Popen[bytes]


class StopSignal:
    """Turns any number of SIGTERM/SIGINT into one stop request (the handler only sets an event)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1  # the stop itself runs in the main flow, never inside the handler
        self.event.set()


def hold_home(home: Path) -> IO[bytes]:
    """Lock `$KILN_HOME/stack.lock` for this stack's life (released by the kernel when it dies)."""
    lock_file = open(home / LOCK_NAME, "a+b")  # noqa: SIM115 - held until the stack ends
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().decode(errors="replace").strip() or "unknown"
        lock_file.close()
        raise StackBusyError(
            f"KILN_HOME {home} is used by another running `kiln up` (pid {holder}); "
            "stop it first, or set KILN_HOME to another directory"
        ) from None
    lock_file.truncate(0)
    lock_file.write(str(os.getpid()).encode())
    lock_file.flush()
    return lock_file


def check_port_free(host: str, port: int, name: str) -> None:
    """Raise StackBusyError when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host if host not in ("", "0.0.0.0", "[::]") else "127.0.0.1", port))
        except OSError:
            raise StackBusyError(
                f"port {port} ({name}) is already in use, probably by another running stack; "
                "stop it, or choose other ports (--port, KILN_TRAIN_PORT)"
            ) from None


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    """True when grpc.health.v1 at `address` answers SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_all_serving(children: list[Child], stop: threading.Event) -> str | None:
    """Poll every child's health until all are SERVING; the name of a child that died first, else None.

    Returns None with `stop` set when asked to stop while waiting.
    """
    waiting = {c.name: c for c in children}
    while waiting and not stop.is_set():
        for name, child in list(waiting.items()):
            if child.proc.poll() is not None:
                return name
            if is_serving(child.address):
                del waiting[name]
        stop.wait(READY_POLL_S)
    return None


def stop_children(children: list[Child], timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
    """SIGTERM every child at once, wait for all their drains together, SIGKILL whoever is left."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int] = {}
    for child in children:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("kiln up: %s did not stop within %.0fs; killing it", child.name, timeout_s)
            child.proc.kill()
            child.proc.wait()
        codes[child.name] = int(child.proc.returncode)
    return codes


def _start(name: str, module: str, address: str, env: dict[str, str]) -> Child:
    return Child(name, address, start_child([sys.executable, "-m", module], env=env))


def _start_services(
    args: argparse.Namespace, environ: Mapping[str, str], env: dict[str, str], say: Callable[[str], None]
) -> list[Child]:
    """Start kiln-infer (and kiln-train unless --no-train) after checking their ports are free."""
    host = environ.get("KILN_HOST", "127.0.0.1")
    infer_port = args.port or int(environ.get("KILN_PORT") or DEFAULT_INFER_PORT)
    train_port = int(environ.get("KILN_TRAIN_PORT") or DEFAULT_TRAIN_PORT)
    with_train = not args.no_train and importlib.util.find_spec("kiln_train.__main__") is not None
    check_port_free(host, infer_port, "kiln-infer")
    if with_train:
        check_port_free("127.0.0.1", train_port, "kiln-train")
    infer_addr = f"{host}:{infer_port}"
    env["KILN_INFER_ADDRESS"] = infer_addr
    children = [_start("kiln-infer", "kiln_infer", infer_addr, {**env, "KILN_PORT": str(infer_port)})]
    say(f"kiln-infer  {infer_addr}  (gRPC: InferenceService, AdapterService, health, reflection)")
    if with_train:
        train_addr = f"127.0.0.1:{train_port}"
        children.append(_start("kiln-train", "kiln_train", train_addr, {**env, "KILN_PORT": str(train_port)}))
        say(f"kiln-train  {train_addr}  (gRPC: TrainingService)")
    return children


def _supervise(children: list[Child], stop: threading.Event, say: Callable[[str], None]) -> int:
    """Wait until every child is ready, then until a stop request or a child's death; the exit status."""
    died = wait_all_serving(children, stop)
    if died is not None:
        say(f"kiln up: {died} exited before it was ready (see its log above); stopping")
        return 1
    if stop.is_set():
        return 0
    infer = children[0]
    flag = "" if infer.address.endswith(f":{DEFAULT_INFER_PORT}") else f"--address {infer.address} "
    say(f'ready: try  kiln {flag}generate --chat "What is the capital of France?"   (Ctrl-C stops)')
    while not stop.wait(0.5):
        for child in children:
            if child.proc.poll() is not None:
                say(f"kiln up: {child.name} exited with code {child.proc.returncode}; stopping the stack")
                return 1
    return 0


def run_stack(args: argparse.Namespace, environ: Mapping[str, str], say: Callable[[str], None]) -> int:
    """Start everything, say where it listens and when all of it is ready, run until a signal, stop it all.

    `say` receives the command's own output (where each part listens, ready, stopped); diagnostics go to
    logging. Returns 0 after a requested stop, 1 when a child died or the start was refused.
    """
    stop_signal = StopSignal()
    stop_signal.install()
    home = default_home(environ)
    home.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_home(home)
    except StackBusyError as exc:
        say(f"kiln up: {exc}")
        return 1
    redis_server = RedisServer(RedisConfig(home=home, url=environ.get("KILN_REDIS_URL", "")))
    children: list[Child] = []
    code = 1
    try:
        url = redis_server.start()
        say(f"redis       {url}" + ("  (embedded valkey-server, append-only)" if redis_server.owned else ""))
        env = {**environ, "KILN_HOME": str(home), "KILN_REDIS_URL": url}
        if args.model:
            env["KILN_MODEL"] = args.model
        children = _start_services(args, environ, env, say)
        say(f"home        {home}")
        code = _supervise(children, stop_signal.event, say)
    except StackBusyError as exc:
        say(f"kiln up: {exc}")
    finally:
        say("stopping ...")
        started = time.monotonic()
        for name, exit_code in stop_children(children).items():
            say(f"{name} stopped (exit {exit_code})")
        redis_server.stop()
        lock.close()
        say(f"stopped in {time.monotonic() - started:.1f}s")
    return code
