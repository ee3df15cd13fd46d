"""Turns a scheduled step into tensors, runs the model, and returns logits for the rows that sample."""

from __future__ import annotations

import torch

from kiln_infer.engine.attention import build_attention_metadata
from kiln_infer.engine.llama import LlamaModel, LoraBatch
from kiln_infer.engine.scheduler import ScheduledSeq
from kiln_infer.lora.layers import LoraSlots


class ModelRunner:
    """Owns the model, its KV cache and LoRA slots; one `execute` per engine step."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        lora_slots: LoraSlots,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.lora_slots = lora_slots
        self.device = model.device

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Flat token ids [T], positions [T] and the flat index of each sampling row's last token."""
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for item in batch:
            ids.extend(item.seq.token_ids[item.start : item.start + item.num_tokens])
            positions.extend(range(item.start, item.start + item.num_tokens))
            if item.samples:
                sample_rows.append(len(ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), sample_rows

    def _lora_batch(self, batch: list[ScheduledSeq]) -> LoraBatch | None:
        if all(item.seq.lora_slot < 0 for item in batch):
            return None
        slots = torch.cat(
            [torch.full((item.num_tokens,), item.seq.lora_slot, dtype=torch.long) for item in batch]
        )
        return LoraBatch(self.lora_slots, self.lora_slots.token_mask(slots.to(self.device)))

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run one step; fp32 logits [num sampling rows, vocab] in batch order."""
        input_ids, positions, sample_rows = self.prepare(batch)
        meta = build_attention_metadata(
            [i.start for i in batch],
            [i.num_tokens for i in batch],
            [i.seq.block_table for i in batch],
            self.block_size,
            self.device,
        )
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta, self._lora_batch(batch))
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[rows])
