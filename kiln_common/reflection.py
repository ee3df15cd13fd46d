"""gRPC server reflection under both names: `grpc.reflection.v1` (what grpcurl asks first) and `v1alpha`.

grpcio-reflection ships only the v1alpha servicer; the v1 protocol is wire-identical (same messages, same
field numbers, only the package differs), so the same servicer is also registered under the v1 service name.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as messages

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
_METHOD = "ServerReflectionInfo"


def enable_reflection(server: grpc.Server | grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for `service_names` (plus both reflection services) on a sync or grpc.aio server."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    if isinstance(server, grpc.aio.Server):
        servicer: reflection.BaseReflectionServicer = reflection.aio.ReflectionServicer(names)
    else:
        servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,  # type: ignore[attr-defined]
        request_deserializer=messages.ServerReflectionRequest.FromString,
        response_serializer=messages.ServerReflectionResponse.SerializeToString,
    )
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {_METHOD: handler}),))
