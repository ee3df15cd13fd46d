"""A step's tokens grouped by LoRA slot into blocks of one slot: the input format of the bgmv kernels.

On the device (`segment_tokens`, one Triton launch, capturable in a CUDA graph) or on the host for eager steps
(`host_segments`, a numpy sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln_infer.kernels.triton_import import tl, triton

BLOCK_M = 16  # tokens of one slot per program (tl.dot needs at least 16 rows)
MAX_TOKENS = 256  # batches up to this many tokens take the kernels; larger ones (prefill) the dense path


def pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= n, at least `least`."""
    return max(least, 1 << max(0, n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """a / b rounded up."""
    return -(-a // b)


def max_blocks(num_tokens: int, num_slots: int) -> int:
    """Most token blocks a step can need: each non-empty slot (and the base bucket) adds a partial block."""
    return (num_tokens + min(num_slots + 1, num_tokens) * (BLOCK_M - 1)) // BLOCK_M


@dataclass(frozen=True)
class SlotSegments:
    """A step's tokens grouped by slot (on the device by `segment_tokens`, or on the host for eager steps).

    order: [T] int32, token indices sorted by slot (stable; slot -1 last).
    blocks: [3, max_blocks] int32, rows slot / start / length: block b is tokens order[start : start+length],
        all of one slot (-1 = no adapter); length 0 marks an unused block.
    split_k: whether the shrink may split its input features over programs. Only for fixed shapes (decode
        graphs): the number of splits follows the number of blocks and is compiled into the kernels, so on
        eager steps, whose block counts vary, each new count would stall the step on a Triton compile.
    """

    order: torch.Tensor
    blocks: torch.Tensor
    split_k: bool = True

    @property
    def num_tokens(self) -> int:
        """T, the tokens of the step (padded rows included)."""
        return self.order.shape[0]


def segment_tokens(token_slots: torch.Tensor, num_slots: int) -> SlotSegments:
    """[T] slot per token (-1 = base) -> the tokens grouped into blocks of one slot (one kernel launch)."""
    assert triton is not None and token_slots.dim() == 1 and token_slots.stride(0) == 1
    t = token_slots.shape[0]
    assert 0 < t <= MAX_TOKENS
    nb = max_blocks(t, num_slots)
    order = torch.empty(t, dtype=torch.int32, device=token_slots.device)
    blocks = torch.empty(3, nb, dtype=torch.int32, device=token_slots.device)
    _segment_kernel[(1,)](
        token_slots,
        order,
        blocks,
        t,
        num_slots,
        nb,
        T_PAD=pow2(t),
        S_PAD=pow2(num_slots + 2),
        J_PAD=pow2(cdiv(t, BLOCK_M)),
        NB_PAD=pow2(nb),
        BLOCK_M=BLOCK_M,
    )
    return SlotSegments(order, blocks)


def host_segments(token_slots: np.ndarray, device: torch.device) -> SlotSegments:
    """[T] slot per token (-1 = base) on the host -> the tokens grouped by slot, in the kernels' format.

    Like `segment_tokens` (blocks of up to BLOCK_M tokens of one slot, `order` listing every token), except
    that base tokens get no block at all: the shrink and expand only touch tokens in adapter blocks.
    """
    t = token_slots.shape[0]
    key = np.where(token_slots < 0, np.iinfo(np.int64).max, token_slots.astype(np.int64))
    order = np.argsort(key, kind="stable")  # by slot, base tokens last, ties in token order
    ordered = token_slots[order]
    adapted = int(np.count_nonzero(ordered >= 0))
    cuts = np.flatnonzero(np.diff(ordered[:adapted])) + 1  # where a new slot's run begins
    run_start = np.concatenate([[0], cuts]).astype(np.int64)
    run_end = np.concatenate([cuts, [adapted]]).astype(np.int64)
    per_run = -(-(run_end - run_start) // BLOCK_M)  # blocks per run
    run_of = np.repeat(np.arange(per_run.shape[0]), per_run)
    within = np.arange(run_of.shape[0]) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    start = run_start[run_of] + within * BLOCK_M
    blocks = np.stack([ordered[run_start[run_of]], start, np.minimum(BLOCK_M, run_end[run_of] - start)])
    packed = np.concatenate([order, blocks.reshape(-1)]).astype(np.int32)
    on_device = torch.from_numpy(packed).to(device)  # one copy for both
    return SlotSegments(on_device[:t], on_device[t:].view(3, -1), split_k=False)


if triton is not None:

    @triton.jit
    def _segment_kernel(
        slots_ptr,
        order_ptr,
        blocks_ptr,
        num_tokens,
        num_slots,
        num_blocks,
        T_PAD: tl.constexpr,
        S_PAD: tl.constexpr,
        J_PAD: tl.constexpr,
        NB_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        # key: the slot, num_slots for base tokens (-1), num_slots + 1 for padding lanes
        p = tl.arange(0, T_PAD)
        slot = tl.load(slots_ptr + p, mask=p < num_tokens, other=-1).to(tl.int32)
        key = tl.where(p < num_tokens, tl.where(slot < 0, num_slots, slot), num_slots + 1)
        ranked = tl.sort(key * T_PAD + p)  # sorted by key, ties by token index
        tl.store(order_ptr + p, ranked % T_PAD, mask=p < num_tokens)
        counts = tl.histogram(key, S_PAD)  # [S_PAD] tokens per key
        starts = tl.cumsum(counts, 0) - counts  # first position of each key in `order`
        s = tl.arange(0, S_PAD)
        nblk = tl.where(s <= num_slots, (counts + BLOCK_M - 1) // BLOCK_M, 0)
        first_block = tl.cumsum(nblk, 0) - nblk
        j = tl.arange(0, J_PAD)
        valid = j[None, :] < nblk[:, None]  # [S_PAD, J_PAD]: block j of key s exists
        b = first_block[:, None] + j[None, :]
        slot_of = tl.where(s == num_slots, -1, s)[:, None] + 0 * j[None, :]
        tl.store(blocks_ptr + b, slot_of, mask=valid)
        tl.store(blocks_ptr + num_blocks + b, starts[:, None] + j[None, :] * BLOCK_M, mask=valid)
        length = tl.minimum(counts[:, None] - j[None, :] * BLOCK_M, BLOCK_M)
        tl.store(blocks_ptr + 2 * num_blocks + b, length, mask=valid)
        used = tl.sum(nblk, 0)
        rest = tl.arange(0, NB_PAD)
        tl.store(blocks_ptr + 2 * num_blocks + rest, 0 * rest, mask=(rest >= used) & (rest < num_blocks))
