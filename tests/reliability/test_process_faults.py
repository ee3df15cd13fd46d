"""kill -9 of kiln-infer and kiln-train mid-work, SIGTERM under load, 500 cancels: what each fault costs."""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.redis_server import connect
from kiln_common.samples import SAMPLES_STREAM, Sample
from tests.reliability.conftest import Service, Stack, generate, publish_random_adapter, start_pair, wait_for


def _distinct_samples(url: str) -> set[str]:
    client = connect(url)
    try:
        return {Sample.from_fields(f).sample_id for _, f in client.xrange(SAMPLES_STREAM)}
    finally:
        client.close()


def _consumed(url: str) -> int:
    client = connect(url)
    try:
        return int(client.hget("kiln:train:stats", "consumed") or 0)
    finally:
        client.close()


def _exactly_once(url: str, timeout_s: float = 60.0) -> None:
    """Every sample on the stream consumed by kiln-train, none twice (consumed counts first sightings).

    Both sides are read again each time: the recorder may still be writing the last samples (a spool replay
    after a restart, a flush behind a busy CPU), so the stream's ids are not fixed when this starts.
    """
    assert wait_for(lambda: _consumed(url) == len(_distinct_samples(url)), timeout_s), (
        len(_distinct_samples(url)),
        _consumed(url),
    )
    time.sleep(1.5)  # a sample counted twice would now push consumed past the stream's distinct ids
    assert _consumed(url) == len(_distinct_samples(url))


def _long_streams(channel: grpc.Channel, n: int, results: list[str]) -> list[threading.Thread]:
    """n streams of 400 tokens in threads; each appends its outcome (finish reason or status name)."""

    def one(i: int) -> None:
        try:
            last = generate(channel, f"long {i}", adapter="rel", max_tokens=400, timeout_s=120)
            results.append(inference_pb2.FinishReason.Name(last.finish_reason))
        except grpc.RpcError as exc:
            results.append(exc.code().name)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_kill9_of_kiln_infer_mid_stream(stack: Stack) -> None:
    """Promise: streams cut by kill -9 end with UNAVAILABLE (never hang); a restart on the same port serves
    again; samples recorded before the kill reach kiln-train exactly once. Measures time to SERVING."""
    infer, _train = start_pair(stack)
    url = stack.env["KILN_REDIS_URL"]
    with grpc.insecure_channel(infer.address) as channel:
        publish_random_adapter(stack, channel)
        for i in range(4):
            generate(channel, f"before {i}", adapter="rel")
        results: list[str] = []
        threads = _long_streams(channel, 4, results)
        time.sleep(1.0)
        infer.proc.kill()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and set(results) <= {"UNAVAILABLE", "FINISH_REASON_LENGTH"}, results
    started = time.monotonic()
    again = stack.start("kiln_infer", port=infer.port)
    again.wait_serving()
    print(f"kiln-infer back to SERVING {time.monotonic() - started:.1f}s after kill -9")
    with grpc.insecure_channel(again.address) as channel:
        generate(channel, "after", adapter="rel")
    _exactly_once(url)


def test_kill9_of_kiln_train_mid_consumption(stack: Stack) -> None:
    """Promise: samples served while kiln-train is killed and restarted all reach it, none twice; the
    restarted kiln-train answers malformed request bytes with INVALID_ARGUMENT."""
    infer, train = start_pair(stack)
    url = stack.env["KILN_REDIS_URL"]
    with grpc.insecure_channel(infer.address) as channel:
        publish_random_adapter(stack, channel)
        for i in range(20):
            generate(channel, f"sample {i}", adapter="rel", max_tokens=2)
            if i == 5:
                train.proc.kill()
        train.proc.wait(10)
        restarted = stack.start("kiln_train")
        restarted.wait_serving()
        with grpc.insecure_channel(
            restarted.address
        ) as tch:  # and it refuses malformed bytes as the client's
            call = tch.unary_unary("/kiln.v1.TrainingService/GetTrainingStatus")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\x0a\x02\xff\xfe", timeout=10)  # adapter (field 1) holding bytes that are not UTF-8
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        for i in range(5):
            generate(channel, f"after {i}", adapter="rel", max_tokens=2)
    _exactly_once(url)


def test_sigterm_under_load_drains_every_stream(stack: Stack) -> None:
    """Promise: SIGTERM with streams in flight lets each finish with a finish reason; exit 0 within the drain
    time (KILN_DRAIN_TIMEOUT=20)."""
    infer = stack.start("kiln_infer")
    infer.wait_serving()
    with grpc.insecure_channel(infer.address) as channel:
        publish_random_adapter(stack, channel)
        results: list[str] = []
        threads = _long_streams(channel, 6, results)
        time.sleep(0.5)
        started = time.monotonic()
        assert infer.stop(signal.SIGTERM, 40) == 0
        for t in threads:
            t.join(10)
    assert sorted(results) == ["FINISH_REASON_LENGTH"] * 6, results
    assert time.monotonic() - started < 25


def _cancel_wave(stub: inference_pb2_grpc.InferenceServiceStub, n: int) -> int:
    """Start n long streams, cancel each after its first response (or at once); how many got a response."""
    sampling = inference_pb2.SamplingParams(max_tokens=1000, ignore_eos=True)
    calls = [
        stub.Generate(inference_pb2.GenerateRequest(prompt="x", sampling=sampling), timeout=60)
        for _ in range(n)
    ]
    answered = 0
    for call in calls:
        try:
            next(call)
            answered += 1
        except grpc.RpcError:
            pass
        call.cancel()
    return answered


@pytest.mark.parametrize("waves", [10])
def test_500_cancels_leave_nothing_in_flight(stack: Stack, waves: int) -> None:
    """Promise: after 500 cancelled streams the engine counts 0 in flight (the drain's own count, logged at
    SIGTERM), and the drain ends at once instead of waiting out its grace."""
    infer: Service = stack.start("kiln_infer")
    infer.wait_serving()
    with grpc.insecure_channel(infer.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        answered = sum(_cancel_wave(stub, 50) for _ in range(waves))
        assert answered >= 100, f"only {answered} of {waves * 50} streams started"
        time.sleep(2.0)
        generate(channel, "still serving")
    started = time.monotonic()
    assert infer.stop(signal.SIGTERM, 40) == 0
    drained = re.findall(r"draining: (\d+) requests in flight", infer.log())
    assert drained == ["0"], drained
    assert time.monotonic() - started < 10
