"""Paged attention over the KV cache: gather each sequence's blocks, then one masked SDPA for the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the flat batch, the padded batch and the paged cache.

    T = tokens this step, B = sequences, Q = longest chunk, N = blocks of the longest context.
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor  # [B, N] cache block ids per sequence (padding: 0)
    query_index: torch.Tensor  # [B, Q] flat token index of chunk position i of sequence b (padding: 0)
    flat_index: torch.Tensor  # [T] b * Q + i for each flat token: padded rows back to the flat batch
    attn_mask: torch.Tensor  # [B, 1, Q, N * block_size] True = may attend


def build_attention_metadata(
    starts: list[int],
    lengths: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Host-side construction of the metadata for chunks [start, start + length) of each sequence."""
    b, q = len(starts), max(lengths)
    n = max(-(-(s + n_) // block_size) for s, n_ in zip(starts, lengths, strict=True))
    tables = torch.zeros(b, n, dtype=torch.long)
    slot_mapping, query_index, flat_index = [], torch.zeros(b, q, dtype=torch.long), []
    t = 0
    for i, (start, length, table) in enumerate(zip(starts, lengths, block_tables, strict=True)):
        tables[i, : len(table)] = torch.tensor(table[:n], dtype=torch.long)
        for pos in range(start, start + length):
            slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        query_index[i, :length] = torch.arange(t, t + length)
        flat_index.extend(range(i * q, i * q + length))
        t += length
    starts_t = torch.tensor(starts)[:, None, None]
    lengths_t = torch.tensor(lengths)[:, None, None]
    qpos = torch.arange(q)[None, :, None]
    kpos = torch.arange(n * block_size)[None, None, :]
    mask = (kpos <= starts_t + qpos) & (qpos < lengths_t)
    mask[:, :, 0] = True  # padded query rows attend to something (their output is discarded)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        block_tables=tables.to(device),
        query_index=query_index.to(device),
        flat_index=torch.tensor(flat_index, dtype=torch.long, device=device),
        attn_mask=mask[:, None].to(device),
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's K/V ([T, KVH, D]) into caches of shape [num_blocks, block_size, KVH, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached context.

    semantics:
        for each sequence b with chunk positions p in [start_b, start_b + len_b):
            out[token(b, p)] = softmax(q[token(b, p)] @ K_b[:p + 1].T * scale) @ V_b[:p + 1]
    q: [T, H, D]; caches: [num_blocks, block_size, KVH, D]; returns [T, H * D].
    """
    b, nblk = meta.block_tables.shape
    heads, dim = q.shape[1], q.shape[2]
    keys = k_cache[meta.block_tables].view(b, -1, *k_cache.shape[2:]).transpose(1, 2)  # [B, KVH, L, D]
    values = v_cache[meta.block_tables].view(b, -1, *v_cache.shape[2:]).transpose(1, 2)
    queries = q[meta.query_index].transpose(1, 2)  # [B, H, Q, D]
    if keys.shape[1] != heads:
        rep = heads // keys.shape[1]
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.attn_mask, scale=scale)
    out = out.transpose(1, 2).reshape(-1, heads * dim)  # [B * Q, H * D]
    return out[meta.flat_index]
