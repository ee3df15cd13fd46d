"""The load generator: client processes over real gRPC, open loop at a fixed rate, `on_start` when they send.

The server is a scripted InferenceService on a real socket (the client side is what is under test): it streams
three tokens per request, one every 10 ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from benchmarks.grpc_load import burst, generate_request
from kiln.v1 import inference_pb2, inference_pb2_grpc


class ThreeTokens(inference_pb2_grpc.InferenceServiceServicer):
    def Generate(self, request: Any, context: Any) -> Iterator[inference_pb2.GenerateResponse]:  # noqa: N802
        for i in range(3):
            time.sleep(0.01)
            yield inference_pb2.GenerateResponse(token_ids=[i + 1])


@pytest.fixture
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(ThreeTokens(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_open_loop_burst_starts_its_hook_before_the_first_request(target: str) -> None:
    started: list[float] = []
    reqs = [generate_request([1, 2, 3], 3) for _ in range(12)]
    result = burst(
        target, reqs, 12, processes=2, rate=40.0, on_start=lambda: started.append(time.monotonic())
    )
    assert result.codes() == {"OK": 12} and len(started) == 1
    submitted = sorted(s.submitted for s in result.streams)
    assert started[0] <= submitted[0] + 0.05  # the hook runs when the clients are told to go, not after
    # open loop: 12 requests at 40/s are spread over ~0.275 s, not sent together
    assert 0.2 < submitted[-1] - submitted[0] < 1.0
    assert all(s.tokens == 3 and s.first >= s.submitted for s in result.ok)
