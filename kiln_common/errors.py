"""Typed errors both servers raise; kiln_common.grpc_status maps each onto one gRPC status."""

from __future__ import annotations


class InvalidArgumentError(ValueError):
    """A request field is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidAdapterError(ValueError):
    """An adapter name, tenant or PEFT directory is malformed (maps to INVALID_ARGUMENT on `field`)."""

    def __init__(self, message: str, field: str = "path") -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(LookupError):
    """Something the caller named does not exist for its tenant."""


class FailedPreconditionError(RuntimeError):
    """The request is valid but the system is not in a state to run it."""


class VersionExistsError(RuntimeError):
    """A version directory already exists; versions are immutable."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it finished."""


class ResourceExhaustedError(RuntimeError):
    """The server is at capacity for now; retry later."""


class UnavailableError(RuntimeError):
    """The server is shutting down or a dependency is down; retry later."""


class PermissionDeniedError(PermissionError):
    """The caller is known but its role may not do this (an admin operation; maps to PERMISSION_DENIED)."""
