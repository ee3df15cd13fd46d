"""The HTTP front in a thread, in front of the session's real kiln-infer, and the official openai client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from prometheus_client import CollectorRegistry

from kiln_infer.http import HttpThread
from kiln_infer.metrics import RequestMetrics
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY


@dataclass
class Front:
    """The running HTTP front: its base URL and the registry its /metrics serves."""

    url: str
    registry: CollectorRegistry


@pytest.fixture(scope="module")
def front(infer_server: InferServer) -> Iterator[Front]:
    """The OpenAI-compatible app on an ephemeral port, measuring requests at the gateway."""
    registry = CollectorRegistry()
    server = HttpThread("127.0.0.1", 0, f"127.0.0.1:{infer_server.port}", registry, RequestMetrics(registry))
    port = server.start()
    yield Front(f"http://127.0.0.1:{port}", registry)
    server.stop()


@pytest.fixture
def client(front: Front) -> Iterator[openai.OpenAI]:
    """The official client as tenant alice, retries off (a retry would hide an error)."""
    with openai.OpenAI(base_url=front.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=120) as c:
        yield c
