"""Paged KV block bookkeeping: allocation, ref counts, prefix cache keyed by adapter + hash chain."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kiln_infer.engine.sequence import Sequence

BlockKey = tuple[int, str, tuple[int, ...]]  # (previous block's hash, adapter key, this block's tokens)


@dataclass
class Block:
    """One KV block: `ref_count` sequences use it; `key` is set once it holds a full, cached block."""

    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None


class BlockManager:
    """Hands out KV blocks; freed full blocks stay findable by content until their memory is reused."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self._cached: dict[BlockKey, int] = {}  # content key -> block id
        self.prefix_hits = 0  # blocks reused from the cache (for metrics and tests)

    @property
    def num_blocks(self) -> int:
        """Total blocks in the cache."""
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks no sequence references (some may still be findable by content)."""
        return len(self._free)

    def _block_key(self, seq: Sequence, index: int, prev_hash: int) -> BlockKey:
        bs = self.block_size
        return (prev_hash, seq.adapter_key, tuple(seq.token_ids[index * bs : (index + 1) * bs]))

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the leading full blocks; returns tokens already computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (len(seq.token_ids) - 1) // self.block_size  # always compute at least one token
        prev = 0
        for i in range(max_blocks):
            key = self._block_key(seq, i, prev)
            block_id = self._cached.get(key)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            prev = hash(key)
            seq.block_hashes.append(prev)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += len(seq.block_table)
        return seq.num_computed_tokens

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks required to hold `num_new_tokens` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether enough blocks are free for the next `num_new_tokens` tokens."""
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate the blocks for the next `num_new_tokens` tokens."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's newly completed full blocks findable by content."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else 0
        for i in range(seq.num_hashed_blocks, full):
            key = self._block_key(seq, i, prev)
            block = self.blocks[seq.block_table[i]]
            if key not in self._cached and block.key is None:
                block.key = key
                self._cached[key] = block.block_id
            prev = hash(key)
            seq.block_hashes.append(prev)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks return to the free list (tail = newest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
