"""Reflection answers over grpc.reflection.v1 and v1alpha, on sync and grpc.aio servers (real sockets)."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as messages

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME, enable_reflection

SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name, health.SERVICE_NAME)


Request, Response = messages.ServerReflectionRequest, messages.ServerReflectionResponse


def _ask(port: int, service: str, request: Request) -> Response:
    """One reflection request over the wire as grpcurl sends it (v1 and v1alpha messages are identical)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=messages.ServerReflectionRequest.SerializeToString,
            response_deserializer=messages.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=10)))


def _check(port: int) -> None:
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        listed = _ask(port, service, messages.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {*SERVICES, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= names
        found = _ask(port, service, messages.ServerReflectionRequest(file_containing_symbol=SERVICES[0]))
        blobs = found.file_descriptor_response.file_descriptor_proto
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in blobs]
        assert any(
            f.package == "kiln.v1" and any(s.name == "InferenceService" for s in f.service) for f in files
        )


def test_sync_server_serves_both_reflection_versions() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = inference_pb2_grpc.InferenceServiceServicer()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    enable_reflection(server, SERVICES)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check(port)
    finally:
        server.stop(0)


def test_aio_server_serves_both_reflection_versions() -> None:
    async def run() -> None:
        server = grpc.aio.server()
        servicer = inference_pb2_grpc.InferenceServiceServicer()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        enable_reflection(server, SERVICES)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.to_thread(_check, port)
        finally:
            await server.stop(0)

    asyncio.run(run())
