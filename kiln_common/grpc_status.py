"""The one mapping of exceptions onto gRPC statuses, used by both servers' servicers.

Each server wraps its RPC methods in `unary` / `stream` of a `StatusMapper`; a server whose own errors are
kinds of the shared ones (kiln-infer's engine errors) names them once as such, so there is still one table.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import redis

from kiln_common.auth import AuthError
from kiln_common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidAdapterError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    VersionExistsError,
)
from kiln_common.registry import AdapterNotFoundError, NoPreviousVersionError

log = logging.getLogger(__name__)

S = TypeVar("S")
R = TypeVar("R")
T = TypeVar("T")


def _field_message(exc: BaseException) -> str:
    return f"{getattr(exc, 'field', 'path')}: {exc}"


def _not_found_message(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else "not found"


def _overloaded_message(exc: BaseException) -> str:
    return f"server overloaded, retry later: {exc}"


def _unavailable_message(exc: BaseException) -> str:
    return f"temporarily unavailable: {exc}"


@dataclass(frozen=True)
class _Rule:
    """Exceptions of these kinds get this status, with this message."""

    kinds: tuple[type[BaseException], ...]
    code: grpc.StatusCode
    message: Callable[[BaseException], str]


# The table: the first rule whose kinds match wins; anything unmatched is INTERNAL with an incident id.
_RULES: tuple[_Rule, ...] = (
    _Rule((InvalidArgumentError,), grpc.StatusCode.INVALID_ARGUMENT, str),
    _Rule((InvalidAdapterError,), grpc.StatusCode.INVALID_ARGUMENT, _field_message),
    _Rule((DeadlineExceededError,), grpc.StatusCode.DEADLINE_EXCEEDED, str),
    _Rule((NotFoundError, AdapterNotFoundError), grpc.StatusCode.NOT_FOUND, _not_found_message),
    _Rule((AuthError,), grpc.StatusCode.UNAUTHENTICATED, str),
    _Rule((PermissionDeniedError,), grpc.StatusCode.PERMISSION_DENIED, str),
    _Rule((ResourceExhaustedError,), grpc.StatusCode.RESOURCE_EXHAUSTED, _overloaded_message),
    _Rule(
        (NoPreviousVersionError, FailedPreconditionError, VersionExistsError),
        grpc.StatusCode.FAILED_PRECONDITION,
        str,
    ),
    _Rule(
        (UnavailableError, redis.ConnectionError, redis.TimeoutError),
        grpc.StatusCode.UNAVAILABLE,
        _unavailable_message,
    ),
)


class StatusMapper:
    """Turns exceptions raised inside RPCs into statuses by the one table above."""

    def __init__(self, kinds: Mapping[type[BaseException], type[BaseException]] | None = None) -> None:
        # A server's own error type -> the shared error kind it counts as, e.g. an engine's "queue full"
        # error -> ResourceExhaustedError.
        self._kinds = dict(kinds or {})

    def _rule(self, exc: BaseException) -> _Rule | None:
        kind = next((k for t, k in self._kinds.items() if isinstance(exc, t)), type(exc))
        return next((rule for rule in _RULES if issubclass(kind, rule.kinds)), None)

    def code_for(self, exc: BaseException) -> grpc.StatusCode:
        """The status code `exc` maps to, without logging anything (for access logs and metrics)."""
        rule = self._rule(exc)
        return rule.code if rule is not None else grpc.StatusCode.INTERNAL

    def status_for(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status code and message a client gets for an exception raised inside an RPC."""
        rule = self._rule(exc)
        if rule is not None:
            return rule.code, rule.message(exc)
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s: %r", incident, exc, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}, see the server log)"

    def abort(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        """End the RPC with the status `exc` maps to (context.abort raises)."""
        code, message = self.status_for(exc)
        if code != grpc.StatusCode.INTERNAL:
            log.info("%s: %s", code.name, message)
        context.abort(code, message)

    def unary(
        self, fn: Callable[[S, R, grpc.ServicerContext], T]
    ) -> Callable[[S, R, grpc.ServicerContext], T]:
        """Wrap a unary RPC method so every exception becomes a status, never a traceback."""

        @functools.wraps(fn)
        def wrapper(servicer: S, request: R, context: grpc.ServicerContext) -> T:
            try:
                return fn(servicer, request, context)
            except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
                self.abort(context, exc)
                raise  # unreachable: context.abort raises

        return wrapper

    def stream(
        self, fn: Callable[[S, R, grpc.ServicerContext], Iterator[T]]
    ) -> Callable[[S, R, grpc.ServicerContext], Iterator[T]]:
        """Wrap a server-streaming RPC method the same way (errors after the first message end the stream)."""

        @functools.wraps(fn)
        def wrapper(servicer: S, request: R, context: grpc.ServicerContext) -> Iterator[T]:
            try:
                yield from fn(servicer, request, context)
            except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
                self.abort(context, exc)

        return wrapper

    async def abort_async(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """The asyncio form of abort (context.abort raises)."""
        code, message = self.status_for(exc)
        if code != grpc.StatusCode.INTERNAL:
            log.info("%s: %s", code.name, message)
        await context.abort(code, message)

    def async_stream(
        self, fn: Callable[[S, R, grpc.aio.ServicerContext], AsyncIterator[T]]
    ) -> Callable[[S, R, grpc.aio.ServicerContext], AsyncIterator[T]]:
        """Wrap an asyncio server-streaming RPC method: every exception becomes a status."""

        @functools.wraps(fn)
        async def wrapper(servicer: S, request: R, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
            try:
                async for item in fn(servicer, request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - the one place exceptions become statuses
                await self.abort_async(context, exc)

        return wrapper


# The mapping for a server with no error kinds of its own (kiln-train).
SHARED = StatusMapper()
status_for = SHARED.status_for
unary_errors = SHARED.unary
stream_errors = SHARED.stream
