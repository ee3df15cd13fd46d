"""kiln-infer on the GPU stack (grpcio 1.84, CUDA, bf16): the same public behaviour as on CPU; GPU only."""

from __future__ import annotations

import threading

import pytest
import torch

from kiln.v1 import inference_pb2 as pb
from tests.kiln_infer.conftest import Client

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
]


def test_server_streams_on_cuda(alice: Client) -> None:
    info = alice.inference.GetModelInfo(pb.GetModelInfoRequest(), metadata=alice.metadata)
    assert info.device.startswith("cuda") and info.dtype == "bfloat16"
    responses = list(
        alice.inference.Generate(
            pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=32),
            ),
            metadata=alice.metadata,
            timeout=120,
        )
    )
    assert "Paris" in "".join(r.text for r in responses) and len(responses) >= 3
    results: list[int] = []

    def run(i: int) -> None:
        out = alice.inference.Generate(
            pb.GenerateRequest(
                prompt=f"Story {i}:",
                sampling=pb.SamplingParams(temperature=0.8, seed=i, max_tokens=64, ignore_eos=True),
            ),
            metadata=alice.metadata,
            timeout=120,
        )
        results.append(sum(len(r.token_ids) for r in out))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [64] * 32
