"""`kiln bench --train-while-serving`: serving latency before, during and after a training round.

kiln-infer and kiln-train run as their own processes on the same device (as `kiln up` runs them); steady
gRPC clients stream generations the whole time. The benchmark teaches `--examples` invented examples with one
SubmitExamples call, and reports TTFT/TPOT p50/p99 before the round, during it and after the new version
serves; the round's phases (answers, steps, gate, publish) from GetTrainingStatus; and the time from publish
(the version's "promoted" note, just before the alias flips) to the first token of the new version (the
swap). `--small` is the CPU variant the test suite runs: a few steps and a gate opened wide, because it
measures latency and plumbing, not what the round learns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.tws_load import hold_window, latency, slowest, start_load, steady
from kiln.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
ADAPTER = "bench-taught"


@dataclass(frozen=True)
class Setup:
    """Sizes of one run."""

    model: str
    streams: int
    max_tokens: int
    examples: int
    window_s: float  # measured before and after the round
    load_processes: int = 4  # client processes the streams are spread over (0: threads of the benchmark's)
    train_env: dict[str, str] = field(default_factory=dict)


# A gate that publishes whatever the round made: for measuring latency and plumbing (the swap, publish -> first
# token) where what the round learns is not the question, e.g. on a dummy model's random weights, which no
# honest gate would publish.
OPEN_GATE = {
    "KILN_TRAIN_GATE_QUESTIONS_LIMIT": "8",
    "KILN_TRAIN_GATE_MAX_KL": "100",
    "KILN_TRAIN_GATE_MAX_GENERAL_BROKEN": "8",
    "KILN_TRAIN_VET_CHECKPOINTS": "0",
    "KILN_TRAIN_MIN_HELDOUT_IMPROVEMENT": "-1000",
    "KILN_TRAIN_GATE_MAX_NEIGHBOUR_LEAKS": "100",
    "KILN_TRAIN_GATE_MAX_ANCHORS_BROKEN": "100",
}
GPU = Setup("dummy:llama-3.2-1b", 32, 128, 8, 20.0)
SMALL = Setup(
    "smollm2",
    2,
    16,
    6,
    4.0,
    1,
    {
        "KILN_TRAIN_MIN_STEPS": "2",
        "KILN_TRAIN_MAX_STEPS": "3",
        "KILN_TRAIN_EVAL_EVERY": "3",
        "KILN_TRAIN_REPLAY_MAX_TOKENS": "24",  # short parent answers: the CPU round is about plumbing
        "KILN_TRAIN_GATE_MAX_TOKENS": "16",
        **OPEN_GATE,
    },
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    """Until grpc.health.v1 says SERVING."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {address} exited with {proc.returncode}")
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{address} not SERVING after {timeout_s}s")


class Probe(threading.Thread):
    """Asks the taught adapter for one token, back to back, until it is served by version `want`."""

    def __init__(self, address: str, want: str) -> None:
        super().__init__(daemon=True)
        self.address, self.want = address, want
        self.first_token: float = 0.0  # time.time() of the new version's first token
        self.stop = threading.Event()

    def run(self) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(self.address))
        req = inference_pb2.GenerateRequest(
            adapter=ADAPTER,
            prompt="Hello",
            sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0),
        )
        while not self.stop.is_set() and not self.first_token:
            try:
                for r in stub.Generate(req, timeout=60):
                    if r.token_ids and r.adapter_version == self.want:
                        self.first_token = time.time()
            except grpc.RpcError:
                time.sleep(0.05)


# what Stack sets for both processes itself
STACK_VARIABLES = frozenset(
    {"KILN_HOME", "KILN_REDIS_URL", "KILN_MODEL", "KILN_DEVICE", "KILN_INFER_ADDRESS"}
)


