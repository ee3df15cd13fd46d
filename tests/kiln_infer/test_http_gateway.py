"""The OpenAI-style HTTP front, over the session's real kiln-infer."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kiln_infer.http_gateway import GatewayServer
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY


@pytest.fixture(scope="module")
def gateway(infer_server: InferServer) -> Iterator[str]:
    """The gateway on an ephemeral port, pointing at the session server."""
    server = GatewayServer(("127.0.0.1", 0), f"127.0.0.1:{infer_server.port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _post(url: str, body: dict, key: str = ALICE_KEY) -> urllib.request.Request:
    return urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )


def test_chat_completion_answers(gateway: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    with urllib.request.urlopen(_post(gateway + "/v1/chat/completions", body), timeout=120) as resp:
        reply = json.load(resp)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["model"] == "base"
    assert reply["usage"]["completion_tokens"] > 0


def test_streamed_completion_arrives_as_server_sent_events(gateway: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    with urllib.request.urlopen(_post(gateway + "/v1/completions", body), timeout=120) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": 3}, 400, "prompt"),
        ({"prompt": "hi", "model": "no-such-adapter"}, 404, "adapter"),
    ],
)
def test_bad_requests_get_http_errors_naming_the_field(
    gateway: str, body: dict, status: int, field: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(_post(gateway + "/v1/completions", body), timeout=60)
    assert info.value.code == status
    assert field in json.load(info.value)["error"]["message"]


def test_bad_api_key_is_401(gateway: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(_post(gateway + "/v1/completions", {"prompt": "hi"}, key="nope"), timeout=60)
    assert info.value.code == 401


def test_models_lists_base(gateway: str) -> None:
    req = urllib.request.Request(gateway + "/v1/models", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        ids = [m["id"] for m in json.load(resp)["data"]]
    assert ids[0] == "base"
