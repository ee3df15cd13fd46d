"""Paged decode attention: one query token per sequence against its cached context (Triton on CUDA).

Two Triton paths. Large batches: one program per (sequence, kv head) walks the whole context
(`_decode_kernel`). Small batches, where that would leave most SMs idle: split-K ("flash-decoding"). The
context is cut into fixed chunks of the block table, one program per (sequence, kv head, chunk) writes a
partial (max, sum, acc) and `_merge_kernel` combines them. The chunking depends only on the batch size and
the block-table width, so a captured CUDA graph stays valid whatever the context lengths are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln_infer.kernels.triton_import import tl, triton

H200_SMS = 132  # only used off CUDA, where the kernels run in Triton's interpreter
SPLIT_WAVES = 2  # split-K aims at about this many programs per SM
MIN_SPLIT_TOKENS = 32  # smallest split-K chunk (tokens)
MERGE_TILE = 16  # chunks the merge reads at a time


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

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        acc_ptr,
        stats_ptr,
        tables_ptr,
        lens_ptr,
        scale,
        table_stride,
        table_width,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_TOKENS: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
    ):
        """One program per (sequence, kv head, chunk): unnormalised partial softmax over the chunk's tokens.

        Writes, for each query head of the group, acc [D] = sum_j exp(s_j - m) v_j, m = max_j s_j and
        l = sum_j exp(s_j - m) over the chunk's tokens below the context length; an empty chunk writes
        (acc, m, l) = (0, -inf, 0), which the merge weighs by exp(-inf) = 0.
        """
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(lens_ptr + seq)
        first = split * SPLIT_TOKENS
        end = tl.minimum(ctx, first + SPLIT_TOKENS)
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
        # the first tile's table entries do not wait for the context length (the loads below mask them)
        table_row = tables_ptr + seq * table_stride
        entry = (first + offs_n) // BLOCK_SIZE
        block = tl.load(table_row + entry, mask=entry < table_width, other=0)
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for start in range(first, end, BLOCK_N):
            pos = start + offs_n
            valid = pos < end
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_off = (slot * NUM_KV_HEADS + kv_head)[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
            entry = (pos + BLOCK_N) // BLOCK_SIZE  # prefetch the next tile's entries
            block = tl.load(table_row + entry, mask=entry < table_width, other=0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split  # [GROUP_PAD] partial rows
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=q_mask[:, None])
        tl.store(stats_ptr + part * 2, m_i, mask=q_mask)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=q_mask)

    @triton.jit
    def _merge_kernel(
        acc_ptr,
        stats_ptr,
        out_ptr,
        HEAD_DIM: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """One program per (sequence, query head): log-sum-exp combination of its chunks' partials.

        Reads every chunk (empty ones weigh 0), so nothing waits on the context length; walks them TILE at
        a time with a running max, so any number of chunks fits in registers.
        """
        row = tl.program_id(0)  # seq * NUM_HEADS + head
        offs_t = tl.arange(0, TILE)
        offs_d = tl.arange(0, HEAD_DIM)
        m_run = tl.max(tl.full([TILE], float("-inf"), dtype=tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([TILE], dtype=tl.float32), axis=0)
        acc_run = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for first in tl.static_range(0, NUM_SPLITS, TILE):
            inside = first + offs_t < NUM_SPLITS
            part = row * NUM_SPLITS + first + offs_t
            m = tl.load(stats_ptr + part * 2, mask=inside, other=float("-inf"))
            l_s = tl.load(stats_ptr + part * 2 + 1, mask=inside, other=0.0)
            acc = tl.load(
                acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=inside[:, None], other=0.0
            )
            m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: the first tile holds chunk 0
            alpha = tl.exp(m_run - m_new)
            w = tl.exp(m - m_new)  # 0 for empty chunks
            l_run = l_run * alpha + tl.sum(l_s * w, axis=0)
            acc_run = acc_run * alpha + tl.sum(acc * w[:, None], axis=0)
            m_run = m_new
        tl.store(out_ptr + row * HEAD_DIM + offs_d, (acc_run / l_run).to(out_ptr.dtype.element_ty))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (an H200's count off CUDA, where only the interpreter runs)."""
    if device.type != "cuda":
        return H200_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_blocks(batch: int, kv_heads: int, table_width: int, block_size: int, num_sms: int) -> int:
    """Block-table entries per split-K chunk; >= table_width means the one-pass kernel.

    Static on purpose (batch size and table width are fixed per captured graph): one pass when the
    (sequence, kv head) programs alone fill the SMs, else chunks of a power-of-two number of blocks sized
    to give about SPLIT_WAVES programs per SM, never smaller than MIN_SPLIT_TOKENS.
    """
    programs = batch * kv_heads
    if programs >= num_sms:
        return table_width
    wanted = -(-SPLIT_WAVES * num_sms // programs)  # chunks per sequence
    blocks = _next_power_of_2(-(-table_width // wanted))
    return max(blocks, -(-MIN_SPLIT_TOKENS // block_size))


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    chunk_blocks: int,
) -> torch.Tensor:
    """The Triton path of `decode_attention` with a given chunk size (block-table entries per program).

    chunk_blocks >= the table width runs the one-pass kernel; otherwise split-K with
    ceil(width / chunk_blocks) chunks per sequence and a merge. Same contract as `decode_attention`.
    """
    b, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    width = block_tables.shape[1]
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    q = q.contiguous()
    out = torch.empty(b, heads, dim, dtype=q.dtype, device=q.device)
    num_splits = -(-width // chunk_blocks)
    if num_splits <= 1:
        _decode_kernel[(b, kv_heads)](
            q,
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
            GROUP_PAD=group_pad,
            HEAD_DIM=dim,
            BLOCK_SIZE=block_size,
            BLOCK_N=max(16, min(64, block_size * 4)),
            num_warps=4,
            num_stages=2,
        )
        return out.reshape(b, heads * dim)
    split_tokens = chunk_blocks * block_size
    rows = b * heads * num_splits
    scratch = torch.empty(rows * (dim + 2), dtype=torch.float32, device=q.device)
    acc, stats = scratch[: rows * dim], scratch[rows * dim :]  # [rows, D] and [rows, (m, l)]
    _split_kernel[(b, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        acc,
        stats,
        block_tables,
        context_lens,
        scale,
        block_tables.stride(0),
        width,
        NUM_HEADS=heads,
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, min(64, triton.next_power_of_2(split_tokens))),
        SPLIT_TOKENS=split_tokens,
        NUM_SPLITS=num_splits,
        num_warps=4,
        num_stages=2,
    )
    _merge_kernel[(b * heads,)](
        acc,
        stats,
        out,
        HEAD_DIM=dim,
        NUM_SPLITS=num_splits,
        TILE=min(MERGE_TILE, triton.next_power_of_2(num_splits)),
        num_warps=2,
    )
    return out.reshape(b, heads * dim)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged context, in Triton (CUDA tensors).

    semantics:
        for b in range(B), head h (kv head h // (H / KVH)):
            K, V = cache rows of block_tables[b] for positions 0 .. context_lens[b] - 1
            out[b, h] = softmax(q[b, h] @ K.T * scale) @ V
    q: [B, H, D]; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, N] int; context_lens: [B] int;
    returns [B, H * D]. Every context_lens[b] must be >= 1 and <= N * block_size. `decode_attention_reference`
    is the torch version.
    """
    chunk = split_blocks(
        q.shape[0], k_cache.shape[2], block_tables.shape[1], k_cache.shape[1], sm_count(q.device)
    )
    return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, chunk)
