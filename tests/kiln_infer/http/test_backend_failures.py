"""The HTTP front when its backend misbehaves: a real grpc.aio InferenceService (over a socket) that streams a
few tokens and then dies, sheds load, or records what it was sent. Only this backend is scripted; the HTTP
app, uvicorn, the gRPC channel and the official openai client are the real ones."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import openai
import pytest

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_infer.http import HttpThread


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """Generate by prompt: "die" streams two tokens then the server stops; "busy" is RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.kill: asyncio.Event | None = None

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if request.prompt == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded, retry later")
        for i in range(2):
            yield inference_pb2.GenerateResponse(request_id="r1", text=f"tok{i} ", token_ids=[i])
        if request.prompt == "die":
            assert self.kill is not None
            self.kill.set()  # the test's loop stops the whole server now, mid-stream
            await asyncio.sleep(60)
        final = inference_pb2.GenerateResponse(
            request_id="r1", finish_reason=inference_pb2.FINISH_REASON_LENGTH
        )
        final.usage.prompt_tokens, final.usage.completion_tokens = 1, 2
        yield final


class Backend:
    """The scripted server on its own loop in a thread, stopped (grace 0) when a stream asks to die."""

    def __init__(self) -> None:
        self.servicer = ScriptedInference()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.servicer.kill = asyncio.Event()
        self.watcher = asyncio.get_running_loop().create_task(self._die_on_request())
        return port

    async def _die_on_request(self) -> None:
        assert self.servicer.kill is not None
        await self.servicer.kill.wait()
        await self.server.stop(0)

    async def _stop(self) -> None:
        self.watcher.cancel()
        await self.server.stop(0)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture
def url(backend: Backend) -> Iterator[str]:
    front = HttpThread("127.0.0.1", 0, f"127.0.0.1:{backend.port}")
    port = front.start()
    yield f"http://127.0.0.1:{port}"
    front.stop()


def test_backend_dying_mid_stream_makes_the_client_raise(url: str) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client:
        stream = client.completions.create(model="base", prompt="die", max_tokens=10, stream=True)
        texts = []
        with pytest.raises(openai.APIError) as err:
            for chunk in stream:
                texts.append(chunk.choices[0].text)
    assert texts == ["tok0 ", "tok1 "]
    assert err.value.body["type"] == "service_unavailable_error"  # type: ignore[index]


def test_mid_stream_error_is_an_openai_error_event_then_done(url: str) -> None:
    body = {"model": "base", "prompt": "die", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = httpx.Response(200, content=events[-2]).json()["error"]
    assert error["type"] == "service_unavailable_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_shed_load_is_429_with_retry_after(url: str) -> None:
    resp = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "busy"}, timeout=30)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="base", prompt="busy", stream=True)


def test_user_and_key_travel_as_grpc_metadata(url: str, backend: Backend) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key="secret-key-1", max_retries=0) as client:
        reply = client.completions.create(model="base", prompt="hi", user="customer-42")
    assert reply.choices[0].text == "tok0 tok1 " and reply.choices[0].finish_reason == "length"
    sent = backend.servicer.metadata[-1]
    assert sent["x-kiln-sticky-key"] == "customer-42"
    assert sent["authorization"] == "Bearer secret-key-1"


def test_unknown_route_and_bad_json_are_openai_errors(url: str) -> None:
    missing = httpx.get(url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    bad = httpx.post(
        url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body"
    big = httpx.post(url + "/v1/completions", content=b"x" * (2 << 20))
    assert big.status_code == 413
    after = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "hi"})
    assert after.status_code == 200  # nothing left over from the refused body
