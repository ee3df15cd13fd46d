"""Allocation of the paged KV cache tensors."""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

from kiln_infer.engine.config import EngineConfig

log = logging.getLogger(__name__)


def kv_bytes_per_token(model_config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes over all layers of a model."""
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
    return 2 * int(model_config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize


def num_kv_blocks(
    config: EngineConfig,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Blocks to allocate: as configured, a share of free CUDA memory, or enough for 8 sequences on CPU."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        per_block = 2 * num_layers * config.block_size * num_kv_heads * head_dim * dtype.itemsize
        return max(config.blocks_per_seq, int(free * config.kv_memory_fraction) // per_block)
    return config.blocks_per_seq * min(config.max_num_seqs, 8)


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_blocks, block_size, KVH, D], carved out of one allocation."""
    storage = torch.zeros(
        num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    gib = storage.numel() * storage.element_size() / 2**30
    log.info("KV cache: %d blocks of %d tokens, %.2f GiB", num_blocks, block_size, gib)
    return [(storage[i, 0], storage[i, 1]) for i in range(num_layers)]
