"""Split-K decode attention and the fused RoPE/KV write against their torch references; GPU only."""

from __future__ import annotations

import pytest
import torch

from kiln_infer.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
    sm_count,
    split_blocks,
)
from kiln_infer.kernels.rope_cache import launch_rope_cache, rope_and_cache, rope_and_cache_reference
from kiln_infer.kernels.triton_import import triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]

BLOCK = 16
CONTEXTS = (1, 15, 16, 17, 300, 2000)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 5e-3}


def paged_inputs(
    lens: list[int], heads: int, kv_heads: int, dim: int, width: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, D], K/V caches with shuffled blocks, block tables [B, width] and context lengths [B]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lens)
    blocks = b * width + 1
    q = torch.randn(b, heads, dim, device="cuda", generator=gen).to(dtype)
    k = torch.randn(blocks, BLOCK, kv_heads, dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(blocks, BLOCK, kv_heads, dim, device="cuda", generator=gen).to(dtype)
    tables = torch.randperm(blocks, device="cuda", generator=gen)[: b * width].view(b, width)
    return q, k, v, tables.to(torch.int32), torch.tensor(lens, device="cuda", dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (8, 8)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("batch", [1, 2, 4, 64, 256])
def test_split_k_decode_matches_reference(
    batch: int, dim: int, heads: int, kv_heads: int, dtype: torch.dtype
) -> None:
    """Every chunking (the chosen one, forced splits, one pass) equals the reference at every length."""
    for ctx in CONTEXTS:
        # row 0 at exactly ctx, the others anywhere in 1..ctx; two spare table entries give empty chunks
        gen = torch.Generator().manual_seed(ctx)
        lens = [ctx] + torch.randint(1, ctx + 1, (batch - 1,), generator=gen).tolist()
        width = -(-ctx // BLOCK) + 2
        q, k, v, tables, ctx_lens = paged_inputs(lens, heads, kv_heads, dim, width, dtype, seed=ctx)
        scale = dim**-0.5
        ref = decode_attention_reference(q.float(), k.float(), v.float(), tables, ctx_lens, scale)
        chosen = split_blocks(batch, kv_heads, width, BLOCK, sm_count(q.device))
        for chunk in dict.fromkeys([chosen, 1, 2, 3, 8, width]):
            out = decode_attention_triton(q, k, v, tables, ctx_lens, scale, chunk)
            err = (out.float() - ref).abs().max().item()
            assert out.dtype == dtype and err < TOLERANCE[dtype], (ctx, chunk, err)
        out = decode_attention(q, k, v, tables, ctx_lens, scale)
        assert (out.float() - ref).abs().max().item() < TOLERANCE[dtype]


def test_split_k_choice_is_static_and_spares_large_batches() -> None:
    """Batch 1 splits (the H200 case), batch 256 keeps the one-pass kernel."""
    sms = sm_count(torch.device("cuda"))
    assert split_blocks(1, 8, 25, BLOCK, sms) < 25
    assert split_blocks(256, 8, 25, BLOCK, sms) >= 25


@pytest.mark.parametrize("batch", [1, 4])
def test_split_k_decode_in_a_cuda_graph(batch: int) -> None:
    """Captured once, replayed with new lengths (1 .. the full table) and new queries: still the reference."""
    heads, kv_heads, dim, width, dtype = 32, 8, 64, 25, torch.bfloat16
    q, k, v, tables, lens = paged_inputs([1] * batch, heads, kv_heads, dim, width, dtype, seed=0)
    assert split_blocks(batch, kv_heads, width, BLOCK, sm_count(q.device)) < width  # the split-K path
    scale = dim**-0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) off the capture
        decode_attention(q, k, v, tables, lens, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, tables, lens, scale)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step_lens in ([1] * batch, [17] * batch, [width * BLOCK] * batch, [300, 2, 33, 399][:batch]):
        lens.copy_(torch.tensor(step_lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen))
        tables.copy_(tables[:, torch.randperm(width, device="cuda", generator=gen)])
        graph.replay()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), tables, lens, scale)
        assert (out.float() - ref).abs().max().item() < TOLERANCE[dtype], step_lens


@pytest.mark.parametrize("tokens", [1, 7, 256, 16384])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 8, 64), (8, 8, 128)])
def test_fused_rope_cache_matches_torch(tokens: int, heads: int, kv_heads: int, dim: int) -> None:
    """Chosen and forced tilings equal the fp32 torch path to a bf16 ulp (V bit for bit)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    dtype = torch.bfloat16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided, as in the model
    angles = torch.rand(tokens, dim, device="cuda", generator=gen) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    blocks = -(-tokens // BLOCK) + 2
    slots = torch.randperm(blocks * BLOCK, device="cuda", generator=gen)[:tokens]

    def caches(dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(blocks, BLOCK, kv_heads, dim, device="cuda", dtype=dt),
            torch.zeros(blocks, BLOCK, kv_heads, dim, device="cuda", dtype=dt),
        )

    def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
        return bool(((out.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-5).all())  # one bf16 ulp

    ref_kv = caches(torch.float32)
    rope32 = (cos.float(), sin.float())
    ref = rope_and_cache_reference(q.float(), k.float(), v.float(), rope32, ref_kv, slots, heads, kv_heads)
    out_kv = caches(dtype)
    runs = [(rope_and_cache(q, k, v, (cos, sin), out_kv, slots, heads, kv_heads), out_kv)]
    for block_t, per_program in ((2, 1), (64, 1), (16, 8)):  # tokens x heads a program
        forced_kv, forced = caches(dtype), torch.empty(tokens, heads, dim, device="cuda", dtype=dtype)
        launch_rope_cache(q, k, v, forced, (cos, sin), forced_kv, slots, block_t, per_program)
        runs.append((forced, forced_kv))
    for out, kv in runs:
        assert close(out, ref) and close(kv[0], ref_kv[0])
        assert torch.equal(kv[1].float(), ref_kv[1])
