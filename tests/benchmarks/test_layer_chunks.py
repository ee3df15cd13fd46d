"""Training in layer chunks gives the gradient of one backward through the model (CPU, a tiny real Llama)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from benchmarks.governor_trainer import _PadOnly, synthetic_batch
from benchmarks.layer_chunks import LayerChunks
from kiln_train.micro_batch import accumulate_backward
from kiln_train.trainer import LoraTrainer, TrainerConfig
from tests.benchmarks.test_governor_bench import tiny_base


def test_chunked_gradient_equals_the_models_own_backward() -> None:
    trainer = LoraTrainer(tiny_base(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    params = trainer.trainable()
    with torch.no_grad():  # LoRA's B starts at zero: give every adapter weight a value, so every path counts
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    batch = synthetic_batch(128, 3, 32, seed=5, device=torch.device("cpu"))
    trainer.model.zero_grad(set_to_none=True)
    want_loss = accumulate_backward(trainer.model, batch, 3)
    want = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    trainer.model.zero_grad(set_to_none=True)
    chunks = LayerChunks(trainer.model, params, 32, graphs=False)
    assert len(chunks.chunks) == 1 + 2 + 4 + 2  # embed, 2 forwards, the head in 4 slices, 2 backwards
    calls: list[int] = []
    loss = chunks.step_grads(batch, before=lambda: calls.append(1))
    assert len(calls) == 3 * len(chunks.chunks)  # the hand-off is asked before every chunk of every row
    assert abs(loss - want_loss) < 1e-5
    for p, g in zip(params, want, strict=True):
        assert p.grad is not None and g.abs().max() > 0
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_chunks_give_the_eager_gradient_and_wait_for_serving(tmp_path: Path) -> None:
    """On a GPU: the chunk graphs' gradient is the model's own, twice over (buffers refilled), and a chunk
    waits while serving's interprocess event says its work is still running."""
    from kiln_common.gpu_turn import TrainingTurn

    trainer = LoraTrainer(tiny_base().cuda(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    params = trainer.trainable()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    chunks = LayerChunks(trainer.model, params, 32, graphs=True)
    assert len(chunks.graphs) == len(chunks.chunks)
    for seed in (1, 2):
        batch = synthetic_batch(128, 3, 32, seed, torch.device("cuda"))
        trainer.model.zero_grad(set_to_none=True)
        eager_loss = accumulate_backward(trainer.model, batch, 3)
        eager = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        loss = chunks.step_grads(batch)
        assert abs(loss - eager_loss) < 1e-4
        for p, g in zip(params, eager, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
    serving = subprocess.Popen(  # kiln-infer's side in a process of its own, as in production
        [sys.executable, "-c", SERVING, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert serving.stdin is not None and serving.stdout is not None
    try:
        turn = TrainingTurn.open(json.loads(serving.stdout.readline()), torch.device("cuda"))
        assert turn.event is not None and not turn.serving_busy()
        serving.stdin.write("step\n")
        serving.stdin.flush()
        assert serving.stdout.readline().strip() == "launched"
        assert turn.serving_busy()  # its ~0.2 s of GPU work is still running
        assert 0.0 < turn.wait(timeout_s=5.0) < 5.0 and not turn.serving_busy()
        turn.close()
    finally:
        serving.stdin.close()
        serving.wait(30)


SERVING = """
import json, sys
from pathlib import Path
import torch
from kiln_common.gpu_turn import ServingTurn
turn = ServingTurn(Path(sys.argv[1]), torch.device("cuda"))
print(json.dumps(turn.handle("g")), flush=True)
for _ in sys.stdin:
    with turn.launching():
        torch.cuda._sleep(400_000_000)
    print("launched", flush=True)
turn.close()
"""