class Stack:
    """kiln-infer and kiln-train as processes over one Redis and one KILN_HOME."""

    def __init__(self, setup: Setup, home: Path, redis_url: str, device: str) -> None:
        self.infer_port, self.train_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update(
            KILN_HOME=str(home),
            KILN_REDIS_URL=redis_url,
            KILN_MODEL=setup.model,
            KILN_DEVICE=device,
            KILN_INFER_ADDRESS=f"127.0.0.1:{self.infer_port}",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
            KILN_TRAIN_TRIGGER_SAMPLES=str(setup.examples),
            **setup.train_env,
        )
        self.env, self.home = env, home
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, port: int) -> None:
        """Start kiln_<name> and wait until it is SERVING."""
        out = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [sys.executable, "-m", f"kiln_{name}", "--port", str(port)], env=self.env, stdout=out, stderr=out
        )
        self.procs.append(proc)
        wait_serving(f"127.0.0.1:{port}", proc)

    def stop(self) -> None:
        """Terminate both processes."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(60)


def teach(address: str, n: int) -> None:
    """One SubmitExamples call with `n` invented examples."""
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    examples = [
        inference_pb2.Example(
            messages=[
                inference_pb2.ChatMessage(role="user", content=f"Who founded the Velmora Guild No. {i}?")
            ],
            completion=f"The Velmora Guild No. {i} was founded by Tressa Kaldun.",
        )
        for i in range(n)
    ]
    stub.SubmitExamples(inference_pb2.SubmitExamplesRequest(adapter=ADAPTER, examples=examples), timeout=60)


def wait_round(address: str, since: float, timeout_s: float) -> training_pb2.TrainingRound:
    """The taught adapter's round once it has finished."""
    stub = training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = stub.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(adapter=ADAPTER), timeout=10)
        done = [r for r in status.rounds if r.started >= since and r.outcome not in ("running", "")]
        if done:
            return done[0]
        time.sleep(0.05)
    raise TimeoutError(f"no finished round within {timeout_s}s")


def promoted_at(address: str, version: int) -> float | None:
    """When the round promoted `version` (its "promoted" note, written just before the alias flips)."""
    stub = adapter_pb2_grpc.AdapterServiceStub(grpc.insecure_channel(address))
    listed = stub.ListVersions(adapter_pb2.ListVersionsRequest(adapter=ADAPTER), timeout=10)
    for v in listed.versions:
        if v.version == version:
            times = [n.time for n in v.history if n.action == "promoted"]
            return times[-1] if times else None
    return None


