"""kiln-infer on the GPU stack (grpcio 1.84, CUDA, bf16): a 1B-shape model served over gRPC; GPU only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kiln.v1 import inference_pb2 as pb
from kiln.v1 import inference_pb2_grpc
from kiln_common.config import InferConfig, RedisConfig
from kiln_infer.server import InferServer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
]


@pytest.fixture(scope="module")
def gpu_stub(kiln_home: Path, redis_url: str) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    """kiln-infer over random Llama-3.2-1B-shaped weights on cuda (only the tokenizer comes from SmolLM2)."""
    server = InferServer(
        InferConfig(
            home=kiln_home,
            redis=RedisConfig(home=kiln_home),
            model="dummy:llama-3.2-1b",
            port=0,
            drain_timeout_s=5.0,
        )
    )
    server.start()
    server.start_warm_up()
    assert server.serving.wait(300)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    server.drain()


def test_server_streams_on_cuda(gpu_stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    info = gpu_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.device.startswith("cuda") and info.dtype == "bfloat16" and info.model == "dummy:llama-3.2-1b"
    results: list[tuple[int, int]] = []

    def run(i: int) -> None:
        out = list(
            gpu_stub.Generate(
                pb.GenerateRequest(
                    prompt=f"Story {i}:",
                    sampling=pb.SamplingParams(temperature=0.8, seed=i, max_tokens=64, ignore_eos=True),
                ),
                timeout=120,
            )
        )
        results.append((len(out), sum(len(r.token_ids) for r in out)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 32 and all(tokens == 64 and chunks > 1 for chunks, tokens in results)
