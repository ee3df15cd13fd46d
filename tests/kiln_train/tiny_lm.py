"""A tiny Llama with a 96-token vocabulary and random prompt/completion rows: trainer tests in seconds."""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln_train.encoding import IGNORE, Encoded

VOCAB = 96


class TinyTok:
    """The trainer's tokenizer needs are the pad and end ids only: rows are token ids already."""

    pad_token_id = 0
    eos_token_id = 1


def tiny_model(device: str = "cpu") -> LlamaForCausalLM:
    """The same random weights every call (seed 0)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float().to(device)


def examples(n: int, seed: int) -> list[Encoded]:
    """Rows of different lengths, each a prompt (masked) and a completion."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, completion = rng.randint(3, 9), rng.randint(2, 20)
        ids = [rng.randrange(2, VOCAB) for _ in range(prompt + completion)]
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out
