"""Training in layer chunks gives the gradient of one backward through the model (CPU, a tiny real Llama)."""

from __future__ import annotations

from typing import Any, cast

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
    assert len(chunks.chunks) == 2 * 2 + 2  # embed, 2 forwards, head, 2 backwards
    calls: list[int] = []
    loss = chunks.step_grads(batch, before=lambda: calls.append(1))
    assert len(calls) == 3 * len(chunks.chunks)  # the hand-off is asked before every chunk of every row
    assert abs(loss - want_loss) < 1e-5
    for p, g in zip(params, want, strict=True):
        assert p.grad is not None and g.abs().max() > 0
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
