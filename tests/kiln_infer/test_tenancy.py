"""Tenants and roles over real gRPC: another tenant's adapter looks exactly like a missing one, server paths
are an admin's and only under the import root, and a refused upload changes nothing anyone is served."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.v1 import adapter_pb2 as apb
from kiln.v1 import adapter_pb2_grpc
from kiln.v1 import inference_pb2 as pb
from kiln_common.auth import Authenticator, hash_key, parse_key_file
from kiln_infer.adapter_servicer import AdapterServicer
from kiln_infer.server import InferServer
from kiln_infer.swapper import AdapterView
from tests.kiln_infer.conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, Client, upload

GREEDY = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def _tokens(client: Client, adapter: str, prompt: str = "The capital of France is") -> list[int]:
    request = pb.GenerateRequest(prompt=prompt, adapter=adapter, sampling=GREEDY)
    return [
        t
        for r in client.inference.Generate(request, metadata=client.metadata, timeout=60)
        for t in r.token_ids
    ]


@pytest.fixture(scope="module")
def secret(alice: Client, peft_adapter: Path) -> str:
    """An adapter of alice's, serving v1."""
    name = f"secret-{uuid.uuid4().hex[:6]}"
    upload(alice, name, peft_adapter, promote=True)
    return name


def _calls(client: Client, name: str) -> dict[str, Callable[[], Any]]:
    md, a = client.metadata, client.adapters
    return {
        "generate": lambda: _tokens(client, name),
        "versions": lambda: a.ListVersions(apb.ListVersionsRequest(adapter=name), metadata=md),
        "promote": lambda: a.Promote(apb.PromoteRequest(adapter=name, version=1), metadata=md),
        "rollback": lambda: a.Rollback(apb.RollbackRequest(adapter=name), metadata=md),
        "split": lambda: a.SetTrafficSplit(
            apb.SetTrafficSplitRequest(adapter=name, shares=[apb.TrafficShare(version=1, weight=1.0)]),
            metadata=md,
        ),
        "canary": lambda: a.StartCanary(apb.StartCanaryRequest(adapter=name, version=1), metadata=md),
        "sampling": lambda: a.SetSamplingPolicy(
            apb.SetSamplingPolicyRequest(adapter=name, sample_rate=0.5), metadata=md
        ),
        "watch": lambda: next(
            iter(a.WatchEvents(apb.WatchEventsRequest(adapter=name), metadata=md, timeout=10))
        ),
    }


def test_cross_tenant_calls_fail_exactly_as_for_a_missing_adapter(
    alice: Client, bob: Client, secret: str
) -> None:
    missing = f"nothing-{uuid.uuid4().hex[:6]}"
    theirs, absent = _calls(bob, secret), _calls(bob, missing)
    for rpc in theirs:
        code, details = _code(theirs[rpc])
        assert (code, details.replace(secret, "X")) == (
            (c := _code(absent[rpc]))[0],
            c[1].replace(missing, "X"),
        ), rpc
        assert code == grpc.StatusCode.NOT_FOUND, rpc
    listed = bob.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=bob.metadata).adapters
    assert secret not in {x.name for x in listed}
    # feedback on alice's request id is unknown to bob
    stream = alice.inference.Generate(
        pb.GenerateRequest(prompt="Hi", adapter=secret, sampling=GREEDY), metadata=alice.metadata, timeout=60
    )
    request_id = [r.request_id for r in stream][-1]
    feedback = pb.SubmitFeedbackRequest(request_id=request_id, rating=1.0)
    code, _ = _code(lambda: bob.inference.SubmitFeedback(feedback, metadata=bob.metadata))
    assert code == grpc.StatusCode.NOT_FOUND
    # alice's alias is untouched by all of it
    assert alice.adapters.ListVersions(
        apb.ListVersionsRequest(adapter=secret), metadata=alice.metadata
    ).versions


def test_path_import_is_admin_only(
    bob: Client, admin: Client, alice: Client, secret: str, infer_server: InferServer
) -> None:
    theirs = str(infer_server.config.home / "adapters" / "alice" / secret / "v1")
    request = apb.PublishVersionRequest(adapter="stolen", path=theirs)
    code, details = _code(lambda: bob.adapters.PublishVersion(request, metadata=bob.metadata))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, details = _code(lambda: admin.adapters.PublishVersion(request, metadata=admin.metadata))
    assert (
        code == grpc.StatusCode.PERMISSION_DENIED and "--import-root" in details
    )  # the session server has none


