"""TrainingService over real gRPC: status, drops, trigger, pause/resume, waiting for the shared base."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis

from kiln.v1 import training_pb2, training_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.auth import Authenticator
from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.registry import Registry
from kiln_common.samples import SAMPLES_STREAM, Sample, SampleKind
from kiln_train.base_model import SharedBase
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.daemon import TrainingDaemon
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.parent_client import ParentClient
from kiln_train.pipeline import Pipeline
from kiln_train.servicer import TrainingServicer
from kiln_train.settings import TrainSettings
from kiln_train.training_round import RoundRunner


@pytest.fixture
def stub(
    rds: redis.Redis, smollm2: ModelSource, tmp_path: Path
) -> Iterator[training_pb2_grpc.TrainingServiceStub]:
    """A daemon (no kiln-infer running, so no shared base) behind a real gRPC server."""
    tok = load_tokenizer(smollm2)
    settings = TrainSettings(trigger_samples=100, block_ms=50)
    buffer = TrainingBuffer(rds)
    consumer = SampleConsumer(rds, buffer, Pipeline(settings, lambda t: len(tok.encode(t)), buffer), settings)
    references = ReferenceCache(tmp_path, "t", PromptSets.builtin())
    parent = ParentClient("127.0.0.1:1", None)  # never asked: no round runs without a shared base
    runner = RoundRunner(Registry(rds, AdapterStore(tmp_path)), tok, settings, references, parent)
    daemon = TrainingDaemon(consumer, buffer, SharedBase(rds, smollm2.config), runner, settings, tick_s=0.05)
    daemon.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_TrainingServiceServicer_to_server(
        TrainingServicer(daemon, Authenticator(None)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    server.stop(0)
    daemon.stop()


def _status(
    stub: training_pb2_grpc.TrainingServiceStub, adapter: str = ""
) -> training_pb2.GetTrainingStatusResponse:
    return stub.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(adapter=adapter), timeout=5)


def test_status_trigger_pause_resume(stub: training_pb2_grpc.TrainingServiceStub, rds: redis.Redis) -> None:
    assert _status(stub).state == training_pb2.TRAINER_STATE_WAITING_FOR_BASE  # no kiln-infer heartbeat
    nothing = stub.TriggerTraining(training_pb2.TriggerTrainingRequest(adapter="kb"), timeout=5)
    assert not nothing.queued and "no buffered samples" in nothing.reason
    for i, completion in enumerate(["Quill Marsh founded Orlet.", "", "Quill Marsh founded Orlet."]):
        s = Sample(
            kind=SampleKind.EXAMPLE,
            tenant="default",
            adapter="kb",
            messages=(("user", f"Who founded Orlet? ({i % 2})"),),
            completion=completion,
        )
        rds.xadd(SAMPLES_STREAM, s.to_fields())
    deadline = time.monotonic() + 10
    while _status(stub).consumed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status = _status(stub, "kb")
    assert [(b.adapter, b.pending_samples) for b in status.buffers] == [("kb", 1)]
    assert dict(status.dropped) == {"empty_completion": 1, "duplicate": 1}
    stub.PauseTraining(training_pb2.PauseTrainingRequest(), timeout=5)
    assert _status(stub).state == training_pb2.TRAINER_STATE_PAUSED
    queued = stub.TriggerTraining(training_pb2.TriggerTrainingRequest(adapter="kb"), timeout=5)
    assert queued.queued and "paused" in queued.reason
    stub.ResumeTraining(training_pb2.ResumeTrainingRequest(), timeout=5)
    assert _status(stub).state == training_pb2.TRAINER_STATE_WAITING_FOR_BASE
    with pytest.raises(grpc.RpcError) as err:
        stub.TriggerTraining(training_pb2.TriggerTrainingRequest(adapter="../etc"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
