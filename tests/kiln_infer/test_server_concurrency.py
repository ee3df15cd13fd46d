"""The asyncio server under many streams: all complete, a cancel frees its sequence, idle watches cost 0."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY

METADATA = (("authorization", f"Bearer {ALICE_KEY}"),)


def _request(i: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return inference_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3, 10 + i], sampling=sampling)


async def _many(port: int, count: int, max_tokens: int) -> list[tuple[str, int, int]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(i: int) -> tuple[str, int, int]:
            tokens = messages = 0
            try:
                async for response in stub.Generate(_request(i, max_tokens), metadata=METADATA):
                    tokens += len(response.token_ids)
                    messages += 1
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, tokens, messages
            return "OK", tokens, messages

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_256_concurrent_streams_all_complete(infer_server: InferServer) -> None:
    """256 streams at once on one channel: every one completes with exactly its tokens, nothing refused."""
    results = asyncio.run(_many(infer_server.port, 256, 4))
    assert [code for code, _, _ in results if code != "OK"] == []
    assert all(tokens == 4 for _, tokens, _ in results)
    # coalescing: never more than one message per token (usually fewer under load)
    assert all(1 <= messages <= 4 for _, _, messages in results)
    deadline = time.monotonic() + 10
    while infer_server.num_in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert infer_server.num_in_flight() == 0


async def _cancel_after_first_token(port: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(_request(0, 1000), metadata=METADATA)
        async for _ in call:
            break
        call.cancel()
        return time.monotonic()


def test_a_cancelled_stream_frees_its_sequence_in_the_engine_core(infer_server: InferServer) -> None:
    """After a cancel the engine core's count of running and unfinished sequences returns to 0 at once."""
    cancelled_at = asyncio.run(_cancel_after_first_token(infer_server.port))
    engine = infer_server._parts.engine  # type: ignore[union-attr]
    deadline = cancelled_at + 10
    stats = engine.stats()
    while (stats["unfinished"] or stats["running"]) and time.monotonic() < deadline:
        time.sleep(0.02)
        stats = engine.stats()
    assert stats["unfinished"] == 0 and stats["running"] == 0
    assert infer_server.num_in_flight() == 0


def test_idle_watchers_do_not_lock_out_health_or_generation(infer_server: InferServer) -> None:
    """With 80 idle WatchEvents streams open, health and a generation still answer within a second."""
    with grpc.insecure_channel(f"127.0.0.1:{infer_server.port}") as channel:
        adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
        watches = [
            adapters.WatchEvents(adapter_pb2.WatchEventsRequest(), metadata=METADATA) for _ in range(80)
        ]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            tokens = sum(
                len(r.token_ids) for r in stub.Generate(_request(1, 2), metadata=METADATA, timeout=5)
            )
            assert tokens == 2
            assert time.monotonic() - started < 1.0 + 1.0  # health + a 2-token generation on a shared CPU
        finally:
            for watch in watches:
                watch.cancel()
