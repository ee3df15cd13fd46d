"""Decode steps on static, padded buffers: CUDA graphs replayed per batch-size bucket (eager on CPU)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import numpy as np
import torch

from kiln_infer.lora.layers import LoraSlots
from kiln_infer.model.attention import StepMetadata, block_table_array
from kiln_infer.model.llama import LlamaModel, LoraBatch

log = logging.getLogger(__name__)


class StaticDecoder:
    """Runs pure-decode steps of up to max(batch_sizes) sequences with fixed shapes."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora_slots: LoraSlots,
        batch_sizes: tuple[int, ...],
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        use_graphs: bool,
    ) -> None:
        self.model, self.kv_caches, self.lora_slots = model, kv_caches, lora_slots
        self.batch_sizes = sorted(set(batch_sizes))
        self.block_size, self.scratch_slot = block_size, scratch_block * block_size
        self.use_graphs = use_graphs
        n, dev = self.batch_sizes[-1], model.device
        self.max_blocks = max_blocks
        # One byte buffer per staging set, viewed as: rows int64 [5, n] (token ids, positions, cache slots,
        # LoRA slot, source row of a device-side token, -1 = host), context lengths int32 [n], block tables
        # int32 [n, max_blocks]. One host-to-device copy per step moves all of it.
        # Two pinned staging sets, used in turn: with overlapped steps the copy out of one set may still be
        # queued on the GPU while the host fills the other (a set is reused only after its step completed).
        pin = dev.type == "cuda"
        blobs = [torch.zeros(self._blob_bytes(n), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.staging = [(blob, *self._views(blob, n)) for blob in blobs]
        self.num_runs = 0
        self.blob = torch.zeros(self._blob_bytes(n), dtype=torch.uint8, device=dev)
        self.rows, self.lens, self.tables = self._views(self.blob, n)
        self.rows[2].fill_(self.scratch_slot)
        self.lens.fill_(1)
        # the previous step's sampled tokens, read inside the graph where rows[4] >= 0
        self.feedback = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: tuple[int, int] | None = None  # memory pool shared by every captured graph

    def _blob_bytes(self, n: int) -> int:
        return 5 * n * 8 + n * 4 + n * self.max_blocks * 4

    def _views(self, blob: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows int64 [5, n], lens int32 [n], tables int32 [n, max_blocks]) over one byte buffer."""
        a, b = 5 * n * 8, 5 * n * 8 + n * 4
        return (
            blob[:a].view(torch.int64).view(5, n),
            blob[a:b].view(torch.int32),
            blob[b:].view(torch.int32).view(n, self.max_blocks),
        )

    @property
    def max_batch(self) -> int:
        """Largest batch this decoder takes."""
        return self.batch_sizes[-1]

    def _forward(self, bucket: int, with_lora: bool) -> torch.Tensor:
        """The captured computation: logits [bucket, vocab] from the static buffers."""
        host_ids, positions, slots, lora_slots, sources = self.rows[:, :bucket]
        ids = torch.where(sources >= 0, self.feedback[sources.clamp(min=0)], host_ids)
        meta = StepMetadata(slots, bucket, self.tables[:bucket], self.lens[:bucket], None)
        lora = LoraBatch.for_tokens(self.lora_slots, lora_slots) if with_lora else None
        hidden = self.model.forward(ids, positions, self.kv_caches, meta, lora)
        return self.model.logits(hidden)

    def capture(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of `forward` (warmed twice on a side stream) in the memory pool every graph shares."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # type: ignore[assignment]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # type: ignore[arg-type]
            out = forward()
        return graph, out

    def _capture(self, bucket: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, out = self.capture(lambda: self._forward(bucket, with_lora))
        log.info("captured decode graph: batch %d, lora %s", bucket, with_lora)
        return graph, out

    @torch.inference_mode()
    def capture_all(self, with_lora: bool) -> None:
        """Capture every bucket now (largest first, so smaller graphs reuse its memory)."""
        if self.use_graphs:
            for bucket in reversed(self.batch_sizes):
                if (bucket, with_lora) not in self.graphs:
                    self.graphs[(bucket, with_lora)] = self._capture(bucket, with_lora)

    def run(
        self,
        tokens: list[int],
        positions: list[int],
        tables: list[list[int]],
        lora_slots: list[int],
        prev_tokens: torch.Tensor | None = None,
        sources: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits [B, vocab] for B single-token decodes (token at `positions[b]` of sequence b).

        Where sources[b] >= 0 the token is prev_tokens[sources[b]], read on the device (no host round trip).
        """
        b = len(tokens)
        bucket = self.batch_sizes[bisect.bisect_left(self.batch_sizes, b)]
        pos = np.asarray(positions, dtype=np.int64)
        table_a = block_table_array(tables, self.max_blocks)
        host_blob, host_rows, host_lens, host_tables = self.staging[self.num_runs % 2]
        self.num_runs += 1
        rows = host_rows.numpy()
        rows[0, :b], rows[1, :b] = tokens, pos
        rows[2, :b] = table_a[np.arange(b), pos // self.block_size].astype(np.int64) * self.block_size + (
            pos % self.block_size
        )
        rows[3, :b] = lora_slots
        rows[4, :b] = sources if sources is not None else -1
        rows[:, b:bucket] = 0
        rows[2, b:bucket] = self.scratch_slot  # padded rows write their K/V into the scratch block
        rows[3, b:bucket] = -1
        rows[4, b:bucket] = -1
        host_lens.numpy()[:b] = pos + 1
        host_lens.numpy()[b:bucket] = 1
        host_tables.numpy()[:b] = table_a
        host_tables.numpy()[b:bucket] = 0
        self.blob.copy_(host_blob, non_blocking=True)
        self.feed(prev_tokens, sources)
        with_lora = any(s >= 0 for s in lora_slots)
        return self.replay(self.graphs, (bucket, with_lora), self._capture, self._forward)[:b]

    def feed(self, prev_tokens: torch.Tensor | None, sources: list[int] | None) -> None:
        """Queue the previous step's sampled tokens into `feedback`, where this step's inputs read them."""
        if prev_tokens is not None and sources is not None:
            self.feedback[: len(prev_tokens)].copy_(prev_tokens, non_blocking=True)

    def replay(
        self,
        graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]],
        key: tuple[int, bool],
        capture: Callable[[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]],
        forward: Callable[[int, bool], torch.Tensor],
    ) -> torch.Tensor:
        """`forward(*key)`'s output: its graph in `graphs` replayed (captured at first use), else run eagerly.

        Shared by the decode and the mixed-step paths (`mixed_graphs.py`), whose graphs share one pool.
        """
        if not self.use_graphs:
            return forward(*key)
        if key not in graphs:
            graphs[key] = capture(*key)
        graph, out = graphs[key]
        graph.replay()
        return out
