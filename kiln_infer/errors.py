"""Typed errors of the servicers and their one mapping onto gRPC status codes."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import redis

from kiln_common.adapter_store import InvalidAdapterError, VersionExistsError
from kiln_common.auth import AuthError
from kiln_common.registry import AdapterNotFoundError, NoPreviousVersionError
from kiln_infer.engine.types import EngineOverloadedError
from kiln_infer.lora.errors import AdapterLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")


class InvalidArgumentError(ValueError):
    """A request field is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(LookupError):
    """Something the caller named does not exist for its tenant."""


class FailedPreconditionError(RuntimeError):
    """The request is valid but the system is not in a state to run it."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it finished."""


class EngineAbortedError(RuntimeError):
    """The engine ended a request the client had not cancelled (see the server log)."""


class UnavailableError(RuntimeError):
    """The server is shutting down or a dependency is down; retry later."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception raised inside an RPC."""
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, InvalidAdapterError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc}"
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, (NotFoundError, AdapterNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, exc.args[0] if exc.args else "not found"
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded, retry later: {exc}"
    if isinstance(
        exc, (NoPreviousVersionError, FailedPreconditionError, AdapterLoadError, VersionExistsError)
    ):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (UnavailableError, EngineAbortedError, redis.ConnectionError, redis.TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, f"temporarily unavailable: {exc}"
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", incident, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}, see the server log)"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code not in (grpc.StatusCode.INTERNAL,):
        log.info("%s: %s", code.name, message)
    context.abort(code, message)


def unary_errors(
    fn: Callable[[Any, Any, grpc.ServicerContext], T],
) -> Callable[[Any, Any, grpc.ServicerContext], T]:
    """Wrap a unary RPC method so every exception becomes a status, never a traceback."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
            _abort(context, exc)
            raise  # unreachable: context.abort raises

    return wrapper


def stream_errors(
    fn: Callable[[Any, Any, grpc.ServicerContext], Iterator[T]],
) -> Callable[[Any, Any, grpc.ServicerContext], Iterator[T]]:
    """Wrap a server-streaming RPC method the same way (errors after the first message end the stream)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
            _abort(context, exc)

    return wrapper
