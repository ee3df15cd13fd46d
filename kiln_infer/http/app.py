"""The OpenAI-compatible FastAPI app: a client of kiln-infer's gRPC API (grpc.aio stubs on one channel)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2_grpc
from kiln_infer.http.errors import ApiError, bad_request, from_grpc
from kiln_infer.http.generation import Generation
from kiln_infer.http.responses import ResponseShape
from kiln_infer.http.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from kiln_infer.http.translate import BASE_MODEL_IDS, sub_requests, top_wanted
from kiln_infer.metrics import RequestMetrics

MAX_BODY_BYTES = 1 << 20
STICKY_KEY_HEADER = "x-kiln-sticky-key"  # gRPC metadata: the OpenAI `user`, pins a caller to one split arm
ADMIN_TIMEOUT_S = 10.0


@dataclass
class Backend:
    """The gRPC channel and stubs (made inside the serving event loop, as grpc.aio requires)."""

    channel: grpc.aio.Channel
    inference: inference_pb2_grpc.InferenceServiceStub
    adapters: adapter_pb2_grpc.AdapterServiceStub
    health: health_pb2_grpc.HealthStub


def _metadata(request: Request, user: str | None = None) -> list[tuple[str, str]]:
    md = [("authorization", request.headers["authorization"])] if "authorization" in request.headers else []
    if user:
        md.append((STICKY_KEY_HEADER, user))
    return md


async def _json_body(request: Request) -> Any:
    """The body as JSON, at most MAX_BODY_BYTES (chunked bodies included), else a 400 / 413."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise ApiError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body: over 1 MiB", "invalid_request_error", "body"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body: over 1 MiB", "invalid_request_error", "body"
            )
    try:
        return json.loads(data or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request("body", f"not valid JSON ({err})") from None


def _model_card(model_id: str, created: float) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": "kiln"}


async def _created(backend: Backend, request: Request, name: str, version: int | None) -> float:
    """When a version (the current one when None) was made; NOT_FOUND as an ApiError."""
    try:
        reply = await backend.adapters.ListVersions(
            adapter_pb2.ListVersionsRequest(adapter=name),
            metadata=_metadata(request),
            timeout=ADMIN_TIMEOUT_S,
        )
    except grpc.RpcError as err:
        raise from_grpc(err) from None
    versions = {v.version: v.created for v in reply.versions}
    if version is None:
        return versions[max(versions)] if versions else 0.0
    if version not in versions:
        raise ApiError(HTTPStatus.NOT_FOUND, f"model: no version {version} of {name!r}", "not_found_error",
                       "model", "model_not_found")  # fmt: skip
    return versions[version]


async def _complete(
    app: FastAPI, request: Request, body: CompletionRequest | ChatCompletionRequest
) -> Response:
    """Run one completions / chat request, whole or streamed."""
    chat = isinstance(body, ChatCompletionRequest)
    generation = Generation(sub_requests(body), app.state.metrics)
    await generation.start(app.state.backend.inference, _metadata(request, body.user))
    prefix = "chatcmpl-" if chat else "cmpl-"
    shape = ResponseShape(chat, prefix + generation.request_id, int(time.time()), top_wanted(body))
    if body.stream:
        return StreamingResponse(
            generation.stream(shape, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    states = await generation.whole()
    return JSONResponse(shape.whole(states, generation.counts_prompt))


def _add_routes(app: FastAPI) -> None:
    """The OpenAI routes plus /metrics and /health."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(app, request, parse_body(CompletionRequest, await _json_body(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(app, request, parse_body(ChatCompletionRequest, await _json_body(request)))

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        backend: Backend = app.state.backend
        try:
            reply = await backend.adapters.ListAdapters(
                adapter_pb2.ListAdaptersRequest(), metadata=_metadata(request), timeout=ADMIN_TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise from_grpc(err) from None
        names = [a.name for a in reply.adapters]
        created = await asyncio.gather(*(_created(backend, request, n, None) for n in names))
        cards = [_model_card("base", app.state.started)]
        cards += [_model_card(n, c) for n, c in zip(names, created, strict=True)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        if model_id in BASE_MODEL_IDS:
            return _model_card("base", app.state.started)
        name, _, version = model_id.partition("@")
        number = int(version[1:]) if version.startswith("v") and version[1:].isdigit() else None
        if version and number is None:
            raise bad_request("model", f"{model_id!r}: expected 'name' or 'name@vN'")
        return _model_card(model_id, await _created(app.state.backend, request, name, number))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        try:
            reply = await app.state.backend.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False
        status = HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=status)


def create_app(
    grpc_target: str, registry: CollectorRegistry | None = None, metrics: RequestMetrics | None = None
) -> FastAPI:
    """The app over kiln-infer at `grpc_target`; `/metrics` serves `registry`, `metrics` records per request.

    Inside kiln-infer pass the server's registry and metrics=None (the servicer records); in front of a
    remote kiln-infer (`kiln http`) pass a registry and a RequestMetrics on it, measured at the gateway.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(grpc_target)
        app.state.backend = Backend(
            channel,
            inference_pb2_grpc.InferenceServiceStub(channel),
            adapter_pb2_grpc.AdapterServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )
        try:
            yield
        finally:
            await channel.close()

    app = FastAPI(title="Kiln OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry if registry is not None else CollectorRegistry()
    app.state.metrics = metrics
    app.state.started = time.time()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == HTTPStatus.NOT_FOUND else "invalid_request_error"
        error = ApiError(err.status_code, str(err.detail), kind)
        return JSONResponse(error.body(), status_code=err.status_code, headers=err.headers)

    _add_routes(app)
    return app
