"""Lifecycle: SERVING only after warm-up; SIGTERM on a real kiln-infer process drains its streams."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import inference_pb2 as pb
from kiln.v1 import inference_pb2_grpc
from kiln_infer.server import InferServer

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_is_serving_only_after_warm_up(infer_server: InferServer) -> None:
    assert infer_server.health_before_warm_up == health_pb2.HealthCheckResponse.NOT_SERVING  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{infer_server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kiln.v1.InferenceService", "kiln.v1.AdapterService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def _health_until_serving(health: health_pb2_grpc.HealthStub, proc: subprocess.Popen[bytes]) -> list[int]:
    """Poll health until SERVING, the process exits, or 120 s pass; the statuses seen, in order."""
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            time.sleep(0.02)
            continue
        seen.append(status)
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.01)
    return seen


def test_sigterm_drains_in_flight_streams_and_exits_0(
    tmp_path: Path, model_cache_home: Path, smollm2: object
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_cache_home / "models", target_is_directory=True)
    port = _free_port()
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "KILN_PORT": str(port),
        "KILN_REDIS_URL": "",
        "KILN_DRAIN_TIMEOUT": "60",
    }
    log = (tmp_path / "kiln-infer.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_infer"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            seen = _health_until_serving(health, proc)
            assert seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING, (proc.poll(), seen)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stream = stub.Generate(
                pb.GenerateRequest(
                    prompt="Once upon a time",
                    sampling=pb.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
                ),
                timeout=120,
            )
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            rest = list(stream)
        responses = [first, *rest]
        assert sum(len(r.token_ids) for r in responses) == 64
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "kiln-infer.log").read_text()
    assert "draining" in text and "Traceback" not in text


def test_kiln_up_serves_and_stops_everything(tmp_path: Path, model_cache_home: Path, smollm2: object) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_cache_home / "models", target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "KILN_HOME": str(home), "KILN_REDIS_URL": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_infer.cli", "up", "--no-train", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert any(f"kiln-infer  127.0.0.1:{port}" in line for line in lines), lines
        assert any(line.startswith("redis") and "redis.sock" in line for line in lines), lines
        answer = subprocess.run(
            [
                sys.executable,
                "-m",
                "kiln_infer.cli",
                "--address",
                f"127.0.0.1:{port}",
                "generate",
                "--chat",
                "What is the capital of France?",
                "--temperature",
                "0",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Paris" in answer.stdout, answer.stderr
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=90) == 0
        assert "kiln-infer stopped (exit 0)" in rest
        assert not (home / "redis.sock").exists()  # the embedded Redis went down with the stack
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
