"""Micro-batches give the full batch's gradient (token-weighted), on a small real Llama."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln_train.micro_batch import IGNORE, accumulate_backward


def test_micro_batches_match_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, 64, (4, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[1, :9] = IGNORE  # rows with different numbers of completion tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    grads = []
    losses = []
    calls = []
    for micro in (4, 1, 3):
        model.zero_grad(set_to_none=True)
        losses.append(accumulate_backward(model, batch, micro, between=lambda m=micro: calls.append(m)))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for g, loss in zip(grads[1:], losses[1:], strict=True):
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)
        assert abs(loss - losses[0]) < 1e-5
    assert calls == [1, 1, 1, 3]  # only between micro-batches: 4 rows by 1 (3 gaps), by 3 (1), by 4 (none)
