"""The engine loop body, single-threaded: `step` = schedule → prepare → run → sample → postprocess."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kiln_common.gpu_turn import ServingTurn
from kiln_infer.engine.block_manager import BlockManager
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.decode_graphs import StaticDecoder
from kiln_infer.engine.kv_cache import allocate_kv_cache, num_kv_blocks
from kiln_infer.engine.mixed_graphs import StaticMixed
from kiln_infer.engine.model_runner import ModelRunner
from kiln_infer.engine.output_processor import OutputProcessor
from kiln_infer.engine.sampler import PendingSample, SamplingBatch, sample_async
from kiln_infer.engine.scheduler import ScheduledSeq, Scheduler
from kiln_infer.engine.sequence import Sequence, SequenceStatus
from kiln_infer.engine.types import FinishReason
from kiln_infer.kernels.backend import select_kernels
from kiln_infer.lora.adapter_manager import AdapterManager
from kiln_infer.lora.layers import LoraSlots
from kiln_infer.model.llama import LlamaModel

log = logging.getLogger(__name__)
SLOW_STEP_S = 0.5  # an engine step longer than this is logged with where its time went

PLACEHOLDER = -1  # a sampled token still on the device


@dataclass
class InflightStep:
    """A launched step whose sampled tokens have not been processed on the host yet."""

    batch: list[ScheduledSeq]
    sampled: list[tuple[Sequence, int]]  # (sequence, index in token_ids) per sampled row
    pending: PendingSample
    row_of: dict[int, int]  # id(sequence) -> row in pending.tokens


def _static_paths(
    config: EngineConfig,
    model: LlamaModel,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    slots: LoraSlots,
    scratch_block: int,
) -> tuple[StaticDecoder | None, StaticMixed | None]:
    """The static-shape step paths the config asks for (CUDA graphs on a GPU): decode steps, mixed steps."""
    on_cuda = model.device.type == "cuda"
    if not (config.static_decode if config.static_decode is not None else on_cuda):
        return None, None
    sizes = tuple(b for b in config.cuda_graph_batch_sizes if b < config.max_num_seqs) + (
        config.max_num_seqs,
    )
    decoder = StaticDecoder(
        model,
        kv,
        slots,
        sizes,
        config.blocks_per_seq,
        config.block_size,
        scratch_block,
        use_graphs=on_cuda and config.use_cuda_graphs,
    )
    mixed = None
    if config.cuda_graph_token_sizes:
        mixed = StaticMixed(decoder, slots, config.cuda_graph_token_sizes, config.max_num_seqs)
    return decoder, mixed


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
        # Triton or torch kernels, chosen once here and handed down to the model and the LoRA slots
        kernels = select_kernels(state["model.embed_tokens.weight"].device)
        self.model = LlamaModel(model_config, state, max_positions=config.max_model_len, kernels=kernels)
        m = self.model
        blocks = num_kv_blocks(config, len(m.layers), m.num_kv_heads, m.head_dim, m.dtype, m.device)
        # one extra scratch block at index `blocks`: padded decode rows write there, no sequence owns it
        kv = allocate_kv_cache(
            blocks + 1, config.block_size, len(m.layers), m.num_kv_heads, m.head_dim, m.dtype, m.device
        )
        slots = LoraSlots(
            len(m.layers),
            m.lora_shapes(),
            config.max_lora_slots,
            config.max_lora_rank,
            m.dtype,
            m.device,
            kernels,
        )
        self.adapters = AdapterManager(slots, config.max_cpu_loras)
        self.blocks = BlockManager(blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        decoder, mixed = _static_paths(config, m, kv, slots, blocks)
        self.runner = ModelRunner(m, kv, config.block_size, slots, decoder, mixed)
        self.outputs = OutputProcessor(tokenizer, eos_token_ids, config.max_model_len)
        self.overlap = decoder is not None and config.overlap_steps
        self.inflight: InflightStep | None = None
        self.phase_s = {"schedule": 0.0, "launch": 0.0, "host": 0.0}  # cumulative seconds, for the benchmark
        self.live: dict[str, Sequence] = {}  # request id -> unfinished sequence
        self.num_steps = 0
        self.num_finished = 0
        self.num_deadlines = 0  # live requests with a deadline (expire() is skipped when none)
        self.on_finished = on_finished  # called once per finished request, before its stream ends
        # serving's turn on a shared GPU (kiln_common/gpu_turn.py), marked around every launch once set
        self.turn: ServingTurn | None = None

    def add(self, seq: Sequence) -> None:
        """Admit a sequence to the waiting queue."""
        self.live[seq.request_id] = seq
        if seq.request.deadline is not None:
            self.num_deadlines += 1
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Finish a request as ABORTED and free its blocks and slot now."""
        seq = self.live.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORTED)
            OutputProcessor.emit(seq)

    def expire(self, now: float) -> None:
        """Abort every request whose deadline has passed; end those that waited too long to start."""
        limit = self.config.max_queue_time_s
        if limit is not None:
            for seq in [s for q in self.scheduler.waiting.values() for s in q if now - s.queued_at > limit]:
                if seq.num_computed_tokens == 0:  # a preempted sequence that already ran keeps its place
                    self._finish(seq, FinishReason.QUEUE_TIMEOUT)
                    OutputProcessor.emit(seq)
        if not self.num_deadlines:
            return
        for seq in [
            s for s in self.live.values() if s.request.deadline is not None and s.request.deadline < now
        ]:
            self.abort(seq.request_id)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self.live) or self.inflight is not None

    def step(self) -> int:
        """One iteration: schedule → prepare → run → sample, then the host work of the previous step.

        In steady decoding the next step is launched before the previous one's tokens reach the host: its
        inputs come from the device, and detokenizing / streaming overlaps the GPU. A sequence that turns out
        to have finished wastes at most that one extra row.
        """
        t0 = time.perf_counter()
        self.expire(time.monotonic())
        batch = self.scheduler.schedule()
        if any(item.num_tokens > 1 for item in batch):  # single-token rows first: the decode attention path
            batch.sort(key=lambda item: item.num_tokens > 1)
        prev, self.inflight = self.inflight, None
        t1 = time.perf_counter()
        self.phase_s["schedule"] += t1 - t0
        if prev is not None and not (batch and self._can_overlap(batch)):
            self._complete(prev)
            prev = None
            batch = [item for item in batch if not item.seq.is_finished]
        t2 = time.perf_counter()
        if batch:
            with self.turn.launching() if self.turn is not None else contextlib.nullcontext():
                self.inflight = self._launch(batch, prev)
            self.num_steps += 1
        t3 = time.perf_counter()
        if prev is not None:
            self._complete(prev)
        self.phase_s["launch"] += t3 - t2
        t4 = time.perf_counter()
        self.phase_s["host"] += (t2 - t1) + (t4 - t3)
        if t4 - t0 > SLOW_STEP_S:  # a stall every request in flight feels: say where it went
            ms = [round(1e3 * d) for d in (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)]
            tokens, adapted = sum(i.num_tokens for i in batch), sum(i.seq.lora_slot >= 0 for i in batch)
            log.warning(
                "slow step: %d ms (schedule %d, complete previous %d, launch %d, host %d) for %d rows, "
                "%d tokens, %d with an adapter",
                *ms,
                len(batch),
                tokens,
                adapted,
            )
        return sum(item.num_tokens for item in batch)

    def _can_overlap(self, batch: list[ScheduledSeq]) -> bool:
        """Whether `batch` can run before the previous step's tokens are on the host."""
        return (
            self.overlap
            and all(
                item.seq.request.sampling.repetition_penalty == 1.0
                and not item.seq.request.sampling.uses_output_penalties
                for item in batch
            )
            and self.runner.static_path(batch) is not None
        )

    def _launch(self, batch: list[ScheduledSeq], prev: InflightStep | None) -> InflightStep:
        sources = None
        if prev is not None:  # tokens still on the device come from the previous step's sampled rows
            sources = [
                prev.row_of[id(item.seq)] if item.seq.token_ids[item.start] == PLACEHOLDER else -1
                for item in batch
            ]
        logits = self.runner.execute(batch, prev.pending.tokens if prev is not None else None, sources)
        seqs = [item.seq for item in batch if item.samples]
        params = [s.request.sampling for s in seqs]
        steps = [len(s.token_ids) for s in seqs]
        pending = sample_async(
            logits,
            SamplingBatch(
                params=params,
                seeds=[s.seed for s in seqs],
                steps=steps,
                history=[
                    s.token_ids if p.repetition_penalty != 1.0 else []
                    for s, p in zip(seqs, params, strict=True)
                ],
                outputs=[
                    s.output_ids if p.uses_output_penalties else [] for s, p in zip(seqs, params, strict=True)
                ],
            ),
        )
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
        for seq in seqs:
            seq.token_ids.append(PLACEHOLDER)
        sampled = list(zip(seqs, steps, strict=True))  # each row's placeholder sits at index `step`
        return InflightStep(batch, sampled, pending, {id(seq): row for row, seq in enumerate(seqs)})

    def _complete(self, step: InflightStep) -> None:
        """Host side of a finished step: resolve its tokens, stream them, retire finished sequences."""
        result = step.pending.result()
        now = time.monotonic()
        accept, emit, finished = self.outputs.accept, self.outputs.emit, SequenceStatus.FINISHED
        for (seq, index), token, lp in zip(step.sampled, result.token_ids, result.logprobs, strict=True):
            if seq.status is finished:
                continue
            reason = accept(seq, index, token, lp)
            if reason is not None:
                self._finish(seq, reason)
            emit(seq, now)
        block_size = self.config.block_size
        for item in step.batch:
            seq = item.seq
            # only sequences that completed a block since their last registration have anything to hash
            if seq.num_computed_tokens >= (seq.num_hashed_blocks + 1) * block_size and not seq.is_finished:
                self.blocks.register_computed(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self.live.pop(seq.request_id, None)
        if seq.request.deadline is not None:
            self.num_deadlines -= 1
        self.num_finished += 1
        self.on_finished()

    def fail_all(self) -> None:
        """End every live request (used when a step raised)."""
        self.inflight = None
        for request_id in list(self.live):
            self.abort(request_id)
