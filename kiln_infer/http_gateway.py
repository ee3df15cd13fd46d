"""OpenAI-style HTTP front over kiln-infer's gRPC API (a convenience: the same engine, the same errors)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

# gRPC status -> HTTP status, as OpenAI-style clients expect them.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.CONFLICT,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
_FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_STOP_STRING: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORTED: "abort",
}


class BadRequestError(ValueError):
    """The HTTP body does not describe a valid request (the message names the field)."""


def to_generate_request(body: dict[str, Any], chat: bool) -> inference_pb2.GenerateRequest:
    """Map an OpenAI completions / chat.completions body onto GenerateRequest (`model` = adapter)."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequestError("model: must be a string ('' or 'base' = base model, else an adapter name)")
    request = inference_pb2.GenerateRequest(adapter="" if model in ("", "base") else model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("messages: must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRequestError(f"messages[{i}]: needs a string 'content'")
            request.messages.add(role=str(m.get("role", "")), content=m["content"])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequestError("prompt: must be a string")
        request.prompt = prompt
    sampling = request.sampling
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            sampling.max_tokens = _number(body, key, int)
    for key in ("temperature", "top_p", "repetition_penalty"):
        if body.get(key) is not None:
            setattr(sampling, key, _number(body, key, float))
    if body.get("top_k") is not None:
        sampling.top_k = _number(body, "top_k", int)
    if body.get("seed") is not None:
        sampling.seed = _number(body, "seed", int)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequestError("stop: must be a string or a list of strings")
        sampling.stop.extend(stops)
    return request


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError(f"{key}: must be a number")
    if kind is int and int(value) != value:
        raise BadRequestError(f"{key}: must be an integer")
    return kind(value)


def _choice(text: str, finish: str | None, chat: bool, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish}
    key = "delta" if delta else "message"
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


class GatewayHandler(BaseHTTPRequestHandler):
    """Handles /v1/completions, /v1/chat/completions (with `stream`) and /v1/models."""

    server: GatewayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.debug("%s " + format, self.address_string(), *args)

    def _metadata(self) -> list[tuple[str, str]]:
        auth = self.headers.get("Authorization")
        return [("authorization", auth)] if auth else []

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, kind: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """List the base model and the caller's adapters."""
        if self.path.rstrip("/") != "/v1/models":
            self._send_error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found")
            return
        try:
            reply = self.server.adapters.ListAdapters(
                adapter_pb2.ListAdaptersRequest(), metadata=self._metadata(), timeout=10
            )
        except grpc.RpcError as err:
            self._grpc_error(err)
            return
        models = [{"id": "base", "object": "model", "owned_by": "kiln"}]
        models += [{"id": a.name, "object": "model", "owned_by": "kiln"} for a in reply.adapters]
        self._send_json(HTTPStatus.OK, {"object": "list", "data": models})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        """Run one completion, streamed as server-sent events when the body asks for it."""
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        chat = routes.get(self.path.rstrip("/"))
        if chat is None:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body: over 1 MiB", "invalid_request_error")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise BadRequestError("body: must be a JSON object")
            request = to_generate_request(body, chat)
        except (json.JSONDecodeError, BadRequestError) as err:
            self._send_error(HTTPStatus.BAD_REQUEST, str(err), "invalid_request_error")
            return
        responses = self.server.inference.Generate(request, metadata=self._metadata())
        try:
            if body.get("stream"):
                self._stream(responses, chat)
            else:
                self._whole(responses, chat)
        except grpc.RpcError as err:
            self._grpc_error(err)
        except (BrokenPipeError, ConnectionResetError):
            responses.cancel()  # the HTTP client went away: free the engine's resources at once

    def _whole(self, responses: Iterator[inference_pb2.GenerateResponse], chat: bool) -> None:
        parts, last = [], None
        for r in responses:
            parts.append(r.text)
            last = r
        assert last is not None, "a Generate stream always ends with a final response"
        self._send_json(
            HTTPStatus.OK,
            {
                "id": last.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": last.adapter_version or "base",
                "choices": [_choice("".join(parts), _FINISH.get(last.finish_reason), chat, delta=False)],
                "usage": {
                    "prompt_tokens": last.usage.prompt_tokens,
                    "completion_tokens": last.usage.completion_tokens,
                    "total_tokens": last.usage.prompt_tokens + last.usage.completion_tokens,
                },
            },
        )

    def _stream(self, responses: Iterator[inference_pb2.GenerateResponse], chat: bool) -> None:
        first = next(responses)  # errors (bad adapter, bad sampling) surface here, before any header
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())
        for r in _chain(first, responses):
            event = {
                "id": r.request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": r.adapter_version or "base",
                "choices": [_choice(r.text, _FINISH.get(r.finish_reason), chat, delta=True)],
            }
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _grpc_error(self, err: grpc.RpcError) -> None:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        status = _HTTP_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
        details = err.details() if hasattr(err, "details") else str(err)
        self._send_error(status, details or code.name, code.name.lower())


def _chain(
    first: inference_pb2.GenerateResponse, rest: Iterator[inference_pb2.GenerateResponse]
) -> Iterator[inference_pb2.GenerateResponse]:
    yield first
    yield from rest


class GatewayServer(ThreadingHTTPServer):
    """The HTTP server, holding one gRPC channel to kiln-infer shared by all handler threads."""

    daemon_threads = True

    def __init__(self, listen: tuple[str, int], grpc_address: str) -> None:
        super().__init__(listen, GatewayHandler)
        self.channel = grpc.insecure_channel(grpc_address)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapter_pb2_grpc.AdapterServiceStub(self.channel)

    def server_close(self) -> None:
        """Close the socket and the gRPC channel."""
        super().server_close()
        self.channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`kiln http`: serve the OpenAI-style front until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="kiln http", description="OpenAI-style HTTP front for kiln-infer")
    parser.add_argument("--address", default="127.0.0.1:50051", help="kiln-infer gRPC host:port")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen host")
    parser.add_argument("--port", type=int, default=8000, help="HTTP listen port")
    parser.add_argument("--api-key", default="", help="ignored: clients send their own Authorization header")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = GatewayServer((args.host, args.port), args.address)
    url = f"http://{args.host}:{server.server_port}/v1"
    log.info("OpenAI-style HTTP on %s -> kiln-infer %s", url, args.address)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
