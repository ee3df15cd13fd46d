"""TrainingService per tenant over gRPC: a pause is the tenant's own; global state and control are admin's."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis

from kiln.v1 import training_pb2 as tpb
from kiln.v1 import training_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.auth import Authenticator, parse_key_file
from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.registry import Registry
from kiln_train.base_model import SharedBase
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.daemon import TrainingDaemon
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.parent_client import ParentClient
from kiln_train.pipeline import Pipeline
from kiln_train.servicer import TrainingServicer
from kiln_train.settings import TrainSettings
from kiln_train.tenant_pauses import TenantPauses
from kiln_train.training_round import RoundRunner

KEYS = "alice-key-0123456789 alice\nbob-key-9876543210 bob\nops-key-0123456789 ops admin\n"


def md(key: str, act_as: str = "") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] + ([("x-kiln-tenant", act_as)] if act_as else [])


ALICE, BOB, ADMIN = md("alice-key-0123456789"), md("bob-key-9876543210"), md("ops-key-0123456789")


@pytest.fixture
def stub(
    rds: redis.Redis, smollm2: ModelSource, tmp_path: Path
) -> Iterator[training_pb2_grpc.TrainingServiceStub]:
    """A daemon behind a real gRPC server with three keys: alice, bob (tenants) and ops (admin)."""
    tok = load_tokenizer(smollm2)
    settings = TrainSettings(trigger_samples=100, block_ms=50)
    buffer = TrainingBuffer(rds)
    consumer = SampleConsumer(rds, buffer, Pipeline(settings, lambda t: len(tok.encode(t)), buffer), settings)
    references = ReferenceCache(tmp_path, "t", PromptSets.builtin())
    parent = ParentClient("127.0.0.1:1", None)  # never asked: no round runs without a shared base
    runner = RoundRunner(Registry(rds, AdapterStore(tmp_path)), tok, settings, references, parent)
    daemon = TrainingDaemon(consumer, buffer, SharedBase(rds, smollm2.config), runner, settings, tick_s=0.05)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = TrainingServicer(daemon, Authenticator(parse_key_file(KEYS)))
    training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    server.stop(0)


def _status(
    stub: training_pb2_grpc.TrainingServiceStub, metadata: list[tuple[str, str]]
) -> tpb.GetTrainingStatusResponse:
    return stub.GetTrainingStatus(tpb.GetTrainingStatusRequest(), metadata=metadata, timeout=5)


def test_pause_is_per_tenant(stub: training_pb2_grpc.TrainingServiceStub, rds: redis.Redis) -> None:
    stub.PauseTraining(tpb.PauseTrainingRequest(), metadata=BOB, timeout=5)
    bob, alice = _status(stub, BOB), _status(stub, ALICE)
    assert (bob.tenant, bob.tenant_paused, bob.state) == ("bob", True, tpb.TRAINER_STATE_PAUSED)
    assert (alice.tenant, alice.tenant_paused) == ("alice", False) and alice.state != tpb.TRAINER_STATE_PAUSED
    assert TenantPauses(rds).is_paused("bob") and not TenantPauses(rds).is_paused("alice")
    stub.ResumeTraining(tpb.ResumeTrainingRequest(), metadata=BOB, timeout=5)
    assert not _status(stub, BOB).tenant_paused
    # an admin acting for alice pauses alice only
    stub.PauseTraining(tpb.PauseTrainingRequest(), metadata=md("ops-key-0123456789", "alice"), timeout=5)
    assert _status(stub, ALICE).tenant_paused and not _status(stub, BOB).tenant_paused


def test_global_state_and_control_are_admin_only(stub: training_pb2_grpc.TrainingServiceStub) -> None:
    for call in (
        lambda m: stub.PauseTraining(tpb.PauseTrainingRequest(all_tenants=True), metadata=m, timeout=5),
        lambda m: stub.ResumeTraining(tpb.ResumeTrainingRequest(all_tenants=True), metadata=m, timeout=5),
        lambda m: stub.GetTrainingStatus(
            tpb.GetTrainingStatusRequest(all_tenants=True), metadata=m, timeout=5
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(BOB)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stub.PauseTraining(tpb.PauseTrainingRequest(all_tenants=True), metadata=ADMIN, timeout=5)
    everyone = stub.GetTrainingStatus(
        tpb.GetTrainingStatusRequest(all_tenants=True), metadata=ADMIN, timeout=5
    )
    assert everyone.globally_paused and everyone.state == tpb.TRAINER_STATE_PAUSED
    assert _status(stub, BOB).globally_paused  # tenants see that everything is paused, not the counters
    assert not _status(stub, BOB).dropped and _status(stub, BOB).consumed == 0
    stub.ResumeTraining(tpb.ResumeTrainingRequest(all_tenants=True), metadata=ADMIN, timeout=5)
    assert not _status(stub, ADMIN).globally_paused
