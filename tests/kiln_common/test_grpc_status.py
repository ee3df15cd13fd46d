"""The one status table, as kiln-train uses it and as a server extends it with its own error kinds."""

from __future__ import annotations

import grpc

from kiln_common.auth import AuthError
from kiln_common.errors import InvalidAdapterError, PermissionDeniedError, ResourceExhaustedError
from kiln_common.grpc_status import StatusMapper, status_for


class QueueFullError(RuntimeError):
    """A server's own error, unknown to the table."""


def test_shared_errors_map_without_extension() -> None:
    assert status_for(AuthError("invalid API key"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status_for(InvalidAdapterError("bad name", "adapter")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "adapter: bad name",
    )
    assert status_for(QueueFullError("full"))[0] == grpc.StatusCode.INTERNAL
    assert status_for(PermissionDeniedError("needs an admin API key")) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "needs an admin API key",
    )


def test_a_server_names_its_errors_as_shared_kinds() -> None:
    mapper = StatusMapper({QueueFullError: ResourceExhaustedError})
    assert mapper.status_for(QueueFullError("full")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "server overloaded, retry later: full",
    )
    assert mapper.status_for(AuthError("no key"))[0] == grpc.StatusCode.UNAUTHENTICATED
