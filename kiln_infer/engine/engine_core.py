"""The engine loop body, single-threaded: `step` = schedule → prepare → run → sample → postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kiln_infer.engine.block_manager import BlockManager
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.detokenizer import Detokenizer, find_stop, streamable_text
from kiln_infer.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from kiln_infer.engine.llama import LlamaModel
from kiln_infer.engine.model_runner import ModelRunner
from kiln_infer.engine.sampler import SamplingBatch, sample
from kiln_infer.engine.scheduler import ScheduledSeq, Scheduler
from kiln_infer.engine.sequence import Sequence
from kiln_infer.engine.types import FinishReason, RequestOutput
from kiln_infer.lora.adapter_manager import AdapterManager
from kiln_infer.lora.layers import LoraSlots

log = logging.getLogger(__name__)


class EngineCore:
    """Owns model, KV cache, scheduler and adapters; every method runs on the engine thread."""

    def __init__(
        self,
        model_config: PretrainedConfig,
        state: dict[str, torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        eos_token_ids: set[int],
        on_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.model = LlamaModel(model_config, state, max_positions=config.max_model_len)
        m = self.model
        blocks = num_kv_blocks(config, len(m.layers), m.num_kv_heads, m.head_dim, m.dtype, m.device)
        kv = allocate_kv_cache(
            blocks, config.block_size, len(m.layers), m.num_kv_heads, m.head_dim, m.dtype, m.device
        )
        slots = LoraSlots(
            len(m.layers), m.lora_shapes(), config.max_lora_slots, config.max_lora_rank, m.dtype, m.device
        )
        self.adapters = AdapterManager(slots, config.max_cpu_loras)
        self.blocks = BlockManager(blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        self.runner = ModelRunner(m, kv, config.block_size, slots)
        self.detokenizer = Detokenizer(tokenizer)
        self.live: dict[str, Sequence] = {}  # request id -> unfinished sequence
        self.num_steps = 0
        self.num_finished = 0
        self.on_finished = on_finished  # called once per finished request, before its stream ends

    def add(self, seq: Sequence) -> None:
        """Admit a sequence to the waiting queue."""
        self.live[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Finish a request as ABORTED and free its blocks and slot now."""
        seq = self.live.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORTED)
            self._emit(seq)

    def expire(self, now: float) -> None:
        """Abort every request whose deadline has passed."""
        for seq in [
            s for s in self.live.values() if s.request.deadline is not None and s.request.deadline < now
        ]:
            self.abort(seq.request_id)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.live)

    def step(self) -> int:
        """One engine iteration; returns the number of tokens computed."""
        self.expire(time.monotonic())
        batch = self.scheduler.schedule()
        if not batch:
            return 0
        logits = self.runner.execute(batch)
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            self.blocks.register_computed(item.seq)
        self._postprocess([item for item in batch if item.samples], logits)
        self.num_steps += 1
        return sum(item.num_tokens for item in batch)

    def _postprocess(self, sampling: list[ScheduledSeq], logits: torch.Tensor) -> None:
        seqs = [item.seq for item in sampling]
        batch = SamplingBatch(
            params=[s.request.sampling for s in seqs],
            seeds=[s.seed for s in seqs],
            steps=[len(s.token_ids) for s in seqs],
            history=[s.token_ids if s.request.sampling.repetition_penalty != 1.0 else [] for s in seqs],
        )
        result = sample(logits, batch)
        for seq, token, lp in zip(seqs, result.token_ids, result.logprobs, strict=True):
            seq.token_ids.append(token)
            seq.pending_ids.append(token)
            if lp is not None:
                seq.pending_logprobs.append(lp)
            delta = self.detokenizer.append(seq)
            params = seq.request.sampling
            stop_at = find_stop(seq, len(delta))
            if stop_at >= 0:
                seq.text = seq.text[:stop_at]
                self._finish(seq, FinishReason.STOP_STRING)
            elif token in self.eos_token_ids and not params.ignore_eos:
                self._finish(seq, FinishReason.STOP)
            elif len(seq.output_ids) >= params.max_tokens or len(seq.token_ids) >= self.config.max_model_len:
                self._finish(seq, FinishReason.LENGTH)
            self._emit(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self.live.pop(seq.request_id, None)
        self.num_finished += 1
        self.on_finished()

    def _emit(self, seq: Sequence) -> None:
        """Push the sequence's new tokens and text to its stream (the final output carries the reason)."""
        text = streamable_text(seq)
        if not (seq.pending_ids or text or seq.is_finished):
            return
        seq.outputs.put(
            RequestOutput(
                request_id=seq.request_id,
                token_ids=seq.pending_ids,
                text=text,
                finished=seq.is_finished,
                finish_reason=seq.finish_reason,
                prompt_tokens=seq.num_prompt_tokens,
                completion_tokens=len(seq.output_ids),
                logprobs=seq.pending_logprobs,
            )
        )
        seq.pending_ids, seq.pending_logprobs = [], []
        if seq.is_finished:
            seq.outputs.put(None)

    def fail_all(self) -> None:
        """End every live request (used when a step raised)."""
        for request_id in list(self.live):
            self.abort(request_id)
