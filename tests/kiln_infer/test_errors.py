"""Each typed error maps to one gRPC status; anything else is INTERNAL with an incident id."""

from __future__ import annotations

import grpc
import pytest
import redis

from kiln_common.adapter_store import InvalidAdapterError
from kiln_common.auth import AuthError
from kiln_common.registry import AdapterNotFoundError, NoPreviousVersionError
from kiln_infer.engine.types import EngineOverloadedError
from kiln_infer.errors import (
    DeadlineExceededError,
    EngineAbortedError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    status_for,
)
from kiln_infer.lora.errors import AdapterLoadError

CASES = [
    (InvalidArgumentError("sampling.top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidAdapterError("bad", "adapter"), grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (NotFoundError("request 'r' not found"), grpc.StatusCode.NOT_FOUND),
    (AuthError("invalid API key"), grpc.StatusCode.UNAUTHENTICATED),
    (EngineOverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError("deadline exceeded"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (NoPreviousVersionError("nothing to roll back to"), grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterLoadError("rank too high"), grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
    (EngineAbortedError("aborted"), grpc.StatusCode.UNAVAILABLE),
    (redis.ConnectionError("down"), grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize(("exc", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_typed_errors_map_to_statuses(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(exc)[0] == code


def test_field_is_named_first() -> None:
    assert status_for(InvalidArgumentError("sampling.top_k", "must be >= 0"))[1].startswith(
        "sampling.top_k: "
    )
    assert status_for(InvalidAdapterError("no weights", "path"))[1] == "path: no weights"


def test_unexpected_errors_are_internal_with_an_incident_id(caplog: pytest.LogCaptureFixture) -> None:
    code, message = status_for(KeyError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "incident" in message and "secret" not in message
    incident = message.split("incident ")[1].split(",")[0]
    assert incident in caplog.text
