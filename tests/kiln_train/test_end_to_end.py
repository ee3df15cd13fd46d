"""End to end: real kiln-infer + kiln-train + Redis as processes; teach an invented fact; kill -9 both."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from kiln_common.base_beacon import heartbeat_generation
from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer, connect
from kiln_train.buffer import SEEN_KEY
from kiln_train.demo import ask
from kiln_train.facts import Fact, invent_fact

REPO = Path(__file__).resolve().parents[2]
# It asserts a published round that answers the taught fact: with the stricter gate the current training
# recipe is rejected on SmolLM2 (issue 13, docs/training.md), so it runs with the taught-facts test
# (KILN_TEST_FACTS=1). Its kill -9 and restart promises are covered without training by tests/reliability/.
pytestmark = [pytest.mark.slow, pytest.mark.facts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """Processes of one Kiln stack sharing a KILN_HOME and an external Redis."""

    home: Path
    redis_url: str
    reference_dir: Path
    infer_port: int = field(default_factory=_free_port)
    train_port: int = field(default_factory=_free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update(
            KILN_HOME=str(self.home),
            KILN_REDIS_URL=self.redis_url,
            PYTHONPATH=str(REPO),
            KILN_INFER_ADDRESS=f"127.0.0.1:{self.infer_port}",
            KILN_TRAIN_TRIGGER_SAMPLES="6",
            KILN_TRAIN_CLAIM_IDLE_MS="2000",
            KILN_TRAIN_REFERENCE_DIR=str(self.reference_dir),
        )
        return env

    def start(self, name: str) -> None:
        port = self.infer_port if name == "infer" else self.train_port
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"kiln_{name}", "--port", str(port)],
            env=self.env(),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_serving(f"127.0.0.1:{port}", self.procs[name], self.home / f"{name}.log")

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 180.0) -> None:
    """Until grpc.health.v1 says SERVING."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{address} not SERVING after {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache_home: Path) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("e2e-home")
    (home / "models").symlink_to(model_cache_home / "models", target_is_directory=True)
    redis_server = RedisServer(RedisConfig(home=home / "redis-home"))
    (home / "redis-home").mkdir()
    # The base model's greedy answers to the replay/control prompts never change: keep them across runs.
    s = Stack(home=home, redis_url=redis_server.start(), reference_dir=model_cache_home / "train-reference")
    yield s
    s.stop()
    redis_server.stop()
    for name in ("train", "infer"):  # shown by pytest when the test failed
        log = home / f"{name}.log"
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if "arn" not in ln]
            print(f"--- {name}.log (tail) ---", *lines[-40:], sep="\n")


class Streamer(threading.Thread):
    """A client streaming back-to-back generations on an adapter, recording versions and failures."""

    def __init__(self, address: str, adapter: str) -> None:
        super().__init__(daemon=True)
        self.stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
        self.adapter = adapter
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.slowest = 0.0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            req = inference_pb2.GenerateRequest(
                adapter=self.adapter,
                messages=[inference_pb2.ChatMessage(role="user", content=f"Count to {i}.")],
                sampling=inference_pb2.SamplingParams(max_tokens=12, temperature=0.7, seed=i),
            )
            t0 = time.monotonic()
            try:
                labels = {r.adapter_version for r in self.stub.Generate(req, timeout=120)}
                if len(labels) != 1 or not next(iter(labels)):
                    self.failures.append(f"versions {labels}")
                self.versions.extend(labels)
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            self.slowest = max(self.slowest, time.monotonic() - t0)


def teach(infer: Any, adapter: str, fact: Fact) -> list[str]:
    examples = [
        inference_pb2.Example(messages=[inference_pb2.ChatMessage(role="user", content=q)], completion=a)
        for q, a in fact.teaching()
    ]
    resp = infer.SubmitExamples(
        inference_pb2.SubmitExamplesRequest(adapter=adapter, examples=examples), timeout=30
    )
    assert resp.accepted == 6
    return list(resp.sample_ids)


