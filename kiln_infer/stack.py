"""`kiln up`: the embedded Redis, kiln-infer and kiln-train as child processes, stopped together."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln_common.config import DEFAULT_INFER_PORT, DEFAULT_TRAIN_PORT, RedisConfig, default_home
from kiln_common.redis_server import RedisServer

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 90.0


def _wait_serving(address: str, proc: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    """Poll grpc.health.v1 until SERVING; False when the process died or we were asked to stop."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set() and proc.poll() is None:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            stop.wait(0.5)
    return False


def _terminate(name: str, proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM a child, wait for its drain, SIGKILL if it hangs; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("kiln up: %s did not stop within %.0fs; killing it", name, STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def run_stack(args: argparse.Namespace, environ: Mapping[str, str], say: Callable[[str], None]) -> int:
    """Start everything, say where it listens, wait for Ctrl-C/SIGTERM or a dead kiln-infer, stop it all.

    `say` receives the command's own output (where each part listens, ready, stopped); diagnostics go to
    logging.
    """
    home = default_home(environ)
    home.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(RedisConfig(home=home, url=environ.get("KILN_REDIS_URL", "")))
    url = redis_server.start()
    say(f"redis       {url}" + ("  (embedded valkey-server, append-only)" if redis_server.owned else ""))
    env = {**environ, "KILN_HOME": str(home), "KILN_REDIS_URL": url}
    if args.model:
        env["KILN_MODEL"] = args.model
    infer_port = args.port or int(environ.get("KILN_PORT") or DEFAULT_INFER_PORT)
    infer_addr = f"{environ.get('KILN_HOST', '127.0.0.1')}:{infer_port}"
    env["KILN_INFER_ADDRESS"] = infer_addr
    children: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        infer_env = {**env, "KILN_PORT": str(infer_port)}
        children["kiln-infer"] = subprocess.Popen(
            [sys.executable, "-m", "kiln_infer"], env=infer_env, start_new_session=True
        )
        say(f"kiln-infer  {infer_addr}  (gRPC: InferenceService, AdapterService, health, reflection)")
        if not args.no_train and importlib.util.find_spec("kiln_train.__main__") is not None:
            train_port = int(environ.get("KILN_TRAIN_PORT") or DEFAULT_TRAIN_PORT)
            train_env = {**env, "KILN_PORT": str(train_port)}
            children["kiln-train"] = subprocess.Popen(
                [sys.executable, "-m", "kiln_train"], env=train_env, start_new_session=True
            )
            say(f"kiln-train  127.0.0.1:{train_port}  (gRPC: TrainingService)")
        say(f"home        {home}")
        if _wait_serving(infer_addr, children["kiln-infer"], stop):
            flag = "" if infer_port == DEFAULT_INFER_PORT else f"--address {infer_addr} "
            say(f'ready: try  kiln {flag}generate --chat "What is the capital of France?"   (Ctrl-C stops)')
        while not stop.is_set():
            for name, proc in list(children.items()):
                if proc.poll() is not None:
                    log.warning("kiln up: %s exited with code %s", name, proc.returncode)
                    del children[name]
                    if name == "kiln-infer":
                        stop.set()
            stop.wait(0.5)
        say("stopping ...")
        return 0
    finally:
        started = time.monotonic()
        for name in ("kiln-train", "kiln-infer"):
            if name in children:
                code = _terminate(name, children[name])
                say(f"{name} stopped (exit {code})")
        redis_server.stop()
        say(f"stopped in {time.monotonic() - started:.1f}s")
