"""Decides each step which sequences run and how many tokens each computes (token budget, chunked prefill)."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

from kiln_infer.engine.block_manager import BlockManager
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.sequence import Sequence, SequenceStatus
from kiln_infer.lora.adapter_manager import AdapterManager

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute tokens [start, start + num_tokens)."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so the step samples a new one."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


def queue_key(seq: Sequence) -> tuple[bool, str]:
    """The waiting queue a sequence joins: background requests queue apart from the others."""
    return seq.background, seq.adapter_key


def step_order(seq: Sequence) -> tuple[bool, float]:
    """Running sequences' order: users' before background ones (which are preempted first), oldest first."""
    return seq.background, seq.arrival


class Scheduler:
    """Running sequences first (oldest first, background ones last), then waiting ones round-robin across
    adapters, background requests only when no other request waits."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, adapters: AdapterManager) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.running: list[Sequence] = []
        # Waiting sequences per (background, adapter key); the dict order is the round-robin order.
        self.waiting: OrderedDict[tuple[bool, str], deque[Sequence]] = OrderedDict()
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a sequence (preempted ones go to the front of their adapter's queue)."""
        seq.status = SequenceStatus.WAITING
        q = self.waiting.setdefault(queue_key(seq), deque())
        q.appendleft(seq) if front else q.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and free its blocks and adapter slot at once."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        else:
            q = self.waiting.get(queue_key(seq))
            if q is not None and seq in q:
                q.remove(seq)
                if not q:
                    del self.waiting[queue_key(seq)]

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.lora_slot >= 0:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV blocks and requeue it (prefix caching may revive them)."""
        log.debug("preempting %s", seq.request_id)
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        self.add(seq, front=True)

    def schedule(self) -> list[ScheduledSeq]:
        """Pick this step's work within the token budget and the KV blocks available."""
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        self.running.sort(key=step_order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 1 and seq.num_computed_tokens < len(seq.block_table) * self.blocks.block_size:
                out.append(ScheduledSeq(seq, seq.num_computed_tokens, 1))  # decode into its last block
                budget -= 1
                i += 1
                continue
            while not self.blocks.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq, n)
                out.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1
        self._admit(out, budget)
        return out

    def _admit(self, out: list[ScheduledSeq], budget: int) -> None:
        """Move waiting sequences into the running set, one per adapter in turn (background ones only when
        no other can be admitted, and no more running at once than `max_background_seqs`)."""
        stalled: set[tuple[bool, str]] = set()
        cap = self.config.max_background_seqs
        background = sum(s.background for s in self.running) if cap is not None else 0
        while (
            budget > 0 and len(self.running) < self.config.max_num_seqs and len(stalled) < len(self.waiting)
        ):
            ready = [k for k in self.waiting if k not in stalled]
            key = next((k for k in ready if not k[0]), ready[0])
            if key[0] and cap is not None and background >= cap:
                stalled.update(k for k in ready if k[0])  # as many background requests run as may
                continue
            q = self.waiting[key]
            seq = q[0]
            if seq.lora is not None and not self.adapters.can_acquire(seq.lora.key):
                stalled.add(key)
                continue
            self.blocks.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if (
                n < seq.num_uncomputed and not self.config.enable_chunked_prefill
            ) or not self.blocks.can_append(seq, n):
                self.blocks.free(seq)
                break
            q.popleft()
            self.waiting.move_to_end(key)  # round-robin: this adapter goes to the back of the line
            if not q:
                del self.waiting[key]
            if seq.lora is not None:
                slot = self.adapters.acquire(seq.lora)
                assert slot is not None
                seq.lora_slot = slot
            self.blocks.append(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
            background += seq.background

    def finish(self, seq: Sequence) -> None:
        """Retire a finished running sequence."""
        self.remove(seq)
        seq.status = SequenceStatus.FINISHED
