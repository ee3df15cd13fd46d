"""Turns a scheduled step into tensors, runs the model, and returns logits for the rows that sample."""

from __future__ import annotations

import numpy as np
import torch

from kiln_infer.engine.decode_graphs import StaticDecoder
from kiln_infer.engine.mixed_graphs import StaticMixed
from kiln_infer.engine.scheduler import ScheduledSeq
from kiln_infer.lora.layers import LoraBatch, LoraSlots
from kiln_infer.model.attention import build_step_metadata
from kiln_infer.model.llama import LlamaModel


class ModelRunner:
    """Owns the model, its KV cache and LoRA slots; one `execute` per engine step."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        lora_slots: LoraSlots,
        decoder: StaticDecoder | None,
        mixed: StaticMixed | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.lora_slots = lora_slots
        self.decoder = decoder  # static-shape decode path (CUDA graphs), None = always eager
        self.mixed = mixed  # static-shape steps with prefill chunks, None = those run eagerly
        self.device = model.device

    def static_path(self, batch: list[ScheduledSeq]) -> str | None:
        """The static-shape path (CUDA graphs) that takes the batch: "decode", "mixed", or None (eager).

        Both static paths can read input tokens still on the device (`execute`'s `sources`).
        """
        if self.decoder is None:
            return None
        if len(batch) <= self.decoder.max_batch and all(item.num_tokens == 1 for item in batch):
            return "decode"
        starts, lengths = [item.start for item in batch], [item.num_tokens for item in batch]
        with_lora = any(item.seq.lora_slot >= 0 for item in batch)
        if self.mixed is not None and self.mixed.fits(starts, lengths, with_lora):
            return "mixed"
        return None

    @torch.inference_mode()
    def execute(
        self,
        batch: list[ScheduledSeq],
        prev_tokens: torch.Tensor | None = None,
        sources: list[int] | None = None,
    ) -> torch.Tensor:
        """Run one step (single-token items first); model-dtype logits [sampling items, vocab], batch order.

        With `sources`, row b's input token is prev_tokens[sources[b]] (still on the device) where >= 0.
        """
        sampling = [i for i, item in enumerate(batch) if item.samples]
        path = self.static_path(batch)
        if path == "decode":
            assert self.decoder is not None
            logits = self.decoder.run(
                [item.seq.token_ids[item.start] for item in batch],
                [item.start for item in batch],
                [item.seq.block_table for item in batch],
                [item.seq.lora_slot for item in batch],
                prev_tokens,
                sources,
            )
            return logits if len(sampling) == len(batch) else logits[sampling]
        assert sources is None or path == "mixed", "tokens still on the device need a static path"
        ids = np.fromiter(
            (t for item in batch for t in item.seq.token_ids[item.start : item.start + item.num_tokens]),
            dtype=np.int64,
        )
        lengths = np.array([item.num_tokens for item in batch], dtype=np.int64)
        starts = np.array([item.start for item in batch], dtype=np.int64)
        positions = (
            np.repeat(starts, lengths)
            + np.arange(lengths.sum())
            - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        lora_slots = [item.seq.lora_slot for item in batch]
        tables = [item.seq.block_table for item in batch]
        if path == "mixed":
            assert self.mixed is not None
            hidden = self.mixed.run(ids, positions, lengths, tables, lora_slots, prev_tokens, sources)
        else:
            hidden = self._eager(batch, ids, positions, starts, lengths, tables)
        last = torch.from_numpy(np.cumsum(lengths) - 1)[sampling].to(self.device)
        return self.model.logits(hidden[last])

    def _eager(
        self,
        batch: list[ScheduledSeq],
        ids: np.ndarray,
        positions: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        tables: list[list[int]],
    ) -> torch.Tensor:
        """Final hidden states of a step run op by op (prefill chunks through SDPA)."""
        num_decode = next((i for i, item in enumerate(batch) if item.num_tokens > 1), len(batch))
        meta = build_step_metadata(
            starts.tolist(), lengths.tolist(), tables, num_decode, self.block_size, self.device
        )
        return self.model.forward(
            torch.from_numpy(ids).to(self.device),
            torch.from_numpy(positions).to(self.device),
            self.kv_caches,
            meta,
            self._lora_batch(batch),
        )

    def _lora_batch(self, batch: list[ScheduledSeq]) -> LoraBatch | None:
        if all(item.seq.lora_slot < 0 for item in batch):
            return None
        slots = np.repeat([item.seq.lora_slot for item in batch], [item.num_tokens for item in batch])
        return LoraBatch.for_host_tokens(self.lora_slots, slots, self.device)
