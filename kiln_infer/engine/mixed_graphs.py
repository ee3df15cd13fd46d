"""Steps that carry prefill chunks, on static padded buffers: CUDA graphs per token bucket (eager on CPU).

An eager step with a prefill chunk in it launches a few hundred kernels from Python and gathers each
chunk's context for SDPA; on the H200 that took 13-23 ms whatever the chunk's size, while a graphed decode
step of 32 sequences took 2.5 ms, and every stream decoding beside the chunk waited for it. Here every token
of such a step is one row of the paged decode-attention kernel: its K/V are written to the cache first, then
it attends to positions 0..p of its own sequence (the causal mask of a prefill, row by row). With the
metadata on the device, one graph per token bucket covers any mix of decodes and chunks.

That kernel reads a token's whole context for each row, which is cheap for the short chunks of interactive
traffic and not for long ones: steps whose rows' contexts add up to more than `context_budget` positions
(a 2,000-token prompt, say) stay on the eager path and its flash attention.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from kiln_infer.engine.decode_graphs import StaticDecoder
from kiln_infer.kernels.lora_segments import MAX_TOKENS
from kiln_infer.lora.layers import LoraSlots
from kiln_infer.model.attention import StepMetadata, block_table_array
from kiln_infer.model.llama import LoraBatch

log = logging.getLogger(__name__)
ROWS = 6  # int64 rows per token in the staging buffers
CONTEXT_BUDGET = 128 * 1024  # most context positions (summed over a step's tokens) a graphed step reads


class StaticMixed:
    """Runs steps of up to max(token_sizes) tokens from up to `max_rows` sequences with fixed shapes."""

    def __init__(
        self,
        decoder: StaticDecoder,
        lora_slots: LoraSlots,
        token_sizes: tuple[int, ...],
        max_rows: int,
        context_budget: int = CONTEXT_BUDGET,
    ) -> None:
        # the decoder's model, cache, scratch block and graph memory pool are shared
        self.decoder, self.model, self.lora_slots = decoder, decoder.model, lora_slots
        self.token_sizes = sorted(set(token_sizes))
        self.max_rows, self.context_budget = max_rows, context_budget
        self.max_blocks = decoder.max_blocks
        dev = self.model.device
        # one byte buffer per staging set, viewed as rows int64 [6, n] (token ids, positions, cache slots,
        # LoRA slot, sequence row of the token, source row of a token still on the device or -1), context
        # lengths int32 [n], block tables int32 [rows, width], where n is the largest bucket
        pin = dev.type == "cuda"
        blobs = [torch.zeros(self._blob_bytes(), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.staging = [(blob, *self._views(blob)) for blob in blobs]
        self.blob = torch.zeros(self._blob_bytes(), dtype=torch.uint8, device=dev)
        self.rows, self.lens, self.tables = self._views(self.blob)
        self.rows[2].fill_(decoder.scratch_slot)
        self.lens.fill_(1)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_runs = 0
        self.num_overlapped = 0  # runs that read some input token from the previous step on the device

    def _blob_bytes(self) -> int:
        n = self.token_sizes[-1]
        return ROWS * n * 8 + n * 4 + self.max_rows * self.max_blocks * 4

    def _views(self, blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.token_sizes[-1]
        a, b = ROWS * n * 8, ROWS * n * 8 + n * 4
        return (
            blob[:a].view(torch.int64).view(ROWS, n),
            blob[a:b].view(torch.int32),
            blob[b:].view(torch.int32).view(self.max_rows, self.max_blocks),
        )

    def _largest(self, with_lora: bool) -> int:
        """Largest bucket for steps with or without adapters (the LoRA kernels group at most MAX_TOKENS)."""
        sizes = [t for t in self.token_sizes if t <= MAX_TOKENS] if with_lora else self.token_sizes
        return sizes[-1] if sizes else 0

    def fits(self, starts: list[int], lengths: list[int], with_lora: bool) -> bool:
        """Whether a step of chunks [start, start + length) of len(starts) sequences can take this path."""
        # context positions the step reads: sum over its tokens of (position + 1)
        context = sum(n * s + n * (n + 1) // 2 for s, n in zip(starts, lengths, strict=True))
        return (
            sum(lengths) <= self._largest(with_lora)
            and len(starts) <= self.max_rows
            and context <= self.context_budget
        )

    def _forward(self, bucket: int, with_lora: bool) -> torch.Tensor:
        """The captured computation: final hidden states [bucket, hidden] from the static buffers."""
        host_ids, positions, slots, lora_slots, seq_rows, sources = self.rows[:, :bucket]
        feedback = self.decoder.feedback  # the previous step's sampled tokens, shared with the decoder
        ids = torch.where(sources >= 0, feedback[sources.clamp(min=0)], host_ids)
        tables = self.tables[seq_rows]  # [bucket, width]: each token reads its own sequence's blocks
        meta = StepMetadata(slots, bucket, tables, self.lens[:bucket], None)
        lora = LoraBatch.for_tokens(self.lora_slots, lora_slots) if with_lora else None
        return self.model.forward(ids, positions, self.decoder.kv_caches, meta, lora)

    @torch.inference_mode()
    def capture_all(self, with_lora: bool) -> None:
        """Capture every bucket now (largest first, so smaller graphs reuse its memory)."""
        if self.decoder.use_graphs:
            for bucket in reversed(self.token_sizes):
                if bucket <= self._largest(with_lora) and (bucket, with_lora) not in self.graphs:
                    self.graphs[(bucket, with_lora)] = self._capture(bucket, with_lora)

    def _capture(self, bucket: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, out = self.decoder.capture(lambda: self._forward(bucket, with_lora))
        log.info("captured mixed-step graph: %d tokens, lora %s", bucket, with_lora)
        return graph, out

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        lengths: np.ndarray,
        tables: list[list[int]],
        lora_slots: list[int],
        prev_tokens: torch.Tensor | None = None,
        sources: list[int] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] for the T tokens `ids` at `positions`, `lengths[r]` of sequence r.

        The caller checked `fits`; sequence r owns block table `tables[r]` and LoRA slot `lora_slots[r]`.
        Where sources[r] >= 0, sequence r's first token is prev_tokens[sources[r]], read on the device.
        """
        t, r = len(ids), len(lengths)
        with_lora = any(s >= 0 for s in lora_slots)
        bucket = self.token_sizes[bisect.bisect_left(self.token_sizes, t)]
        table_a = block_table_array(tables, self.max_blocks)
        seq_rows = np.repeat(np.arange(r), lengths)
        host_blob, host_rows, host_lens, host_tables = self.staging[self.num_runs % 2]
        self.num_runs += 1
        rows = host_rows.numpy()
        block_size = self.decoder.block_size
        rows[0, :t], rows[1, :t], rows[4, :t] = ids, positions, seq_rows
        rows[2, :t] = table_a[seq_rows, positions // block_size].astype(np.int64) * block_size + (
            positions % block_size
        )
        rows[3, :t] = np.repeat(lora_slots, lengths)
        rows[5, :t] = -1
        if sources is not None:
            rows[5, np.cumsum(lengths) - lengths] = sources
            self.num_overlapped += max(sources) >= 0
        rows[:, t:bucket] = 0  # padding tokens: base weights, row 0's first block, K/V to the scratch block
        rows[2, t:bucket] = self.decoder.scratch_slot
        rows[3, t:bucket] = -1
        rows[5, t:bucket] = -1
        unresolved = (rows[0, :t] < 0) & (rows[5, :t] < 0)
        assert not unresolved.any(), "a token still on the device without the row it comes from"
        host_lens.numpy()[:t] = positions + 1
        host_lens.numpy()[t:bucket] = 1
        host_tables.numpy()[:r] = table_a
        self.blob.copy_(host_blob, non_blocking=True)
        self.decoder.feed(prev_tokens, sources)
        return self.decoder.replay(self.graphs, (bucket, with_lora), self._capture, self._forward)[:t]
