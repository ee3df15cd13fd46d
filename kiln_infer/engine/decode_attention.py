"""Paged decode attention: one query token per sequence against its cached context (Triton on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available() -> bool:
    """Whether the Triton decode kernel can be used."""
    return triton is not None


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch version of `decode_attention` (gather the blocks, masked SDPA); same contract."""
    b, heads, dim = q.shape
    tables = block_tables.long()
    keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
    values = v_cache[tables].flatten(1, 2).transpose(1, 2)
    rep = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    mask = torch.arange(keys.shape[2], device=q.device)[None, :] < context_lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], scale=scale
    )
    return out.reshape(b, heads * dim)


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        tables_ptr,
        lens_ptr,
        scale,
        table_stride,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program per (sequence, kv head): all query heads of the group, online softmax over tiles."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        ctx = tl.load(lens_ptr + seq)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g
        q_mask = offs_g < GROUP
        q = tl.load(
            q_ptr + (seq * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=q_mask[:, None],
            other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for start in range(0, ctx, BLOCK_N):
            pos = start + offs_n
            valid = pos < ctx
            block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_off = (slot * NUM_KV_HEADS + kv_head)[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (seq * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask[:, None],
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    use_triton: bool,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged context.

    semantics:
        for b in range(B), head h (kv head h // (H / KVH)):
            K, V = cache rows of block_tables[b] for positions 0 .. context_lens[b] - 1
            out[b, h] = softmax(q[b, h] @ K.T * scale) @ V
    q: [B, H, D]; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, N] int; context_lens: [B] int;
    returns [B, H * D]. Every context_lens[b] must be >= 1.
    """
    if not use_triton or triton is None:
        return decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    b, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty(b, heads, dim, dtype=q.dtype, device=q.device)
    _decode_kernel[(b, kv_heads)](
        q.contiguous(),
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        scale,
        block_tables.stride(0),
        NUM_HEADS=heads,
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, block_size * 4)),
        num_warps=4,
        num_stages=2,
    )
    return out.reshape(b, heads * dim)
