"""kiln-infer's errors and its RPC wrappers: the shared status table plus the engine's own error kinds."""

from __future__ import annotations

from kiln_common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from kiln_common.grpc_status import StatusMapper
from kiln_infer.engine.types import EngineOverloadedError
from kiln_infer.engine_link import EngineUnavailableError
from kiln_infer.lora.errors import AdapterLoadError


class EngineAbortedError(UnavailableError):
    """The engine ended a request the client had not cancelled (see the server log)."""


# The engine's errors, as kinds of the shared ones (kiln_common.grpc_status holds the one table).
_MAPPER = StatusMapper(
    {
        EngineOverloadedError: ResourceExhaustedError,
        AdapterLoadError: FailedPreconditionError,
        EngineUnavailableError: UnavailableError,
    }
)
status_for = _MAPPER.status_for
code_for = _MAPPER.code_for
unary_errors = _MAPPER.unary
stream_errors = _MAPPER.stream
async_stream_errors = _MAPPER.async_stream

__all__ = [
    "DeadlineExceededError",
    "EngineAbortedError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "UnavailableError",
    "async_stream_errors",
    "code_for",
    "status_for",
    "stream_errors",
    "unary_errors",
]
