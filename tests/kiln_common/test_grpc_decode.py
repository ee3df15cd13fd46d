"""Malformed request bytes get INVALID_ARGUMENT naming the message type, on sync and asyncio servers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kiln_common.grpc_decode import AsyncDecodeErrorInterceptor, DecodeErrorInterceptor

BAD_UTF8 = (
    b"\x0a\x02\xff\xfe"  # HealthCheckRequest.service (field 1, a string) holding bytes that are not UTF-8
)
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


def _raw_call(port: int, method: str, streaming: bool) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            if streaming:
                list(channel.unary_stream(method)(BAD_UTF8, timeout=5))
            else:
                channel.unary_unary(method)(BAD_UTF8, timeout=5)
    return err.value


def _good_call(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


@pytest.fixture
def sync_port() -> Iterator[int]:
    """A grpc.server with the health service and the interceptor."""
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[DecodeErrorInterceptor()])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture
def aio_port() -> Iterator[int]:
    """A grpc.aio server (in its own event-loop thread) with the health service and the interceptor."""
    loop = asyncio.new_event_loop()
    ready: list[int] = []
    started, stop = threading.Event(), asyncio.Event()

    async def serve() -> None:
        server = grpc.aio.server(interceptors=[AsyncDecodeErrorInterceptor()])
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ready.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield ready[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


@pytest.mark.parametrize("method,streaming", [(CHECK, False), (WATCH, True)])
def test_sync_server_answers_invalid_argument(sync_port: int, method: str, streaming: bool) -> None:
    """Unary and server-streaming RPCs: INVALID_ARGUMENT naming the type; good requests still work."""
    err = _raw_call(sync_port, method, streaming)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "HealthCheckRequest" in str(err.details())
    assert _good_call(sync_port) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method,streaming", [(CHECK, False), (WATCH, True)])
def test_aio_server_answers_invalid_argument(aio_port: int, method: str, streaming: bool) -> None:
    """The same on the asyncio server (coroutine and async-generator methods)."""
    err = _raw_call(aio_port, method, streaming)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "HealthCheckRequest" in str(err.details())
    assert _good_call(aio_port) == health_pb2.HealthCheckResponse.SERVING


def test_without_the_interceptor_the_transport_says_internal() -> None:
    """Why the interceptor exists: plain grpc.server turns the same bytes into a non-client status."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert _raw_call(port, CHECK, False).code() != grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
