"""The real stack as separate processes for fault injection: valkey-server, kiln-infer, kiln-train.

Processes run the tiny dummy model (random weights of a small Llama shape, the embedded tokenizer) so a start
takes seconds on two CPU cores; every test gets its own KILN_HOME (models/ shared with the conversion cache).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
MODEL = "dummy:tiny"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll `cond` until it is true or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return False


def serving(address: str, timeout_s: float = 1.0) -> bool:
    """True when grpc.health.v1 at `address` says SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@dataclass
class Service:
    """One kiln service process with its log file."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        """host:port of its gRPC server."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """What it has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Block until health is SERVING; fail with its log if it died or took too long."""
        ok = wait_for(lambda: self.proc.poll() is not None or serving(self.address), timeout_s, 0.2)
        assert ok and self.proc.poll() is None, f"{self.name} not serving:\n{self.log()[-3000:]}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal it and wait for the exit code (SIGKILL after `timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


@dataclass
class Stack:
    """A KILN_HOME, an embedded Redis URL and the services started in it."""

    home: Path
    redis_server: RedisServer
    env: dict[str, str]
    services: list[Service] = field(default_factory=list)

    def start(self, module: str, port: int | None = None, **extra_env: str) -> Service:
        """Start `python -m module` with the stack's environment (not waiting for it)."""
        port = port or free_port()
        name = module.replace("_", "-")
        log_path = self.home / f"{name}-{len(self.services)}.log"
        env = {**self.env, "KILN_PORT": str(port), **extra_env}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        service = Service(name, port, proc, log_path)
        self.services.append(service)
        return service


def home_with_models(root: Path, model_cache_home: Path) -> Path:
    """A fresh KILN_HOME whose models/ is the shared conversion cache."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(model_cache_home / "models", target_is_directory=True)
    return root


def base_env(home: Path, redis_url: str, infer_port: int) -> dict[str, str]:
    """The environment both services read: tiny model on CPU, fast training triggers, one home."""
    return {
        **os.environ,
        "KILN_HOME": str(home),
        "KILN_REDIS_URL": redis_url,
        "KILN_MODEL": MODEL,
        "KILN_DEVICE": "cpu",
        "KILN_INFER_ADDRESS": f"127.0.0.1:{infer_port}",
        "KILN_DRAIN_TIMEOUT": "20",
        "KILN_IMPORT_ROOT": str(home),  # tests publish adapters written under the home by path
        "KILN_TRAIN_THREADS": "1",
        "TORCH_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def running_stack(home: Path) -> Iterator[Stack]:
    """A real embedded valkey-server for `home`; every service started in it is killed at the end."""
    redis_server = RedisServer(RedisConfig(home=home))
    url = redis_server.start()
    s = Stack(home, redis_server, base_env(home, url, free_port()))
    try:
        yield s
    finally:
        for service in s.services:
            service.stop(signal.SIGKILL, 10)
        redis_server.stop()


@pytest.fixture
def stack(tmp_path: Path, model_cache_home: Path, smollm2: object) -> Iterator[Stack]:
    """A fresh home with its own Redis for one test."""
    with running_stack(home_with_models(tmp_path / "home", model_cache_home)) as s:
        yield s


def generate(
    channel: grpc.Channel, prompt: str, adapter: str = "", max_tokens: int = 8, timeout_s: float = 60.0
) -> inference_pb2.GenerateResponse:
    """One greedy generation to the end; its last response (finish reason and usage set)."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.GenerateRequest(
        adapter=adapter,
        prompt=prompt,
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    responses = list(stub.Generate(request, timeout=timeout_s))
    assert responses and responses[-1].finish_reason, "stream ended without a finish reason"
    return responses[-1]


def publish_random_adapter(stack: Stack, channel: grpc.Channel, name: str = "rel") -> None:
    """Write a random rank-4 PEFT adapter of the tiny model's shape and publish it (promoted, sampled)."""
    from transformers import LlamaConfig

    from kiln_common.model_loader import DUMMY_SHAPES
    from kiln_infer.lora.random_adapter import write_random_adapter

    path = write_random_adapter(
        stack.home / "peft" / name,
        LlamaConfig(**DUMMY_SHAPES["tiny"]),
        rank=4,
        seed=0,  # type: ignore[arg-type]
    )
    stub = adapter_pb2_grpc.AdapterServiceStub(channel)
    stub.PublishVersion(
        adapter_pb2.PublishVersionRequest(adapter=name, path=str(path), promote=True), timeout=60
    )
    wait_for(lambda: _serves(channel, name), 60, 0.5)


def _serves(channel: grpc.Channel, adapter: str) -> bool:
    try:
        generate(channel, "ping", adapter=adapter, max_tokens=1, timeout_s=10)
    except grpc.RpcError:
        return False
    return True


def start_pair(stack: Stack, **train_env: str) -> tuple[Service, Service]:
    """kiln-infer and kiln-train on the stack, both SERVING."""
    infer_port = int(stack.env["KILN_INFER_ADDRESS"].rsplit(":", 1)[1])
    infer = stack.start("kiln_infer", port=infer_port)
    train = stack.start("kiln_train", **train_env)
    infer.wait_serving()
    train.wait_serving()
    return infer, train
