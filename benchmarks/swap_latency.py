"""Time from a version becoming the default to its first token, cold (publish and promote in one call, as
rounds did before issue 13) against staged (published unpromoted, asked pinned as the gate does, then promoted).

A real kiln-infer (its engine core process, the real model) over a real valkey-server. The clock starts when the
registry call returns (where a round's record is finished). `flip_s`: until kiln-infer's LOADED event says its
view serves the new version (a cold one is loaded from disk first); `first_ttft_s`: the first request on the
new version after that (a cold one is copied into a device slot on it), against `old_ttft_s` on the old one just
before; `total_s` = flip + first TTFT, what a request arriving at the flip sees. Prints JSON, medians first.

    .venv/bin/python -m benchmarks.swap_latency --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
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
from kiln_common.registry import EventType, Registry
from kiln_infer.lora.random_adapter import write_random_adapter
from kiln_infer.server import InferServer

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
ADAPTER = "swap"


def _ttft(stub: inference_pb2_grpc.InferenceServiceStub, adapter: str) -> tuple[float, str]:
    """One one-token request: its time to first token and the version that served it."""
    req = inference_pb2.GenerateRequest(
        adapter=adapter, prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0)
    )
    sent = time.monotonic()
    for r in stub.Generate(req, timeout=60):
        if r.token_ids:
            return time.monotonic() - sent, r.adapter_version
    raise RuntimeError("no token")


def one_swap(
    address: str, registry: Registry, version: int, make_default: Callable[[], object]
) -> dict[str, float]:
    """From `make_default` returning: until kiln-infer announces it serves `version` (its LOADED event, sent
    once the view flipped), and the time to first token of the first request on it after that, against one on
    the old version just before."""
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    old_ttft, _ = _ttft(stub, ADAPTER)
    last = registry.last_event_id()
    make_default()
    t0 = time.monotonic()
    flip = 0.0
    while not flip and time.monotonic() - t0 < 60:
        events, last = registry.read_events(last, block_ms=1000)
        if any(e.type == EventType.LOADED and e.version == version for e in events):
            flip = time.monotonic() - t0
    new_ttft, served = _ttft(stub, ADAPTER)
    assert served == f"{ADAPTER}@v{version}", served
    return {"flip_s": flip, "first_ttft_s": new_ttft, "old_ttft_s": old_ttft, "total_s": flip + new_ttft}


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
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "staged": []}
    config = resolve_model(server.config.model, server.config.home).config
    registry.create("default", ADAPTER)
    for i in range(2 * repeats):
        src = write_random_adapter(adapters / f"a{i}", config, rank=16, seed=i)
        if i % 2 == 0:
            version = registry.get("default", ADAPTER).latest + 1
            runs["cold"].append(one_swap(address, registry, version, partial(_publish, registry, src, True)))
        else:
            version = _publish(registry, src, False)
            pinned_once(address, version)
            runs["staged"].append(one_swap(address, registry, version, partial(_promote, registry, version)))
    medians = {
        f"{kind}_{key}_median": statistics.median(r[key] for r in rs)
        for kind, rs in runs.items()
        for key in rs[0]
    }
    return {**medians, "runs": runs}


def _publish(registry: Registry, src: Path, promote: bool) -> int:
    return registry.publish("default", ADAPTER, src, promote=promote).version


def _promote(registry: Registry, version: int) -> None:
    registry.promote("default", ADAPTER, version)


def main(argv: Sequence[str] | None = None) -> int:
    """Start Redis and kiln-infer in a fresh home (models from --models-home), measure, print JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models-home", type=Path, default=REPO / ".kiln", help="a KILN_HOME with models/")
    p.add_argument("--model", default="smollm2", help="smollm2, an HF directory, or dummy:<shape>")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-swap-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(args.models_home.resolve() / "models", target_is_directory=True)
        redis_server = RedisServer(RedisConfig(home=home / "redis"))
        url = redis_server.start()
        config = InferConfig(
            home=home, redis=RedisConfig(home=home, url=url), port=0, model=args.model, device=args.device
        )
        server = InferServer(config)
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
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
