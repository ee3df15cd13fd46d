"""Soak and stream-count checks against a real kiln-infer process: resident memory under steady load.

    python -m benchmarks.soak --minutes 30 --sample-every 60 --concurrency 4 --watchers 2000

Starts its own valkey-server and kiln-infer (KILN_MODEL, default dummy:tiny) in a temporary KILN_HOME whose
models/ links to the checkout's conversion cache, opens `--watchers` idle WatchEvents streams, then runs
`--concurrency` clients generating back to back for `--minutes`, sampling kiln-infer's RSS and the health
latency every `--sample-every` seconds. Prints one line per sample and a JSON summary (also to --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_common.config import RedisConfig, default_home
from kiln_common.redis_server import RedisServer

log = logging.getLogger("soak")
REPO = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    """Resident set size of a process and all its descendants (kiln-infer is a process tree), KiB."""
    total, pending = 0, [pid]
    while pending:
        p = pending.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            pending += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return total


def health_latency_s(channel: grpc.Channel) -> float:
    """Seconds a health check takes (inf when it fails)."""
    started = time.monotonic()
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError:
        return float("inf")
    return time.monotonic() - started


def client_loop(
    channel: grpc.Channel, stop: threading.Event, outcomes: Counter[str], lock: threading.Lock
) -> None:
    """Generate back to back until stopped, counting outcomes (OK or the status code name)."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    sampling = inference_pb2.SamplingParams(max_tokens=32, temperature=0.7, seed=1)
    while not stop.is_set():
        try:
            list(
                stub.Generate(
                    inference_pb2.GenerateRequest(prompt="Tell me a story", sampling=sampling), timeout=60
                )
            )
            outcome = "OK"
        except grpc.RpcError as exc:
            outcome = exc.code().name  # type: ignore[attr-defined]
        with lock:
            outcomes[outcome] += 1


def start_infer(home: Path, url: str, port: int, model: str) -> subprocess.Popen[bytes]:
    """kiln-infer as a child process, logging into home/kiln-infer.log."""
    env = {
        **os.environ,
        "KILN_HOME": str(home),
        "KILN_REDIS_URL": url,
        "KILN_PORT": str(port),
        "KILN_MODEL": model,
    }
    with (home / "kiln-infer.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kiln_infer"], cwd=REPO, env=env, stdout=out, stderr=out
        )


def wait_serving(channel: grpc.Channel, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    """Block until health answers SERVING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if health_latency_s(channel) != float("inf"):
            return
        time.sleep(0.5)
    raise SystemExit("kiln-infer did not become SERVING (see kiln-infer.log)")


def soak(args: argparse.Namespace, channel: grpc.Channel, pid: int) -> dict[str, object]:
    """Watchers, then steady load with samples; the summary."""
    watches = [
        adapter_pb2_grpc.AdapterServiceStub(channel).WatchEvents(adapter_pb2.WatchEventsRequest())
        for _ in range(args.watchers)
    ]
    time.sleep(1.0)
    outcomes: Counter[str] = Counter()
    lock, stop = threading.Lock(), threading.Event()
    clients = [
        threading.Thread(target=client_loop, args=(channel, stop, outcomes, lock), daemon=True)
        for _ in range(args.concurrency)
    ]
    for c in clients:
        c.start()
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < args.minutes * 60:
        time.sleep(args.sample_every)
        with lock:
            done = dict(outcomes)
        sample = {
            "t_s": round(time.monotonic() - started),
            "rss_kib": rss_kib(pid),
            "health_s": round(health_latency_s(channel), 4),
            "outcomes": done,
        }
        samples.append(sample)
        log.info("%s", json.dumps(sample))
    stop.set()
    for c in clients:
        c.join(90)
    for w in watches:
        w.cancel()
    rss = [int(s["rss_kib"]) for s in samples]  # type: ignore[call-overload]
    steady = rss[1:] or rss  # the first sample includes warm-up growth
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "watchers": args.watchers,
        "model": args.model,
        "outcomes": dict(outcomes),
        "rss_kib": rss,
        "rss_spread_after_first_sample": (max(steady) - min(steady)) / min(steady) if steady else 0.0,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print/write its summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--sample-every", type=float, default=60.0, help="seconds between RSS samples [60]")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--watchers", type=int, default=0, help="idle WatchEvents streams held open [0]")
    p.add_argument("--model", default=os.environ.get("KILN_MODEL", "dummy:tiny"))
    p.add_argument("--port", type=int, default=50071)
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cache = default_home(os.environ)
    with tempfile.TemporaryDirectory(prefix="kiln-soak-") as tmp:
        home = Path(tmp)
        (cache / "models").mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(cache / "models", target_is_directory=True)
        redis_server = RedisServer(RedisConfig(home=home))
        proc = start_infer(home, redis_server.start(), args.port, args.model)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{args.port}") as channel:
                wait_serving(channel, proc)
                summary = soak(args, channel, proc.pid)
        finally:
            proc.terminate()
            proc.wait(120)
            redis_server.stop()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
