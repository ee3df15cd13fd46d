"""Attention over the paged KV cache: decode rows through the chosen kernel, prefill chunks through SDPA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PrefillMetadata:
    """Prefill chunks in a padded layout. B = chunks, Q = longest chunk, N = blocks of the longest context."""

    block_tables: torch.Tensor  # [B, N] cache block ids per sequence (padding: 0)
    query_index: torch.Tensor  # [B, Q] prefill-token index of chunk position i of sequence b (padding: 0)
    flat_index: torch.Tensor  # [P] b * Q + i for each prefill token: padded rows back to the flat order
    attn_mask: torch.Tensor  # [B, 1, Q, N * block_size] True = may attend


@dataclass
class StepMetadata:
    """Where the T tokens of a step go: first `num_decode` single-token decodes, then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each token's K/V
    num_decode: int
    decode_tables: torch.Tensor | None  # [num_decode, N] int32 block ids
    decode_lens: torch.Tensor | None  # [num_decode] int32 context length including the new token
    prefill: PrefillMetadata | None


def slots_for(starts: np.ndarray, lengths: np.ndarray, tables: np.ndarray, block_size: int) -> np.ndarray:
    """Flat cache slots of positions [start, start + length) of each row of `tables` ([B, N] block ids)."""
    rows = np.repeat(np.arange(len(starts)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.repeat(starts, lengths) + offsets
    return tables[rows, pos // block_size].astype(np.int64) * block_size + pos % block_size


def block_table_array(tables: list[list[int]], width: int) -> np.ndarray:
    """Pad block id lists into an int32 array [len(tables), width]."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    out = np.zeros((len(tables), width), dtype=np.int32)
    out[np.arange(width) < lengths[:, None]] = flat  # row-major fill: each row's ids, then its padding
    return out


def build_step_metadata(
    starts: list[int],
    lengths: list[int],
    tables: list[list[int]],
    num_decode: int,
    block_size: int,
    device: torch.device,
) -> StepMetadata:
    """Host-side metadata for chunks [start, start + length) of each sequence (decodes first)."""
    starts_a, lengths_a = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    width = int(max(-(-(s + n) // block_size) for s, n in zip(starts, lengths, strict=True)))
    table_a = block_table_array(tables, width)
    slot_mapping = torch.from_numpy(slots_for(starts_a, lengths_a, table_a, block_size)).to(device)
    decode_tables = decode_lens = None
    if num_decode:
        decode_tables = torch.from_numpy(table_a[:num_decode]).to(device)
        decode_lens = torch.from_numpy((starts_a[:num_decode] + 1).astype(np.int32)).to(device)
    prefill = None
    if num_decode < len(starts):
        prefill = _prefill_metadata(
            starts_a[num_decode:], lengths_a[num_decode:], table_a[num_decode:], block_size, device
        )
    return StepMetadata(slot_mapping, num_decode, decode_tables, decode_lens, prefill)


def _prefill_metadata(
    starts: np.ndarray, lengths: np.ndarray, tables: np.ndarray, block_size: int, device: torch.device
) -> PrefillMetadata:
    b, q = len(starts), int(lengths.max())
    n = int(max(-(-(s + ln) // block_size) for s, ln in zip(starts, lengths, strict=True)))
    offsets = np.cumsum(lengths) - lengths
    qpos = np.arange(q)[None, :]
    query_index = np.where(qpos < lengths[:, None], offsets[:, None] + qpos, 0)
    rows = np.repeat(np.arange(b), lengths)
    flat_index = rows * q + (np.arange(lengths.sum()) - np.repeat(offsets, lengths))
    kpos = np.arange(n * block_size)[None, None, :]
    mask = (kpos <= starts[:, None, None] + qpos[:, :, None]) & (qpos[:, :, None] < lengths[:, None, None])
    mask[:, :, 0] = True  # padded query rows attend to something (their output is discarded)
    return PrefillMetadata(
        block_tables=torch.from_numpy(tables[:, :n].astype(np.int64)).to(device),
        query_index=torch.from_numpy(query_index).to(device),
        flat_index=torch.from_numpy(flat_index).to(device),
        attn_mask=torch.from_numpy(mask[:, None]).to(device),
    )


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PrefillMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of prefill chunks over each sequence's cached context.

    semantics:
        for each sequence b with chunk positions p in [start_b, start_b + len_b):
            out[token(b, p)] = softmax(q[token(b, p)] @ K_b[:p + 1].T * scale) @ V_b[:p + 1]
    q: [P, H, D]; caches: [num_blocks, block_size, KVH, D]; returns [P, H * D].
    """
    b = meta.block_tables.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    keys = k_cache[meta.block_tables].view(b, -1, *k_cache.shape[2:]).transpose(1, 2)  # [B, KVH, L, D]
    values = v_cache[meta.block_tables].view(b, -1, *v_cache.shape[2:]).transpose(1, 2)
    queries = q[meta.query_index].transpose(1, 2)  # [B, H, Q, D]
    if keys.shape[1] != heads:
        rep = heads // keys.shape[1]
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.attn_mask, scale=scale)
    return out.transpose(1, 2).reshape(-1, heads * dim)[meta.flat_index]


DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: StepMetadata,
    scale: float,
    decode_attention: DecodeAttention,
) -> torch.Tensor:
    """Attention for every token of the step ([T, H, D] -> [T, H * D]), decodes and prefill chunks.

    `decode_attention` is the engine's choice of the kernel of that name (Triton or the torch reference).
    """
    nd = meta.num_decode
    parts = []
    if nd:
        assert meta.decode_tables is not None and meta.decode_lens is not None
        parts.append(decode_attention(q[:nd], k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale))
    if meta.prefill is not None:
        parts.append(prefill_attention(q[nd:], k_cache, v_cache, meta.prefill, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
