"""Time from a version becoming the default to its first token, cold (publish and promote in one call, as
rounds did before issue 13) against staged (published unpromoted, asked pinned as the gate does, then promoted).

A real kiln-infer (its engine core process, the real model) over a real valkey-server; a probe streams one-token
requests to the bare adapter name back to back and notes when the first one is served by the new version. The
clock starts when the registry call returns (where a round's record is finished); the number includes the time
to first token of the request that brings the new version (on a CPU most of it: ~70 ms for a one-token
request) and the wait for the probe's request in flight. Prints JSON with each run and the medians.

    .venv/bin/python -m benchmarks.swap_latency --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.config import InferConfig, RedisConfig
from kiln_common.model_loader import resolve_model
from kiln_common.redis_server import RedisServer, connect
from kiln_common.registry import Registry
from kiln_infer.lora.random_adapter import write_random_adapter
from kiln_infer.server import InferServer

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
ADAPTER = "swap"


class Probe(threading.Thread):
    """One-token requests to the bare adapter name, back to back, until one is served by `want`."""

    def __init__(self, address: str, want: str) -> None:
        super().__init__(daemon=True)
        self.stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
        self.want = want
        self.first_token = 0.0  # time.monotonic() of the wanted version's first token
        self.ttft = 0.0  # that request's own time to first token (what the swap cannot make shorter)
        self.stop = threading.Event()

    def run(self) -> None:
        req = inference_pb2.GenerateRequest(
            adapter=ADAPTER,
            prompt="Hello",
            sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0),
        )
        while not self.stop.is_set() and not self.first_token:
            sent = time.monotonic()
            for r in self.stub.Generate(req, timeout=60):
                if r.token_ids and r.adapter_version == self.want:
                    self.first_token = time.monotonic()
                    self.ttft = self.first_token - sent


def one_swap(address: str, version: int, make_default: Callable[[], object]) -> tuple[float, float]:
    """Seconds from `make_default` returning to the first token of `version` on default traffic, and the
    time to first token of the request that brought it."""
    probe = Probe(address, f"{ADAPTER}@v{version}")
    probe.start()
    time.sleep(0.3)  # the probe is streaming the old version
    make_default()
    t0 = time.monotonic()
    probe.join(60)
    probe.stop.set()
    if not probe.first_token:
        raise TimeoutError(f"{ADAPTER}@v{version} never served")
    return probe.first_token - t0, probe.ttft


def pinned_once(address: str, version: int) -> None:
    """What the gate does to a staged version: ask it pinned (here one short request)."""
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    req = inference_pb2.GenerateRequest(
        adapter=f"{ADAPTER}@v{version}", prompt="Hi", sampling=inference_pb2.SamplingParams(max_tokens=2)
    )
    list(stub.Generate(req, timeout=60))


def measure(server: InferServer, registry: Registry, adapters: Path, repeats: int) -> dict[str, object]:
    """Alternate cold and staged swaps, `repeats` of each."""
    address = f"127.0.0.1:{server.port}"
    cold: list[tuple[float, float]] = []
    staged: list[tuple[float, float]] = []
    config = resolve_model("smollm2", server.config.home).config
    registry.create("default", ADAPTER)
    for i in range(2 * repeats):
        src = write_random_adapter(adapters / f"a{i}", config, rank=16, seed=i)
        if i % 2 == 0:
            version = registry.versions("default", ADAPTER)[-1].version + 1 if i else 1
            cold.append(one_swap(address, version, partial(_publish, registry, src, True)))
        else:
            version = _publish(registry, src, False)
            pinned_once(address, version)
            staged.append(one_swap(address, version, partial(_promote, registry, version)))
    cold_s, staged_s = [c for c, _ in cold], [s for s, _ in staged]
    return {
        "cold_publish_to_first_token_s": cold_s,
        "staged_promote_to_first_token_s": staged_s,
        "cold_median_s": statistics.median(cold_s),
        "staged_median_s": statistics.median(staged_s),
        "ratio_cold_over_staged": statistics.median(cold_s) / max(statistics.median(staged_s), 1e-9),
        "cold_ttft_median_s": statistics.median(t for _, t in cold),
        "staged_ttft_median_s": statistics.median(t for _, t in staged),
    }


def _publish(registry: Registry, src: Path, promote: bool) -> int:
    return registry.publish("default", ADAPTER, src, promote=promote).version


def _promote(registry: Registry, version: int) -> None:
    registry.promote("default", ADAPTER, version)


def main(argv: Sequence[str] | None = None) -> int:
    """Start Redis and kiln-infer in a fresh home (models from --models-home), measure, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models-home", type=Path, default=REPO / ".kiln", help="a KILN_HOME with models/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-swap-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(args.models_home.resolve() / "models", target_is_directory=True)
        redis_server = RedisServer(RedisConfig(home=home / "redis"))
        url = redis_server.start()
        server = InferServer(InferConfig(home=home, redis=RedisConfig(home=home, url=url), port=0))
        server.start()
        server.start_warm_up()
        try:
            assert server.serving.wait(300), "kiln-infer did not warm up"
            registry = Registry(connect(url), AdapterStore(home))
            result = measure(server, registry, home / "src", args.repeats)
        finally:
            server.drain()
            redis_server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
