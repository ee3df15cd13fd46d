"""Two kiln-infer replicas against one Redis: a promote or rollback made on one reaches the other within 1 s,
and keyed traffic splits pick the same version for a key on both."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kiln.v1 import adapter_pb2 as apb
from kiln.v1 import inference_pb2 as pb
from kiln_common.config import InferConfig, RedisConfig
from kiln_common.model_loader import ModelSource
from kiln_infer.server import InferServer
from kiln_infer.swapper import AdapterView
from tests.conftest import make_peft_adapter
from tests.kiln_infer.conftest import Client, _client, upload

GREEDY = pb.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


@pytest.fixture(scope="module")
def replica(
    infer_server: InferServer, redis_url: str, kiln_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InferServer]:
    """A second kiln-infer on the session's Redis; its adapter store is the same directory (shared mount)."""
    home = tmp_path_factory.mktemp("replica-home")
    (home / "adapters").symlink_to(kiln_home / "adapters", target_is_directory=True)
    config = InferConfig(
        home=home,
        redis=RedisConfig(home=home, url=redis_url),
        port=0,
        api_keys_file=infer_server.config.api_keys_file,
        drain_timeout_s=5.0,
        warmup=False,
    )
    server = InferServer(config)
    server.start()
    server.start_warm_up()
    assert server.serving.wait(120)
    yield server
    server.drain()


def _label(client: Client, name: str) -> str:
    request = pb.GenerateRequest(prompt="Hi", adapter=name, sampling=GREEDY)
    return [
        r.adapter_version for r in client.inference.Generate(request, metadata=client.metadata, timeout=60)
    ][-1]


def _reaches(client: Client, name: str, label: str, within_s: float = 1.0) -> float:
    """Seconds until `client`'s replica serves `label` for `name`; fails past `within_s`."""
    started = time.monotonic()
    while _label(client, name) != label:
        assert time.monotonic() - started < within_s, f"{label} did not reach the replica in {within_s}s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_promote_and_rollback_reach_both_replicas(
    alice: Client, infer_server: InferServer, replica: InferServer, smollm2: ModelSource, tmp_path: Path
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        other = _client(channel, "alice-key-0123456789")
        name = f"replicated-{uuid.uuid4().hex[:6]}"
        for i in (1, 2):
            upload(alice, name, make_peft_adapter(smollm2, tmp_path / f"v{i}", seed=20 + i))
        md = alice.metadata
        for step in (
            lambda: alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=1), metadata=md),
            lambda: alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=md),
            lambda: alice.adapters.Rollback(apb.RollbackRequest(adapter=name), metadata=md),
        ):
            current = step().current_version
            assert _label(alice, name) == f"{name}@v{current}"  # the replica that made the change: at once
            _reaches(other, name, f"{name}@v{current}")
        # the other way round: a change made on the replica reaches the session server
        other.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=other.metadata)
        _reaches(alice, name, f"{name}@v2")
        # a keyed split picks the same version for each key on both replicas
        shares = [apb.TrafficShare(version=1, weight=9.0), apb.TrafficShare(version=2, weight=1.0)]
        other.adapters.SetTrafficSplit(
            apb.SetTrafficSplitRequest(adapter=name, shares=shares), metadata=other.metadata
        )
        views = [s._parts.swapper.view for s in (infer_server, replica)]  # type: ignore[union-attr]
        deadline = time.monotonic() + 1.0
        while not all(view.state("alice", name).split for view in views):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        picks = [[_pick(view, name, f"user-{i}") for i in range(1000)] for view in views]
        assert (
            picks[0] == picks[1] and 0.062 < picks[0].count(2) / 1000 < 0.138
        )  # 4 sd of binomial(1000, 0.1)


def _pick(view: AdapterView, name: str, sticky_key: str) -> int:
    resolved, _ = view.resolve("alice", name, sticky_key)
    assert resolved is not None
    return resolved.version