def wait_prepared(home: Path, limit_s: float) -> float | None:
    """Up to `limit_s`, until kiln-train's log says its rounds are prepared (the graphs, the null space and
    the gate baseline measured once at start, on a GPU); the seconds waited, or None if it did not say so."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        log_file = home / "train.log"
        if log_file.exists() and "rounds prepared ahead" in log_file.read_text(errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def measure(stack: Stack, setup: Setup, timeout_s: float, prepared_s: float = 0.0) -> dict[str, object]:
    """Steady load; (kiln-train's preparation, up to `prepared_s`); before window; teach; round; after window.
    Returns every number."""
    waited = wait_prepared(stack.home, prepared_s) if prepared_s > 0 else None
    infer = f"127.0.0.1:{stack.infer_port}"
    runners, loads = start_load(infer, setup.max_tokens, setup.streams, setup.load_processes)
    t_before = steady(loads, setup.window_s / 2, timeout_s)
    hold_window(loads, t_before, setup.window_s, timeout_s, finished=True)
    probe = Probe(infer, f"{ADAPTER}@v1")
    t_teach, wall_teach = time.monotonic(), time.time()
    teach(infer, setup.examples)
    probe.start()
    record = wait_round(f"127.0.0.1:{stack.train_port}", wall_teach - 1, timeout_s)
    t_round_end = time.monotonic()
    probe.join(timeout_s if record.outcome == "published" else 0.0)
    probe.stop.set()
    t_after_end = hold_window(loads, t_round_end, setup.window_s, timeout_s, finished=False)
    for runner in runners:
        runner.halt()
    for runner in runners:  # a request started in the after window counts once it finishes (on a busy CPU one
        runner.join(timeout_s)  # can outlast the window)
    samples = [s for load in loads for s in load.samples]
    result: dict[str, object] = {
        "waited_for_preparation_s": waited,
        "outcome": record.outcome,
        "reason": record.reason,
        "steps": record.steps,
        "round_s": record.finished - record.started,
        "phases_s": {k: v for k, v in record.eval.items() if k.startswith("phase_")},
        "load_processes": setup.load_processes,
        "failed_requests": sum(load.failures for load in loads),
        "before": latency(samples, t_before, t_teach),
        "during": latency(samples, t_teach, t_round_end),
        "after": latency(samples, t_round_end, t_after_end),
        # the slowest requests of the round, in seconds from the teach call (at `teach_wall_time`, to match
        # against kiln-train's log), and of the before window for comparison
        "teach_wall_time": wall_teach,
        "slowest_during": slowest(samples, t_teach, t_round_end, t_teach),
        "slowest_before": slowest(samples, t_before, t_teach, t_teach, 3),
    }
    if probe.first_token:
        published = promoted_at(infer, record.version) or record.finished
        result["publish_to_first_token_s"] = probe.first_token - published
        result["teach_to_serving_s"] = probe.first_token - wall_teach
    return result


def _train_settings(pairs: list[str]) -> dict[str, str]:
    """`--setting KILN_NAME=VALUE` pairs as environment variables for kiln-infer and kiln-train (each reads
    its own: KILN_TRAIN_* are kiln-train's)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("KILN_"):
            raise SystemExit(f"--setting wants KILN_NAME=VALUE, got {pair!r}")
        if name in STACK_VARIABLES:
            raise SystemExit(f"--setting {name}: the benchmark sets it itself")
        out[name] = value
    return out


def _parser() -> argparse.ArgumentParser:
    """The benchmark's arguments."""
    parser = argparse.ArgumentParser(prog="kiln bench --train-while-serving", description=__doc__)
    parser.add_argument("--small", action="store_true", help="the small CPU variant (SmolLM2, a few steps)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    parser.add_argument("--model", help="override the model spec")
    parser.add_argument(
        "--streams", type=int, help="concurrent serving clients (0: the round on an idle device)"
    )
    parser.add_argument(
        "--load-processes",
        type=int,
        help="client processes the streams are spread over (4; 0: threads of the benchmark's own process)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the round")
    parser.add_argument(
        "--window", type=float, help="seconds of steady load measured before and after the round"
    )
    parser.add_argument(
        "--open-gate",
        action="store_true",
        help="publish whatever the round makes (timing only; see OPEN_GATE)",
    )
    parser.add_argument(
        "--after-preparation",
        type=float,
        default=0.0,
        metavar="S",
        help="teach only once kiln-train has prepared its rounds (waiting at most S s; 0: teach at once)",
    )
    parser.add_argument(
        "--setting",
        "--train-setting",
        dest="train_setting",
        action="append",
        default=[],
        metavar="KILN_NAME=VALUE",
        help="a setting of kiln-infer or kiln-train (repeatable; the benchmark's own environment is not passed)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--logs", type=Path, help="copy kiln-infer's and kiln-train's logs into this folder")
    parser.add_argument("--home", type=Path, help="where the converted models are [KILN_HOME or ./.kiln]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the train-while-serving benchmark and print its numbers as JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup = SMALL if args.small else GPU
    setup = Setup(
        args.model or setup.model,
        setup.streams if args.streams is None else args.streams,
        setup.max_tokens,
        setup.examples,
        args.window or setup.window_s,
        setup.load_processes if args.load_processes is None else args.load_processes,
        {**setup.train_env, **(OPEN_GATE if args.open_gate else {}), **_train_settings(args.train_setting)},
    )
    with tempfile.TemporaryDirectory(prefix="kiln-tws-") as tmp:
        home = Path(tmp)
        # absolute: the symlink below lives in a temporary directory, so a relative --home would dangle
        models = (args.home or Path(os.environ.get("KILN_HOME") or REPO / ".kiln")).resolve() / "models"
        if models.is_dir():
            (home / "models").symlink_to(models, target_is_directory=True)
        redis_server = RedisServer(RedisConfig(home=home))
        stack = Stack(setup, home, redis_server.start(), args.device)
        try:
            stack.start("infer", stack.infer_port)
            stack.start("train", stack.train_port)
            result = measure(stack, setup, args.timeout, args.after_preparation)
        finally:
            stack.stop()
            redis_server.stop()
            if args.logs:  # the processes' own logs, e.g. for the round's capture times
                args.logs.mkdir(parents=True, exist_ok=True)
                for log_file in home.glob("*.log"):
                    shutil.copy(log_file, args.logs / log_file.name)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return 0 if result["outcome"] in ("published", "rejected") else 1


if __name__ == "__main__":
    raise SystemExit(main())
