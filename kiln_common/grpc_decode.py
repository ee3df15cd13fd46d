"""Malformed request bytes are the client's mistake: INVALID_ARGUMENT, never the transport's INTERNAL.

gRPC deserializes a request before the servicer runs, and a failure there (a string field that is not UTF-8,
a truncated message) ends the call as INTERNAL ("Exception deserializing request!"). These interceptors hand
the servicer's method the raw bytes instead and parse them inside it, where a failure becomes
INVALID_ARGUMENT naming the message type. One for `grpc.server`, one for `grpc.aio.server`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from kiln_common.errors import InvalidArgumentError
from kiln_common.grpc_status import SHARED

log = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


def _message(deserialize: Deserializer, exc: Exception) -> str:
    owner = getattr(deserialize, "__self__", None)
    kind = getattr(owner, "__name__", "request")
    return f"bytes are not a valid {kind} message ({exc})"


def _parse(deserialize: Deserializer, raw: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return deserialize(raw)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed message
        SHARED.abort(context, InvalidArgumentError("request", _message(deserialize, exc)))


def _lenient_sync(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    if handler.request_streaming:
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
        inner = getattr(handler, kind)

        def streaming(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            return inner((_parse(deserialize, raw, context) for raw in raws), context)

        return handler._replace(request_deserializer=None, **{kind: streaming})  # type: ignore[attr-defined]
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    inner = getattr(handler, kind)

    def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        return inner(_parse(deserialize, raw, context), context)

    return handler._replace(request_deserializer=None, **{kind: unary})  # type: ignore[attr-defined]


class DecodeErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """For `grpc.server(..., interceptors=[...])`: malformed request bytes → INVALID_ARGUMENT."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler, parsing its request inside the method."""
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _lenient_sync(handler)


async def _parse_async(deserialize: Deserializer, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return deserialize(raw)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed message
        await SHARED.abort_async(context, InvalidArgumentError("request", _message(deserialize, exc)))


def _lenient_async_unary(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    if handler.response_streaming:
        inner_stream = handler.unary_stream
        if inspect.isasyncgenfunction(inner_stream):

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in inner_stream(await _parse_async(deserialize, raw, context), context):
                    yield item

            return handler._replace(request_deserializer=None, unary_stream=unary_stream)  # type: ignore[attr-defined]

        async def writing_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await inner_stream(await _parse_async(deserialize, raw, context), context)

        return handler._replace(request_deserializer=None, unary_stream=writing_stream)  # type: ignore[attr-defined]
    inner_unary: Callable[[Any, Any], Awaitable[Any]] = handler.unary_unary

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await inner_unary(await _parse_async(deserialize, raw, context), context)

    return handler._replace(request_deserializer=None, unary_unary=unary_unary)  # type: ignore[attr-defined]


class AsyncDecodeErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """For `grpc.aio.server(interceptors=[...])`: bad request bytes → INVALID_ARGUMENT (unary-request RPCs;
    Kiln has no client-streaming RPC, and those are passed through unchanged)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler, parsing its request inside the method."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        if not inspect.iscoroutinefunction(handler.unary_unary or handler.unary_stream) and not (
            inspect.isasyncgenfunction(handler.unary_stream)
        ):
            return _lenient_sync(handler)  # a plain function served by the aio server's thread pool
        return _lenient_async_unary(handler)
