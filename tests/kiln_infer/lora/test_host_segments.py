"""Prefill-sized LoRA steps: slot segments built on the host, and the kernels over them (GPU part)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln_infer.kernels.backend import TRITON_KERNELS
from kiln_infer.kernels.lora_segments import BLOCK_M, host_segments
from kiln_infer.kernels.triton_import import triton_available
from kiln_infer.lora.layers import LoraBatch, LoraSlots, add_lora, lora_delta_reference


def step_slots(seed: int, num_slots: int, num_tokens: int) -> np.ndarray:
    """A mixed step's slots: single decode tokens of any slot, then prefill runs of one slot each."""
    rng = np.random.default_rng(seed)
    decodes = rng.integers(-1, num_slots, 40)
    runs = [np.full(int(rng.integers(1, 700)), int(rng.integers(-1, num_slots))) for _ in range(80)]
    slots = np.concatenate([decodes, *runs])[:num_tokens]
    assert slots.shape[0] == num_tokens
    return slots


@pytest.mark.parametrize(("num_slots", "num_tokens"), [(1, 300), (4, 5000), (16, 16384), (64, 2049)])
def test_host_segments_cover_each_adapter_token_once(num_slots: int, num_tokens: int) -> None:
    slots = step_slots(num_slots * 7 + num_tokens, num_slots, num_tokens)
    seg = host_segments(slots, torch.device("cpu"))
    order, blocks = seg.order.numpy(), seg.blocks.numpy()
    assert seg.num_tokens == num_tokens and sorted(order.tolist()) == list(range(num_tokens))
    covered = []
    for slot, start, length in blocks.T:
        assert 1 <= length <= BLOCK_M and slot >= 0
        tokens = order[start : start + length]
        assert (slots[tokens] == slot).all()  # a block holds tokens of its own slot only
        covered += tokens.tolist()
    adapted = np.flatnonzero(slots >= 0)
    assert sorted(covered) == adapted.tolist()  # every adapter token once, base tokens never
    # as few blocks as the runs allow: one partial block per slot at most
    per_slot = [np.count_nonzero(slots == s) for s in range(num_slots)]
    assert blocks.shape[1] == sum(-(-n // BLOCK_M) for n in per_slot)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernels_match_reference(dtype: torch.dtype) -> None:
    shapes = {"gate_proj": (256, 384), "up_proj": (256, 384), "q_proj": (256, 200), "k_proj": (256, 72)}
    dev, num_slots, rank = torch.device("cuda"), 8, 16
    lora_slots = LoraSlots(1, shapes, num_slots, rank, dtype, dev, TRITON_KERNELS)
    gen = torch.Generator().manual_seed(0)
    for s in range(num_slots):
        r = [rank, 1, 7][s % 3]  # mixed ranks, zero-padded
        for m, (i, o) in shapes.items():
            lora_slots.a[0][m][s * rank : s * rank + r] = (torch.randn(r, i, generator=gen) / i**0.5).to(
                dtype
            )
            lora_slots.b[0][m][:, s * rank : s * rank + r] = torch.randn(o, r, generator=gen).to(dtype)
        lora_slots.ranks[s] = r
    slots = step_slots(1, num_slots, 6000)
    batch = LoraBatch.for_host_tokens(lora_slots, slots, dev)
    assert batch.segments is not None  # more than MAX_TOKENS tokens: the kernels, not the dense path
    x = torch.randn(slots.shape[0], 256, device=dev).to(dtype)
    out = torch.zeros(slots.shape[0], 768, device=dev, dtype=dtype)
    add_lora(x, list(out.split([384, 384], dim=1)), 0, "gate_up", batch)
    ts = torch.from_numpy(slots).to(dev)
    ref = torch.cat(
        [
            lora_delta_reference(x.float(), lora_slots.a[0][m].float(), lora_slots.b[0][m].float(), ts, rank)
            for m in ("gate_proj", "up_proj")
        ],
        dim=1,
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert (out[torch.from_numpy(slots < 0).to(dev)] == 0).all()  # base tokens untouched
