"""StartCanary over gRPC: the canary shows in listings, a worse candidate is rolled back by its ratings with
the reason in the version's history and the event, and the server's view follows."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from kiln.v1 import adapter_pb2 as apb
from kiln_common.canary import Canaries
from kiln_common.model_loader import ModelSource
from kiln_common.registry import EventType
from kiln_infer.server import InferServer
from tests.conftest import make_peft_adapter
from tests.kiln_infer.conftest import Client, upload


def test_worse_canary_is_rolled_back_over_grpc(
    alice: Client, bob: Client, infer_server: InferServer, smollm2: ModelSource, tmp_path: Path
) -> None:
    name = f"canary-{uuid.uuid4().hex[:6]}"
    upload(alice, name, make_peft_adapter(smollm2, tmp_path / "v1", seed=41), promote=True)
    upload(alice, name, make_peft_adapter(smollm2, tmp_path / "v2", seed=42))
    md = alice.metadata
    with pytest.raises(grpc.RpcError) as err:
        bob.adapters.StartCanary(apb.StartCanaryRequest(adapter=name, version=2), metadata=bob.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    canary = alice.adapters.StartCanary(
        apb.StartCanaryRequest(adapter=name, version=2, share=0.25, min_requests=4), metadata=md
    ).canary
    assert (canary.version, canary.baseline_version, canary.min_requests) == (2, 1, 4)
    listed = {a.name: a for a in alice.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md).adapters}
    assert listed[name].canary.version == 2 and {s.version for s in listed[name].split} == {1, 2}
    registry = infer_server._parts.swapper.view.registry  # type: ignore[union-attr]
    last = registry.last_event_id()
    # ratings as SubmitFeedback records them (its hook: Canaries.record(tenant, adapter, version, rating))
    canaries = Canaries(registry)
    for _ in range(3):
        canaries.record("alice", name, 1, 0.8)
    for _ in range(4):
        canaries.record("alice", name, 2, -1.0)
    events, _ = registry.read_events(last, block_ms=0, count=1000)
    rolled = [e for e in events if e.adapter == name and e.type == EventType.ROLLED_BACK]
    assert rolled[0].version == 1 and "canary worse than the current version" in rolled[0].detail
    deadline = time.monotonic() + 1.0
    while infer_server._parts.swapper.view.state("alice", name).split:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    versions = alice.adapters.ListVersions(apb.ListVersionsRequest(adapter=name), metadata=md).versions
    notes = [(n.action, n.reason) for n in versions[1].history]
    assert [a for a, _ in notes] == ["canary", "rolled_back"] and "-1.000 over 4" in notes[-1][1]
    info = {a.name: a for a in alice.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md).adapters}
    assert info[name].current_version == 1 and not info[name].HasField("canary")
