"""OpenAI-shaped errors of the HTTP front (`{"error": {message, type, param, code}}`), from gRPC statuses."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

import grpc

RETRY_AFTER_S = 1  # what a 429 / 503 tells the client to wait

# gRPC status -> (HTTP status, OpenAI error type).
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (HTTPStatus.NOT_FOUND, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (HTTPStatus.UNAUTHORIZED, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (HTTPStatus.FORBIDDEN, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (HTTPStatus.TOO_MANY_REQUESTS, "rate_limit_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (HTTPStatus.CONFLICT, "conflict_error"),
    grpc.StatusCode.ALREADY_EXISTS: (HTTPStatus.CONFLICT, "conflict_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (HTTPStatus.GATEWAY_TIMEOUT, "timeout_error"),
    # The gateway only reads a stream it has not cancelled itself: CANCELLED means the backend went away.
    grpc.StatusCode.CANCELLED: (HTTPStatus.SERVICE_UNAVAILABLE, "service_unavailable_error"),
    grpc.StatusCode.UNAVAILABLE: (HTTPStatus.SERVICE_UNAVAILABLE, "service_unavailable_error"),
}
# gRPC field names (the start of an INVALID_ARGUMENT message) -> the OpenAI parameter they came from.
_PARAM = {
    "prompt": "prompt",
    "messages": "messages",
    "adapter": "model",
    "request": "messages",
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
    "sampling.logprobs": "logprobs",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*):")


class ApiError(Exception):
    """An error the HTTP front answers with (status, OpenAI type, the parameter at fault)."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Retry-After on 429 and 503, nothing otherwise."""
        if self.status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
            return {"Retry-After": str(RETRY_AFTER_S)}
        return {}

    def sse_event(self) -> bytes:
        """The error as a server-sent event (mid-stream)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def bad_request(param: str, message: str) -> ApiError:
    """A 400 naming the parameter at fault (the message starts with it too)."""
    return ApiError(HTTPStatus.BAD_REQUEST, f"{param}: {message}", "invalid_request_error", param)


def unsupported(param: str) -> ApiError:
    """A 400 for an OpenAI parameter Kiln does not implement (never silently ignored)."""
    return ApiError(
        HTTPStatus.BAD_REQUEST,
        f"{param}: not supported by Kiln",
        "invalid_request_error",
        param,
        "unsupported_parameter",
    )


def _param_of(code: grpc.StatusCode, details: str) -> str | None:
    if code == grpc.StatusCode.NOT_FOUND:
        return "model"
    match = _FIELD.match(details)
    if match is None:
        return None
    field = match.group(1)
    return _PARAM.get(field, field.removeprefix("sampling."))


def from_grpc(err: grpc.RpcError) -> ApiError:
    """The OpenAI error of a failed gRPC call (status, type and, for bad fields, the parameter)."""
    code_of, details_of = getattr(err, "code", None), getattr(err, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = (details_of() if callable(details_of) else "") or code.name
    status, kind = _STATUS.get(code, (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"))
    param = _param_of(code, details)
    error_code = "model_not_found" if code == grpc.StatusCode.NOT_FOUND else code.name.lower()
    return ApiError(status, details, kind, param, error_code)