@pytest.fixture(scope="module")
def import_server(
    infer_server: InferServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """An AdapterService with an import root, over the session server's registry and engine."""
    root = tmp_path_factory.mktemp("import-root").resolve()
    swapper = infer_server._parts.swapper  # type: ignore[union-attr]
    keys = parse_key_file(f"{ALICE_KEY} alice\n{BOB_KEY} bob\n{hash_key(ADMIN_KEY)} ops admin\n")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = AdapterServicer(
        registry=swapper.view.registry,
        swapper=swapper,
        auth=Authenticator(keys),
        stopping=threading.Event(),
        import_root=root,
    )
    adapter_pb2_grpc.add_AdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield root, f"127.0.0.1:{port}"
    server.stop(0)


def test_import_only_under_the_root(
    import_server: tuple[Path, str], peft_adapter: Path, tmp_path: Path
) -> None:
    root, address = import_server
    shutil.copytree(peft_adapter, root / "good")
    (root / "linked").symlink_to(peft_adapter)
    admin_md = [("authorization", f"Bearer {ADMIN_KEY}"), ("x-kiln-tenant", "alice")]
    name = f"imported-{uuid.uuid4().hex[:6]}"
    with grpc.insecure_channel(address) as channel:
        stub = adapter_pb2_grpc.AdapterServiceStub(channel)

        def publish(path: str) -> Any:
            return stub.PublishVersion(apb.PublishVersionRequest(adapter=name, path=path), metadata=admin_md)

        assert publish("good").version == 1  # relative to the root
        assert publish(str(root / "good")).version == 2
        outside = [str(peft_adapter), str(tmp_path / "does-not-exist"), "../../etc", "/etc/passwd"]
        answers = {_code(lambda p=p: publish(p)) for p in outside}  # type: ignore[misc]
        assert answers == {
            (grpc.StatusCode.PERMISSION_DENIED, "path must lie under the server's import root")
        }
        code, details = _code(lambda: publish("linked"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "symlink" in details
        bob_md = [("authorization", f"Bearer {BOB_KEY}")]
        request = apb.PublishVersionRequest(adapter=name, path="good")
        assert (
            _code(lambda: stub.PublishVersion(request, metadata=bob_md))[0]
            == grpc.StatusCode.PERMISSION_DENIED
        )


def _poison(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    change(tensors)
    os.chmod(path / "adapter_model.safetensors", 0o644)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _first(t: dict[str, torch.Tensor], side: str) -> str:
    return sorted(k for k in t if f"lora_{side}" in k)[0]


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[_first(t, "B")].fill_(float("nan"))


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[_first(t, "A")][0, 0] = float("inf")


def _wide(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "A")
    t[key] = torch.zeros(t[key].shape[0], 100)


def _layer(t: dict[str, torch.Tensor]) -> None:
    key = _first(t, "A")
    t[key.replace("layers.0.", "layers.99.")] = t.pop(key)
    other = key.replace("lora_A", "lora_B")
    t[other.replace("layers.0.", "layers.99.")] = t.pop(other)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_nan, "holds NaN or infinite"),
        (_inf, "holds NaN or infinite"),
        (_wide, "shape"),  # named by the store's check against the base model's shapes
        (_layer, "layer 99"),
    ],
    ids=["nan", "inf", "wrong-shape", "layer"],
)
def test_refused_upload_changes_nothing_served(
    alice: Client,
    secret: str,
    peft_adapter: Path,
    tmp_path: Path,
    change: Callable[[dict[str, torch.Tensor]], None],
    message: str,
) -> None:
    before = _tokens(alice, secret), _tokens(alice, "")
    bad = _poison(Path(shutil.copytree(peft_adapter, tmp_path / "bad")), change)
    code, details = _code(lambda: upload(alice, secret, bad, promote=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert str(tmp_path) not in details and ".staging" not in details  # no server paths in answers
    versions = alice.adapters.ListVersions(apb.ListVersionsRequest(adapter=secret), metadata=alice.metadata)
    assert [v.version for v in versions.versions] == [1]  # no number taken
    assert (_tokens(alice, secret), _tokens(alice, "")) == before


def test_split_weights_must_be_finite(alice: Client, secret: str) -> None:
    shares = [apb.TrafficShare(version=1, weight=float("inf")), apb.TrafficShare(version=0, weight=1.0)]
    request = apb.SetTrafficSplitRequest(adapter=secret, shares=shares)
    code, details = _code(lambda: alice.adapters.SetTrafficSplit(request, metadata=alice.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in details


def test_split_is_sticky_per_key_and_the_same_on_every_replica(
    alice: Client, secret: str, infer_server: InferServer
) -> None:
    shares = [apb.TrafficShare(version=1, weight=9.0), apb.TrafficShare(version=0, weight=1.0)]
    alice.adapters.SetTrafficSplit(
        apb.SetTrafficSplitRequest(adapter=secret, shares=shares), metadata=alice.metadata
    )
    registry = infer_server._parts.swapper.view.registry  # type: ignore[union-attr]
    replicas = [AdapterView(registry, seed=1), AdapterView(registry, seed=2)]
    picks = [
        [view.resolve("alice", secret, f"user-{i}")[0].version for i in range(1000)] for view in replicas
    ]  # type: ignore[union-attr]
    assert picks[0] == picks[1]  # deterministic across replicas
    assert picks[0] == [replicas[0].resolve("alice", secret, f"user-{i}")[0].version for i in range(1000)]  # type: ignore[union-attr]
    share = picks[0].count(0) / 1000  # binomial(1000, 0.1): sd ~ 0.0095; 4 sd either side
    assert 0.062 < share < 0.138
    alice.adapters.Promote(apb.PromoteRequest(adapter=secret, version=1), metadata=alice.metadata)