def wait_round(train: Any, adapter: str, done: bool, timeout_s: float = 1800.0, min_steps: int = 0) -> Any:
    """The adapter's newest round once it is finished (done=True) or running with >= min_steps steps.

    A whole round at the defaults takes 10-20 minutes on 2 CPU cores (the parent's answers to the replay,
    vetting and gate sets, the null-space measurement, then steps of ~20-40 s): 420 s timed out mid-round."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = train.GetTrainingStatus(
                training_pb2.GetTrainingStatusRequest(adapter=adapter), timeout=10
            )
        except grpc.RpcError:
            time.sleep(1.0)
            continue
        for r in status.rounds:
            if done and r.outcome in ("published", "rejected"):
                return r
            if not done and r.outcome == "running" and r.steps >= min_steps:
                return r
        time.sleep(0.5)
    raise TimeoutError(f"no {'finished' if done else 'running'} round for {adapter}")


def test_teach_serve_and_survive_kills(stack: Stack) -> None:
    stack.start("infer")
    stack.start("train")
    infer = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{stack.infer_port}"))
    train = training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(f"127.0.0.1:{stack.train_port}"))
    fact = invent_fact(int.from_bytes(os.urandom(4), "little"))
    answer, _ = ask(infer, fact.probes()[0], "", [])
    assert not fact.answered_by(answer), answer  # the base model cannot know an invented fact

    ids_a = teach(infer, "facts", fact)
    last_sample = time.monotonic()
    streamer = Streamer(f"127.0.0.1:{stack.infer_port}", "facts")
    streamer.start()
    rnd = wait_round(train, "facts", done=True)
    assert rnd.outcome == "published", rnd.reason
    published = time.monotonic()
    deadline = time.monotonic() + 60
    while ask(infer, "Hi", "facts", [], max_tokens=2)[1] != "facts@v1":
        assert time.monotonic() < deadline, "v1 never served"
        time.sleep(0.2)
    serving = time.monotonic()
    print(
        f"last sample -> v1 published {published - last_sample:.1f}s, "
        f"-> v1 serving {serving - last_sample:.1f}s (round: {rnd.steps} steps, eval {dict(rnd.eval)})"
    )
    answers = [ask(infer, q, "facts", [])[0] for q in fact.probes()]
    assert sum(fact.answered_by(a) for a in answers) >= 2, (fact, answers)
    paris, version = ask(infer, "What is the capital of France?", "facts", [])
    assert "Paris" in paris and version == "facts@v1"
    time.sleep(1.0)
    streamer.stop.set()
    streamer.join(60)
    assert streamer.failures == [] and streamer.slowest < 60
    assert {"facts@v0", "facts@v1"} <= set(streamer.versions)

    # kill -9 kiln-train in the middle of a round, restart: nothing lost, nothing trained twice.
    fact_b = invent_fact(int.from_bytes(os.urandom(4), "little"))
    ids_b = teach(infer, "facts-b", fact_b)
    wait_round(train, "facts-b", done=False, min_steps=1)
    stack.kill9("train")
    stack.start("train")
    rnd_b = wait_round(train, "facts-b", done=True)  # the round ran again after the restart
    status = train.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(), timeout=10)
    assert any(r.reason.startswith("interrupted") for r in status.rounds if r.adapter == "facts-b")
    trained: list[str] = []
    client = connect(stack.redis_url)
    for adapter in ("facts", "facts-b"):
        for vdir in sorted((stack.home / "adapters" / "default" / adapter).glob("v*")):
            history = client.lrange(f"kiln:reg:default:{adapter}:history:{vdir.name[1:]}", 0, -1)
            if not any(json.loads(h)["action"] == "promoted" for h in history):
                continue  # a candidate the gate rejected (or never judged): its samples are trained again
            meta = json.loads((vdir / "meta.json").read_text())
            trained += meta["sample_ids"] + meta["hyperparameters"]["heldout_sample_ids"]
    # A rejected round keeps its samples buffered for the next one; a published one consumed them.
    waiting = list(client.zrange("kiln:train:order:default:facts-b", 0, -1))
    assert (rnd_b.outcome == "published") == (waiting == []), rnd_b.reason
    assert sorted(trained + waiting) == sorted(ids_a + ids_b)  # ids in = ids consumed, none twice
    # Every stream entry (the 12 examples and the streamer's recorded generations) consumed exactly once.
    assert status.consumed == client.xlen("kiln:samples") and status.dead_lettered == 0
    assert all(client.zscore(SEEN_KEY, i) is not None for i in ids_a + ids_b)  # remembered as consumed
    assert int(client.xpending("kiln:samples", "kiln-train")["pending"]) == 0

    # kill -9 kiln-infer: kiln-train keeps running, waits, and re-attaches to the new weights.
    old_generation = heartbeat_generation(client)
    stack.kill9("infer")
    time.sleep(4.0)  # the heartbeat expires
    status = train.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(), timeout=10)
    assert status.state == training_pb2.TRAINER_STATE_WAITING_FOR_BASE
    stack.start("infer")
    new_generation = heartbeat_generation(client)
    assert new_generation and new_generation != old_generation
    deadline = time.monotonic() + 30
    while (
        train.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(), timeout=10).base_generation
        != new_generation
    ):
        assert time.monotonic() < deadline, "kiln-train did not re-attach"
        time.sleep(0.5)
    assert stack.procs["train"].poll() is None
